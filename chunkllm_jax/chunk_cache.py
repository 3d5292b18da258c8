"""The chunk table beside the KV buffer, and the compacted working buffer that decode reads.

Semantic chunks (20-40 tokens) do not line up with kernel blocks, so reading the selected
chunks in place reads far more bytes than the retention rate suggests. The selection changes
only at boundaries (ICAC), so there the selected chunks' K/V are gathered once into a
contiguous buffer `[L, B, budget, H_kv, D]`; every decode step until the next boundary reads
that buffer densely, plus the open chunk's tokens in the main buffer.

Working-buffer layout per row: the `n_sink` sinks, then the selected and the local chunks packed
back to back in ascending position order, then unused slots. Decode reads only the blocks up to
the last used slot, so the bytes read follow the retained tokens, not the worst case.

Sinks are the first `n_sink` positions and belong to no chunk; chunk 0 starts at `n_sink`
(the convention of `boundaries.chunks_from_labels`, which training uses).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.selection import choose, chunk_lengths, last_token_count, local_count, local_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChunkState:
  chunk_start: jnp.ndarray  # [B, C] int32: first token of each completed chunk
  chunk_end: jnp.ndarray  # [B, C] int32: its boundary (last) token; -1 where empty
  chunk_key: jnp.ndarray  # [S, B, C, d_c] float32: k~ at the boundary token, per selection layer
  #                         (d_c = 0 for scorer="attention", which reads the layers' K instead, and for
  #                         the per-head rule, whose heads score the cache itself)
  recent_q: jnp.ndarray  # [S, B, Q, H, D]: the last Q queries of each selection layer, slot = position % Q
  #                        (Q = score_queries for scorer="attention" with the shared rule, else 0)
  recent_qt: jnp.ndarray  # [S, B, Q, d_c] float32: the last Q q~ of each selection layer, slot = position % Q
  #                         (Q = score_queries for scorer="adapter" with the shared rule, else 0)
  n_chunks: jnp.ndarray  # [B] int32: completed chunks
  open_start: jnp.ndarray  # [B] int32: first token of the open chunk
  selected: jnp.ndarray  # [B, C] bool: the chunks the last selection kept (local chunks not included;
  #                        none with the per-head rule, whose heads keep their own)
  work_pos: jnp.ndarray  # [B, W] int32: main-buffer position of each working slot
  work_valid: jnp.ndarray  # [B, W] bool
  work_used: jnp.ndarray  # [B] int32: slots in use (sinks + packed chunks)
  work_k: jnp.ndarray  # [L, B, W, H_kv, D]
  work_v: jnp.ndarray  # [L, B, W, H_kv, D]
  n_selections: jnp.ndarray  # [B] int32: re-selections (boundaries, and refreshes if enabled)
  retained: jnp.ndarray  # [B] float32: sum over decode steps of (visible / seen)
  read_slots: jnp.ndarray  # [B] float32: sum over decode steps of K/V slots a sparse layer read
  overflow: jnp.ndarray  # [B] bool: the table filled, and later chunks were merged into its last one
  # selection="kv_head" with score_estimate="lowrank" (`head_selection.low_rank_keys`), else r = 0:
  # The per-head rule's low-rank keys, for the L' sparse layers alone (`head_selection.low_rank_keys`):
  key_basis: jnp.ndarray  # [L', B, H_kv, D, r] float32: each KV head's basis of its prompt keys
  key_low: jnp.ndarray  # [L', B, H_kv, r + 1, S]: every key's `lowrank_coords` in it (S = 0 before they are built)
  key_sketch: jnp.ndarray  # [L', B, H_kv, score_sketch // 32, S] uint32: every key's `residual_sketch`
  # selection="kv_head" with head_refresh > 1 (else W = 0): each sparse layer's and KV head's read as the
  # heads chose it last (`head_selection.head_slots`), and the steps since they chose (head_refresh: now).
  head_pos: jnp.ndarray  # [L, B, H_kv, W] int32: the position each slot reads
  head_ok: jnp.ndarray  # [L, B, H_kv, W] bool
  head_used: jnp.ndarray  # [L, B, H_kv] int32: slots in use
  head_age: jnp.ndarray  # [B] int32

  def replace(self, **kw) -> "ChunkState":
    return dataclasses.replace(self, **kw)


def working_size(cfg: ChunkConfig, max_len: int, block: int) -> int:
  """Static slots of the working buffer: the most a selection keeps, in whole blocks."""
  return -(-cfg.work_slots(max_len) // block) * block


def init_chunk_state(n_layers: int, n_select: int, batch: int, d_c: int, n_heads: int, n_kv: int, head_dim: int,
                     dtype, cfg: ChunkConfig, W: int) -> ChunkState:
  """An empty state for `cfg`, resolved (`chunk_generation.resolved`: its query window is known)."""
  if cfg.score_queries is None:
    raise ValueError("init_chunk_state needs a resolved ChunkConfig (score_queries set): "
                     "use chunk_generation.resolved(params, ccfg)")
  C = cfg.max_chunks
  Q = cfg.score_queries if cfg.scorer == "attention" and cfg.shares_selection else 0
  Qt = cfg.score_queries if cfg.scorer == "adapter" and cfg.shares_selection else 0
  W_head = W if cfg.keeps_head_choice else 0
  return ChunkState(
      recent_q=jnp.zeros((n_select, batch, Q, n_heads, head_dim), dtype),
      recent_qt=jnp.zeros((n_select, batch, Qt, d_c), jnp.float32),
      chunk_start=jnp.zeros((batch, C), jnp.int32), chunk_end=jnp.full((batch, C), -1, jnp.int32),
      chunk_key=jnp.zeros((n_select, batch, C, d_c), jnp.float32), n_chunks=jnp.zeros((batch,), jnp.int32),
      open_start=jnp.full((batch,), cfg.n_sink, jnp.int32), selected=jnp.zeros((batch, C), bool),
      work_pos=jnp.zeros((batch, W), jnp.int32), work_valid=jnp.zeros((batch, W), bool),
      work_used=jnp.zeros((batch,), jnp.int32), read_slots=jnp.zeros((batch,), jnp.float32),
      work_k=jnp.zeros((n_layers, batch, W, n_kv, head_dim), dtype),
      work_v=jnp.zeros((n_layers, batch, W, n_kv, head_dim), dtype),
      n_selections=jnp.zeros((batch,), jnp.int32), retained=jnp.zeros((batch,), jnp.float32),
      overflow=jnp.zeros((batch,), bool), key_basis=jnp.zeros((n_layers, batch, n_kv, head_dim, 0), jnp.float32),
      key_low=jnp.zeros((n_layers, batch, n_kv, 0, 0), dtype),
      key_sketch=jnp.zeros((n_layers, batch, n_kv, 0, 0), jnp.uint32),
      head_pos=jnp.zeros((n_layers, batch, n_kv, W_head), jnp.int32),
      head_ok=jnp.zeros((n_layers, batch, n_kv, W_head), bool), head_used=jnp.zeros((n_layers, batch, n_kv), jnp.int32),
      head_age=jnp.full((batch,), cfg.head_refresh, jnp.int32))  # the first step chooses


def append_chunks(st: ChunkState, closes_B, pos_B, key_SBd) -> ChunkState:
  """Rows where `closes_B` close the open chunk at `pos_B`: it joins the table with its k~. In a full
  table it joins the last chunk instead (which then ends at `pos_B`, with this k~), as a full prompt
  table does (`boundaries.completed_chunk_ends`): every token stays in a chunk, so a selection of
  every chunk still reads every token."""
  C = st.chunk_end.shape[1]
  full = st.n_chunks >= C
  slot = jnp.minimum(st.n_chunks, C - 1)
  rows = jnp.arange(pos_B.shape[0])
  upd = lambda a, v, where: a.at[rows, slot].set(jnp.where(where, v, a[rows, slot]))
  key = st.chunk_key.at[:, rows, slot].set(
      jnp.where(closes_B[None, :, None], key_SBd, st.chunk_key[:, rows, slot]))
  return st.replace(
      chunk_start=upd(st.chunk_start, st.open_start, closes_B & ~full), chunk_end=upd(st.chunk_end, pos_B, closes_B),
      chunk_key=key, n_chunks=st.n_chunks + (closes_B & ~full), open_start=jnp.where(closes_B, pos_B + 1, st.open_start),
      overflow=st.overflow | (closes_B & full))


def choose_at(st: ChunkState, score_BRC, pos_B, cfg: ChunkConfig):
  """`selection.choose` over the state's candidates for the token at `pos_B` (the sinks, the local
  chunks and the open chunk always read), one choice per row of `score_BRC`: [B, R, C] bool."""
  R = score_BRC.shape[1]
  rows = lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], R))
  n_local = local_count(st.chunk_end, st.n_chunks, pos_B, cfg)
  n_cand = st.n_chunks - n_local
  local = local_tokens(st.chunk_end, st.n_chunks[:, None], n_local[:, None], cfg.n_sink)[:, 0]
  fixed = cfg.n_sink + local + jnp.maximum(pos_B + 1 - st.open_start, 0)
  return choose(score_BRC, rows(n_cand), chunk_lengths(st.chunk_start, st.chunk_end, st.n_chunks), rows(fixed),
                rows(pos_B + 1), cfg)


def working_room(st: ChunkState, pos_B, cfg: ChunkConfig):
  """What the budget leaves after the sinks and the open chunk at `pos_B`, as `choose` counts it: the
  `room_B` of `working_positions` (only the last tokens of the chunks left out can exceed it), or
  None where nothing limits them but the slots."""
  if not (cfg.budgeted and cfg.reads_boundary_tokens):
    return None
  return cfg.budget_tokens(pos_B + 1) - cfg.n_sink - jnp.maximum(pos_B + 1 - st.open_start, 0)


def working_positions(st: ChunkState, selected_BC, cfg: ChunkConfig, W: int, pos_B, room_B=None):
  """Packed working slots for a selection made at `pos_B`: positions [B, W], validity [B, W], and slots used [B].

  The sinks first, then the selected and the local chunks (`local_count` at `pos_B`) back to back in position
  order. With `boundary_tokens`, also the last token of each chunk left out, as many of the newest as
  `last_token_count` allows and fit the W slots and `room_B` (the slots after the sinks that the budget leaves,
  when it sets one). Where the
  chunks read exceed the W slots, the newest W - n_sink of their tokens are kept."""
  C = selected_BC.shape[-1]
  c = jnp.arange(C)
  n_local = local_count(st.chunk_end, st.n_chunks, pos_B, cfg)
  local = (c >= (st.n_chunks - n_local)[:, None]) & (c < st.n_chunks[:, None])
  start, end = st.chunk_start, st.chunk_end
  if cfg.keep == "boundary":  # a selected chunk contributes its boundary token only (SepLLM)
    start = jnp.where(selected_BC & ~local, end, start)
  read = selected_BC | local
  if cfg.reads_boundary_tokens:  # the chunks left out contribute their last token
    left_out = (c < st.n_chunks[:, None]) & ~read
    if room_B is not None and cfg.boundary_share < 1.0:  # as many of the newest as `choose` paid for
      local_len = local_tokens(st.chunk_end, st.n_chunks[:, None], n_local[:, None], cfg.n_sink)[:, 0]
      n_last = last_token_count(st.n_chunks - n_local, room_B - local_len, cfg)
      left_out = left_out & (jnp.cumsum(left_out[:, ::-1], -1)[:, ::-1] <= n_last[:, None])
    # Where they do not all fit, the oldest give way, never a chunk read whole (the local ones are newest).
    limit = W - cfg.n_sink if room_B is None else jnp.minimum(room_B, W - cfg.n_sink)
    over = jnp.sum(jnp.where(read, end - start + 1, 0) + left_out, -1) - limit
    left_out = left_out & (jnp.cumsum(left_out, -1) > over[:, None])
    start, read = jnp.where(left_out, end, start), read | left_out
  length = jnp.where(read, end - start + 1, 0)
  # What does not fit the W slots gives way from the oldest end, never the newest: a full chunk table
  # merges every later chunk into its last one, which can outgrow the slots, and its newest tokens
  # (the question after a long text) are the ones the next token needs.
  excess = jnp.maximum(jnp.sum(length, -1) - (W - cfg.n_sink), 0)[:, None]  # [B, 1]
  offs_end = jnp.cumsum(length, axis=-1) - excess  # [B, C], slots from the first one that fits
  offs_start = offs_end - length
  w = jnp.arange(W - cfg.n_sink)
  B = selected_BC.shape[0]
  # The chunk of packed slot w: the last chunk whose run starts at or before w (a chunk read whole or in
  # part is the last of those sharing its start; the empty ones before it start there too). Each chunk
  # marks its start and a running max carries it along: W + C work, where a binary search of every slot
  # (jnp.searchsorted) took log2(C) gathers of W, 3x as long (0.67 against 1.9 ms for 3 rows of 16K slots
  # over 4K chunks, which the per-head rule pays for every sparse layer at every step).
  # (A chunk that starts before the first slot marks slot 0: the last such one holds it.)
  marks = jnp.zeros((B, W - cfg.n_sink), jnp.int32).at[jnp.arange(B)[:, None], jnp.maximum(offs_start, 0)].max(
      jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C)), mode="drop")
  which = jax.lax.cummax(marks, axis=1)
  pos = jnp.take_along_axis(start, which, -1) + w - jnp.take_along_axis(offs_start, which, -1)
  valid = w < offs_end[:, -1:]
  sink_pos = jnp.broadcast_to(jnp.arange(cfg.n_sink, dtype=jnp.int32), (B, cfg.n_sink))
  pos = jnp.concatenate([sink_pos, jnp.where(valid, pos, 0)], -1).astype(jnp.int32)
  valid = jnp.concatenate([jnp.ones_like(sink_pos, bool), valid], -1)
  return pos, valid, jnp.minimum(cfg.n_sink + offs_end[:, -1], W).astype(jnp.int32)


def compact_into(work_k_LBWKD, work_v_LBWKD, k_LBSKD, v_LBSKD, work_pos_BW):
  """Gathers the working slots of every layer from the main buffer into the working buffers, in place.

  Layer by layer with `dynamic_update_slice`, so the working buffers keep their memory: a
  `lax.cond` whose other branch leaves them unchanged then needs no copy of them.
  """
  B, S = k_LBSKD.shape[1:3]
  rows_B1 = jnp.arange(B)[:, None]
  idx_BW = jnp.minimum(work_pos_BW, S - 1)

  def layer(l, wkv):
    wk, wv = wkv
    gk, gv = k_LBSKD[l, rows_B1, idx_BW], v_LBSKD[l, rows_B1, idx_BW]  # reads the slots only
    return (jax.lax.dynamic_update_slice(wk, gk[None].astype(wk.dtype), (l, 0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(wv, gv[None].astype(wv.dtype), (l, 0, 0, 0, 0)))

  return jax.lax.fori_loop(0, k_LBSKD.shape[0], layer, (work_k_LBWKD, work_v_LBWKD))


def compact(k_LBSKD, v_LBSKD, work_pos_BW):
  """The working slots of every layer gathered into new buffers: [L, B, W, H_kv, D] x 2."""
  L, B, _, K, D = k_LBSKD.shape
  zeros = jnp.zeros((L, B, work_pos_BW.shape[-1], K, D), k_LBSKD.dtype)
  return compact_into(zeros, zeros, k_LBSKD, v_LBSKD, work_pos_BW)
