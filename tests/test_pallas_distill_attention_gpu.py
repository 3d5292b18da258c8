"""Distillation attention, GPU (Triton-style) kernel: interpret mode on CPU against the jnp
reference, the dispatcher's routing, and the lowering to Triton IR for CUDA.

No GPU ran these: the Triton compile (registers, shared memory) and the speed are unchecked here.
(That interpret mode starts outputs as NaN, which the poison checks rely on, is checked in
test_pallas_chunk_prefill_attention_gpu.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import distill_attention as da
from pallas_kernels import distill_attention_gpu as dg
from tests.kernel_fixtures import chunk_ids, lower_for_gpu

# bounds on |got - ref| (relative and absolute), for o and for P: f32 agrees to rounding, bf16
# to its mantissa
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
STATIC = ("scale", "max_chunks", "n_sink", "block_q", "block_k", "softcap")
# jitted, so the cases that share a shape share one compile
raw_gpu = jax.jit(dg.distill_attention_raw_gpu,
                  static_argnames=(*STATIC, "interpret", "tile_q", "tile_k", "chunk_tile"))
reference = jax.jit(da.distill_attention_reference, static_argnames=STATIC)


def inputs(B, T, K, G, D, dtype, seed):
  """Fresh q, k, v from numpy (no jax.random compile per shape)."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return draw(B, T, K * G, D), draw(B, T, K, D), draw(B, T, K, D)


SHAPES = [  # B, T, K, G, D, block_q, block_k, C, mean_chunk, softcap, tiles (q, k, C), dtype
    (3, 128, 2, 1, 32, 32, 32, 16, 10, None, (16, 16, 16), jnp.float32),  # blocks cut in tiles
    (3, 128, 1, 4, 16, 64, 32, 40, 4, None, (32, 32, 16), jnp.float32),  # 3 chunk tiles, G = 4
    (3, 96, 3, 3, 48, 24, 24, 20, 6, 20.0, (64, 64, 16), jnp.float32),  # all padded; softcap
    (3, 128, 2, 2, 32, 32, 64, 32, 5, None, (64, 64, 16), jnp.bfloat16),
]


@pytest.mark.parametrize("case", ["ragged", "full"])
@pytest.mark.parametrize("B,T,K,G,D,bq,bk,C,mean_chunk,softcap,tiles,dtype", SHAPES)
def test_gpu_kernel_matches_reference(case, B, T, K, G, D, bq, bk, C, mean_chunk, softcap, tiles,
                                      dtype):
  rng = np.random.default_rng(300 + T + bq + bk + C)  # not the TPU test's inputs
  q, k, v = inputs(B, T, K, G, D, dtype, seed=300 + D + G)
  # ragged: a full row, a short one (chunk id -1 past it), an empty one; full: every key of
  # every row (same shapes: one compile)
  lengths = [T, int(rng.integers(T // 3, T)), 0] if case == "ragged" else [T] * B
  chunk_id = chunk_ids(rng, lengths, T, mean_chunk=mean_chunk)
  assert int(chunk_id.max()) < C
  kw = dict(scale=D ** -0.5, max_chunks=C, n_sink=4, block_q=bq, block_k=bk, softcap=softcap)
  tq, tk, tc = tiles
  o, mass = raw_gpu(q, k, v, chunk_id, **kw, interpret=True, tile_q=tq, tile_k=tk, chunk_tile=tc)
  # interpret mode starts outputs as NaN: every element must be written
  assert jnp.isfinite(o).all() and jnp.isfinite(mass).all()
  p = da.renormalise(mass, chunk_id)
  ref_o, ref_p = reference(q, k, v, chunk_id, **kw)
  assert o.shape == q.shape and o.dtype == dtype
  assert mass.shape == p.shape == ref_p.shape == (B, T, C)
  assert mass.dtype == p.dtype == jnp.float32
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref_o, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(p, ref_p, rtol=tol, atol=tol)
  # the raw mass of a query sums, over chunks, to its non-sink probability (< 1 with sinks)
  assert jnp.all(mass.sum(-1) <= 1 + tol) and jnp.any(p)
  if case == "ragged":  # the empty row sees nothing; padding queries get no teacher
    assert not jnp.any(o[-1]) and not jnp.any(mass[-1])
    assert not np.asarray(p)[np.asarray(chunk_id < 0)].any()


def test_chunk_tile_runs_cover_every_binned_key():
  """Each chunk tile's key-tile run holds every key (token, not a sink) of its chunks."""
  T, tk, ct, C, n_sink = 96, 16, 16, 40, 4
  rng = np.random.default_rng(11)
  chunk_id = chunk_ids(rng, [T, 50, 0], T, mean_chunk=3)
  nct = -(-C // ct)
  lo, hi = dg.chunk_tile_runs(chunk_id, tile_k=tk, chunk_tile=ct, n_chunk_tiles=nct,
                              n_sink=n_sink, max_chunks=C)
  cid = np.asarray(chunk_id)
  for b in range(cid.shape[0]):
    for c in range(nct):
      keys = [s for s in range(n_sink, T) if c * ct <= cid[b, s] < min((c + 1) * ct, C)]
      if keys:
        assert lo[b, c] == keys[0] // tk and hi[b, c] == keys[-1] // tk + 1, (b, c)
      else:
        assert lo[b, c] == hi[b, c] == 0, (b, c)


def test_dispatcher_routes_to_the_gpu_kernel(monkeypatch):
  """backend="gpu" picks the GPU kernel (default tiles); CPU without it keeps the reference."""
  B, T, K, G, D = 2, 64, 2, 2, 16
  rng = np.random.default_rng(12)
  q, k, v = inputs(B, T, K, G, D, jnp.float32, seed=12)
  chunk_id = chunk_ids(rng, [T, 40], T, mean_chunk=6)
  kw = dict(scale=0.25, max_chunks=12, n_sink=4, block_q=32, block_k=32, softcap=None)
  ref = reference(q, k, v, chunk_id, **kw)
  for a, b in zip(da.distill_attention(q, k, v, chunk_id, **kw), ref):
    np.testing.assert_array_equal(a, b)

  calls = []  # counted at trace time
  gpu = dg.distill_attention_gpu
  monkeypatch.setattr(dg, "distill_attention_gpu", lambda *a, **k: calls.append(1) or gpu(*a, **k))
  on_gpu = jax.jit(functools.partial(da.distill_attention, **kw, interpret=True, backend="gpu"))
  for a, b in zip(on_gpu(q, k, v, chunk_id), ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert len(calls) == 1


@pytest.mark.parametrize("B,T,K,G,D,bq,bk,C,softcap,dtype", [
    (1, 1024, 3, 3, 64, 256, 512, 100, None, jnp.bfloat16),  # the teacher's blocks
    (2, 96, 2, 3, 48, 24, 24, 20, 30.0, jnp.float32),  # everything padded; softcap
])
def test_lowers_to_triton_for_cuda(B, T, K, G, D, bq, bk, C, softcap, dtype):
  """The Triton lowering runs without a GPU; it rejects e.g. tensor sizes that are not powers
  of 2, so this catches what interpret mode lets through (not what Triton's compiler rejects)."""
  f = jax.jit(functools.partial(dg.distill_attention_gpu, scale=0.1, max_chunks=C, n_sink=4,
                                block_q=bq, block_k=bk, softcap=softcap))
  sds = jax.ShapeDtypeStruct
  args = (sds((B, T, K * G, D), dtype), sds((B, T, K, D), dtype), sds((B, T, K, D), dtype),
          sds((B, T), jnp.int32))
  hlo = lower_for_gpu(f, *args)
  assert hlo.count("xla.gpu.triton") == 2
  assert 'name = "distill_attention_gpu_flash"' in hlo
  assert 'name = "distill_attention_gpu_bins"' in hlo
