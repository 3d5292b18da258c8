"""Chunk-sparse prefill attention, GPU (Triton-style) kernel: interpret mode on CPU against the
jnp reference, the dispatcher's routing, and the lowering to Triton IR for CUDA.

No GPU ran these: the Triton compile (registers, shared memory) and the speed are unchecked here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import chunk_prefill_attention as cpa
from pallas_kernels import chunk_prefill_attention_gpu as cpg
from tests.kernel_fixtures import chunking, lower_for_gpu

# bounds on |out - ref| (relative and absolute): f32 agrees to rounding, bf16 to its mantissa
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
MASK_ARGS = ("block_q", "block_k", "n_sink", "n_local")
# jitted, so the cases that share a shape share one compile
gpu_kernel = jax.jit(cpg.chunk_prefill_attention_gpu,
                     static_argnames=("scale", *MASK_ARGS, "interpret", "tile_q", "tile_k",
                                      "heads_per_program"))
reference = jax.jit(cpa.chunk_prefill_attention_reference, static_argnames=("scale", *MASK_ARGS))
block_lists = jax.jit(cpa.prefill_block_lists, static_argnames=(*MASK_ARGS, "max_chunks"))


def inputs(B, T, K, G, D, dtype, seed):
  """Fresh q, k, v from numpy (no jax.random compile per shape)."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return draw(B, T, K * G, D), draw(B, T, K, D), draw(B, T, K, D)


SHAPES = [  # B, T, K, G, D, block_q, block_k, n_local, n_sel, tile_q, tile_k, heads, dtype
    (2, 128, 2, 1, 32, 32, 32, 1, 3, 16, 16, None, jnp.float32),  # blocks cut into 2 x 2 tiles
    (2, 128, 1, 4, 32, 32, 16, 0, 2, 64, 64, 2, jnp.float32),  # G = 4 in groups of 2
    (2, 96, 3, 3, 48, 24, 24, 2, 3, 64, 64, None, jnp.float32),  # 24, 48, G = 3: all padded
    (2, 128, 2, 4, 16, 64, 32, 2, 4, 32, 16, None, jnp.bfloat16),
]


@pytest.mark.parametrize("case", ["ragged", "empty", "every_block"])
@pytest.mark.parametrize("B,T,K,G,D,bq,bk,n_local,n_sel,tq,tk,heads,dtype", SHAPES)
def test_gpu_kernel_matches_reference(case, B, T, K, G, D, bq, bk, n_local, n_sel, tq, tk, heads,
                                      dtype):
  rng = np.random.default_rng(200 + T + bq + bk + n_sel)  # not the TPU test's inputs
  q, k, v = inputs(B, T, K, G, D, dtype, seed=200 + D + G)
  lengths = [T] + list(rng.integers(T // 4, T, size=B - 1))  # ragged: chunk id -1 past a row
  chunk_id, sel, C = chunking(rng, lengths, T, n_sel=n_sel, mean_chunk=8)
  if case == "empty":  # no selections, and query blocks with nothing listed give zeros
    sel = jnp.full(sel.shape, -1, jnp.int32)
  kw = dict(block_q=bq, block_k=bk, n_sink=4, n_local=n_local)
  ids, n = block_lists(chunk_id, sel, **kw, max_chunks=C)
  if case == "empty":
    n = n.at[0, ::2].set(0)
  elif case == "every_block":
    ids = jnp.broadcast_to(jnp.arange(T // bk, dtype=jnp.int32), ids.shape)
    n = jnp.full(n.shape, T // bk, jnp.int32)
  scale = D ** -0.5
  out = gpu_kernel(q, k, v, ids, n, chunk_id, sel, scale=scale, **kw, interpret=True, tile_q=tq,
                   tile_k=tk, heads_per_program=heads)
  # interpret mode starts outputs as NaN (test_unwritten_output_stays_nan_in_triton_style):
  # every element must be written
  assert jnp.isfinite(out).all()
  ref = reference(q, k, v, ids, n, chunk_id, sel, scale=scale, **kw)
  assert out.shape == ref.shape == q.shape and out.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  assert jnp.any(out)
  if case == "empty":
    assert not jnp.any(out[0, :bq])
  if case == "ragged":  # padding queries see nothing
    assert not jnp.any(out[1, lengths[1]:])


def _half_writer(x_ref, o_ref):
  @pl.when(pl.program_id(0) == 0)
  def _():
    o_ref[...] = x_ref[...]


def test_unwritten_output_stays_nan_in_triton_style():
  """The poison checks above rely on this: a Triton-style `pallas_call` in interpret mode
  starts its outputs as NaN, so a block the kernel never writes stays NaN."""
  x = jnp.ones((32, 16), jnp.float32)
  out = pl.pallas_call(_half_writer, grid=(2,),
                       in_specs=[pl.BlockSpec((16, 16), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((16, 16), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       compiler_params=pltriton.CompilerParams(), interpret=True)(x)
  assert not jnp.isnan(out[:16]).any() and jnp.isnan(out[16:]).all()


def test_dispatcher_routes_to_the_gpu_kernel(monkeypatch):
  """backend="gpu" picks the GPU kernel (default tiles); CPU without it keeps the reference."""
  B, T, K, G, D, bq, bk = 2, 64, 2, 2, 16, 32, 16
  rng = np.random.default_rng(9)
  q, k, v = inputs(B, T, K, G, D, jnp.float32, seed=9)
  chunk_id, sel, C = chunking(rng, [T, 45], T, n_sel=2, mean_chunk=8)
  kw = dict(scale=0.25, block_q=bq, block_k=bk, n_sink=4, n_local=1)
  ids, n = block_lists(chunk_id, sel, **{a: kw[a] for a in MASK_ARGS}, max_chunks=C)
  args = (q, k, v, ids, n, chunk_id, sel)
  ref = reference(*args, **kw)
  np.testing.assert_array_equal(cpa.chunk_prefill_attention(*args, **kw), ref)

  calls = []  # counted at trace time
  gpu = cpg.chunk_prefill_attention_gpu
  monkeypatch.setattr(cpg, "chunk_prefill_attention_gpu",
                      lambda *a, **k: calls.append(1) or gpu(*a, **k))
  on_gpu = jax.jit(functools.partial(cpa.chunk_prefill_attention, **kw, interpret=True,
                                     backend="gpu"))
  np.testing.assert_allclose(on_gpu(*args), ref, rtol=1e-5, atol=1e-5)
  assert len(calls) == 1


@pytest.mark.parametrize("B,T,K,G,D,bq,bk,n_sel,dtype", [
    (1, 512, 3, 3, 64, 256, 256, 5, jnp.bfloat16),  # chunk_prefill's blocks, SmolLM2's heads
    (2, 96, 2, 3, 48, 24, 24, 3, jnp.float32),  # everything padded
    (2, 128, 2, 4, 32, 32, 16, 3, jnp.float32),  # all 4 query heads of a kv head in a program
])
def test_lowers_to_triton_for_cuda(B, T, K, G, D, bq, bk, n_sel, dtype):
  """The Triton lowering runs without a GPU; it rejects e.g. tensor sizes that are not powers
  of 2, so this catches what interpret mode lets through (not what Triton's compiler rejects)."""
  f = jax.jit(functools.partial(cpg.chunk_prefill_attention_gpu, scale=0.1, block_q=bq,
                                block_k=bk, n_sink=4, n_local=1))
  sds = jax.ShapeDtypeStruct
  args = (sds((B, T, K * G, D), dtype), sds((B, T, K, D), dtype), sds((B, T, K, D), dtype),
          sds((B, T // bq, T // bk), jnp.int32), sds((B, T // bq), jnp.int32),
          sds((B, T), jnp.int32), sds((B, T, n_sel), jnp.int32))
  hlo = lower_for_gpu(f, *args)
  assert "xla.gpu.triton" in hlo and 'name = "chunk_prefill_attention_gpu"' in hlo
