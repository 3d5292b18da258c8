"""The chunk table beside the KV buffer, and the compacted working buffer that decode reads.

Semantic chunks (20-40 tokens) do not line up with kernel blocks, so reading the selected
chunks in place reads far more bytes than the retention rate suggests. The selection changes
only at boundaries (ICAC), so there the selected chunks' K/V are gathered once into a
contiguous buffer `[L, B, budget, H_kv, D]`; every decode step until the next boundary reads
that buffer densely, plus the open chunk's tokens in the main buffer.

Working-buffer layout per row: `n_sink` sink slots, then `top_k` selected-chunk slots, then
`n_local` local-chunk slots, each `max_chunk_len` tokens, in ascending position order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from chunkllm_jax.selection import ChunkConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkState:
  chunk_start: jnp.ndarray  # [B, C] int32: first token of each completed chunk
  chunk_end: jnp.ndarray  # [B, C] int32: its boundary (last) token; -1 where empty
  chunk_key: jnp.ndarray  # [Lq, B, C, d_c] float32: k~ at the boundary token, per QK layer
  n_chunks: jnp.ndarray  # [B] int32: completed chunks
  open_start: jnp.ndarray  # [B] int32: first token of the open chunk
  selected: jnp.ndarray  # [B, top_k] or [Lq, B, top_k] int32, -1 where empty
  work_pos: jnp.ndarray  # [Lw, B, W] int32: main-buffer position of each working slot
  work_valid: jnp.ndarray  # [Lw, B, W] bool
  work_k: jnp.ndarray  # [L, B, W, H_kv, D]
  work_v: jnp.ndarray  # [L, B, W, H_kv, D]
  n_selections: jnp.ndarray  # [B] int32: boundaries that re-selected
  retained: jnp.ndarray  # [B] float32: sum over decode steps of (visible / seen)
  overflow: jnp.ndarray  # [B] bool: a chunk was dropped because the table was full

  def replace(self, **kw) -> "ChunkState":
    return dataclasses.replace(self, **kw)


def init_chunk_state(n_layers: int, n_qk: int, batch: int, d_c: int, n_kv: int, head_dim: int, dtype,
                     cfg: ChunkConfig) -> ChunkState:
  C, W = cfg.max_chunks, cfg.budget
  n_sel = 1 if cfg.vote == "sum" else n_qk
  sel_shape = (batch, cfg.top_k) if cfg.vote == "sum" else (n_qk, batch, cfg.top_k)
  return ChunkState(
      chunk_start=jnp.zeros((batch, C), jnp.int32), chunk_end=jnp.full((batch, C), -1, jnp.int32),
      chunk_key=jnp.zeros((n_qk, batch, C, d_c), jnp.float32), n_chunks=jnp.zeros((batch,), jnp.int32),
      open_start=jnp.zeros((batch,), jnp.int32), selected=jnp.full(sel_shape, -1, jnp.int32),
      work_pos=jnp.zeros((n_sel, batch, W), jnp.int32), work_valid=jnp.zeros((n_sel, batch, W), bool),
      work_k=jnp.zeros((n_layers, batch, W, n_kv, head_dim), dtype),
      work_v=jnp.zeros((n_layers, batch, W, n_kv, head_dim), dtype),
      n_selections=jnp.zeros((batch,), jnp.int32), retained=jnp.zeros((batch,), jnp.float32),
      overflow=jnp.zeros((batch,), bool))


def append_chunks(st: ChunkState, closes_B, pos_B, key_LBd) -> ChunkState:
  """Rows where `closes_B` close the open chunk at `pos_B`: it joins the table with its k~."""
  C = st.chunk_end.shape[1]
  full = st.n_chunks >= C
  write = closes_B & ~full
  slot = jnp.minimum(st.n_chunks, C - 1)
  rows = jnp.arange(pos_B.shape[0])
  upd = lambda a, v: a.at[rows, slot].set(jnp.where(write, v, a[rows, slot]))
  key = st.chunk_key.at[:, rows, slot].set(
      jnp.where(write[None, :, None], key_LBd, st.chunk_key[:, rows, slot]))
  return st.replace(
      chunk_start=upd(st.chunk_start, st.open_start), chunk_end=upd(st.chunk_end, pos_B), chunk_key=key,
      n_chunks=st.n_chunks + write, open_start=jnp.where(closes_B, pos_B + 1, st.open_start),
      overflow=st.overflow | (closes_B & full))


def working_positions(st: ChunkState, selected_SBk, cfg: ChunkConfig):
  """Main-buffer positions [S, B, W] and validity of the working slots for a selection."""
  M = cfg.max_chunk_len
  n_sel = selected_SBk.shape[0]
  B = st.n_chunks.shape[0]
  local = st.n_chunks[:, None] - cfg.n_local + jnp.arange(cfg.n_local)[None]  # [B, n_local]
  local = jnp.where(local >= 0, local, -1)
  chunks = jnp.concatenate([selected_SBk, jnp.broadcast_to(local, (n_sel, B, cfg.n_local))], axis=-1)
  safe = jnp.maximum(chunks, 0)
  start = jnp.take_along_axis(st.chunk_start[None].repeat(n_sel, 0), safe, axis=-1)
  end = jnp.take_along_axis(st.chunk_end[None].repeat(n_sel, 0), safe, axis=-1)
  start = jnp.maximum(start, cfg.n_sink)  # sinks are read from their own slots, never twice
  pos = start[..., None] + jnp.arange(M)  # [S, B, slots, M]
  valid = (chunks[..., None] >= 0) & (pos <= end[..., None])
  pos = pos.reshape(n_sel, B, -1)
  valid = valid.reshape(n_sel, B, -1)
  sink_pos = jnp.broadcast_to(jnp.arange(cfg.n_sink, dtype=jnp.int32), (n_sel, B, cfg.n_sink))
  return jnp.concatenate([sink_pos, pos], -1), jnp.concatenate([jnp.ones_like(sink_pos, bool), valid], -1)


def compact(k_LBSKD, v_LBSKD, work_pos_SBW, layer_slot_L):
  """Gathers each layer's working slots from the main buffer: [L, B, W, H_kv, D] x 2."""
  pos_LBW = work_pos_SBW[layer_slot_L]
  idx = jnp.minimum(pos_LBW, k_LBSKD.shape[2] - 1)[..., None, None]
  return jnp.take_along_axis(k_LBSKD, idx, axis=2), jnp.take_along_axis(v_LBSKD, idx, axis=2)
