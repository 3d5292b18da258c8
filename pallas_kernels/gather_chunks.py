"""Compaction: copy the selected chunks' KV into a contiguous working buffer.

At a chunk boundary the selection changes (ICAC), so decode can read the selected chunks from a
dense `[B, budget, K, D]` buffer instead of reading whole kernel blocks of the static buffer in
place (docs/design.md, section 7, "Working buffer"). Per row, the spans
`(span_start_BN, span_len_BN)` (length 0 = padding) are packed back to back, in list order, from
slot 0. Slots past the packed tokens are zeros and invalid; tokens past `budget` are dropped.

The kernel, `gather_rows`, takes any slot layout (slot r <- token src[r], -1 = empty), so a
fixed-slots-per-chunk layout can use it too. It copies token rows HBM -> VMEM with DMAs
(`pltpu.make_async_copy`), one DMA per token and per K/V, `rows_per_step` rows per grid step;
the output tile then goes back to HBM through the normal pipeline. DMA sizes must be static, so
spans of any length become row copies; copying fixed-size pieces per span would need fewer DMAs
but overlapping writes.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import check_operands, implementation, require


def slot_sources(span_start_BN, span_len_BN, *, budget: int):
  """Where each working-buffer slot comes from: token index [B, budget] int32, -1 = empty slot.

  Slot r holds token `start[i] + r - offset[i]` of the span i with offset[i] <= r < offset[i+1].
  """
  len_BN = jnp.maximum(span_len_BN.astype(jnp.int32), 0)
  end_BN = jnp.cumsum(len_BN, axis=-1)
  off_BN = end_BN - len_BN
  r_R = jnp.arange(budget, dtype=jnp.int32)
  span_BR = (r_R[None, :, None] >= end_BN[:, None, :]).sum(-1)  # spans that end before slot r
  span_BR = jnp.minimum(span_BR, span_len_BN.shape[1] - 1)
  take = lambda x_BN: jnp.take_along_axis(x_BN, span_BR, axis=1)
  src_BR = take(span_start_BN.astype(jnp.int32)) + r_R - take(off_BN)
  return jnp.where(r_R < end_BN[:, -1:], src_BR, -1)


def gather_rows_reference(k_BSKD, v_BSKD, src_BR):
  """XLA gather of token rows; slots with src -1 are zeros. Returns (k_BRKD, v_BRKD)."""
  idx_BR11 = jnp.maximum(src_BR, 0)[..., None, None]
  pick = lambda x_BSKD: jnp.where(src_BR[..., None, None] >= 0,
                                  jnp.take_along_axis(x_BSKD, idx_BR11, axis=1), 0)
  return pick(k_BSKD), pick(v_BSKD)


def _gather_kernel(src_ref,  # scalar prefetch (SMEM): src flat [B * R]
                   k_hbm, v_hbm,  # [B, S, K, D], left in HBM
                   src_tile_ref,  # [1, rows, 1, 1] the same sources, as a vector for the mask
                   ko_ref, vo_ref,  # [1, rows, K, D] output tiles (VMEM)
                   sem, *, budget: int):
  b, t = pl.program_id(0), pl.program_id(1)
  rows = ko_ref.shape[1]
  first = b * budget + t * rows

  # The tiles keep their unit row axis (a block dim of 1, not None): Mosaic's lowering of a DMA into a
  # squeezed block's slice makes invalid IR ('tpu.memref_slice' op Indices and slice shapes must match),
  # which interpret mode never sees (tests/test_pallas_gather_chunks.py, test_lowers_to_mosaic_for_tpu).
  def copies(r):
    src = src_ref[first + r]
    return (pltpu.make_async_copy(k_hbm.at[b, pl.ds(src, 1)], ko_ref.at[0, pl.ds(r, 1)], sem.at[0]),
            pltpu.make_async_copy(v_hbm.at[b, pl.ds(src, 1)], vo_ref.at[0, pl.ds(r, 1)], sem.at[1]))

  @pl.loop(0, rows)
  def _start(r):
    @pl.when(src_ref[first + r] >= 0)
    def _():
      for c in copies(r):
        c.start()

  @pl.loop(0, rows)
  def _wait(r):
    @pl.when(src_ref[first + r] >= 0)
    def _():
      for c in copies(r):
        c.wait()

  # the slots no DMA wrote hold stale VMEM (an earlier tile's rows): zero them
  valid_1R11 = src_tile_ref[...] >= 0
  ko_ref[...] = jnp.where(valid_1R11, ko_ref[...], 0).astype(ko_ref.dtype)
  vo_ref[...] = jnp.where(valid_1R11, vo_ref[...], 0).astype(vo_ref.dtype)


def gather_rows_kernel(k_BSKD, v_BSKD, src_BR, *, rows_per_step: int | None = None,
                       interpret=False):
  """The Pallas path: one DMA per token row and per K/V. Returns (k_BRKD, v_BRKD)."""
  B, S, K, D = k_BSKD.shape
  R = src_BR.shape[1]
  chex.assert_shape(v_BSKD, (B, S, K, D))
  chex.assert_shape(src_BR, (B, R))
  check_operands("gather_rows", same_dtype=[("k", k_BSKD), ("v", v_BSKD)], ints=[("src", src_BR)])
  rows = rows_per_step or math.gcd(R, 128)
  require(rows > 0 and R % rows == 0, f"gather_rows: {R} slots are not whole steps of {rows} rows")
  src_BR = src_BR.astype(jnp.int32)
  out_spec = pl.BlockSpec((1, rows, K, D), lambda b, t, src: (b, t, 0, 0))
  return pl.pallas_call(
      functools.partial(_gather_kernel, budget=R),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, R // rows),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((1, rows, 1, 1), lambda b, t, src: (b, t, 0, 0))],
          out_specs=[out_spec, out_spec],
          scratch_shapes=[pltpu.SemaphoreType.DMA((2,))]),
      out_shape=[jax.ShapeDtypeStruct((B, R, K, D), k_BSKD.dtype),
                 jax.ShapeDtypeStruct((B, R, K, D), v_BSKD.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
  )(src_BR.reshape(-1), k_BSKD, v_BSKD, src_BR[..., None, None])


def gather_rows(k_BSKD, v_BSKD, src_BR, *, rows_per_step: int | None = None, interpret=False):
  """Dispatcher for any slot layout: slot r of row b gets token src_BR[b, r] (-1: zeros)."""
  check_operands("gather_rows", same_dtype=[("k", k_BSKD), ("v", v_BSKD)], ints=[("src", src_BR)])
  if implementation(interpret, gpu_version=False) == "pallas":
    return gather_rows_kernel(k_BSKD, v_BSKD, src_BR, rows_per_step=rows_per_step,
                              interpret=interpret)
  return gather_rows_reference(k_BSKD, v_BSKD, src_BR)


def gather_chunks_reference(k_BSKD, v_BSKD, span_start_BN, span_len_BN, *, budget: int):
  """XLA gather of packed spans. Returns (k_BRKD, v_BRKD, valid_BR)."""
  src_BR = slot_sources(span_start_BN, span_len_BN, budget=budget)
  return (*gather_rows_reference(k_BSKD, v_BSKD, src_BR), src_BR >= 0)


def gather_chunks_kernel(k_BSKD, v_BSKD, span_start_BN, span_len_BN, *, budget: int,
                         rows_per_step: int | None = None, interpret=False):
  """The Pallas path for packed spans. Returns (k_BRKD, v_BRKD, valid_BR)."""
  chex.assert_equal_shape([span_start_BN, span_len_BN])
  src_BR = slot_sources(span_start_BN, span_len_BN, budget=budget)
  k_BRKD, v_BRKD = gather_rows_kernel(k_BSKD, v_BSKD, src_BR, rows_per_step=rows_per_step,
                                      interpret=interpret)
  return k_BRKD, v_BRKD, src_BR >= 0


def gather_chunks(k_BSKD, v_BSKD, span_start_BN, span_len_BN, *, budget: int,
                  rows_per_step: int | None = None, interpret=False):
  """Dispatcher: the Pallas kernel on TPU or in interpret mode, else the XLA gather."""
  if implementation(interpret, gpu_version=False) == "pallas":
    return gather_chunks_kernel(k_BSKD, v_BSKD, span_start_BN, span_len_BN, budget=budget,
                                rows_per_step=rows_per_step, interpret=interpret)
  return gather_chunks_reference(k_BSKD, v_BSKD, span_start_BN, span_len_BN, budget=budget)
