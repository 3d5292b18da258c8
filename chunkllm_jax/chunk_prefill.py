"""Chunk-sparse prefill: each chunk's queries read the sinks, the chunks chosen at the boundary
before it, the local chunks and (causally) their own chunk.

Prefill runs layer by layer over all tokens, so a layer can only use a selection that is already
made: the layers up to the first selection layer prefill densely, and every later sparse layer
reads what the vote of the selection layers run so far chose at each boundary (`prompt_selection`
over the boundary rows of `adapter_rows` / `attention_rows`). The segmentation comes from layer 0,
which therefore always prefills densely.

Chunk ids here are the kernel view of `boundaries`' convention (`kernel_ids`): the sinks are id 0,
table chunk j is id j + 1, the open chunk after the last boundary is id n_chunks + 1, padding is -1.
Ids are monotone along a row, so a block of positions holds a contiguous range of ids, and "which
key blocks does this query block read" is two prefix sums over a [C, C] chunk-visibility table:
no T x T array anywhere.

Chunks of 20-40 tokens scattered over a long prompt touch nearly every 128- or 256-token block
(measured: 90-100% of the causal block pairs at 25% retention), so reading blocks in place saves
almost nothing. The XLA path therefore packs, per query block, the positions of the chunks its
queries read (as decode compacts its working buffer) and folds only the used packed blocks into
an online softmax: the work follows the union of the block's selections. `attention="pallas"`
runs the block-sparse kernel of `pallas_kernels/` (in place, block lists) on the same rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chunkllm_jax import attention as attn
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.selection import KEY_BLOCK, adapter_window_probs, choose, chunk_lengths, chunk_mass, local_tokens

PREFILL_BLOCK = 256  # query and key block of the sparse prefill loop


def kernel_ids(chunk_id_BT, valid_BT, max_chunks: int):
  """The prefill's view of the chunk ids: sinks 0, chunk j -> j + 1, padding -1 (`boundaries`).
  Chunks past the table's end (overflow) share the last id, so they stay visible as one chunk."""
  return jnp.where(valid_BT, jnp.minimum(chunk_id_BT + 1, max_chunks + 1), -1).astype(jnp.int32)


def selection_rows(ends_BC, n_chunks_B, last_B, ccfg: ChunkConfig):
  """The selections of the prompt, one row per chunk it serves (chunk s = 0..C; s = n_chunks is the
  open chunk after the last boundary). Per row, each [B, C + 1] int32: the position of the last
  query that chooses, the candidate count (chunks completed before s, minus the local ones), the
  tokens the budget must also cover (sinks, local chunks, what of chunk s is read), and the tokens
  seen. `ccfg.prefill_selection` says whose queries choose for chunk s:
  - "own": chunk s's own last queries (the prompt is known whole, so a question's chunk reads what
    the question asks for);
  - "previous": the last queries before chunk s, at the boundary that opened it, as in decode.
  Rows past the open chunk have no candidate."""
  B, C = ends_BC.shape
  s = jnp.arange(C + 1)[None]
  start = jnp.concatenate([jnp.full((B, 1), ccfg.n_sink, ends_BC.dtype), ends_BC + 1], axis=1)  # chunk s's first
  own_end = jnp.where(s < n_chunks_B[:, None], jnp.pad(ends_BC, [(0, 0), (0, 1)]), last_B[:, None])
  row_end = own_end if ccfg.prefill_selection == "own" else start - 1
  live = s <= n_chunks_B[:, None]
  n_cand = jnp.where(live, jnp.maximum(s - ccfg.n_local, 0), 0)
  s_B = jnp.broadcast_to(s, (B, C + 1))
  fixed = ccfg.n_sink + local_tokens(ends_BC, s_B, ccfg.n_local, ccfg.n_sink) + jnp.maximum(row_end + 1 - start, 0)
  return (row_end.astype(jnp.int32), n_cand.astype(jnp.int32), fixed.astype(jnp.int32),
          (jnp.maximum(row_end, 0) + 1).astype(jnp.int32))


def adapter_rows(q_BTd, k_BTd, row_end_BR, ends_BC, n_cand_BR, *, n_queries: int = 1):
  """QK-Adapter distributions of the selection rows: [B, R, C]. A row scores with the q~ of the
  `n_queries` tokens up to its last query (the max over them, `adapter_window_probs`); the chunks'
  keys are k~ at their ends."""
  q_pos = row_end_BR[..., None] - jnp.arange(n_queries)  # [B, R, Q]; < 0: no such query
  q = jnp.take_along_axis(q_BTd[:, :, None], jnp.maximum(q_pos, 0)[..., None], axis=1)  # [B, R, Q, d_c]
  k = jnp.take_along_axis(k_BTd, jnp.maximum(ends_BC, 0)[..., None], axis=1)
  return adapter_window_probs(q, k, ends_BC, n_cand_BR, q_pos)


def attention_rows(q_BTHD, k_BTKD, row_end_BR, ends_BC, n_cand_BR, *, n_sink: int, scale: float, softcap=None,
                   n_queries: int = 1, rows_at_once: int = 128, key_block: int = KEY_BLOCK, heads: str = "max"):
  """Frozen-attention distributions of the selection rows: [B, R, C]; `selection.attention_probs`'
  rule. A row scores with the queries of the `n_queries` tokens up to its last query (the max over
  them); about `rows_at_once` queries at a time.

  A row reads only the candidates' tokens, [n_sink, end of its last candidate], so each block of
  rows folds only the key blocks up to its own last candidate into an online softmax (causal work:
  about half of reading every key, and nothing for rows with no candidate, most of a table sized
  for max_len); the fold is `selection.chunk_mass`."""
  B, R = row_end_BR.shape
  K, H = k_BTKD.shape[2], q_BTHD.shape[2]
  C = ends_BC.shape[1]
  nb = max(rows_at_once // n_queries, 1)  # rows per block
  pad = -R % nb
  q_pos = jnp.pad(row_end_BR, [(0, 0), (0, pad)], constant_values=-1)[..., None] - jnp.arange(n_queries)
  q_BRQHD = jnp.take_along_axis(q_BTHD[:, :, None], jnp.maximum(q_pos, 0)[..., None, None], axis=1)
  n_cand = jnp.pad(n_cand_BR, [(0, 0), (0, pad)])
  last = jnp.where(n_cand > 0, jnp.take_along_axis(ends_BC, jnp.maximum(n_cand - 1, 0), axis=1), -1)
  hi_RQ = jnp.minimum(last[..., None], q_pos)  # the last key each query reads; < n_sink: none

  def block(i):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * nb, nb, axis=1)
    q = attn.split_heads(sl(q_BRQHD).reshape(B, nb * n_queries, H, -1), K)  # [B, K, G, r, D]
    mass = chunk_mass(q, k_BTKD, sl(hi_RQ).reshape(B, 1, 1, nb * n_queries), ends_BC, n_sink=n_sink, scale=scale,
                      softcap=softcap, key_block=key_block)  # [B, K, G, r, C]
    score = mass.max(axis=(1, 2)) if heads == "max" else mass.mean(axis=(1, 2))
    return score.reshape(B, nb, n_queries, C).max(2)

  out = jax.lax.map(block, jnp.arange((R + pad) // nb))  # [blocks, B, nb, C]
  out = jnp.moveaxis(out, 0, 1).reshape(B, R + pad, C)[:, :R]
  return jnp.where(jnp.arange(C) < n_cand_BR[..., None], out, 0.0)


def prompt_selection(vote_BRC, ends_BC, n_chunks_B, rows, ccfg: ChunkConfig):
  """The chunks kept for each prompt chunk, from the selection layers' vote on its row: [B, C + 1, C]
  bool. `rows`: `selection_rows`' output."""
  _, n_cand, fixed, seen = rows
  start = jnp.pad(ends_BC[:, :-1] + 1, [(0, 0), (1, 0)], constant_values=ccfg.n_sink)
  lengths = chunk_lengths(start, ends_BC, n_chunks_B)
  return choose(vote_BRC, n_cand, lengths, fixed, seen, ccfg)


def selection_table(chosen_BRC, n_ids: int):
  """vis[b, c_q, c_k]: chunk id c_k was selected for the queries of chunk id c_q. [B, n_ids, n_ids] bool.

  Row s of `chosen_BRC` serves table chunk s, id s + 1; table chunk i is id i + 1."""
  B, R, C = chosen_BRC.shape
  vis = jnp.zeros((B, n_ids, n_ids), bool)
  rows, cols = min(R, n_ids - 1), min(C, n_ids - 1)
  return vis.at[:, 1:1 + rows, 1:1 + cols].set(chosen_BRC[:, :rows, :cols])


def token_mask(cq_BT, ck_BS, q_pos_BT, k_pos_BS, vis_BCC, end_BS, n_local: int):
  """The visibility rule on a tile: [B, T, S] bool. `end_BS` marks keys that may be read from a
  selected chunk (all of them, or only its boundary token for `keep="boundary"`)."""
  structural = (ck_BS[:, None, :] == 0) | (ck_BS[:, None, :] >= cq_BT[:, :, None] - n_local)
  picked = jax.vmap(lambda v, cq, ck: v[jnp.maximum(cq, 0)[:, None], jnp.maximum(ck, 0)[None]])(vis_BCC, cq_BT, ck_BS)
  reads = structural | (picked & end_BS[:, None, :])
  causal = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]  # positions [B or 1, T / S]
  return reads & causal & (cq_BT >= 0)[:, :, None] & (ck_BS >= 0)[:, None, :]


def chunks_read(chunk_id_BT, vis_BCC, n_local: int, block: int):
  """The chunk ids each query block reads: [B, nq, n_ids] bool, and whether the block holds tokens [B, nq].

  A query block holds ids [lo, hi] (ids are monotone); it reads id c <= hi if c is the sinks, local to
  some query (c >= lo - n_local), or selected by some query chunk (a prefix sum over the table's rows)."""
  B, T = chunk_id_BT.shape
  n_ids = vis_BCC.shape[-1]
  c_t = chunk_id_BT.reshape(B, T // block, block)
  live = (c_t >= 0).any(-1)
  lo = jnp.where(c_t >= 0, c_t, n_ids).min(-1)
  hi = c_t.max(-1)
  rows_cum = jnp.pad(jnp.cumsum(vis_BCC.astype(jnp.int32), axis=1), ((0, 0), (1, 0), (0, 0)))  # [B, n+1, n]
  take = lambda r: jnp.take_along_axis(rows_cum, jnp.clip(r, 0, n_ids)[..., None], axis=1)
  selected = (take(hi + 1) - take(lo)) > 0
  c = jnp.arange(n_ids)
  reads = (selected | (c == 0) | (c >= (lo - n_local)[..., None])) & (c <= hi[..., None]) & live[..., None]
  return reads, live, lo, hi


def block_lists(chunk_id_BT, vis_BCC, n_local: int, block: int):
  """The key blocks each query block reads in place, ascending: ids [B, nq, nk] (0-padded), counts [B, nq].

  A key block holding ids [klo, khi] is read if any of them is read (a prefix sum over the columns).
  For the block-sparse Pallas kernel; scattered chunks make most blocks active, which is why the
  XLA path compacts instead (`packed_key_positions`)."""
  reads, live, lo, hi = chunks_read(chunk_id_BT, vis_BCC, n_local, block)
  n_ids, nb = vis_BCC.shape[-1], reads.shape[1]
  reads_cum = jnp.pad(jnp.cumsum(reads.astype(jnp.int32), axis=-1), ((0, 0), (0, 0), (1, 0)))
  at = lambda x: jnp.take_along_axis(reads_cum, jnp.broadcast_to(jnp.clip(x, 0, n_ids)[:, None, :], reads.shape[:2] + (nb,)), -1)
  hit = (at(hi + 1) - at(lo)) > 0
  causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
  active = hit & causal & live[:, :, None] & live[:, None, :]
  order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
  n = jnp.sum(active, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.arange(nb) < n[..., None], order, 0), n


def packed_key_positions(chunk_id_BT, vis_BCC, n_local: int, block: int):
  """Per query block, the positions of every token it may read, packed back to back in ascending
  order: [B, nq, T] int32, and how many are used [B, nq].

  The compacted layout of decode's working buffer, made per query block: the key loop then reads
  only as many slots as the block's queries can see, however the chunks fall across blocks."""
  B, T = chunk_id_BT.shape
  n_ids = vis_BCC.shape[-1]
  reads, _, _, _ = chunks_read(chunk_id_BT, vis_BCC, n_local, block)
  ids = jnp.where(chunk_id_BT >= 0, chunk_id_BT, n_ids)
  size = jax.vmap(lambda i: jnp.bincount(i, length=n_ids + 1))(ids)[:, :n_ids]  # tokens per id
  first = jnp.cumsum(size, axis=-1) - size  # ids are monotone: id c starts here
  q_end = (jnp.arange(reads.shape[1]) + 1) * block  # a chunk running past the block is cut there (causal)
  size_q = jnp.clip(q_end[None, :, None] - first[:, None], 0, size[:, None])
  length = jnp.where(reads, size_q, 0)  # [B, nq, n_ids]
  offs_end = jnp.cumsum(length, axis=-1)
  w = jnp.arange(T)
  which = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, w, side="right")))(offs_end)  # id of packed slot w
  which = jnp.minimum(which, n_ids - 1)
  start = jnp.take_along_axis(jnp.broadcast_to(first[:, None], offs_end.shape), which, -1)
  pos = start + w - jnp.take_along_axis(offs_end - length, which, -1)
  used = offs_end[..., -1]
  return jnp.where(w < used[..., None], pos, 0).astype(jnp.int32), used.astype(jnp.int32)


def sparse_prefill_attention(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, vis_BCC, end_BT, *, n_local: int,
                             scale: float, softcap: float | None = None, block: int = PREFILL_BLOCK):
  """Chunk-sparse causal attention (XLA): each query block gathers the tokens its queries may read
  into packed key blocks, and folds only the used ones into an online softmax."""
  B, T0, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  pad = -T0 % block
  if pad:
    padT = lambda x, c=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=c)
    q_BTHD, k_BTKD, v_BTKD, end_BT = padT(q_BTHD), padT(k_BTKD), padT(v_BTKD), padT(end_BT, False)
    chunk_id_BT = padT(chunk_id_BT, -1)
  T = T0 + pad
  pos_BQW, used_BQ = packed_key_positions(chunk_id_BT, vis_BCC, n_local, block)
  slot_in = jnp.arange(block)

  q_BKGTD = attn.split_heads(q_BTHD, K)

  def one_query_block(qi):
    q_pos = (qi * block + slot_in)[None]
    rows_of = lambda x, axis=1: jax.lax.dynamic_slice_in_dim(x, qi * block, block, axis=axis)
    q = rows_of(q_BKGTD, axis=3)
    cq = rows_of(chunk_id_BT)
    pos_BW, used_B = pos_BQW[:, qi], used_BQ[:, qi]

    def body(i, carry):
      kp_BS = jax.lax.dynamic_slice_in_dim(pos_BW, i * block, block, axis=1)  # packed slots -> positions
      take = lambda x: jnp.take_along_axis(x, kp_BS.reshape(kp_BS.shape + (1,) * (x.ndim - 2)), axis=1)
      kk, vv, ck, ek = take(k_BTKD), take(v_BTKD), take(chunk_id_BT), take(end_BT)
      ok = token_mask(cq, ck, q_pos, kp_BS, vis_BCC, ek, n_local)
      ok = (ok & (i * block + slot_in < used_B[:, None])[:, None, :])[:, None, None]
      return attn.fold(carry, attn.scores(q, kk, ok, scale=scale, softcap=softcap), ok, vv)

    carry = jax.lax.fori_loop(0, -(-jnp.max(used_B) // block), body, attn.fold_init(*q.shape))
    return attn.merge_heads(attn.fold_finish(carry)[0])  # a padding query sees nothing: zeros

  o_QBTHD = jax.lax.map(one_query_block, jnp.arange(T // block))
  o = jnp.moveaxis(o_QBTHD, 0, 1).reshape(B, T, H, D)
  return o[:, :T0].astype(q_BTHD.dtype)


def prefill_attention(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, vis_BNN, end_BT, ccfg: ChunkConfig, *, scale: float,
                      softcap: float | None, use_kernel: bool, block: int = PREFILL_BLOCK):
  """One sparse layer's prefill attention, by the XLA loop or the Pallas kernel (same rule, same lists)."""
  if not use_kernel:
    return sparse_prefill_attention(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, vis_BNN, end_BT, n_local=ccfg.n_local,
                                    scale=scale, softcap=softcap, block=block)
  if softcap is not None:  # the kernels take no soft-capping: it would be dropped, not applied
    raise ValueError(f"the prefill kernel does not support attention logit soft-capping (softcap={softcap}); "
                     "use attention='xla'")
  from pallas_kernels.chunk_prefill_attention import chunk_prefill_attention

  B, T0 = chunk_id_BT.shape
  pad = -T0 % block
  padT = lambda x, c=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=c)
  q, k, v, ids = padT(q_BTHD), padT(k_BTKD), padT(v_BTKD), padT(chunk_id_BT, -1)
  blocks_BQN, n_BQ = block_lists(ids, vis_BNN, ccfg.n_local, block)
  # the kernel takes each token's selection as a list of kernel ids, -1 padded
  n_ids = vis_BNN.shape[-1]
  N = min(ccfg.top_chunks, n_ids) if not ccfg.budgeted else n_ids
  order = jnp.argsort(~vis_BNN, axis=-1, stable=True)[..., :N].astype(jnp.int32)  # selected ids first
  lists = jnp.where(jnp.take_along_axis(vis_BNN, order, -1), order, -1)  # [B, n_ids, N]
  sel_BTN = jnp.take_along_axis(lists, jnp.maximum(ids, 0)[..., None], axis=1)
  o = chunk_prefill_attention(q, k, v, blocks_BQN, n_BQ, ids, sel_BTN, scale=scale, block_q=block, block_k=block,
                              n_sink=ccfg.n_sink, n_local=ccfg.n_local, interpret=ccfg.interpret)
  return o[:, :T0]
