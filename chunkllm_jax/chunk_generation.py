"""ChunkLLM decoding: chunk selection over the static KV buffer.

By default (`selection="kv_head"`) each KV head of each sparse layer chooses the chunks it reads at
every decode step (`head_selection.py`), and a boundary only appends the chunk to the table. Under the
paper's rule (`selection="shared"`), described below, one selection made at each boundary serves
every layer and head.

Prefill lets the Chunk Adapter segment the prompt at layer 0 and attends densely (the default, where the
frozen attention scores the prompt: `prefill_scorer="attention"`), or, where the adapters score it
(`prefill="sparse"`), densely up to the first selection layer and chunk-sparsely after it
(`chunk_prefill.py`: the selection layers' vote at every boundary); it fills the chunk table from the
prompt's chunk ends and makes the first selection at the last prompt token.
Each decode step then:
  1. runs every layer: dense layers read the whole buffer, sliding layers their window, and the
     other layers read only the compacted working buffer (sinks, selected and local chunks) plus
     the open chunk; the selection layers also keep their query (and q~ / k~ for the adapter
     scorer) for the next selection;
  2. runs the Chunk Adapter on layer 0's output; where the token closes a chunk (p > alpha, or the
     chunk reached `max_chunk_len`), a `lax.cond` appends it, lets the selection layers vote,
     keeps the chunks that fit the budget (or the top-k) and re-compacts.
The new selection applies from the next token; between boundaries nothing is re-scored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import adapters as adp
from chunkllm_jax import attention as attn
from chunkllm_jax import boundaries
from chunkllm_jax import checks
from chunkllm_jax import decoding
from chunkllm_jax import model
from chunkllm_jax import chunk_kernels
from chunkllm_jax import chunk_prefill as chunk_prefill_lib
from chunkllm_jax.chunk_attention import packed_decode_attention
from chunkllm_jax.chunk_cache import (ChunkState, append_chunks, choose_at, compact_into, init_chunk_state,
                                      working_positions, working_room, working_size)
from chunkllm_jax.chunk_config import ATTENTION_QUERIES, ChunkConfig, check_chunk_config
from chunkllm_jax.kv_cache import PREFILL_BLOCK, KVCache, init_cache, observed_prefill, write_prefix, write_token
from chunkllm_jax.params import ModelParams
from chunkllm_jax.sampling import Sampling
from chunkllm_jax.head_selection import head_attention, kept_slots, low_rank_keys, new_low_rank_keys
from chunkllm_jax.selection import (adapter_window_probs, attention_probs, local_count, mass_by_segments,
                                    score_read_share, vote_scores)
from pallas_kernels.dispatch import implementation

WORK_BLOCK = 128  # the working buffer is allocated, and decode reads it, in whole blocks of this many slots
WORK_BLOCKS = (2048, WORK_BLOCK)  # the XLA path's read: blocks of 2048 while that many slots remain, as dense decode
# The per-head rule's gathers: 1024 slots each while that many remain, then 128. Each gather and its two
# small matmuls cost a fixed overhead on the CPU: 128-slot blocks alone made a step at 8K and 25% 5% slower.
HEAD_BLOCKS = (1024, WORK_BLOCK)


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
  """What each layer does under a ChunkConfig (static; built on the host from the configs)."""

  sparse: np.ndarray  # [L] bool: decode reads the working buffer (not dense, not sliding)
  prefill_sparse: np.ndarray  # [L] bool: sparse in prefill too (after the first selection layer)
  selects: np.ndarray  # [L] bool: a selection layer
  qk_slot: np.ndarray  # [L] int32: its QK Adapter's index in the stacked adapters (0 where none)
  selection_layers: tuple[int, ...]

  @property
  def scored(self) -> tuple[int, ...]:
    """The sparse layers: the per-head rule's low-rank keys are kept for these alone (`low_rank_keys`)."""
    return tuple(int(i) for i in np.flatnonzero(self.sparse))

  @property
  def score_slot(self) -> np.ndarray:
    """[L] int32: a sparse layer's index in the low-rank state stacked over `scored` (0 for the others)."""
    return np.maximum(np.cumsum(self.sparse) - 1, 0).astype(np.int32)


def _layer_plan(params: ModelParams, ccfg: ChunkConfig) -> _LayerPlan:
  cfg, acfg = params.config, params.adapters.config
  L = cfg.n_layers
  layers = np.arange(L)
  sparse = np.array([i not in ccfg.dense_layers and not cfg.sliding_layers[i] for i in range(L)])
  ccfg = resolved(params, ccfg)
  sel = ccfg.selection_layers
  qk_slot = np.zeros(L, np.int32)
  for i, layer in enumerate(acfg.qk_layers):
    qk_slot[layer] = i
  # Layer 0 segments the prompt, and a prefill layer can only use a selection already made.
  prefill_sparse = sparse & (layers > min(sel)) & (layers > 0) & (ccfg.prefill == "sparse")
  return _LayerPlan(sparse, prefill_sparse, np.isin(layers, sel), qk_slot, sel)


def resolved(params: ModelParams, ccfg: ChunkConfig) -> ChunkConfig:
  """`ccfg` with what the adapters and the model decide filled in (selection layers, the scorer's query
  window, the per-head score's size)."""
  acfg = params.adapters.config
  return ccfg.resolve(params.config.full_attention_layers, acfg.qk_layers, acfg.selection_layers, acfg.score_queries,
                      head_dim=params.config.head_dim)


def _qk(params: ModelParams, slot, h_BTD):
  p = jax.tree.map(lambda a: a[slot], params.adapters.params["qk"])
  return adp.qk_adapter_apply(p, h_BTD)


def _d_c(params: ModelParams, ccfg: ChunkConfig) -> int:
  """Width of the chunk keys the state keeps: the adapters' d_c for the shared rule scored by them, else 0."""
  return params.adapters.config.d_c if ccfg.scorer == "adapter" and ccfg.shares_selection else 0


def _boundary_probs(params: ModelParams, h0_BTD):
  """The Chunk Adapter's p_t from layer 0's output: [B, T]."""
  return jax.nn.sigmoid(adp.chunk_adapter_logits(params.adapters.params["chunk"], h0_BTD))


def _fill_working_buffer(st: ChunkState, cache: KVCache, ccfg: ChunkConfig, scored: tuple[int, ...]) -> ChunkState:
  """`st` (after a prompt, without a working buffer) with its working buffer allocated and filled for
  the selection made at each row's last prompt token. `chunk_generate` runs this at the start of its
  decode program, not at the end of the prefill: there the buffer (a quarter of the KV buffer at a
  25% budget) would be live beside the prefill's temporaries, which are gone by then. The per-head rule's
  low-rank keys are built for the `scored` layers (`_LayerPlan.scored`), the layers decode scores."""
  L, B, _, K, D = cache.k.shape
  if ccfg.selection == "kv_head":  # each head gathers its own read at every step: no shared buffer
    empty = jnp.zeros((L, B, 0, K, D), cache.k.dtype)
    st = st.replace(work_k=empty, work_v=empty)
    if ccfg.keeps_low_rank_keys and scored:
      basis, low, sketch = low_rank_keys(cache.k, cache.length, ccfg.score_rank, ccfg.sketch_bits, layers=scored)
      st = st.replace(key_basis=basis, key_low=low, key_sketch=sketch)
    return st
  zeros = jnp.zeros((L, B, st.work_pos.shape[-1], K, D), cache.k.dtype)
  return _refresh_working_buffer(st.replace(work_k=zeros, work_v=zeros), cache, ccfg, cache.length - 1)


def _refresh_working_buffer(st: ChunkState, cache: KVCache, ccfg: ChunkConfig, pos_B, rows_B=None) -> ChunkState:
  """The working buffer of the selection made at `pos_B`, for the rows in `rows_B` (None: every row).
  The other rows keep their slots: packed at their own last selection, where the budget's room was
  what it is no longer (the open chunk has grown since), so that a row reads the same whichever
  rows share its batch."""
  pos, valid, used = working_positions(st, st.selected, ccfg, st.work_pos.shape[-1], pos_B,
                                       working_room(st, pos_B, ccfg))
  if rows_B is not None:  # the kept rows' slots are gathered again below: the cache there has not changed
    pos, valid = jnp.where(rows_B[:, None], pos, st.work_pos), jnp.where(rows_B[:, None], valid, st.work_valid)
    used = jnp.where(rows_B, used, st.work_used)
  if _use_kernels(ccfg):
    wk, wv = chunk_kernels.compact_kernel(st.work_k, st.work_v, cache.k, cache.v, pos, valid,
                                          interpret=ccfg.interpret)
  else:
    wk, wv = compact_into(st.work_k, st.work_v, cache.k, cache.v, pos)
  return st.replace(work_pos=pos, work_valid=valid, work_used=used, work_k=wk, work_v=wv)


def _write_sink_slots(st: ChunkState, cache: KVCache, pos_B) -> ChunkState:
  """Rows whose token at `pos_B` is a sink (a prompt shorter than the sinks) get its keys and values in their
  working buffer's sink slot, which holds position `pos_B` (the sinks come first): the buffer was filled at the
  last selection, before the token existed, and the next selection may be many steps away. (The shared rule's
  full-coverage tokens differed from `generate`'s after a prompt of 1 to 3 tokens.)"""
  rows, slot = jnp.arange(pos_B.shape[0]), jnp.minimum(pos_B, st.work_pos.shape[-1] - 1)
  sink = (pos_B < st.open_start)[None, :, None, None]
  put = lambda work, buf: work.at[:, rows, slot].set(
      jnp.where(sink, buf[:, rows, pos_B].astype(work.dtype), work[:, rows, slot]))  # pos_B: written this step
  return st.replace(work_k=put(st.work_k, cache.k), work_v=put(st.work_v, cache.v))


def _use_kernels(ccfg: ChunkConfig) -> bool:
  """`attention="pallas"` asks for the kernels; `dispatch.implementation` says whether any runs here."""
  return ccfg.attention == "pallas" and implementation(ccfg.interpret) != "xla"


def _ring_positions(pos_B, Q: int):
  """The position each slot of a ring of the last Q tokens holds (slot = position % Q): [B, Q]."""
  return pos_B[:, None] - jnp.mod(pos_B[:, None] - jnp.arange(Q), Q)


def _vote_now(params: ModelParams, st: ChunkState, pos_B, k_LBSKD, plan: _LayerPlan, ccfg: ChunkConfig):
  """The selection layers' vote at position `pos_B` over each row's candidates, from the rings of
  their last queries: [B, C]."""
  cfg = params.config
  n_cand = (st.n_chunks - local_count(st.chunk_end, st.n_chunks, pos_B, ccfg))[:, None]
  if ccfg.scorer == "adapter":
    q_pos = _ring_positions(pos_B, st.recent_qt.shape[2])
    probs = [adapter_window_probs(st.recent_qt[i][:, None], st.chunk_key[i], st.chunk_end, n_cand, q_pos[:, None])[:, 0]
             for i in range(len(plan.selection_layers))]
  else:
    q_pos = _ring_positions(pos_B, st.recent_q.shape[2])
    probs = [attention_probs(st.recent_q[i], k_LBSKD, st.chunk_end, jnp.broadcast_to(n_cand, q_pos.shape),
                             n_sink=ccfg.n_sink, scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                             q_pos_BR=q_pos, layer=layer).max(1)
             for i, layer in enumerate(plan.selection_layers)]
  return vote_scores(jnp.stack(probs), ccfg.vote)


def _remember_queries(st: ChunkState, q_SBHD, qt_SBd, pos_B) -> ChunkState:
  """Writes the selection layers' queries (q for the attention scorer, q~ for the adapters) at
  `pos_B` into their ring of recent queries."""
  rows = jnp.arange(pos_B.shape[0])
  for name, new in (("recent_q", q_SBHD), ("recent_qt", qt_SBd)):
    ring = getattr(st, name)
    if ring.shape[2]:
      slot = jnp.mod(pos_B, ring.shape[2])
      st = st.replace(**{name: ring.at[:, rows, slot].set(new.astype(ring.dtype))})
  return st


def _reselect(st: ChunkState, rows_B, score_BC, pos_B, ccfg: ChunkConfig) -> ChunkState:
  """Rows in `rows_B` take a new selection, made at position `pos_B` from `score_BC`."""
  new = choose_at(st, score_BC[:, None], pos_B, ccfg)[:, 0]
  return st.replace(selected=jnp.where(rows_B[:, None], new, st.selected), n_selections=st.n_selections + rows_B)


def layer0_output(params: ModelParams, tokens_BT, lengths_B):
  """Layer 0's output hidden state [B, T, D] of right-padded rows: the Chunk Adapter's input.
  Layer 0 always attends densely, so this one layer (about 1/L of a forward pass) is all it needs."""
  cfg = params.config
  one = params.replace(
      backbone={**params.backbone, "layers": jax.tree.map(lambda w: w[:1], params.backbone["layers"])},
      config=cfg.replace(n_layers=1, layer_sliding=cfg.layer_sliding[:1]))
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  h0, _, _ = model.run_layers(one, model.embed(one, tokens_BT), positions, model.self_attend_fn(one.config, positions, valid))
  return h0


@functools.partial(jax.jit, static_argnames=("ccfg",))
def segment_prompts(params: ModelParams, tokens_BT, lengths_B, ccfg: ChunkConfig):
  """Where the chunks of right-padded prompts end, by the config's rule: [B, T] bool: the
  segmentation `chunk_prefill` makes."""
  h0 = layer0_output(params, tokens_BT, lengths_B)
  p = jax.nn.sigmoid(adp.chunk_adapter_logits(params.adapters.params["chunk"], h0))
  valid = jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None]
  return boundaries.segment(p, valid, tokens_BT, ccfg)


@functools.partial(jax.jit, static_argnames=("max_len", "ccfg", "block", "working_buffer"))
def chunk_prefill(params: ModelParams, tokens_BT, lengths_B, max_len: int, ccfg: ChunkConfig,
                  block: int = PREFILL_BLOCK, working_buffer: bool = True):
  """Prefill that segments the prompt (at layer 0), attends chunk-sparsely after the first
  selection layer (or densely, by `ccfg.prefill`), fills the chunk table and makes the first
  selection at the last prompt token. A dense prefill runs in blocks of `block` tokens, as
  `kv_cache.prefill` does (`_dense_chunk_prefill`). With `working_buffer=False` the state's
  work_k and work_v are None, for `_fill_working_buffer` to build later."""
  ccfg = resolved(params, ccfg)
  if ccfg.prefill == "dense" and ((ccfg.prefill_scorer or ccfg.scorer) == "attention" or ccfg.scorer == "adapter"):
    logits, cache, st = _dense_chunk_prefill(params, tokens_BT, lengths_B, max_len, ccfg, block)
  else:
    logits, cache, st = _sparse_chunk_prefill(params, tokens_BT, lengths_B, max_len, ccfg)
  if working_buffer:
    st = _fill_working_buffer(st, cache, ccfg, _layer_plan(params, ccfg).scored)
  return logits, cache, st


def _sparse_chunk_prefill(params: ModelParams, tokens_BT, lengths_B, max_len: int, ccfg: ChunkConfig):
  """`chunk_prefill` in one call: the prompt read chunk-sparsely after the first selection layer
  (`ccfg.prefill == "sparse"`), or densely for a scorer pairing the blocked path does not serve."""
  cfg = params.config
  B, T = tokens_BT.shape
  # The prompt's tables (each chunk's selection [B, C + 1, C], the visibility [B, C + 2, C + 2]) need
  # only the chunks a prompt of T tokens can make, one token each at most past the sinks; the state's
  # table keeps `max_chunks` for decode. At 8K x 8 rows with a separator per token possible, these
  # tables were 19 GiB of temporaries for a 256-token prompt; now a few MiB.
  C = min(ccfg.max_chunks, max(T - ccfg.n_sink, 1))
  plan = _layer_plan(params, ccfg)
  sparse_L, selects_L, slot_L = map(jnp.asarray, (plan.prefill_sparse, plan.selects, plan.qk_slot))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  self_attend = model.self_attend_fn(cfg, positions, valid)
  last = (lengths_B - 1)[:, None, None]
  x0 = model.embed(params, tokens_BT)
  d_c = _d_c(params, ccfg)
  n_ids = C + 2
  Q = ccfg.score_queries if ccfg.shares_selection else 0  # decode's rings of recent queries
  recent_pos = (lengths_B - Q)[:, None] + jnp.arange(Q)  # the last Q prompt positions (< 0: none)
  at_recent = lambda x: jnp.take_along_axis(x, jnp.maximum(recent_pos, 0).reshape(B, Q, *(1,) * (x.ndim - 2)), axis=1)

  def segmentation(o0):
    # Layer 0's output rebuilt from its attention output, as a selection layer 0 scores the chunks
    # inside its attention step. (The dense prefill and decode read it in `run_layers`' `output_fn`,
    # which spares the copy of layer 0's weights that the slice below costs; this path keeps the
    # whole prompt's activations of a layer, so handing them past the MLP would cost more.)
    layer0 = jax.tree.map(lambda w: w[0], params.backbone["layers"])
    closes = boundaries.segment(_boundary_probs(params, model.finish_layer(cfg, layer0, x0, o0)), valid,
                                tokens_BT, ccfg)
    ends, n = boundaries.completed_chunk_ends(closes, C)
    ids = chunk_prefill_lib.kernel_ids(boundaries.chunk_ids(closes, valid, ccfg.n_sink), valid, C)
    return closes, ids, ends, n

  pscorer = ccfg.prefill_scorer or ccfg.scorer  # who scores the prompt's rows
  hybrid = pscorer != ccfg.scorer and ccfg.shares_selection  # the first selection is not decode's scorer's
  Qp = ccfg.score_queries if pscorer == ccfg.scorer else (
      ATTENTION_QUERIES if pscorer == "attention" else params.adapters.config.score_queries)

  def layer_scores(idx, q, k, h, seg):
    """This selection layer's distributions for every prompt chunk's selection [B, C + 1, C] and, when
    the prompt's scorer is not decode's, at the last prompt token [B, C]; the q~ of the last Q prompt
    tokens [B, Q, d_c] (for decode's ring) and the chunks' k~ [B, C, d_c]."""
    _, _, ends, n = seg
    row_end, n_cand, _, _ = chunk_prefill_lib.selection_rows(ends, n, lengths_B - 1, ccfg)
    if d_c or pscorer == "adapter":
      qt, kt = _qk(params, slot_L[idx], h)
    if d_c:
      keys = (at_recent(qt), adp.chunk_keys(kt, ends))
    else:
      keys = (jnp.zeros((B, Q, 0), jnp.float32), jnp.zeros((B, C, 0), jnp.float32))

    def rows(row_end, n_cand):
      if pscorer == "adapter":
        return chunk_prefill_lib.adapter_rows(qt, kt, row_end, ends, n_cand, n_queries=Qp)
      return chunk_prefill_lib.attention_rows(q, k, row_end, ends, n_cand, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                                              softcap=cfg.attn_softcap, n_queries=Qp)

    last_cand = (n - local_count(ends, n, lengths_B - 1, ccfg))[:, None]
    final = rows((lengths_B - 1)[:, None], last_cand)[:, 0] if hybrid else jnp.zeros((B, C), jnp.float32)
    return (rows(row_end, n_cand), final, *keys)

  def attend_fn(state, layer, q, k, v, h):
    kb, vb, seg, vote, final_vote, vis = state
    idx = layer["index"]
    kb, vb = write_prefix(kb, idx, k), write_prefix(vb, idx, v)

    def sparse():
      _, ids, _, _ = seg
      end_ok = seg[0] if ccfg.keep == "boundary" else jnp.ones_like(seg[0])
      return chunk_prefill_lib.prefill_attention(q, k, v, ids, vis, end_ok, ccfg, scale=cfg.attn_scale,
                                                 softcap=cfg.attn_softcap, use_kernel=_use_kernels(ccfg))

    o = jax.lax.cond(sparse_L[idx], sparse, lambda: self_attend(None, layer, q, k, v, h)[0])
    seg = jax.lax.cond(idx == 0, lambda: segmentation(o), lambda: seg)
    nothing = (jnp.zeros((B, C + 1, C), jnp.float32), jnp.zeros((B, C), jnp.float32),
               jnp.zeros((B, Q, d_c), jnp.float32), jnp.zeros((B, C, d_c), jnp.float32))
    probs, final, qt_recent, chunk_key = jax.lax.cond(selects_L[idx], lambda: layer_scores(idx, q, k, h, seg),
                                                      lambda: nothing)
    add = (lambda a, b: a + b) if ccfg.vote == "sum" else jnp.maximum  # probs >= 0: max with 0 is a no-op
    vote, final_vote = add(vote, probs), add(final_vote, final)
    if ccfg.prefill == "sparse":
      rows = chunk_prefill_lib.selection_rows(seg[2], seg[3], lengths_B - 1, ccfg)
      vis = jax.lax.cond(selects_L[idx], lambda: chunk_prefill_lib.selection_table(
          chunk_prefill_lib.prompt_selection(vote, seg[2], seg[3], rows, ccfg), n_ids), lambda: vis)
    return o, (kb, vb, seg, vote, final_vote, vis), (at_recent(q), qt_recent, chunk_key)

  cache = init_cache(cfg, B, max_len, params.backbone["embed"].dtype)
  seg0 = (jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32), jnp.zeros((B, C), jnp.int32),
          jnp.zeros((B,), jnp.int32))
  state0 = (cache.k, cache.v, seg0, jnp.zeros((B, C + 1, C), jnp.float32), jnp.zeros((B, C), jnp.float32),
            jnp.zeros((B, n_ids, n_ids), bool))
  x, (k, v, seg, _, final_vote, _), (q_recent_L, qt_recent_L, chunk_key_L) = model.run_layers(
      params, x0, positions, attend_fn, state0)
  logits = model.unembed(params, jnp.take_along_axis(x, last, axis=1))[:, 0]
  cache = KVCache(k=k, v=v, length=lengths_B.astype(jnp.int32))
  closes, _, ends, n = seg
  sel_layers = np.asarray(plan.selection_layers)
  more = ccfg.max_chunks - C  # the state's table is decode's: its columns past the prompt's start empty
  ends = jnp.pad(ends, [(0, 0), (0, more)], constant_values=-1)
  chunk_key = jnp.pad(chunk_key_L[sel_layers], [(0, 0), (0, 0), (0, more), (0, 0)])
  final_vote = jnp.pad(final_vote, [(0, 0), (0, more)])
  st = _prompt_chunk_state(params, cache, lengths_B, closes, ends, n, chunk_key, q_recent_L[sel_layers],
                           qt_recent_L[sel_layers], recent_pos, final_vote if hybrid else None, plan, ccfg, max_len)
  return logits, cache, st


def _dense_chunk_prefill(params: ModelParams, tokens_BT, lengths_B, max_len: int, ccfg: ChunkConfig, block: int):
  """`chunk_prefill` when the prompt is read densely: `kv_cache.observed_prefill`, in blocks, collecting
  on the way what the chunk state needs: at layer 0 the block's segmentation (the rule is causal, so
  it continues from the blocks before), at the selection layers k~ of the block's boundary tokens
  straight into the chunk-key table, and the queries (q and q~) of the last prompt tokens. The first
  selection follows from these and the filled buffer, so only one block's activations are live, as
  in dense prefill (the whole prompt's were 0.6x the KV buffer in temporaries, and k~ of every
  prompt token 16 MiB at 32K, bench/RESULTS_memory.md). The first selection is the attention
  scorer's or decode's own: a prompt scored by the adapters for a decode scored by attention (an odd
  mix) runs in one call."""
  cfg = params.config
  B, T = tokens_BT.shape
  C = ccfg.max_chunks
  plan = _layer_plan(params, ccfg)
  sel_layers = np.asarray(plan.selection_layers)
  n_sel = len(sel_layers)
  slot_of = np.full(cfg.n_layers, n_sel, np.int32)  # a selection layer's slot; the others write the rings' scratch slot
  slot_of[sel_layers] = np.arange(n_sel)
  slot_L, qk_slot_L = jnp.asarray(slot_of), jnp.asarray(plan.qk_slot)
  pscorer = ccfg.prefill_scorer or ccfg.scorer
  hybrid = pscorer != ccfg.scorer and ccfg.shares_selection
  Q = ccfg.score_queries if ccfg.shares_selection else 0  # decode's rings of recent queries
  Qp = ATTENTION_QUERIES if hybrid else 0  # the attention scorer's queries for the first selection
  R = max(Q, Qp)
  d_c = _d_c(params, ccfg)
  lengths_B = lengths_B.astype(jnp.int32)
  dtype = params.backbone["embed"].dtype  # what the layers compute in; the adapters' outputs may differ
  h_like = jax.ShapeDtypeStruct((B, 1, cfg.d_model), dtype)
  qk_dtype = jax.eval_shape(lambda h: _qk(params, 0, h)[0], h_like).dtype if d_c else dtype
  recent_pos = (lengths_B - R)[:, None] + jnp.arange(R)  # the last R prompt positions (< 0: none)

  def segment_block(start, tokens_Bt, x0_BtD, closes_BT):
    t = tokens_Bt.shape[1]
    p = _boundary_probs(params, x0_BtD)
    valid = start + jnp.arange(t) < lengths_B[:, None]
    return boundaries.segment(p, valid, tokens_Bt, ccfg, start=start,
                              open_start_B=boundaries.open_start(closes_BT, start, ccfg.n_sink))

  def observe(obs, layer, start, tokens_Bt, q, h):
    """After the layer's attention: the rings of the last queries; k~ of the block is handed on to
    `observe_output`, which writes it at the boundary tokens once layer 0's output has segmented the block."""
    closes_BT, key_SBCd, q_SBRHD, qt_SBRd = obs
    idx, t = layer["index"], tokens_Bt.shape[1]
    slot = slot_L[idx]
    kt = None
    if d_c:
      qt, kt = jax.lax.cond(slot < n_sel, lambda: _qk(params, qk_slot_L[idx], h),
                            lambda: 2 * (jnp.zeros((B, t, d_c), qk_dtype),))
    at = recent_pos - start  # the recent positions, in this block
    here = (at >= 0) & (at < t)
    pick = lambda x: jnp.take_along_axis(x, jnp.clip(at, 0, t - 1).reshape(B, R, *(1,) * (x.ndim - 2)), axis=1)
    keep = lambda ring, x: ring.at[slot].set(jnp.where(here.reshape(B, R, *(1,) * (x.ndim - 2)),
                                                       pick(x).astype(ring.dtype), ring[slot]))
    q_SBRHD = keep(q_SBRHD, q)
    if d_c:
      qt_SBRd = keep(qt_SBRd, qt)
    return (closes_BT, key_SBCd, q_SBRHD, qt_SBRd), kt

  def observe_output(obs, layer, start, tokens_Bt, x, kt):
    """After the layer: layer 0's output segments the block; a selection layer's boundary tokens fill
    the next rows of the chunk-key table (the rest of the block, every token of a layer that does not
    select, and chunks past the table go nowhere)."""
    closes_BT, key_SBCd, q_SBRHD, qt_SBRd = obs
    idx, t = layer["index"], tokens_Bt.shape[1]
    mine = jax.lax.dynamic_slice_in_dim(closes_BT, start, t, axis=1)
    closes_Bt = jax.lax.cond(idx == 0, lambda: segment_block(start, tokens_Bt, x, closes_BT), lambda: mine)
    closes_BT = jax.lax.dynamic_update_slice_in_dim(closes_BT, closes_Bt, start, axis=1)
    if d_c:
      slot = slot_L[idx]
      before = jnp.sum(closes_BT & (jnp.arange(T) < start), axis=1)
      row = jnp.where(closes_Bt & (slot < n_sel), before[:, None] + jnp.cumsum(closes_Bt, axis=1) - 1, C)
      key_SBCd = key_SBCd.at[jnp.minimum(slot, n_sel - 1), jnp.arange(B)[:, None], row].set(kt, mode="drop")
    return closes_BT, key_SBCd, q_SBRHD, qt_SBRd

  observed = (jnp.zeros((B, T), bool), jnp.zeros((n_sel, B, C, d_c), qk_dtype),
              jnp.zeros((n_sel + 1, B, R, cfg.n_heads, cfg.head_dim), dtype), jnp.zeros((n_sel + 1, B, R, d_c), qk_dtype))
  cache = init_cache(cfg, B, max_len, dtype)
  logits, cache, (closes, chunk_key, q_SBRHD, qt_SBRd) = observed_prefill(
      params, tokens_BT, lengths_B, cache, block, observe, observe_output, observed)
  ends, n = boundaries.completed_chunk_ends(closes, C)
  final_vote = None
  if hybrid:  # the attention scorer's vote at the last prompt token, from the buffer's keys
    n_cand = jnp.broadcast_to((n - local_count(ends, n, lengths_B - 1, ccfg))[:, None], (B, Qp))
    probs = [attention_probs(q_SBRHD[i, :, R - Qp:], cache.k, ends, n_cand, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                             softcap=cfg.attn_softcap, q_pos_BR=recent_pos[:, R - Qp:], layer=layer).max(1)
             for i, layer in enumerate(sel_layers)]
    final_vote = vote_scores(jnp.stack(probs), ccfg.vote)
  st = _prompt_chunk_state(params, cache, lengths_B, closes, ends, n, chunk_key, q_SBRHD[:n_sel, :, R - Q:],
                           qt_SBRd[:n_sel, :, R - Q:], recent_pos[:, R - Q:], final_vote, plan, ccfg, max_len)
  return logits, cache, st


def _prompt_chunk_state(params: ModelParams, cache: KVCache, lengths_B, closes, ends, n, chunk_key_SBCd,
                        q_SBQHD, qt_SBQd, recent_pos_BQ, final_vote_BC, plan: _LayerPlan, ccfg: ChunkConfig,
                        max_len: int) -> ChunkState:
  """The chunk state after a prompt: the chunk table from the prompt's chunk ends, the selection
  layers' rings of their last Q queries, and the first selection at the last prompt token (by
  `final_vote_BC` where the prompt's scorer is not decode's, else decode's vote from the rings)."""
  cfg = params.config
  B, C = ends.shape  # closes [B, T], ends [B, C], n [B]: the prompt's segmentation
  Q = recent_pos_BQ.shape[1]
  st = init_chunk_state(cfg.n_layers, len(plan.selection_layers), B, chunk_key_SBCd.shape[-1], cfg.n_heads,
                        cfg.n_kv_heads, cfg.head_dim, cache.k.dtype, ccfg, working_size(ccfg, max_len, WORK_BLOCK))
  # Into the ring, oldest first (position p sits in slot p % Q): a loop, not Q unrolled copies of the write.
  if Q:  # (the per-head rule keeps no ring)
    st = jax.lax.fori_loop(0, Q, lambda i, st: _remember_queries(st, q_SBQHD[:, :, i], qt_SBQd[:, :, i],
                                                                 recent_pos_BQ[:, i]), st)
  starts = jnp.pad(ends[:, :-1] + 1, [(0, 0), (1, 0)], constant_values=ccfg.n_sink)
  has = jnp.arange(C) < n[:, None]
  n_closes = jnp.sum(closes, axis=1)
  last_end = jnp.take_along_axis(ends, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
  st = st.replace(chunk_start=jnp.where(has, starts, 0), chunk_end=jnp.where(has, ends, -1),
                  chunk_key=jnp.where(has[None, ..., None], chunk_key_SBCd, 0.0).astype(st.chunk_key.dtype), n_chunks=n,
                  open_start=jnp.where(n > 0, last_end + 1, ccfg.n_sink).astype(jnp.int32),
                  overflow=n_closes > C)
  if not ccfg.shares_selection:  # the heads make the first choice at the first decode step
    return st.replace(work_k=None, work_v=None)
  # The first selection, at the last prompt token: the prompt's scorer's (decode's, from its rings, or,
  # when they differ, the prompt scorer's vote at that token).
  score = final_vote_BC if final_vote_BC is not None else _vote_now(params, st, lengths_B - 1, cache.k, plan, ccfg)
  st = _reselect(st, jnp.ones((B,), bool), score, lengths_B - 1, ccfg)
  return st.replace(work_k=None, work_v=None)  # built by `_fill_working_buffer`


@functools.partial(jax.jit, static_argnames=("ccfg",))
def chunk_decode_step(params: ModelParams, tokens_B, cache: KVCache, st: ChunkState, ccfg: ChunkConfig):
  """One token per row: (logits [B, V], the cache, the chunk state), re-selecting where it closes a chunk."""
  cfg = params.config
  ccfg = resolved(params, ccfg)
  plan = _layer_plan(params, ccfg)
  sparse_L, selects_L, slot_L, score_slot_L = map(jnp.asarray, (plan.sparse, plan.selects, plan.qk_slot,
                                                                plan.score_slot))
  pos_B = cache.length
  B, M = tokens_B.shape[0], min(ccfg.max_chunk_len, cache.max_len)
  n_blocks = -(-jnp.max(st.work_used) // WORK_BLOCK)  # batch-wide
  W = st.work_pos.shape[-1]
  n_new_key = cfg.head_dim if ccfg.keeps_low_rank_keys else 0  # each layer's new key, for its low-rank coordinates
  d_c = _d_c(params, ccfg)

  def attend_fn(state, layer, q, k, v, h):
    kb, vb, p_B, reads_B = state
    idx = layer["index"]
    kb, vb = write_token(kb, idx, pos_B, k[:, 0]), write_token(vb, idx, pos_B, v[:, 0])

    def dense():
      return attn.decode_attention(q, kb, vb, idx, pos_B, layer["window"], scale=cfg.attn_scale,
                                   softcap=cfg.attn_softcap)

    def open_chunk(start_B):  # the open chunk's keys and values (a window of M from its start) and which are in it
      k_open, open_pos = attn.row_window(kb, idx, start_B, M)
      v_open, _ = attn.row_window(vb, idx, start_B, M)
      return k_open, v_open, (open_pos >= start_B[:, None]) & (open_pos <= pos_B[:, None])

    def sparse():
      # A token before the open chunk (a prompt shorter than the sinks: this token is a sink) is read in place,
      # as the open chunk is; its slot in the working buffer is written after this step (`_write_sink_slots`).
      before_open = pos_B < st.open_start
      k_open, v_open, open_ok = open_chunk(jnp.where(before_open, pos_B, st.open_start))
      work_ok = st.work_valid & (st.work_pos <= pos_B[:, None]) & ~(
          before_open[:, None] & (st.work_pos == pos_B[:, None]))
      if _use_kernels(ccfg):
        return chunk_kernels.decode_attention_kernel(
            q, st.work_k[idx], st.work_v[idx], work_ok, st.work_used, k_open, v_open, open_ok,
            scale=cfg.attn_scale, block=WORK_BLOCK, interpret=ccfg.interpret)
      return packed_decode_attention(q, st.work_k, st.work_v, idx, work_ok, n_blocks * WORK_BLOCK, k_open, v_open,
                                     open_ok, scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                                     blocks=attn.decode_blocks(st.work_k.shape[2], WORK_BLOCKS))

    head_slots = ()  # with head_refresh > 1, each layer's slots go into the state for the steps after
    if ccfg.selection == "kv_head":
      def per_head():
        o, read_BK, slots = head_attention(cfg, ccfg, st, q, kb, vb, idx, score_slot_L[idx], pos_B,
                                           open_chunk(st.open_start),
                                           W=W, blocks=attn.decode_blocks(W, HEAD_BLOCKS), choose_now=choose_now,
                                           key_chunk_BS=key_chunk_BS)
        return o, read_BK, slots if ccfg.keeps_head_choice else ()

      def dense_layer():
        return dense(), jnp.zeros((B, cfg.n_kv_heads), jnp.float32), kept_slots(st, idx) if ccfg.keeps_head_choice else ()

      # (no sparse layer: nothing to score, and no low-rank state to trace the per-head branch with)
      o, read_BK, head_slots = jax.lax.cond(sparse_L[idx], per_head, dense_layer) if plan.scored else dense_layer()
      reads_B = reads_B + read_BK.mean(-1)
    else:
      o = jax.lax.cond(sparse_L[idx], sparse, dense)
    if d_c:  # the QK Adapters run on the selection layers only
      qt, kt = jax.lax.cond(selects_L[idx], lambda: tuple(x[:, 0] for x in _qk(params, slot_L[idx], h)),
                            lambda: (jnp.zeros((B, d_c), jnp.float32),) * 2)
    else:
      qt = kt = jnp.zeros((B, 0), jnp.float32)
    return o, (kb, vb, p_B, reads_B), (q[:, 0], qt, kt, k[:, 0, :, :n_new_key], head_slots)

  def output_fn(state, layer, x, ys):  # the Chunk Adapter reads layer 0's output
    kb, vb, p_B, reads_B = state
    p_B = jax.lax.cond(layer["index"] == 0, lambda: _boundary_probs(params, x)[:, 0], lambda: p_B)
    return (kb, vb, p_B, reads_B), ys

  x0 = model.embed(params, tokens_B[:, None])
  p0 = jnp.zeros((B,), jax.eval_shape(lambda h: _boundary_probs(params, h), x0).dtype)
  # With head_refresh > 1 the heads choose (batch-wide) where any row's last choice is head_refresh steps
  # old or a chunk closed since; the first step after a prompt always chooses (`init_chunk_state`).
  choose_now = jnp.any(st.head_age >= ccfg.head_refresh)
  key_chunk_BS = None  # the chunk of every key, for the estimated scores' segment sums: once for every layer
  if ccfg.selection == "kv_head" and ccfg.score_estimate != "exact" and mass_by_segments():
    key_chunk_BS = boundaries.chunk_ids_from_ends(st.chunk_end, cache.max_len, ccfg.n_sink)
  x, (k, v, p, reads_B), (q_LBHD, qt_LBd, kt_LBd, k_LBKD, head_LBKW) = model.run_layers(
      params, x0, pos_B[:, None], attend_fn, (cache.k, cache.v, p0, jnp.zeros((B,), jnp.float32)), output_fn)
  logits = model.unembed(params, x)[:, 0]
  cache = KVCache(k=k, v=v, length=pos_B + 1)

  # Retention (SepLLM): tokens a sparse layer read / tokens seen, before this step's boundary.
  seen = pos_B + 1
  all_dense = not plan.sparse.any()  # dense_layers (and sliding ones) cover every layer: each read the whole cache
  if ccfg.selection == "kv_head":  # the sparse layers' and heads' mean; the slots add the scores' reads of K
    visible = seen if all_dense else reads_B / max(int(np.sum(plan.sparse)), 1)
    score_share = score_read_share(cfg.head_dim, cache.k.dtype.itemsize, ccfg.score_rank, ccfg.score_estimate,
                                   ccfg.sketch_bits)
    chose = choose_now if ccfg.keeps_head_choice else True
    st = st.replace(retained=st.retained + jnp.minimum(visible, seen) / seen,
                    read_slots=st.read_slots + visible + jnp.where(chose, score_share * seen, 0.0),
                    n_selections=st.n_selections + chose)
  else:
    w0 = st.work_valid & (st.work_pos <= pos_B[:, None])
    visible = seen if all_dense else jnp.sum(w0, -1) + jnp.clip(seen - st.open_start, 0, None)
    # The row's own blocks of the working buffer (as the kernel reads them, and as it reads alone): the XLA
    # path reads the batch's most, masked, but a row's stats must not depend on the rows beside it.
    own_blocks = -(-st.work_used // WORK_BLOCK)
    st = st.replace(retained=st.retained + jnp.minimum(visible, seen) / seen,
                    read_slots=st.read_slots + own_blocks * WORK_BLOCK + M)

  closes = ccfg.closes(pos_B, st.open_start, tokens_B, p)

  # Optional refresh inside a long chunk: every `refresh_every` tokens of the open chunk.
  into_chunk = pos_B - st.open_start + 1
  refresh = ~closes & (pos_B >= ccfg.n_sink) & (ccfg.refresh_every > 0) & (
      into_chunk % max(ccfg.refresh_every, 1) == 0)
  reselect = closes | refresh
  sel = np.asarray(plan.selection_layers)

  if not ccfg.shares_selection:  # the heads choose at their own steps: the chunk table is all a boundary changes
    st = append_chunks(st, closes, pos_B, kt_LBd[sel])
    if ccfg.keeps_head_choice:  # a closed chunk left the open window: the next step chooses again
      age = jnp.where(choose_now, 1, st.head_age + 1)
      st = st.replace(head_pos=head_LBKW[0], head_ok=head_LBKW[1], head_used=head_LBKW[2],
                      head_age=jnp.where(closes, ccfg.head_refresh, age).astype(jnp.int32))
    if ccfg.keeps_low_rank_keys and plan.scored:  # this token's key in each scored layer's basis, for later steps
      low, sketch = new_low_rank_keys(k_LBKD[np.asarray(plan.scored), :, :, None], st.key_basis,
                                      ccfg.sketch_bits)  # L' B K 1 (r+1 | w)
      rows = jnp.arange(B)
      st = st.replace(key_low=st.key_low.at[:, rows, :, :, pos_B].set(
          jnp.swapaxes(low[:, :, :, 0], 0, 1).astype(st.key_low.dtype)),
          key_sketch=st.key_sketch.at[:, rows, :, :, pos_B].set(jnp.swapaxes(sketch[:, :, :, 0], 0, 1)))
    return logits, cache, st

  st = _remember_queries(st, q_LBHD[sel], qt_LBd[sel], pos_B)  # the rings the shared vote reads
  st = jax.lax.cond(jnp.any(pos_B < st.open_start), lambda s: _write_sink_slots(s, cache, pos_B), lambda s: s, st)

  def on_boundary(st):
    st = append_chunks(st, closes, pos_B, kt_LBd[sel])
    score = _vote_now(params, st, pos_B, cache.k, plan, ccfg)
    st = _reselect(st, reselect, score, pos_B, ccfg)
    return _refresh_working_buffer(st, cache, ccfg, pos_B, reselect)

  st = jax.lax.cond(jnp.any(reselect), on_boundary, lambda s: s, st)
  return logits, cache, st


# ----------------------------------------------------------------------------------------------
# The step functions of the shared decode loop (decoding.py), and the public API


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
  max_len: int  # the KV buffer's slots
  ccfg: ChunkConfig


def _prefill_state(params: ModelParams, tokens_BT, lengths_B, settings: ChunkSettings):
  logits, cache, st = chunk_prefill(params, tokens_BT, lengths_B, settings.max_len, settings.ccfg,
                                    working_buffer=False)
  return logits, (cache, st)


def _enter_state(params: ModelParams, state, settings: ChunkSettings):
  cache, st = state
  return cache, _fill_working_buffer(st, cache, settings.ccfg, _layer_plan(params, settings.ccfg).scored)


def _step_state(params: ModelParams, tokens_B, state, done_B, settings: ChunkSettings):
  cache, st = state
  logits, cache, new = chunk_decode_step(params, tokens_B, cache, st, settings.ccfg)
  # A finished row still runs with its batch (its pad tokens close chunks by max_chunk_len); its steps must
  # not count in its own stats. Its table stops growing too: nothing of it is read for its output any more.
  new = new.replace(**{name: jnp.where(done_B, getattr(st, name), getattr(new, name))
                       for name in ("retained", "read_slots", "n_chunks", "n_selections", "overflow")})
  return logits, (cache, new)


def _state_shardings(cache_shardings):
  return cache_shardings, None  # the chunk state follows the placements XLA propagates


def bytes_per_decode_step(params: ModelParams, ccfg: ChunkConfig, itemsize: int, sparse_slots: np.ndarray,
                          seen_tokens: np.ndarray) -> dict[str, np.ndarray]:
  """K/V bytes one decode step reads (means over the steps): sparse layers read `sparse_slots`, every
  other layer, like dense attention, the `seen_tokens` so far, or a sliding layer the last `sliding_window`
  of them (as `attention.decode_attention` reads it, in both designs)."""
  cfg = params.config
  sparse = _layer_plan(params, ccfg).sparse
  seen = np.asarray(seen_tokens, np.float64)
  window = cfg.sliding_window or 0
  read = [np.minimum(seen, window) if slide else seen for slide in cfg.sliding_layers]  # each layer, dense
  per_token = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize
  return dict(chunk=per_token * sum(sparse_slots if s else r for s, r in zip(sparse, read)),
              dense=per_token * sum(read))


def _low_rank_state_bytes(params: ModelParams, ccfg: ChunkConfig, batch: int, buffer_len: int, itemsize: int) -> int:
  """Bytes of the per-head rule's low-rank keys and sketches (`head_selection.low_rank_keys`), 0 without them."""
  if not ccfg.keeps_low_rank_keys:
    return 0
  per_key = (ccfg.score_rank + 1) * itemsize + ccfg.sketch_bits // 8
  return len(_layer_plan(params, ccfg).scored) * batch * params.config.n_kv_heads * buffer_len * per_key


def chunk_generate(params: ModelParams, tokens, max_new_tokens: int = 64, *, lengths=None,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
                   eos_ids=None, pad_id=None, max_len: int | None = None, chunk_config: ChunkConfig | None = None,
                   mesh=None, **chunk_fields):
  """ChunkLLM generation. `params` must carry adapters (`with_adapters`).

  Sampling (`temperature`, `top_k`, `top_p`, `seed`) is `generate`'s. Any `ChunkConfig` field can
  be given by keyword (`kv_budget=0.25`, `top_chunks=32`, `n_local=4`, ...). Returns a `GenerateOutput`
  whose stats add per row: kv_retention, n_chunks, n_selections, chunk_overflow, and the K/V
  bytes read per decode step by this design and by dense attention (means over the row's own
  decode steps, up to its end-of-sequence token; NaN when it had none). With `mesh`, the backbone
  and the batch are placed by `sharding.LOGICAL_TO_MESH` (adapters replicated), and the compiled
  programs follow those placements.
  """
  checks.check_params(params, "chunk_generate")
  checks.check_on_host("chunk_generate", params, tokens, lengths)  # a traced seed: `decoding.row_keys`
  checks.check_sampling(temperature, top_k, top_p)
  checks.check_mesh(mesh)
  if params.adapters is None:
    raise ValueError("chunk_generate needs adapters: params = cj.with_adapters(params, cj.load_adapters(...))")
  cfg = params.config
  params = adp.with_adapters(params.replace(adapters=None), params.adapters)  # fits this backbone?
  ccfg = with_fields(check_chunk_config(chunk_config), chunk_fields)
  eos_ids, pad_id = decoding.end_rules(cfg, eos_ids, pad_id)
  prompts, lens = decoding.prepare_prompts(tokens, cfg.vocab_size, pad_id, lengths)
  itemsize = params.backbone["embed"].dtype.itemsize
  max_len = decoding.resolve_max_len(cfg, lens, max_new_tokens, max_len, itemsize=itemsize)
  ccfg = resolved(params, ccfg.validate(max_len, cfg.n_layers, vocab_size=cfg.vocab_size))
  if ccfg.votes and ccfg.score_queries > max_len:  # the adapters' stored window, filled in by `resolved`
    raise ValueError(f"the adapters' score_queries ({ccfg.score_queries}) exceeds the buffer (max_len={max_len}): "
                     "give score_queries=... (at most max_len)")
  slots = decoding.buffer_len(max_len)
  checks.check_kv_memory(cfg, len(lens), slots, itemsize,
                         state_bytes=_low_rank_state_bytes(params, ccfg, len(lens), slots, itemsize))
  if ccfg.attention == "pallas" and ccfg.shares_selection and cfg.attn_softcap is not None:
    raise ValueError("the shared rule's kernels (attention='pallas', selection='shared') do not support attention "
                     "logit soft-capping; use attention='xla'")
  sampling = Sampling.of(temperature, top_k, top_p)
  progs = decoding.programs(_prefill_state, _step_state, ChunkSettings(decoding.buffer_len(max_len), ccfg), enter_fn=_enter_state,
                            sampling=sampling, max_new=decoding.loop_width(max_new_tokens), eos_ids=eos_ids,
                            pad_id=pad_id, mesh=mesh, cfg=cfg, shapes=prompts.shape if mesh is not None else (0, 0),
                            state_shardings=_state_shardings)
  params = decoding.place_params(params, mesh)
  key = decoding.row_keys(seed, len(prompts))
  tokens_BT, lengths_B = jnp.asarray(prompts), jnp.asarray(lens)
  progs.compile_ahead(params, tokens_BT, lengths_B, key)
  (first, state), prefill_s = progs.prefill.timed(params, tokens_BT, lengths_B, key)
  (new, steps, (cache, st), live), decode_s = progs.loop.timed(params, first, state, key,
                                                              jnp.int32(max_new_tokens))
  steps = int(steps) - 1
  live = np.asarray(live)  # decode steps each row ran before its end-of-sequence token
  with np.errstate(invalid="ignore", divide="ignore"):  # NaN for a row with no decode step
    per_step = lambda x: np.where(live > 0, np.asarray(x) / np.maximum(live, 1), np.nan)
    seen = lens + 1 + (live - 1) / 2  # tokens seen at a row's middle decode step
    nbytes = bytes_per_decode_step(params, ccfg, cache.k.dtype.itemsize, per_step(st.read_slots), seen)
    retention = per_step(st.retained)
  _warn_about_reads(ccfg, np.asarray(st.overflow), retention, seen, all_dense=not _layer_plan(params, ccfg).sparse.any())
  extra = dict(kv_retention=retention, n_chunks=np.asarray(st.n_chunks),
               n_selections=np.asarray(st.n_selections), chunk_overflow=np.asarray(st.overflow),
               bytes_per_step=nbytes["chunk"], dense_bytes_per_step=np.where(live > 0, nbytes["dense"], np.nan))
  return decoding.assemble_output(prompts, lens, np.asarray(new)[:, :max_new_tokens], eos_ids, pad_id,
                                  prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, extra_stats=extra)


def _warn_about_reads(ccfg: ChunkConfig, overflow_B, retention_B, seen_B, all_dense: bool = False) -> None:
  """Warnings where a run read otherwise than its settings ask: a chunk table that filled (the later chunks are
  merged into its last one, which is always read) and a budget below what is always read (sinks, local and open
  chunks). Neither where everything is read anyway (`all_dense`: no layer reads by the selection)."""
  reads_all = all_dense or ccfg.kv_budget == 1.0 or (not ccfg.budgeted and ccfg.top_chunks >= ccfg.max_chunks)
  if np.any(overflow_B) and not reads_all:
    rows = np.flatnonzero(overflow_B).tolist()
    warnings.warn(f"the chunk table (max_chunks={ccfg.max_chunks}) filled in row(s) {rows}: "
                  "later chunks were merged into its last one, which is always read (its newest tokens, as far as "
                  "the budget's working slots hold it), so the selection no longer chooses among them and the KV read "
                  "may pass the budget; give a larger max_chunks (text of short lines, such as code or lists, closes a chunk every "
                  "few tokens). Left unset, max_chunks follows the buffer (max_len // 8, the batch's longest row and "
                  "max_new_tokens), so where the table fills a row may read otherwise in another batch or with more new "
                  "tokens; a max_chunks given makes it the same everywhere (stats['chunk_overflow'])", stacklevel=3)
  if ccfg.budgeted and not all_dense:
    target = np.asarray(ccfg.budget_tokens(np.ceil(seen_B).astype(np.int32))) / seen_B
    over = np.flatnonzero(retention_B > target + 0.1)  # NaN rows (no decode step) compare false
    if over.size:
      row = over[np.argmax(target[over])]
      # under a recent share the local chunks always read are those that fit it, at least the newest (`local_count`)
      local, knobs = ((f"the {ccfg.n_local} most recent chunks", "a smaller n_local or max_chunk_len")
                      if not ccfg.recent_share else ("the most recent chunk", "a smaller max_chunk_len"))
      warnings.warn(
          f"row(s) {over.tolist()} read {np.nanmax(retention_B[over]):.1%} of the KV against a budget of "
          f"{float(target[row]):.1%} (row {row}'s, in whole tokens of the {float(seen_B[row]):.0f} seen at its middle "
          f"step): the sinks, {local} and the open chunk (up to {ccfg.max_chunk_len} tokens each) are always read, "
          f"and that is more than the budget at this length; {knobs}, or a longer context, brings the read to the "
          "budget (stats['kv_retention'])", stacklevel=3)


def with_fields(ccfg: ChunkConfig, fields: dict) -> ChunkConfig:
  """`ccfg` with the given fields replaced; an unknown field name is a TypeError that lists the known ones."""
  known = {f.name for f in dataclasses.fields(ChunkConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    whole = [k for k in unknown if isinstance(fields[k], ChunkConfig)]  # config=ChunkConfig(...)
    hint = f"; a whole ChunkConfig goes in chunk_config= (not {whole[0]}=)" if whole else ""
    close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
    hint += "".join(f"; {k}: did you mean {m[0]}?" for k, m in close.items() if m and k not in whole)
    raise TypeError(f"unknown chunk-config fields {unknown}{hint}; known: {sorted(known)}")
  out = dataclasses.replace(ccfg, **fields)
  if "top_chunks" in fields and (out.kv_budget is not None or out.kv_budget_tokens is not None):
    budget = f"kv_budget={out.kv_budget}" if out.kv_budget is not None else f"kv_budget_tokens={out.kv_budget_tokens}"
    raise ValueError(f"top_chunks={fields['top_chunks']} is how many chunks are chosen where no KV budget is set; with "
                     f"{budget} it would be unused: give one of them")
  return out
