"""Compaction: the DMA gather kernel (interpret mode) against the XLA gather and plain loops, and its lowering
to Mosaic for a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gather_chunks as gc
from tests.kernel_fixtures import TPU_HEADS, lower_for_tpu, tpu_kernels

kernel = jax.jit(gc.gather_chunks_kernel, static_argnames=("budget", "rows_per_step", "interpret"))
reference = jax.jit(gc.gather_chunks_reference, static_argnames=("budget",))
rows_kernel = jax.jit(gc.gather_rows_kernel, static_argnames=("rows_per_step", "interpret"))


def random_spans(rng, B, S, N, *, max_len=40):
  """Up to N disjoint ascending spans per row; unused slots have length 0."""
  start = np.zeros((B, N), np.int32)
  length = np.zeros((B, N), np.int32)
  for b in range(B):
    n = int(rng.integers(1, N + 1))
    cuts = np.sort(rng.choice(np.arange(S), size=2 * n, replace=False))
    start[b, :n], ends = cuts[0::2], cuts[1::2]
    length[b, :n] = np.minimum(ends - cuts[0::2], max_len)
  return start, length


def slow_gather(x, start, length, budget):
  """Span by span, token by token."""
  B, _, K, D = x.shape
  out = np.zeros((B, budget, K, D), x.dtype)
  valid = np.zeros((B, budget), bool)
  for b in range(B):
    r = 0
    for s, n in zip(start[b], length[b]):
      for t in range(s, s + n):
        if r < budget:
          out[b, r], valid[b, r] = x[b, t], True
          r += 1
  return out, valid


@pytest.mark.parametrize("case", ["random", "over_budget", "empty", "everything"])
@pytest.mark.parametrize("B,S,K,D,N,budget,rows,dtype", [
    (2, 256, 2, 32, 6, 128, 32, jnp.float32),
    (3, 128, 1, 16, 4, 96, None, jnp.bfloat16),
])
def test_kernel_matches_reference(case, B, S, K, D, N, budget, rows, dtype):
  rng = np.random.default_rng(S + N)
  kk, kv = jax.random.split(jax.random.key(N))
  k = jax.random.normal(kk, (B, S, K, D), dtype)
  v = jax.random.normal(kv, (B, S, K, D), dtype)
  start, length = random_spans(rng, B, S, N)
  if case == "over_budget":  # the last tokens do not fit and are dropped
    start[:, 0], length[:, 0] = 0, budget - 5
  elif case == "empty":
    length[:] = 0
  elif case == "everything":  # one span fills the whole budget
    start[:], length[:] = 0, 0
    length[:, 0] = budget
  ko, vo, valid = kernel(k, v, jnp.asarray(start), jnp.asarray(length), budget=budget,
                         rows_per_step=rows, interpret=True)
  assert not jnp.isnan(ko).any() and not jnp.isnan(vo).any()  # every slot written
  rk, rv, rvalid = reference(k, v, jnp.asarray(start), jnp.asarray(length), budget=budget)
  want_k, want_valid = slow_gather(np.asarray(k), start, length, budget)
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(rvalid, want_valid)
  np.testing.assert_array_equal(np.asarray(rk), want_k)
  np.testing.assert_array_equal(np.asarray(ko), want_k)  # a copy: exact, in any dtype
  np.testing.assert_array_equal(np.asarray(vo), np.asarray(rv))
  assert ko.dtype == dtype and ko.shape == (B, budget, K, D)


@pytest.mark.parametrize("dtype,interpret", [(jnp.float32, True), (jnp.bfloat16, True),
                                             (jnp.float32, pltpu.InterpretParams())],
                         ids=["f32", "bf16", "f32_tpu_sim"])
def test_rows_with_holes(dtype, interpret):
  """Any slot layout: e.g. fixed slots per chunk, with empty slots (-1) between chunks.

  The TPU simulator reuses VMEM across grid steps, so empty slots there start stale, not NaN.
  """
  B, S, K, D, R = 2, 128, 2, 16, 64
  rng = np.random.default_rng(8)
  k, v = (jax.random.normal(key, (B, S, K, D), dtype) for key in jax.random.split(jax.random.key(8)))
  src = rng.integers(0, S, size=(B, R)).astype(np.int32)
  src[rng.random((B, R)) < 0.3] = -1
  src[1, :16] = -1  # a whole tile empty
  ko, vo = rows_kernel(k, v, jnp.asarray(src), rows_per_step=16, interpret=interpret)
  assert not jnp.isnan(ko).any() and not jnp.isnan(vo).any()
  for got, x in ((ko, k), (vo, v)):
    want = np.where((src >= 0)[..., None, None],
                    np.asarray(x)[np.arange(B)[:, None], np.maximum(src, 0)], 0)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_tpu_interpreter_and_dispatcher():
  """The TPU simulator (real DMA semantics, bounds-checked reads) agrees; CPU runs XLA."""
  B, S, K, D, budget = 2, 128, 2, 16, 64
  rng = np.random.default_rng(7)
  k, v = (jax.random.normal(key, (B, S, K, D)) for key in jax.random.split(jax.random.key(7)))
  start, length = (jnp.asarray(x) for x in random_spans(rng, B, S, 5))
  want = reference(k, v, start, length, budget=budget)
  got = gc.gather_chunks(k, v, start, length, budget=budget, rows_per_step=16,
                         interpret=pltpu.InterpretParams())
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(gc.gather_chunks(k, v, start, length, budget=budget), want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("heads", TPU_HEADS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_for_tpu(heads, dtype):
  """A DMA into a squeezed (None) output block made invalid Mosaic IR here; interpret mode ran it."""
  K, _, D = TPU_HEADS[heads]
  sds = jax.ShapeDtypeStruct
  hlo = lower_for_tpu(gc.gather_rows_kernel, sds((2, 4096, K, D), dtype), sds((2, 4096, K, D), dtype),
                      sds((2, 512), jnp.int32))
  assert tpu_kernels(hlo) == 1
