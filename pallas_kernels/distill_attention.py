"""Distillation attention: causal flash attention that also gives the teacher P[t, j].

P[t, j] is the layer's softmax attention of query t, averaged over heads, summed over the tokens
of chunk j, then renormalised over t's candidate chunks (docs/design.md, section 8):
- sink tokens (positions < n_sink) carry no mass;
- chunk j is a candidate for t iff it ended before t's chunk began. With non-decreasing,
  consecutive chunk ids that is j < chunk(t): t's own open chunk is excluded.
Rows without candidate mass are all zeros.

Two passes, never a T x T buffer: pass 1 keeps the running max and sum per (query, head); pass 2
recomputes the scores, normalises them with those, and bins them into chunks with a one-hot
[block_k, max_chunks] matmul (and accumulates the attention output on the way). Memory is
O(T * max_chunks). Forward only: use P under `stop_gradient`.

Keys with chunk id -1 are padding; rows are left-aligned (position = index). Chunk ids must be
< max_chunks (a larger id has no bin).

On GPU the dispatcher runs the Triton version, `distill_attention_gpu` (same arguments, same
result; a different split of the work, explained there).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import NEG_INF, check_operands, implementation, require


def renormalise(p_raw_BTC, chunk_id_BT):
  """Keeps t's candidate chunks (j < chunk(t)) and rescales them to sum to 1 (or all 0)."""
  cand_BTC = jnp.arange(p_raw_BTC.shape[-1]) < chunk_id_BT[..., None]
  p_BTC = jnp.where(cand_BTC, p_raw_BTC, 0.0)
  tot_BT1 = p_BTC.sum(-1, keepdims=True)
  return p_BTC / jnp.where(tot_BT1 > 0, tot_BT1, 1.0)


def distill_attention_reference(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float,
                                max_chunks: int, n_sink: int, block_q: int, block_k: int,
                                softcap: float | None = None):
  """Dense causal attention, one query block at a time. Returns (o_BTHD, p_BTC float32)."""
  del block_k  # only the kernel tiles keys
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  pos_S = jnp.arange(T)
  onehot_BSC = (chunk_id_BT[..., None] == jnp.arange(max_chunks)) & (pos_S >= n_sink)[:, None]

  def one_block(qi):
    q_BTKGD = jax.lax.dynamic_slice_in_dim(q_BTHD, qi * block_q, block_q, axis=1).reshape(
        B, block_q, K, H // K, D)
    q_pos_T = qi * block_q + jnp.arange(block_q)
    mask_BTS = (pos_S <= q_pos_T[:, None]) & (chunk_id_BT >= 0)[:, None]
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD,
                         preferred_element_type=jnp.float32) * scale
    if softcap is not None:
      s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    p_BKGTS = jnp.where(mask_BTS[:, None, None], p_BKGTS, 0.0)  # a row with no key stays 0
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v_BTKD.dtype), v_BTKD,
                         preferred_element_type=jnp.float32)
    mass_BTC = jnp.einsum("bkgts,bsc->btc", p_BKGTS, onehot_BSC.astype(jnp.float32)) / H
    return o_BTKGD.reshape(B, block_q, H, D).astype(q_BTHD.dtype), mass_BTC

  o_QBTHD, mass_QBTC = jax.lax.map(one_block, jnp.arange(T // block_q))
  o_BTHD = jnp.moveaxis(o_QBTHD, 0, 1).reshape(B, T, H, D)
  mass_BTC = jnp.moveaxis(mass_QBTC, 0, 1).reshape(B, T, max_chunks)
  return o_BTHD, renormalise(mass_BTC, chunk_id_BT)


def _scores(q_ref, k_ref, ck_ref, h, kh, qi, kj, *, scale, softcap):
  """Masked scores of head h on this tile: [bq, bk] f32, and the visibility mask."""
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  q_pos_T1 = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  k_pos_1S = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  vis_TS = (k_pos_1S <= q_pos_T1) & (ck_ref[...] >= 0)
  s_TS = jax.lax.dot_general(q_ref[:, h, :], k_ref[:, kh, :], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s_TS = jnp.tanh(s_TS / softcap) * softcap
  return jnp.where(vis_TS, s_TS, NEG_INF), vis_TS, k_pos_1S


def _causal_steps(qi, kj, bq, bk):
  """Tiles at or below the diagonal hold any visible key."""
  return kj * bk <= qi * bq + bq - 1


def _stats_kernel(q_ref, k_ref, ck_ref, m_ref, l_ref, m_sc, l_sc, *, scale, softcap):
  """Pass 1: running max and sum per (query, head). m, l: [bq, H]."""
  qi, kj = pl.program_id(1), pl.program_id(2)
  bq, H = q_ref.shape[:2]
  G = H // k_ref.shape[1]

  @pl.when(kj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

  @pl.when(_causal_steps(qi, kj, bq, k_ref.shape[0]))
  def _step():
    for h in range(H):
      s_TS, vis_TS, _ = _scores(q_ref, k_ref, ck_ref, h, h // G, qi, kj, scale=scale,
                                softcap=softcap)
      m_prev_T1 = m_sc[:, h:h + 1]
      m_new_T1 = jnp.maximum(m_prev_T1, s_TS.max(-1, keepdims=True))
      p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_new_T1), 0.0)
      corr_T1 = jnp.exp(m_prev_T1 - m_new_T1)
      l_sc[:, h:h + 1] = corr_T1 * l_sc[:, h:h + 1] + p_TS.sum(-1, keepdims=True)
      m_sc[:, h:h + 1] = m_new_T1

  @pl.when(kj == pl.num_programs(2) - 1)
  def _done():
    m_ref[...] = m_sc[...]
    l_ref[...] = l_sc[...]


def _bins_kernel(q_ref, k_ref, v_ref, ck_ref, ckc_ref, m_ref, l_ref, o_ref, p_ref, acc_sc, bin_sc,
                 *, scale, softcap, n_sink, max_chunks):
  """Pass 2: normalised probabilities -> output [bq, H, D] and chunk mass [bq, C]."""
  qi, kj = pl.program_id(1), pl.program_id(2)
  bq, H = q_ref.shape[:2]
  bk = k_ref.shape[0]
  G = H // k_ref.shape[1]

  @pl.when(kj == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    bin_sc[...] = jnp.zeros(bin_sc.shape, jnp.float32)

  @pl.when(_causal_steps(qi, kj, bq, bk))
  def _step():
    p_sum_TS = jnp.zeros((bq, bk), jnp.float32)
    for h in range(H):
      s_TS, vis_TS, k_pos_1S = _scores(q_ref, k_ref, ck_ref, h, h // G, qi, kj, scale=scale,
                                       softcap=softcap)
      l_T1 = l_ref[:, h:h + 1]
      inv_l_T1 = jnp.where(l_T1 > 0, 1.0 / l_T1, 0.0)  # a query with no key: all zeros
      p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_ref[:, h:h + 1]), 0.0) * inv_l_T1
      acc_sc[h] += jnp.dot(p_TS.astype(v_ref.dtype), v_ref[:, h // G, :],
                           preferred_element_type=jnp.float32)
      p_sum_TS += p_TS
    p_sum_TS = jnp.where(k_pos_1S >= n_sink, p_sum_TS, 0.0) / H  # sinks carry no mass
    # key s -> its chunk column; padding (-1) matches no column
    onehot_SC = (ckc_ref[...] == jax.lax.broadcasted_iota(jnp.int32, (bk, max_chunks), 1))
    bin_sc[...] += jnp.dot(p_sum_TS, onehot_SC.astype(jnp.float32),
                           preferred_element_type=jnp.float32)

  @pl.when(kj == pl.num_programs(2) - 1)
  def _done():
    for h in range(H):
      o_ref[:, h, :] = acc_sc[h].astype(o_ref.dtype)
    p_ref[...] = bin_sc[...]


def check_distill_inputs(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, block_q: int, block_k: int):
  """What both distillation kernels (TPU and GPU) and the reference read. Returns (B, T, H, D, K)."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  chex.assert_shape([k_BTKD, v_BTKD], (B, T, K, D))
  chex.assert_shape(chunk_id_BT, (B, T))
  check_operands("distill_attention", floats=[("q", q_BTHD), ("k", k_BTKD)], same_dtype=[("k", k_BTKD), ("v", v_BTKD)],
                 ints=[("chunk_id", chunk_id_BT)])
  require(H % K == 0, f"distill_attention: {H} query heads do not group over {K} KV heads")
  require(T % block_q == 0 and T % block_k == 0,
          f"distill_attention: {T} tokens are not whole blocks of {block_q} queries and {block_k} keys")
  return B, T, H, D, K


def distill_attention_raw(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float, max_chunks: int,
                          n_sink: int, block_q: int, block_k: int, softcap: float | None = None,
                          interpret=False):
  """The two Pallas passes. Returns (o_BTHD, mass_BTC): the chunk mass before renormalising."""
  B, T, H, D, K = check_distill_inputs(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, block_q, block_k)
  grid = (B, T // block_q, T // block_k)
  f32 = jnp.float32

  def kv_index(b, q, j):
    # above the diagonal: repeat the last useful block, so the pipeline skips the copy
    return jnp.minimum(j, (q * block_q + block_q - 1) // block_k)

  q_spec = pl.BlockSpec((None, block_q, H, D), lambda b, q, j: (b, q, 0, 0))
  kv_spec = pl.BlockSpec((None, block_k, K, D), lambda b, q, j: (b, kv_index(b, q, j), 0, 0))
  ck_spec = pl.BlockSpec((None, 1, block_k), lambda b, q, j: (b, 0, kv_index(b, q, j)))
  ckc_spec = pl.BlockSpec((None, block_k, 1), lambda b, q, j: (b, kv_index(b, q, j), 0))
  stat_spec = pl.BlockSpec((None, block_q, H), lambda b, q, j: (b, q, 0))
  bins_spec = pl.BlockSpec((None, block_q, max_chunks), lambda b, q, j: (b, q, 0))
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  chunk_id_BT = chunk_id_BT.astype(jnp.int32)
  ck_B1T, ck_BT1 = chunk_id_BT[:, None], chunk_id_BT[..., None]

  m_BTH, l_BTH = pl.pallas_call(
      functools.partial(_stats_kernel, scale=scale, softcap=softcap),
      grid=grid,
      in_specs=[q_spec, kv_spec, ck_spec],
      out_specs=[stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct((B, T, H), f32)] * 2,
      scratch_shapes=[pltpu.VMEM((block_q, H), f32)] * 2,
      compiler_params=params,
      interpret=interpret,
  )(q_BTHD, k_BTKD, ck_B1T)
  return pl.pallas_call(
      functools.partial(_bins_kernel, scale=scale, softcap=softcap, n_sink=n_sink,
                        max_chunks=max_chunks),
      grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, ck_spec, ckc_spec, stat_spec, stat_spec],
      out_specs=[q_spec, bins_spec],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, D), q_BTHD.dtype),
                 jax.ShapeDtypeStruct((B, T, max_chunks), f32)],
      scratch_shapes=[pltpu.VMEM((H, block_q, D), f32), pltpu.VMEM((block_q, max_chunks), f32)],
      compiler_params=params,
      interpret=interpret,
  )(q_BTHD, k_BTKD, v_BTKD, ck_B1T, ck_BT1, m_BTH, l_BTH)


def distill_attention_kernel(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float,
                             max_chunks: int, n_sink: int, block_q: int, block_k: int,
                             softcap: float | None = None, interpret=False):
  """The Pallas path. Returns (o_BTHD, p_BTC float32)."""
  o_BTHD, mass_BTC = distill_attention_raw(
      q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, scale=scale, max_chunks=max_chunks, n_sink=n_sink,
      block_q=block_q, block_k=block_k, softcap=softcap, interpret=interpret)
  return o_BTHD, renormalise(mass_BTC, chunk_id_BT)


def distill_attention(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float, max_chunks: int,
                      n_sink: int, block_q: int, block_k: int, softcap: float | None = None,
                      interpret=False, backend: str | None = None):
  """Dispatcher: the GPU kernel on GPU (or `backend="gpu"`), the Pallas kernel on TPU or in
  interpret mode, else the jnp reference.

  Returns (o_BTHD, p_BTC): the attention output, and the teacher (float32).
  """
  kw = dict(scale=scale, max_chunks=max_chunks, n_sink=n_sink, block_q=block_q,
            block_k=block_k, softcap=softcap)
  check_distill_inputs(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, block_q, block_k)
  if implementation(interpret, backend) == "gpu":
    # imported here: the GPU module imports this one
    from pallas_kernels.distill_attention_gpu import distill_attention_gpu
    return distill_attention_gpu(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, **kw, interpret=interpret)
  if implementation(interpret, backend) == "pallas":
    return distill_attention_kernel(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, **kw,
                                    interpret=interpret)
  return distill_attention_reference(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, **kw)
