"""Per-head decode attention on GPU: the Triton-lowered Pallas kernel of `head_decode_attention` (same
arguments, same partials). Why Triton rather than Mosaic GPU: `pallas_kernels/dispatch.py`.

Grid (B, n_splits, K): one program per row, split and KV head. A program loads its head's queries once,
then for each of its blocks of `block_size` slots reads their flat row numbers and loads those rows of K
and V with one gathered load each (`k_ref[rows, :]`: Triton computes a pointer per row, so nothing is
copied out of the buffer first, and 64-bit offsets where the buffer passes 4 GiB). Online softmax in f32.

The KV buffer comes in whole (a [N, D] view of the stacked buffer, a reshape XLA makes without a copy),
so its head dim is taken as it is: `head_decode_attention.kernel_fits`. The G query heads of a KV head
are padded with zero queries to at least 16, Triton's smallest dot (their outputs are cut off), and a
slot list whose length is not a multiple of the block is padded with invisible slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_decode_attention_gpu import fold_block, fold_into
from pallas_kernels.head_decode_attention import check_head_inputs, kernel_fits, softcapped

MIN_DOT = 16  # dots at least this wide, as the shared rule's decode kernel keeps them
BLOCKS_PER_SPLIT = 4  # n_splits=None: a split per this many blocks of slots


def split_count(n_blocks: int) -> int:
  """Splits for a head's `n_blocks` blocks of slots: enough programs to spread one decode step over a GPU's
  streaming multiprocessors (a batch of one with 3 KV heads is 3 programs a split), each a few blocks long."""
  return max(1, pl.cdiv(n_blocks, BLOCKS_PER_SPLIT))


def _head_kernel(rows_ref, ok_ref, used_ref,  # [W] flat rows of this head's slots, [W] visible, [] slots used
                 q_ref, k_ref, v_ref,  # [G, D] this head's queries, [N, D] the whole K and V
                 acc_ref, m_ref, l_ref,  # [G, D], [G], [G]: this split's partials
                 *, scale: float, softcap: float | None, block_size: int, blocks_per_split: int):
  f32 = jnp.float32
  lo = pl.program_id(1) * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, pl.cdiv(used_ref[...], block_size))  # hi <= lo: no iteration
  q_GD = q_ref[...]

  def step(j, carry):
    start = j * block_size
    rows_S = rows_ref[pl.ds(start, block_size)]
    k_SD = k_ref[rows_S, :]
    v_SD = v_ref[rows_S, :]
    slot_S = start + lax.broadcasted_iota(jnp.int32, (block_size,), 0)
    visible_1S = ((ok_ref[pl.ds(start, block_size)] != 0) & (slot_S < used_ref[...]))[None, :]
    s_GS = softcapped(lax.dot_general(q_GD, k_SD, (((1,), (1,)), ((), ())), preferred_element_type=f32) * scale,
                      softcap)
    return fold_block(carry, s_GS, visible_1S, v_SD)

  fold_into(acc_ref, m_ref, l_ref, step, lo, hi)


def head_decode_partials_gpu(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK, *, scale: float,
                             softcap: float | None = None, block_size: int = 128, n_splits: int | None = None,
                             interpret=False, num_warps: int = 4, num_stages: int = 2):
  """As `head_decode_attention.head_decode_partials`: acc [B, P, K, G, D], max and sum [B, P, K, G]
  (float32), P = n_splits (None: `split_count` of the slot list's blocks). `num_warps`, `num_stages`:
  Triton's launch and pipelining knobs."""
  B, K, G, D, W = check_head_inputs(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK)
  if not kernel_fits(D):
    raise ValueError(f"the per-head decode kernel reads rows of head_dim {D} as they are: it needs a power of 2 "
                     "of at least 16 (head_decode_attention.kernel_fits); run the XLA path")
  assert block_size >= MIN_DOT and block_size & (block_size - 1) == 0, block_size
  N = k_ND.shape[0]
  Gp = max(MIN_DOT, pl.next_power_of_2(G))
  Wp = pl.cdiv(W, block_size) * block_size
  pad_slots = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, Wp - W)))
  # rows past the list or out of the buffer -> row 0, so that no load can leave it; they are invisible
  rows_BKW = pad_slots(jnp.clip(rows_BKW.astype(jnp.int32), 0, N - 1))
  ok_BKW = pad_slots(ok_BKW.astype(jnp.int32))
  used_BK = jnp.clip(used_BK.astype(jnp.int32), 0, W)
  q_BKGD = jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))  # zero queries, cut off below
  n_splits = n_splits or split_count(Wp // block_size)
  per_split = max(pl.cdiv(Wp // block_size, n_splits), 1)

  f32 = jnp.float32
  slot_spec = pl.BlockSpec((None, None, Wp), lambda b, s, h: (b, h, 0))
  kv_spec = pl.BlockSpec((N, D), lambda b, s, h: (0, 0))
  part_spec = lambda *d: pl.BlockSpec((None, None, None, Gp, *d), lambda b, s, h: (b, s, h, 0, *(0,) * len(d)))
  acc, m, l = pl.pallas_call(
      functools.partial(_head_kernel, scale=scale, softcap=softcap, block_size=block_size,
                        blocks_per_split=per_split),
      grid=(B, n_splits, K),
      in_specs=[slot_spec, slot_spec,
                pl.BlockSpec((None, None), lambda b, s, h: (b, h)),
                pl.BlockSpec((None, None, Gp, D), lambda b, s, h: (b, h, 0, 0)),
                kv_spec, kv_spec],
      out_specs=[part_spec(D), part_spec(), part_spec()],
      out_shape=[jax.ShapeDtypeStruct((B, n_splits, K, Gp, D), f32),
                 jax.ShapeDtypeStruct((B, n_splits, K, Gp), f32),
                 jax.ShapeDtypeStruct((B, n_splits, K, Gp), f32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="head_decode_attention_gpu",
  )(rows_BKW, ok_BKW, used_BK, q_BKGD, k_ND, v_ND)
  return acc[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G]
