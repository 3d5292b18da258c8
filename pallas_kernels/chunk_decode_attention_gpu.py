"""Chunk-selective decode attention on GPU: the Triton-lowered Pallas version of
`chunk_decode_attention` (same arguments, same partials, same merge).

Why Triton (`pl.pallas_call` with `pltriton.CompilerParams`) and not Mosaic GPU, from jax 0.10.2:
- Both are current. `pl.pallas_call` without compiler params lowers to Mosaic GPU and warns
  "Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated ... Please migrate to
  ``plgpu.kernel``" (`_src/pallas/pallas_call.py`); with `compiler_params=pltriton.CompilerParams()`
  it picks the Triton backend and warns nothing. `ops/gpu/decode_attention.py` is written so.
- `interpret=True` runs a Triton-style `pallas_call` on CPU through the HLO interpreter, so this
  kernel is tested here without a GPU. A `plgpu.kernel` needs the Mosaic GPU simulator,
  `InterpretGPUParams`, which jax exports from `_src` only (`_src/pallas/mosaic_gpu/interpret`).
- `plgpu.kernel` threads are "warpgroups on Hopper and Blackwell GPUs", and its kernels
  (`ops/gpu/attention_mgpu.py`) are TMA copies, barriers and WGMMA: a separate program, for
  little gain on a memory-bound decode over scattered blocks. Mosaic GPU also raises "Mosaic GPU
  does not yet support AMD ROCm devices. Use ``compiler_params=pltriton.CompilerParams()`` for
  ROCm."
- With the Triton backend, `jit(...).trace(...).lower(lowering_platforms=("cuda",))` produces
  the Triton IR on a CPU-only machine, so the tests also check that this kernel lowers.

The Triton backend has no scalar prefetch, so the block ids cannot drive BlockSpecs. Each program
gets its row's whole K/V (one kv head) as a ref, reads the block ids from an ordinary int32 input
and loads each listed block with a dynamic `pl.ds(id * block_size, block_size)` slice, in a
`fori_loop` over its split's part of the list. Online softmax in f32.

Grid (B, n_splits, K): one program per row, split and kv head, so a decode step with few rows
still spreads over B * n_splits * K programs; each program loads each of its blocks once for its
G query heads.

The Triton lowering wants power-of-2 tensor sizes ("requires that all operations have array
arguments and results whose size is a power of 2"), and `decode_attention.py` keeps its dots at
least 16 wide (heads padded to `block_h=16`, "block_k must be >= 16"). So the G query heads of a
kv head are padded with zero queries to at least 16 (their outputs are cut off), and a block size
or head dim that is not a power of 2 of at least 16 is padded with invisible tokens / zero
features (a copy of K/V: give such shapes only to small buffers, like the open chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_decode_attention import check_decode_inputs, combine_splits
from pallas_kernels.dispatch import NEG_INF

MIN_DOT = 16  # dots at least this wide, as ops/gpu/decode_attention.py keeps them


def _tile(n: int) -> int:
  """The size Triton gets for a dimension of n: a power of 2, at least MIN_DOT."""
  return max(MIN_DOT, pl.next_power_of_2(n))


def _pad_axis(x, axis: int, size: int):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def fold_block(carry, s_GS, visible_1S, v_SD):
  """One block of keys folded into a program's online softmax (acc [G, D], max [G], sum [G], all f32), from its
  logits [G, S], which keys are visible [1, S] and its values [S, D]. Both GPU decode kernels fold with it."""
  acc_GD, m_G, l_G = carry
  s_GS = jnp.where(visible_1S, s_GS, NEG_INF)
  m_new_G = jnp.maximum(m_G, s_GS.max(-1))
  # masked entries get exactly 0, even when everything so far is masked
  p_GS = jnp.where(visible_1S, jnp.exp(s_GS - m_new_G[:, None]), 0.0)
  corr_G = jnp.exp(m_G - m_new_G)
  l_G = corr_G * l_G + p_GS.sum(-1)
  # p in V's dtype, as the reference: a bf16 x bf16 dot, accumulated in f32
  pv_GD = jnp.dot(p_GS.astype(v_SD.dtype), v_SD, preferred_element_type=jnp.float32)
  return corr_G[:, None] * acc_GD + pv_GD, m_new_G, l_G


def fold_into(acc_ref, m_ref, l_ref, step, lo, hi) -> None:
  """Folds blocks lo..hi - 1 by `step(j, carry) -> carry` (`fold_block`) from an empty softmax, into the program's
  partials. Every program writes its whole output block, also when it has no block to read (hi <= lo)."""
  f32 = jnp.float32
  G, D = acc_ref.shape
  init = (jnp.zeros((G, D), f32), jnp.full((G,), NEG_INF, f32), jnp.zeros((G,), f32))
  acc_ref[...], m_ref[...], l_ref[...] = lax.fori_loop(lo, hi, step, init)


def _decode_kernel_gpu(ids_ref, n_ref,  # [N] this row's block ids, [] its count
                       q_ref, k_ref, v_ref, mask_ref,  # [G, D], [S, D], [S, D], [S]: one kv head
                       acc_ref, m_ref, l_ref,  # [G, D], [G], [G]: this split's partials
                       *, scale: float, block_size: int, blocks_per_split: int):
  f32 = jnp.float32
  lo = pl.program_id(1) * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, n_ref[...])  # hi <= lo: no iteration
  q_GD = q_ref[...]

  def step(j, carry):
    start = ids_ref[j] * block_size
    k_SD = k_ref[pl.ds(start, block_size), :]
    v_SD = v_ref[pl.ds(start, block_size), :]
    visible_1S = mask_ref[pl.ds(start, block_size)][None, :] != 0
    s_GS = lax.dot_general(q_GD, k_SD, (((1,), (1,)), ((), ())), preferred_element_type=f32) * scale
    return fold_block(carry, s_GS, visible_1S, v_SD)

  fold_into(acc_ref, m_ref, l_ref, step, lo, hi)


def decode_partials_gpu(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, *,
                        scale: float, block_size: int, n_splits: int = 2, interpret=False,
                        num_warps: int = 4, num_stages: int = 2):
  """As `decode_partials`: per split, unnormalised acc [B, P, H, D], max and sum [B, P, H, 1]
  (f32). `num_warps`, `num_stages`: Triton's launch and pipelining knobs."""
  B, H, D, S, K, N = check_decode_inputs(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                                         block_size)
  G = H // K
  n_all = S // block_size
  bs, Dp, Gp = _tile(block_size), _tile(D), _tile(G)
  if bs != block_size:  # invisible tokens at the end of each block
    blocks = lambda x: _pad_axis(x.reshape(B, n_all, block_size, *x.shape[2:]), 2, bs)
    k_BSKD = blocks(k_BSKD).reshape(B, n_all * bs, K, D)
    v_BSKD = blocks(v_BSKD).reshape(B, n_all * bs, K, D)
    token_mask_BS = blocks(token_mask_BS).reshape(B, n_all * bs)
  if Dp != D:  # zero features: scores unchanged, extra output columns cut off below
    q_BHD, k_BSKD, v_BSKD = (_pad_axis(x, x.ndim - 1, Dp) for x in (q_BHD, k_BSKD, v_BSKD))
  q_BKGD = _pad_axis(q_BHD.reshape(B, K, G, Dp), 2, Gp)  # zero queries, cut off below

  per_split = max(pl.cdiv(N, n_splits), 1)
  n_B = jnp.clip(n_blocks_B.astype(jnp.int32), 0, N)
  # padding ids -> 0 so that no slice can point outside the buffer
  ids_BN = jnp.where(jnp.arange(N)[None] < n_B[:, None], block_ids_BN.astype(jnp.int32), 0)
  ids_BN = jnp.clip(ids_BN, 0, n_all - 1)
  mask_BS = token_mask_BS.astype(jnp.int32)
  Sp = k_BSKD.shape[1]

  f32 = jnp.float32
  kv_spec = pl.BlockSpec((None, Sp, None, Dp), lambda b, s, h: (b, 0, h, 0))
  part_spec = lambda *d: pl.BlockSpec((None, None, None, Gp, *d),
                                      lambda b, s, h: (b, s, h, 0, *(0,) * len(d)))
  acc_BPKGD, m_BPKG, l_BPKG = pl.pallas_call(
      functools.partial(_decode_kernel_gpu, scale=scale, block_size=bs,
                        blocks_per_split=per_split),
      grid=(B, n_splits, K),
      in_specs=[pl.BlockSpec((None, N), lambda b, s, h: (b, 0)),
                pl.BlockSpec((None,), lambda b, s, h: (b,)),
                pl.BlockSpec((None, None, Gp, Dp), lambda b, s, h: (b, h, 0, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((None, Sp), lambda b, s, h: (b, 0))],
      out_specs=[part_spec(Dp), part_spec(), part_spec()],
      out_shape=[jax.ShapeDtypeStruct((B, n_splits, K, Gp, Dp), f32),
                 jax.ShapeDtypeStruct((B, n_splits, K, Gp), f32),
                 jax.ShapeDtypeStruct((B, n_splits, K, Gp), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="chunk_decode_attention_gpu",
  )(ids_BN, n_B, q_BKGD, k_BSKD, v_BSKD, mask_BS)
  acc_BPHD = acc_BPKGD[:, :, :, :G, :D].reshape(B, n_splits, H, D)
  m_BPH1 = m_BPKG[:, :, :, :G].reshape(B, n_splits, H, 1)
  l_BPH1 = l_BPKG[:, :, :, :G].reshape(B, n_splits, H, 1)
  return acc_BPHD, m_BPH1, l_BPH1


def chunk_decode_attention_gpu(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS, *,
                               scale: float, block_size: int, n_splits: int = 2, interpret=False):
  """The GPU path: partials per split, then the merge. Returns [B, H, D] in q's dtype."""
  parts = decode_partials_gpu(q_BHD, k_BSKD, v_BSKD, block_ids_BN, n_blocks_B, token_mask_BS,
                              scale=scale, block_size=block_size, n_splits=n_splits,
                              interpret=interpret)
  return combine_splits(*parts).astype(q_BHD.dtype)
