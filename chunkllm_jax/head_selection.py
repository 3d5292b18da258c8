"""Per-head selection (`ChunkConfig.selection="kv_head"`, the default): at every decode step each KV
head of each sparse layer chooses the chunks it reads, by its own query's attention over them.

ChunkLLM's rule makes one selection where a token closes a chunk and serves every layer and head
with it until the next one. Measured with the frozen attention's own scores, that rule is what
keeps perplexity away from vanilla's on running text; a selection made by each query per KV head
over the same chunks and budget keeps most of it (`eval.selection_ceiling`, docs/results.md).

A step, per sparse layer:
  1. scores every candidate chunk per KV head: the attention mass of the query heads that read it
     (their max), by default Loki's estimate from every key's `score_rank` coordinates in a basis of
     its KV head's prompt keys with a sketch of what the basis misses (`low_rank_keys`,
     `selection.lowrank_chunk_mass`), or SparQ's from `score_rank` of K's dimensions
     (`selection.sparq_chunk_mass`), or the exact mass (`selection.chunk_mass`, reading all of K);
  2. chooses per head with `chunk_cache.choose_at` (one row per head, as the shared rule's one
     row), under the budget's shape: sinks, local and open chunks, the recent share, boundary tokens;
  3. lays each head's read out as the shared rule lays out its working buffer
     (`chunk_cache.working_positions`: the sinks, then the chosen and the local chunks in position
     order, then the last tokens of the chunks left out that the budget has room for), and attends
     the open chunk and those slots. The run of consecutive positions every head's read ends with (the
     recent and local chunks: under a budget, its recent share) is sliced out of the stacked buffer in
     place, as dense decode reads it (`shared_tail`); the slots before it are gathered block by block
     as the fold reaches them (`attention.decode_over_blocks`): nothing is copied but the blocks read. With
     `attention="pallas"` on a GPU the per-head decode kernel reads them instead
     (`pallas_kernels.head_decode_attention`: each slot's row loaded in place, nothing gathered first).

With `head_refresh` = N > 1 the heads make steps 1-3 every N steps and at the step after a chunk
closes; the steps between read the slots of their last choice (`ChunkState.head_pos`, `kept_slots`)
and the open chunk as it grows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chunkllm_jax import attention as attn
from chunkllm_jax.chunk_cache import ChunkState, choose_at, working_positions, working_room
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.selection import (chunk_mass, gram_basis, key_gram, local_count, lowrank_chunk_mass, lowrank_coords,
                                    residual_sketch, sparq_chunk_mass)
from pallas_kernels.chunk_decode_attention import combine_splits
from pallas_kernels.head_decode_attention import head_decode_partials, runs_kernel


def head_choice(cfg, ccfg: ChunkConfig, st: ChunkState, q_B1HD, k_LBSKD, layer, score_slot, pos_B,
                key_chunk_BS=None):
  """The candidates each KV head of `layer` keeps at `pos_B`: [B, K, C] bool (steps 1 and 2). `key_chunk_BS`:
  `boundaries.chunk_ids_from_ends` of the state's table, made once a step for every layer (estimated
  scores: a segment sum per chunk, `selection.mass_by_segments`). `score_slot`: the layer's index in the
  low-rank state, which is kept for the sparse layers alone (`chunk_generation._LayerPlan.score_slot`)."""
  K = k_LBSKD.shape[3]
  n_cand = st.n_chunks - local_count(st.chunk_end, st.n_chunks, pos_B, ccfg)
  last = jnp.take_along_axis(st.chunk_end, jnp.maximum(n_cand - 1, 0)[:, None], 1)[:, 0]
  hi = jnp.where(n_cand > 0, last, -1)[:, None, None, None]
  q = attn.split_heads(q_B1HD, K)  # B K G 1 D
  if ccfg.score_estimate == "exact":
    mass = chunk_mass(q, k_LBSKD, hi, st.chunk_end, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                      softcap=cfg.attn_softcap, layer=layer)
  elif ccfg.score_estimate == "lowrank":
    mass = lowrank_chunk_mass(q, st.key_low, st.key_basis[score_slot], hi, st.chunk_end, n_sink=ccfg.n_sink,
                              scale=cfg.attn_scale, layer=score_slot,
                              k_sketch_BKwT=st.key_sketch if ccfg.sketch_bits else None,
                              sketch_estimate=ccfg.sketch_estimate, key_chunk_BT=key_chunk_BS)
  else:
    mass = sparq_chunk_mass(q, k_LBSKD, hi, st.chunk_end, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                            rank=ccfg.score_rank, layer=layer, key_chunk_BT=key_chunk_BS)
  return choose_at(st, mass[:, :, :, 0].max(2), pos_B, ccfg)


LOW_RANK_BLOCK = 1024  # positions of one layer's keys a step of `low_rank_keys` reads


def low_rank_keys(k_LBSKD, length_B, rank: int, sketch_bits: int = 0, layers: tuple[int, ...] | None = None):
  """score_estimate="lowrank"'s state, built once after the prompt for the given `layers` (the sparse ones,
  whose heads score; None: every layer), stacked in their order as L': each layer's and KV head's basis of
  its prompt keys (`selection.key_basis`, [L', B, K, D, rank]), every key's `selection.lowrank_coords`
  in it ([L', B, K, rank + 1, S], in the cache's dtype, as `selection.lowrank_chunk_mass` reads them)
  and its `selection.residual_sketch` ([L', B, K, sketch_bits // 32, S] uint32; S = 0 without one).
  Decode adds each new key's (`new_low_rank_keys`). (Gemma 3 reads 3 of its 18 layers sparsely: all 18 kept
  6x the state.)

  One layer at a time, and in each layer `LOW_RANK_BLOCK` positions at a time (a sum of their Gram
  matrices, then their coordinates and sketches written in place in the stacked outputs): the keys'
  transposes, what the basis misses and its projection for the sketch are temporaries of one block.
  A whole layer at once held 3x its keys beside the state (76 MiB at 32K keys, the decode program's
  largest temporary); all layers at once 2-3x the K buffer (a peak of 2.2x weights + KV + state at
  8K, bench/RESULTS_memory.md)."""
  L, B, S, K, D = k_LBSKD.shape
  layer_ids = jnp.asarray(range(L) if layers is None else layers, jnp.int32)
  size = min(LOW_RANK_BLOCK, S)
  n_blocks = -(-S // size)
  starts = jnp.minimum(jnp.arange(n_blocks) * size, S - size)  # the last block ends at S (it may overlap)
  valid = jnp.arange(S)[None] < length_B[:, None]

  def layer(l, out):  # the l-th of `layers`
    block = lambda i: (jax.lax.dynamic_slice(k_LBSKD, (layer_ids[l], 0, starts[i], 0, 0), (1, B, size, K, D))[0],
                       jax.lax.dynamic_slice_in_dim(valid, starts[i], size, 1))

    def add_gram(i, gram):
      k, ok = block(i)
      fresh = starts[i] + jnp.arange(size) >= i * size  # an overlapping last block counts its new keys once
      return gram + key_gram(k, ok & fresh[None])

    gram = jax.lax.fori_loop(0, n_blocks, add_gram, jnp.zeros((B, K, D, D), jnp.float32))
    basis = gram_basis(gram, rank)

    def write(i, out):  # the block's coordinates and sketches, in place in the stacked outputs
      low, sketch = new_low_rank_keys(jnp.swapaxes(block(i)[0], 1, 2)[None], basis[None], sketch_bits)
      put = lambda buf, x: jax.lax.dynamic_update_slice(buf, jnp.swapaxes(x, -1, -2).astype(buf.dtype),
                                                        (l, 0, 0, 0, starts[i]))
      return out[0], put(out[1], low), put(out[2], sketch)

    out = (jax.lax.dynamic_update_index_in_dim(out[0], basis, l, 0),) + out[1:]
    return jax.lax.fori_loop(0, n_blocks, write, out)

  n = layer_ids.shape[0]
  out = (jnp.zeros((n, B, K, D, rank), jnp.float32), jnp.zeros((n, B, K, rank + 1, S), k_LBSKD.dtype),
         jnp.zeros((n, B, K, sketch_bits // 32, S), jnp.uint32))
  return jax.lax.fori_loop(0, n, layer, out)


def new_low_rank_keys(k_LBKND, basis_LBKDr, sketch_bits: int):
  """Keys' `lowrank_coords` [L, B, K, N, rank + 1] and `residual_sketch` [L, B, K, N, sketch_bits // 32]."""
  low = jax.vmap(lowrank_coords)(k_LBKND, basis_LBKDr)
  if not sketch_bits:
    return low, jnp.zeros(low.shape[:-1] + (0,), jnp.uint32)
  return low, jax.vmap(lambda k, p: residual_sketch(k, p, sketch_bits))(k_LBKND, basis_LBKDr)


def head_slots(ccfg: ChunkConfig, st: ChunkState, picked_BKC, pos_B, W: int):
  """Each head's read as W working slots (step 3): positions and validity [B, K, W], slots used [B, K]."""
  room = working_room(st, pos_B, ccfg)
  pos, valid, used = jax.vmap(lambda sel: working_positions(st, sel, ccfg, W, pos_B, room), in_axes=1, out_axes=1)(
      picked_BKC)
  return pos, valid & (pos <= pos_B[:, None, None]), used


def kept_slots(st: ChunkState, layer):
  """The slots `layer`'s heads chose last (head_refresh > 1): positions and validity [B, K, W], used [B, K]."""
  return tuple(jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
               for x in (st.head_pos, st.head_ok, st.head_used))


def head_attention(cfg, ccfg: ChunkConfig, st: ChunkState, q_B1HD, k_LBSKD, v_LBSKD, layer, score_slot, pos_B,
                   open_kv, *, W: int, blocks: tuple[int, ...], choose_now=True, key_chunk_BS=None):
  """selection="kv_head" attention of one sparse layer: (output [B, 1, H, D], tokens each head read [B, K],
  the slots it read: positions and validity [B, K, W], slots used [B, K]).

  `open_kv`: the open chunk's (keys, values [B, M, K, D], visible [B, M]), as the shared rule reads it.
  With `head_refresh` > 1 the heads choose where `choose_now` (a traced bool) is set, and otherwise read
  the slots of their last choice (`ChunkState.head_pos`). `key_chunk_BS`, `score_slot`: as `head_choice`'s. The heads
  are folded as rows of their own ([B * K] rows of one KV head each), so a block of each head's slots is
  one gather from the stacked buffer and one plain matmul (`attention.fold_packed`)."""
  L, B, S, K, D = k_LBSKD.shape
  if L * B * S * K >= 2**31:  # the gather's flat int32 row index into the stacked buffer
    raise ValueError(f"selection='kv_head' indexes the KV buffer's {L * B * S * K} rows (layers x batch x slots x "
                     "KV heads) with int32: use a smaller batch or max_len (at most 2**31 - 1 rows)")

  def choose():
    choice = head_choice(cfg, ccfg, st, q_B1HD, k_LBSKD, layer, score_slot, pos_B, key_chunk_BS)
    return head_slots(ccfg, st, choice, pos_B, W)

  if ccfg.keeps_head_choice:
    slots = jax.lax.cond(choose_now, choose, lambda: kept_slots(st, layer))
  else:
    slots = choose()
  pos_BKW, ok_BKW, used_BK = slots
  q = attn.split_heads(q_B1HD, K)  # B K G 1 D
  q = q.reshape(B * K, 1, *q.shape[2:])
  per_head = lambda x: jnp.swapaxes(x, 1, 2).reshape(B * K, x.shape[1], 1, D)  # [B, M, K, D] -> [BK, M, 1, D]
  k_open, v_open, open_ok = open_kv
  ok = jnp.repeat(open_ok, K, axis=0)[:, None, None, None]
  carry = attn.fold(attn.fold_init(*q.shape), attn.scores(q, per_head(k_open), ok, scale=cfg.attn_scale,
                                                          softcap=cfg.attn_softcap), ok, per_head(v_open))
  rows = (layer * B + jnp.arange(B)[:, None, None]) * S  # the flat row of (layer, b, position 0, head 0) / K
  flat_k, flat_v = k_LBSKD.reshape(L * B * S * K, D), v_LBSKD.reshape(L * B * S * K, D)
  flat_rows = lambda p: (rows + p) * K + jnp.arange(K)[None, :, None]  # positions [B, K, n] -> rows of flat_k
  n_read = (jnp.sum(ok_BKW, -1) + jnp.sum(open_ok, -1)[:, None]).astype(jnp.float32)

  if ccfg.attention == "pallas" and runs_kernel(D, ccfg.interpret):  # the GPU kernel: every slot read in place
    acc, m, l = head_decode_partials(q.reshape(B, K, -1, D), flat_k, flat_v,
                                     flat_rows(pos_BKW), ok_BKW, used_BK, scale=cfg.attn_scale,
                                     softcap=cfg.attn_softcap, interpret=ccfg.interpret)
    H = K * acc.shape[3]
    by_head = lambda x, d: x.reshape(B, -1, H, d)  # the splits' partials, or the open chunk's fold: [B, P, H, d]
    parts = [jnp.concatenate([by_head(opened, d), by_head(split, d)], axis=1)  # the open chunk: one more split
             for opened, split, d in ((carry.acc, acc, D), (carry.m, m, 1), (carry.l, l, 1))]
    return combine_splits(*parts)[:, None].astype(q_B1HD.dtype), n_read, slots

  # The run of consecutive positions that ends every head's read (the recent and local chunks: the
  # recent share of the budget, the same for every head) is read in place, each row's window sliced
  # out of the stacked buffer as `decode_attention` reads it; only the slots before it are gathered.
  # A gather of 256-byte rows ran at 6.8-9 GiB/s where a slice reads whole runs of them.
  tail_B, last_B = shared_tail(pos_BKW, ok_BKW, used_BK)
  gathered_BK = used_BK - tail_B[:, None]

  def read(start, size):  # slots [start, start + size) of every head: [B * K, size, 1, D] each
    at = flat_rows(jax.lax.dynamic_slice_in_dim(pos_BKW, start, size, axis=2)).reshape(B * K, size, 1)
    return flat_k[at], flat_v[at]

  def ok_fn(start, size):
    slot = start + jnp.arange(size)
    ok = jax.lax.dynamic_slice_in_dim(ok_BKW, start, size, axis=2) & (slot < gathered_BK[..., None])
    return ok.reshape(B * K, size)

  n_slots = -(-jnp.max(gathered_BK) // blocks[-1]) * blocks[-1]
  carry = attn.decode_over_blocks(q, read, ok_fn, 0, n_slots, carry, blocks=blocks, scale=cfg.attn_scale,
                                  softcap=cfg.attn_softcap)
  carry = jax.tree.map(lambda x: x.reshape(B, K, *x.shape[2:]), carry)  # rows of one head -> rows of K heads
  first_B = last_B - tail_B + 1

  def read_tail(start, size):
    return tuple(attn.row_window(buf, layer, first_B + start, size)[0] for buf in (k_LBSKD, v_LBSKD))

  def tail_ok(start, size):  # a window clamped at the buffer's end holds keys folded already: left out
    at = attn.window_positions(first_B + start, size, S)
    return (at >= (first_B + start)[:, None]) & (at <= last_B[:, None])

  tail_blocks = attn.decode_blocks(S)  # a dense read, in the dense decode's blocks
  end = -(-jnp.max(tail_B) // tail_blocks[-1]) * tail_blocks[-1]
  carry = attn.decode_over_blocks(attn.split_heads(q_B1HD, K), read_tail, tail_ok, 0, end, carry,
                                  blocks=tail_blocks, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
  return attn.merge_heads(attn.fold_finish(carry)[0]).astype(q_B1HD.dtype), n_read, slots


def shared_tail(pos_BKW, ok_BKW, used_BK):
  """Per row, how many of the last slots of every head's read hold the same run of consecutive positions,
  ending at the same position for every head (0 where the heads' reads end apart), and that position: [B] each."""
  s = jnp.arange(pos_BKW.shape[-1])
  used = used_BK[..., None]
  last = jnp.take_along_axis(pos_BKW, jnp.maximum(used - 1, 0), -1)  # [B, K, 1]
  in_use = s < used
  breaks = in_use & ~(ok_BKW & (pos_BKW == last - (used - 1 - s)))
  tail_BK = used_BK - 1 - jnp.max(jnp.where(breaks, s, -1), -1)
  same_end = jnp.all(last[:, :, 0] == last[:, :1, 0], -1)
  return jnp.where(same_end, jnp.min(tail_BK, -1), 0), last[:, 0, 0]
