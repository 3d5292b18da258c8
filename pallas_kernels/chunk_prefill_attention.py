"""Chunk-sparse prefill attention: block-sparse flash attention, forward only.

The mask, without a T x T array. Chunk ids are non-decreasing along a row, consecutive from 0,
and -1 marks padding (which only comes after the row's tokens). Query t sees key s iff
  s <= t, both are tokens (chunk id >= 0), and one of
  - s < n_sink                                  (sinks),
  - chunk(s) >= chunk(t) - n_local              (the local chunks and, causally, t's own chunk),
  - chunk(s) in sel_BTN[b, t]                   (the chunks selected for t's chunk; -1 = empty).
`sel_BTN` is per query *token* (`sel_BCN[b, chunk_id_BT]`, gathered by the caller): T x N ints,
and each kernel block reads its own rows of it with a plain BlockSpec. A per-chunk table
[C, C] would be smaller but needs a gather inside the kernel. Dense causal prefill is
`n_local >= max_chunks`.

Sparsity: per query block, `kv_blocks_BQN[b, q, :n_kv_BQ[b, q]]` lists the KV blocks to read
(scalar-prefetched, they drive the K/V index maps); `prefill_block_lists` builds them from the
chunk ids. The token mask applies inside each block. A query that sees nothing gets zeros.

On GPU the dispatcher runs the Triton version, `chunk_prefill_attention_gpu` (same arguments,
same result).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import NEG_INF, check_operands, implementation, require


def token_visible(q_pos_T1, k_pos_1S, cq_T1, ck_1S, sel_TN, *, n_sink: int, n_local: int):
  """The rule above on one tile: [T, 1] query side, [1, S] key side. Returns [T, S] bool."""
  return visible_given_selections(q_pos_T1, k_pos_1S, cq_T1, ck_1S,
                                  [sel_TN[:, n:n + 1] for n in range(sel_TN.shape[-1])],
                                  n_sink=n_sink, n_local=n_local)


def visible_given_selections(q_pos_T1, k_pos_1S, cq_T1, ck_1S, sel_cols_T1, *, n_sink: int,
                             n_local: int):
  """`token_visible` with the selections as a list of [T, 1] columns: the GPU kernel loads them
  one by one (Triton lowers no value slicing), the TPU kernel slices them from its tile."""
  in_sel = jnp.zeros(jnp.broadcast_shapes(cq_T1.shape, ck_1S.shape), bool)
  for sel_T1 in sel_cols_T1:  # static: N compares, no gather
    in_sel |= sel_T1 == ck_1S
  reads = (k_pos_1S < n_sink) | (ck_1S >= cq_T1 - n_local) | in_sel
  return (k_pos_1S <= q_pos_T1) & (cq_T1 >= 0) & (ck_1S >= 0) & reads


def prefill_block_lists(chunk_id_BT, sel_BTN, *, block_q: int, block_k: int, n_sink: int,
                        n_local: int, max_chunks: int, max_blocks: int | None = None):
  """The KV blocks each query block must read: (kv_blocks_BQN, n_kv_BQ), ascending, 0-padded.

  Chunk-level and conservative (a listed block may have no visible token for some tile); memory
  O(T/block * max_chunks), never T x T. Needs chunk ids < max_chunks: a larger id is not seen,
  and its blocks would be left off the lists.
  """
  B, T = chunk_id_BT.shape
  nq, nk = T // block_q, T // block_k
  max_blocks = nk if max_blocks is None else max_blocks
  c_C = jnp.arange(max_chunks)
  # query block q reads chunks [min(cq) - n_local, max(cq)] (ids are monotone), plus its selections
  cq_BQt = chunk_id_BT.reshape(B, nq, block_q)
  live_BQ = (cq_BQt >= 0).any(-1)
  hi_BQ = cq_BQt.max(-1)
  lo_BQ = jnp.where(cq_BQt >= 0, cq_BQt, max_chunks).min(-1) - n_local
  reads_BQC = (c_C >= lo_BQ[..., None]) & (c_C <= hi_BQ[..., None])
  sel_BQX = jnp.where(cq_BQt[..., None] >= 0, sel_BTN.reshape(B, nq, block_q, -1), -1)
  sel_BQX = sel_BQX.reshape(B, nq, -1)
  hit_BQC = jnp.zeros((B, nq, max_chunks + 1), bool)  # last column soaks up the -1 entries
  sel_BQX = jnp.where((sel_BQX >= 0) & (sel_BQX < max_chunks), sel_BQX, max_chunks)
  hit_BQC = hit_BQC.at[jnp.arange(B)[:, None, None], jnp.arange(nq)[None, :, None],
                       sel_BQX].set(True)
  reads_BQC |= hit_BQC[..., :max_chunks]
  # kv block k holds chunks [min(ck), max(ck)]
  ck_BKt = chunk_id_BT.reshape(B, nk, block_k)
  k_hi_BK = ck_BKt.max(-1)
  k_lo_BK = jnp.where(ck_BKt >= 0, ck_BKt, max_chunks).min(-1)
  holds_BKC = (c_C >= k_lo_BK[..., None]) & (c_C <= k_hi_BK[..., None])
  pair_BQK = jnp.einsum("bqc,bkc->bqk", reads_BQC.astype(jnp.float32),
                        holds_BKC.astype(jnp.float32)) > 0
  sink_K = jnp.arange(nk) * block_k < n_sink
  causal_QK = jnp.arange(nk)[None] * block_k <= (jnp.arange(nq)[:, None] + 1) * block_q - 1
  active_BQK = (pair_BQK | sink_K) & causal_QK & live_BQ[..., None] & (k_hi_BK >= 0)[:, None]
  order_BQK = jnp.argsort(~active_BQK, axis=-1, stable=True).astype(jnp.int32)
  n_BQ = jnp.minimum(active_BQK.sum(-1), max_blocks).astype(jnp.int32)
  ids_BQN = order_BQK[..., :max_blocks]
  ids_BQN = jnp.where(jnp.arange(max_blocks) < n_BQ[..., None], ids_BQN, 0)
  return ids_BQN, n_BQ


def chunk_prefill_attention_reference(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ,
                                      chunk_id_BT, sel_BTN, *, scale: float, block_q: int,
                                      block_k: int, n_sink: int, n_local: int):
  """Dense masked attention, one query block at a time: memory O(block_q * T). [B, T, H, D]."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  nq, N = kv_blocks_BQN.shape[1:]
  pos_S = jnp.arange(T)
  live_BQN = jnp.arange(N) < n_kv_BQ[..., None]

  def one_block(qi):
    # only the listed blocks are read
    ids_BN, live_BN = kv_blocks_BQN[:, qi], live_BQN[:, qi]
    listed_BK = ((ids_BN[..., None] == jnp.arange(T // block_k)) & live_BN[..., None]).any(-2)
    listed_BS = jnp.repeat(listed_BK, block_k, axis=-1)
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, qi * block_q, block_q, axis=1)
    q_pos_T = qi * block_q + jnp.arange(block_q)
    vis_BTS = jax.vmap(lambda cq, ck, sel: token_visible(
        q_pos_T[:, None], pos_S[None], cq[:, None], ck[None], sel, n_sink=n_sink,
        n_local=n_local))(rows(chunk_id_BT), chunk_id_BT, rows(sel_BTN))
    mask_BTS = vis_BTS & listed_BS[:, None]
    q_BTKGD = rows(q_BTHD).reshape(B, block_q, K, H // K, D)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD,
                         preferred_element_type=jnp.float32) * scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v_BTKD.dtype), v_BTKD,
                         preferred_element_type=jnp.float32)
    o_BTKGD = jnp.where(mask_BTS.any(-1)[:, :, None, None, None], o_BTKGD, 0.0)  # sees nothing
    return o_BTKGD.reshape(B, block_q, H, D).astype(q_BTHD.dtype)

  o_QBTHD = jax.lax.map(one_block, jnp.arange(nq))
  return jnp.moveaxis(o_QBTHD, 0, 1).reshape(B, T, H, D)


def _prefill_kernel(ids_ref, n_ref,  # scalar prefetch (SMEM), flat
                    q_ref, k_ref, v_ref, cq_ref, ck_ref, sel_ref,
                    # [bq, H, D], [bk, K, D] x2, [bq, 1], [1, bk], [bq, N]
                    o_ref, acc_sc, m_sc, l_sc, *, scale: float, n_sink: int, n_local: int,
                    n_max: int):
  b, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nq = pl.num_programs(1)
  bq, H, D = q_ref.shape
  bk, K = k_ref.shape[:2]
  G = H // K
  row = b * nq + qi

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

  @pl.when(j < n_ref[row])
  def _step():
    kv_blk = ids_ref[row * n_max + j]
    q_pos_T1 = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos_1S = kv_blk * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    vis_TS = token_visible(q_pos_T1, k_pos_1S, cq_ref[...], ck_ref[...], sel_ref[...],
                           n_sink=n_sink, n_local=n_local)
    for h in range(H):  # static; head h reads kv head h // G
      kh = h // G
      s_TS = jax.lax.dot_general(q_ref[:, h, :], k_ref[:, kh, :], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
      s_TS = jnp.where(vis_TS, s_TS, NEG_INF)
      m_prev_T1 = m_sc[h]
      m_new_T1 = jnp.maximum(m_prev_T1, s_TS.max(-1, keepdims=True))
      p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_new_T1), 0.0)
      corr_T1 = jnp.exp(m_prev_T1 - m_new_T1)
      l_sc[h] = corr_T1 * l_sc[h] + p_TS.sum(-1, keepdims=True)
      pv_TD = jnp.dot(p_TS.astype(v_ref.dtype), v_ref[:, kh, :],
                      preferred_element_type=jnp.float32)
      acc_sc[h] = corr_T1 * acc_sc[h] + pv_TD
      m_sc[h] = m_new_T1

  @pl.when(j == pl.num_programs(2) - 1)
  def _done():
    for h in range(H):
      l_T1 = l_sc[h]
      o_ref[:, h, :] = (acc_sc[h] / jnp.where(l_T1 > 0, l_T1, 1.0)).astype(o_ref.dtype)


def check_prefill_inputs(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT, sel_BTN, block_q: int,
                         block_k: int):
  """Shapes both prefill kernels (TPU and GPU) need. Returns (B, T, H, D, K, nq, N). The block lists and
  selections are read per row and query block: one that broadcasts (a batch of 1, a short T) would read
  outside its array, which interpret mode pads instead of refusing."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  nq = T // block_q
  N = kv_blocks_BQN.shape[-1]
  chex.assert_shape([k_BTKD, v_BTKD], (B, T, K, D))
  chex.assert_shape([kv_blocks_BQN], (B, nq, N))
  chex.assert_shape([n_kv_BQ], (B, nq))
  chex.assert_shape([chunk_id_BT], (B, T))
  chex.assert_shape([sel_BTN], (B, T, None))
  check_operands("chunk_prefill_attention", floats=[("q", q_BTHD), ("k", k_BTKD)],
                 same_dtype=[("k", k_BTKD), ("v", v_BTKD)],
                 ints=[("kv_blocks", kv_blocks_BQN), ("n_kv", n_kv_BQ), ("chunk_id", chunk_id_BT), ("sel", sel_BTN)])
  require(H % K == 0, f"chunk_prefill_attention: {H} query heads do not group over {K} KV heads")
  require(T % block_q == 0 and T % block_k == 0,
          f"chunk_prefill_attention: {T} tokens are not whole blocks of {block_q} queries and {block_k} keys")
  return B, T, H, D, K, nq, N


def block_selections(sel_BTN):
  """The selections as both kernels read them: int32, and at least one column (-1, no chunk) where none is
  given (top_chunks=0), since a block cannot be 0 wide."""
  sel_BTN = sel_BTN.astype(jnp.int32)
  return jnp.full((*sel_BTN.shape[:2], 1), -1, jnp.int32) if sel_BTN.shape[-1] == 0 else sel_BTN


def chunk_prefill_attention_kernel(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT,
                                   sel_BTN, *, scale: float, block_q: int, block_k: int,
                                   n_sink: int, n_local: int, interpret=False):
  """The Pallas path. Grid (row, query block, listed KV block). Returns [B, T, H, D]."""
  B, T, H, D, K, nq, N = check_prefill_inputs(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT,
                                               sel_BTN, block_q, block_k)
  n_flat = jnp.clip(n_kv_BQ.astype(jnp.int32), 0, N).reshape(-1)
  live = jnp.arange(N) < n_flat.reshape(B, nq, 1)
  ids_flat = jnp.where(live, kv_blocks_BQN.astype(jnp.int32), 0).reshape(-1)

  def kv_block(b, q, j, ids, n):
    row = b * nq + q
    return ids[row * N + jnp.minimum(j, jnp.maximum(n[row] - 1, 0))]

  kv_spec = pl.BlockSpec((None, block_k, K, D),
                         lambda b, q, j, ids, n: (b, kv_block(b, q, j, ids, n), 0, 0))
  ck_spec = pl.BlockSpec((None, 1, block_k),
                         lambda b, q, j, ids, n: (b, 0, kv_block(b, q, j, ids, n)))
  q_spec = pl.BlockSpec((None, block_q, H, D), lambda b, q, j, ids, n: (b, q, 0, 0))
  cq_spec = pl.BlockSpec((None, block_q, 1), lambda b, q, j, ids, n: (b, q, 0))
  f32 = jnp.float32
  chunk_id_BT = chunk_id_BT.astype(jnp.int32)
  sel_BTN = block_selections(sel_BTN)
  sel_spec = pl.BlockSpec((None, block_q, sel_BTN.shape[-1]), lambda b, q, j, ids, n: (b, q, 0))
  return pl.pallas_call(
      functools.partial(_prefill_kernel, scale=scale, n_sink=n_sink, n_local=n_local, n_max=N),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, nq, N),
          in_specs=[q_spec, kv_spec, kv_spec, cq_spec, ck_spec, sel_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((H, block_q, D), f32), pltpu.VMEM((H, block_q, 1), f32),
                          pltpu.VMEM((H, block_q, 1), f32)]),
      out_shape=jax.ShapeDtypeStruct((B, T, H, D), q_BTHD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(ids_flat, n_flat, q_BTHD, k_BTKD, v_BTKD, chunk_id_BT[..., None], chunk_id_BT[:, None], sel_BTN)


def chunk_prefill_attention(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT, sel_BTN,
                            *, scale: float, block_q: int, block_k: int, n_sink: int,
                            n_local: int, interpret=False, backend: str | None = None):
  """Dispatcher: the GPU kernel on GPU (or `backend="gpu"`), the Pallas kernel on TPU or in
  interpret mode, else the jnp reference."""
  kw = dict(scale=scale, block_q=block_q, block_k=block_k, n_sink=n_sink, n_local=n_local)
  args = (q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT, sel_BTN)
  check_prefill_inputs(*args, block_q, block_k)  # on every path, so that each refuses what the others do
  if implementation(interpret, backend) == "gpu":
    # imported here: the GPU module imports this one
    from pallas_kernels.chunk_prefill_attention_gpu import chunk_prefill_attention_gpu
    return chunk_prefill_attention_gpu(*args, **kw, interpret=interpret)
  if implementation(interpret, backend) == "pallas":
    return chunk_prefill_attention_kernel(*args, **kw, interpret=interpret)
  return chunk_prefill_attention_reference(*args, **kw)
