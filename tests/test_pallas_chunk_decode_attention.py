"""Chunk-selective decode attention: Pallas kernel (interpret mode) against the jnp reference, and its
lowering to Mosaic for a TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import chunk_decode_attention as cda
from tests.kernel_fixtures import TPU_HEADS, decode_case_mask, lower_for_tpu, selection_mask, tpu_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# jitted, so the cases that share a shape share one compile
partials = jax.jit(cda.decode_partials,
                   static_argnames=("scale", "block_size", "n_splits", "interpret"))
reference = jax.jit(cda.chunk_decode_attention_reference, static_argnames=("scale", "block_size"))
block_list = jax.jit(cda.decode_block_list, static_argnames=("block_size",))


def inputs(B, S, K, G, D, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (B, K * G, D), dtype)
  k = jax.random.normal(kk, (B, S, K, D), dtype)
  v = jax.random.normal(kv, (B, S, K, D), dtype)
  return q, k, v


SHAPES = [  # B, S, K, G, D, block, n_splits, dtype
    (2, 256, 2, 1, 32, 32, 2, jnp.float32),
    (2, 256, 1, 4, 32, 32, 3, jnp.float32),
    (3, 128, 2, 4, 16, 16, 1, jnp.bfloat16),
    (2, 256, 2, 4, 32, 64, 4, jnp.bfloat16),
]


@pytest.mark.parametrize("case", ["ragged", "empty_row", "every_block", "cut_list"])
@pytest.mark.parametrize("B,S,K,G,D,bs,n_splits,dtype", SHAPES)
def test_kernel_matches_reference(case, B, S, K, G, D, bs, n_splits, dtype):
  rng = np.random.default_rng(S + K + G + bs)
  q, k, v = inputs(B, S, K, G, D, dtype)
  lengths = rng.integers(S // 4, S + 1, size=B)
  mask = decode_case_mask(case, rng, lengths, S)
  ids, n = block_list(mask, block_size=bs)
  if case == "cut_list":  # tokens in blocks left off the list must be invisible
    n = jnp.minimum(n, 2)
  scale = D ** -0.5
  parts = partials(q, k, v, ids, n, mask, scale=scale, block_size=bs,
                              n_splits=n_splits, interpret=True)
  for part in parts:  # interpret mode starts outputs as NaN: every element must be written
    assert not jnp.isnan(part).any()
  out = cda.combine_splits(*parts).astype(dtype)
  ref = reference(q, k, v, ids, n, mask, scale=scale, block_size=bs)
  assert out.shape == ref.shape == (B, K * G, D) and out.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  if case == "empty_row":
    assert int(n[0]) == 0 and not jnp.any(out[0])


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("bad", ["ids_batch", "n_batch"])
def test_refuses_lists_of_the_wrong_shape(bad, kernel):
  """A block list or count of batch 1 is refused by both kernels' one check: it broadcast to every row and gave
  numbers."""
  from pallas_kernels.chunk_decode_attention_gpu import decode_partials_gpu

  call = dict(tpu=cda.decode_partials, gpu=decode_partials_gpu)[kernel]
  B, S, D, bs = 2, 64, 16, 16
  mask = jnp.arange(S)[None] < jnp.array([[S], [20]])
  ids, n = cda.decode_block_list(mask, block_size=bs)
  ids, n = {"ids_batch": (ids[:1], n), "n_batch": (ids, n[:1])}[bad]
  q, k = jnp.ones((B, 2, D)), jnp.ones((B, S, 1, D))
  with pytest.raises(AssertionError, match="shape"):
    call(q, k, k, ids, n, mask, scale=0.25, block_size=bs, interpret=True)


def test_dispatcher_and_tpu_interpreter():
  """CPU runs the reference; the TPU simulator (bounds-checked reads, NaN memory) agrees."""
  B, S, K, G, D, bs = 2, 128, 2, 2, 32, 32
  rng = np.random.default_rng(1)
  q, k, v = inputs(B, S, K, G, D, jnp.float32, seed=1)
  mask = selection_mask(rng, [S, 70], S)
  ids, n = cda.decode_block_list(mask, block_size=bs)
  kw = dict(scale=0.2, block_size=bs)
  ref = cda.chunk_decode_attention_reference(q, k, v, ids, n, mask, **kw)
  np.testing.assert_array_equal(cda.chunk_decode_attention(q, k, v, ids, n, mask, **kw), ref)
  out = cda.chunk_decode_attention(q, k, v, ids, n, mask, **kw, n_splits=2,
                                   interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_block_list_against_loops():
  rng = np.random.default_rng(2)
  mask = selection_mask(rng, [256, 100, 0], 256)
  ids, n = cda.decode_block_list(mask, block_size=32)
  for b in range(3):
    want = [i for i in range(8) if np.asarray(mask[b, i * 32:(i + 1) * 32]).any()]
    assert int(n[b]) == len(want)
    assert list(np.asarray(ids[b, :len(want)])) == want
    assert not np.asarray(ids[b, len(want):]).any()


@pytest.mark.parametrize("heads", TPU_HEADS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("S,bs,n_splits", [(4096, 128, 2), (30, 30, 1)])  # the working buffer; the open chunk
def test_lowers_to_mosaic_for_tpu(heads, dtype, S, bs, n_splits):
  K, G, D = TPU_HEADS[heads]
  sds = jax.ShapeDtypeStruct
  f = functools.partial(cda.chunk_decode_attention_kernel, scale=0.1, block_size=bs, n_splits=n_splits)
  hlo = lower_for_tpu(f, sds((2, K * G, D), dtype), sds((2, S, K, D), dtype), sds((2, S, K, D), dtype),
                      sds((2, S // bs), jnp.int32), sds((2,), jnp.int32), sds((2, S), jnp.bool_))
  assert tpu_kernels(hlo) == 1
