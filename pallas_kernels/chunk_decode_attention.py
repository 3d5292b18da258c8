"""Chunk-selective decode attention: one query token per row, reading only the listed KV blocks.

The KV buffer is the static one, `[B, max_len, K, D]`, cut into blocks of `block_size` tokens.
Per row, `block_ids_BN[b, :n_blocks_B[b]]` lists the blocks that hold any visible token (distinct
ids; entries past `n_blocks` are padding). Only those blocks are read: the ids are
scalar-prefetched and drive the K/V BlockSpec index maps. Inside a block, `token_mask_BS` says
which tokens are visible. Tokens outside the listed blocks are invisible whatever the mask says.

Flash-decoding split: the block list is cut into `n_splits` parts, a parallel grid axis. Each
part gives a partial (acc, max, sum); `combine_splits` merges them by log-sum-exp. A row with no
visible token returns zeros.

GQA: head h reads kv head h // (H / K). A KV block is fetched once for all of its heads.

On GPU the dispatchers (`chunk_decode_attention`, `partials`) run the Triton version,
`chunk_decode_attention_gpu`, which gives the same partials.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import NEG_INF, check_operands, implementation, require


def decode_block_list(token_mask_BS, *, block_size: int, max_blocks: int | None = None):
  """The blocks that hold any visible token, ascending, padded with 0. Returns (ids_BN, n_B).

  Rows with more than `max_blocks` such blocks are cut to their first `max_blocks`.
  """
  B, S = token_mask_BS.shape
  n_all = S // block_size
  max_blocks = n_all if max_blocks is None else max_blocks
  touched_BM = token_mask_BS.reshape(B, n_all, block_size).any(-1)
  # stable sort puts touched blocks first, in ascending order
  order_BM = jnp.argsort(~touched_BM, axis=-1, stable=True).astype(jnp.int32)
  n_B = jnp.minimum(touched_BM.sum(-1), max_blocks).astype(jnp.int32)
  ids_BN = order_BM[:, :max_blocks]
  ids_BN = jnp.where(jnp.arange(max_blocks)[None] < n_B[:, None], ids_BN, 0)
  return ids_BN, n_B


def listed_tokens(block_ids_BN, n_blocks_B, seq_len: int, block_size: int):
  """[B, S] bool: token s lies in one of the row's first n_blocks listed blocks."""
  N = block_ids_BN.shape[1]
  live_BN = jnp.arange(N)[None] < n_blocks_B[:, None]
  block_S = jnp.arange(seq_len) // block_size
  return ((block_ids_BN[:, None, :] == block_S[None, :, None]) & live_BN[:, None, :]).any(-1)


def chunk_decode_attention_reference(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B,
                                     token_mask_BS, *, scale: float, block_size: int):
  """Dense masked attention over the visible tokens of the listed blocks. Returns [B, H, D]."""
  B, H, D = q_BHD.shape
  S, K = k_BSKD.shape[1:3]
  mask_BS = token_mask_BS & listed_tokens(block_ids_BN, n_blocks_B, S, block_size)
  q_BKGD = q_BHD.reshape(B, K, H // K, D)
  s_BKGS = jnp.einsum("bkgd,bskd->bkgs", q_BKGD, k_BSKD,
                      preferred_element_type=jnp.float32) * scale
  s_BKGS = jnp.where(mask_BS[:, None, None], s_BKGS, NEG_INF)
  p_BKGS = jax.nn.softmax(s_BKGS, axis=-1)
  o_BKGD = jnp.einsum("bkgs,bskd->bkgd", p_BKGS.astype(v_BSKD.dtype), v_BSKD,
                      preferred_element_type=jnp.float32)
  o_BKGD = jnp.where(mask_BS.any(-1)[:, None, None, None], o_BKGD, 0.0)  # empty row: zeros
  return o_BKGD.reshape(B, H, D).astype(q_BHD.dtype)


def _decode_kernel(ids_ref, n_ref,  # scalar prefetch (SMEM)
                   q_ref, k_ref, v_ref, mask_ref,  # [H, D], [bs, K, D], [bs, K, D], [1, bs]
                   acc_ref, m_ref, l_ref,  # [H, D], [H, 1], [H, 1] partials of this split
                   acc_sc, m_sc, l_sc, *, scale: float, blocks_per_split: int):
  b, split, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  H = q_ref.shape[0]
  K = k_ref.shape[1]
  G = H // K

  @pl.when(i == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

  @pl.when(split * blocks_per_split + i < n_ref[b])
  def _step():
    visible_1S = mask_ref[...] != 0
    for kh in range(K):  # static: each kv head serves its G query heads
      hs = slice(kh * G, (kh + 1) * G)
      s_GS = jax.lax.dot_general(q_ref[hs, :], k_ref[:, kh, :], (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
      s_GS = jnp.where(visible_1S, s_GS, NEG_INF)
      m_prev_G1 = m_sc[hs, :]
      m_new_G1 = jnp.maximum(m_prev_G1, s_GS.max(-1, keepdims=True))
      # masked entries get exactly 0, even when the whole block so far is masked
      p_GS = jnp.where(visible_1S, jnp.exp(s_GS - m_new_G1), 0.0)
      corr_G1 = jnp.exp(m_prev_G1 - m_new_G1)
      l_sc[hs, :] = corr_G1 * l_sc[hs, :] + p_GS.sum(-1, keepdims=True)
      pv_GD = jnp.dot(p_GS.astype(v_ref.dtype), v_ref[:, kh, :],
                      preferred_element_type=jnp.float32)
      acc_sc[hs, :] = corr_G1 * acc_sc[hs, :] + pv_GD
      m_sc[hs, :] = m_new_G1

  @pl.when(i == blocks_per_split - 1)
  def _done():
    acc_ref[...] = acc_sc[...]
    m_ref[...] = m_sc[...]
    l_ref[...] = l_sc[...]


def check_decode_inputs(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, block_size: int):
  """Shapes both decode kernels (TPU and GPU) need. Returns (B, H, D, S, K, N). The block list and its length
  are per row: one of batch 1 would broadcast (row 0's list for every row) instead of being refused."""
  B, H, D = q_BHD.shape
  S, K = k_BSKD.shape[1:3]
  chex.assert_shape([k_BSKD, v_BSKD], (B, S, K, D))
  chex.assert_shape(token_mask_BS, (B, S))
  chex.assert_shape(block_ids_BN, (B, None))
  chex.assert_shape(n_blocks_B, (B,))
  check_operands("chunk_decode_attention", floats=[("q", q_BHD), ("k", k_BSKD)],
                 same_dtype=[("k", k_BSKD), ("v", v_BSKD)], masks=[("token_mask", token_mask_BS)],
                 ints=[("block_ids", block_ids_BN), ("n_blocks", n_blocks_B)])
  require(H % K == 0, f"chunk_decode_attention: {H} query heads do not group over {K} KV heads")
  require(S % block_size == 0, f"chunk_decode_attention: the buffer's {S} tokens are not whole blocks of {block_size}")
  return B, H, D, S, K, block_ids_BN.shape[1]


def decode_partials(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, *,
                    scale: float, block_size: int, n_splits: int = 2, interpret=False):
  """The Pallas call: per split, unnormalised acc [B, P, H, D], max and sum [B, P, H, 1] (f32)."""
  B, H, D, S, K, N = check_decode_inputs(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                                         block_size)
  per_split = max(pl.cdiv(N, n_splits), 1)
  n_B = jnp.clip(n_blocks_B.astype(jnp.int32), 0, N)
  # padding ids -> 0 so that no index map can point outside the buffer
  ids_BN = jnp.where(jnp.arange(N)[None] < n_B[:, None], block_ids_BN.astype(jnp.int32), 0)
  ids_BN = jnp.pad(ids_BN, ((0, 0), (0, n_splits * per_split - N)))
  ids_flat = ids_BN.reshape(-1)  # 1-D: SMEM pads the minor dim of 2-D arrays
  # [B, n_blocks, 1, bs]: the block's last two dims are the array's, as Mosaic wants
  mask_BM1S = token_mask_BS.astype(jnp.int32).reshape(B, S // block_size, 1, block_size)
  width = n_splits * per_split

  def kv_block(b, split, i, ids, n):
    # past the row's list: repeat its last block, so the pipeline skips the copy
    j = jnp.minimum(split * per_split + i, jnp.maximum(n[b] - 1, 0))
    return ids[b * width + j]

  kv_spec = pl.BlockSpec((None, block_size, K, D),
                         lambda b, s, i, ids, n: (b, kv_block(b, s, i, ids, n), 0, 0))
  mask_spec = pl.BlockSpec((None, None, 1, block_size),
                           lambda b, s, i, ids, n: (b, kv_block(b, s, i, ids, n), 0, 0))
  q_spec = pl.BlockSpec((None, H, D), lambda b, s, i, ids, n: (b, 0, 0))
  part_spec = lambda d: pl.BlockSpec((None, None, H, d), lambda b, s, i, ids, n: (b, s, 0, 0))
  f32 = jnp.float32
  return pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale, blocks_per_split=per_split),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, n_splits, per_split),
          in_specs=[q_spec, kv_spec, kv_spec, mask_spec],
          out_specs=[part_spec(D), part_spec(1), part_spec(1)],
          scratch_shapes=[pltpu.VMEM((H, D), f32), pltpu.VMEM((H, 1), f32),
                          pltpu.VMEM((H, 1), f32)]),
      out_shape=[jax.ShapeDtypeStruct((B, n_splits, H, D), f32),
                 jax.ShapeDtypeStruct((B, n_splits, H, 1), f32),
                 jax.ShapeDtypeStruct((B, n_splits, H, 1), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(ids_flat, n_B, q_BHD, k_BSKD, v_BSKD, mask_BM1S)


def combine_splits(acc_BPHD, m_BPH1, l_BPH1):
  """Log-sum-exp merge of the split partials. Rows with nothing visible (l = 0) give zeros."""
  m_B1H1 = m_BPH1.max(axis=1, keepdims=True)
  w_BPH1 = jnp.exp(m_BPH1 - m_B1H1)  # an empty split has m = NEG_INF, so weight 0
  l_BH1 = (w_BPH1 * l_BPH1).sum(1)
  acc_BHD = (w_BPH1 * acc_BPHD).sum(1)
  return acc_BHD / jnp.where(l_BH1 > 0, l_BH1, 1.0)


def chunk_decode_attention_kernel(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B,
                                  token_mask_BS, *, scale: float, block_size: int,
                                  n_splits: int = 2, interpret=False):
  """The Pallas path: partials per split, then the merge. Returns [B, H, D] in q's dtype."""
  parts = decode_partials(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                          scale=scale, block_size=block_size, n_splits=n_splits,
                          interpret=interpret)
  return combine_splits(*parts).astype(q_BHD.dtype)


def partials(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, *, scale: float,
             block_size: int, n_splits: int = 2, interpret=False, backend: str | None = None):
  """Dispatcher for the partials: the GPU kernel on GPU (or `backend="gpu"`), else
  `decode_partials`."""
  check_decode_inputs(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, block_size)
  if implementation(interpret, backend) == "gpu":
    # imported here: the GPU module imports this one
    from pallas_kernels.chunk_decode_attention_gpu import decode_partials_gpu
    return decode_partials_gpu(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                               scale=scale, block_size=block_size, n_splits=n_splits,
                               interpret=interpret)
  return decode_partials(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                         scale=scale, block_size=block_size, n_splits=n_splits, interpret=interpret)


def chunk_decode_attention(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, *,
                           scale: float, block_size: int, n_splits: int = 2, interpret=False,
                           backend: str | None = None):
  """Dispatcher: the GPU kernel on GPU (or `backend="gpu"`), the Pallas kernel on TPU or in
  interpret mode, else the jnp reference."""
  check_decode_inputs(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, block_size)
  if implementation(interpret, backend) == "gpu":
    from pallas_kernels.chunk_decode_attention_gpu import chunk_decode_attention_gpu
    return chunk_decode_attention_gpu(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B,
                                      token_mask_BS, scale=scale, block_size=block_size,
                                      n_splits=n_splits, interpret=interpret)
  if implementation(interpret, backend) == "pallas":
    return chunk_decode_attention_kernel(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B,
                                         token_mask_BS, scale=scale, block_size=block_size,
                                         n_splits=n_splits, interpret=interpret)
  return chunk_decode_attention_reference(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B,
                                          token_mask_BS, scale=scale, block_size=block_size)
