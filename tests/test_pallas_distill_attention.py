"""Distillation attention: Pallas kernel (interpret mode) against the jnp reference and loops, and its
lowering to Mosaic for a TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import distill_attention as da
from tests.kernel_fixtures import TPU_HEADS, chunk_ids, lower_for_tpu, tpu_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
STATIC = ("scale", "max_chunks", "n_sink", "block_q", "block_k", "softcap")
raw = jax.jit(da.distill_attention_raw, static_argnames=(*STATIC, "interpret"))
reference = jax.jit(da.distill_attention_reference, static_argnames=STATIC)


def slow_teacher(q, k, chunk_id, *, scale, max_chunks, n_sink):
  """P[t, j] from the definition, one query at a time, in float64."""
  q, k, chunk_id = (np.asarray(x, np.float64) for x in (q, k, chunk_id))
  B, T, H, _ = q.shape
  G = H // k.shape[2]
  P = np.zeros((B, T, max_chunks))
  for b in range(B):
    keys = np.nonzero(chunk_id[b] >= 0)[0]
    for t in range(T):
      seen = keys[keys <= t]
      if not len(seen):
        continue
      mass = np.zeros(len(seen))
      for h in range(H):
        s = k[b, seen, h // G] @ q[b, t, h] * scale
        a = np.exp(s - s.max())
        mass += a / a.sum() / H
      for s, m in zip(seen, mass):
        j = int(chunk_id[b, s])
        if s >= n_sink and j < chunk_id[b, t]:  # no sinks; finished chunks only
          P[b, t, j] += m
      tot = P[b, t].sum()
      P[b, t] /= tot if tot > 0 else 1.0
  return P


SHAPES = [  # B, T, K, G, D, block_q, block_k, max_chunks, softcap, dtype
    (2, 128, 2, 1, 32, 32, 32, 16, None, jnp.float32),
    (2, 128, 1, 4, 16, 32, 16, 20, None, jnp.float32),
    (2, 128, 2, 4, 32, 16, 32, 16, 20.0, jnp.float32),
    (2, 128, 2, 2, 32, 32, 32, 16, None, jnp.bfloat16),
]


@pytest.mark.parametrize("B,T,K,G,D,bq,bk,C,softcap,dtype", SHAPES)
def test_kernel_matches_reference(B, T, K, G, D, bq, bk, C, softcap, dtype):
  rng = np.random.default_rng(T + bq + bk + C)
  kq, kk, kv = jax.random.split(jax.random.key(C), 3)
  q = jax.random.normal(kq, (B, T, K * G, D), dtype)
  k = jax.random.normal(kk, (B, T, K, D), dtype)
  v = jax.random.normal(kv, (B, T, K, D), dtype)
  chunk_id = chunk_ids(rng, [T, int(rng.integers(T // 3, T))], T)
  kw = dict(scale=D ** -0.5, max_chunks=C, n_sink=4, block_q=bq, block_k=bk, softcap=softcap)
  o, mass = raw(q, k, v, chunk_id, **kw, interpret=True)
  # interpret mode starts outputs as NaN: every element must be written
  assert not jnp.isnan(o).any() and not jnp.isnan(mass).any()
  p = da.renormalise(mass, chunk_id)
  ref_o, ref_p = reference(q, k, v, chunk_id, **kw)
  assert p.shape == (B, T, C) and p.dtype == jnp.float32 and o.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref_o, np.float32),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(p, ref_p, rtol=tol, atol=tol)
  # rows sum to 1 where a candidate exists (an earlier chunk with a non-sink token: one at or
  # after the chunk of position n_sink), else are all zero
  has_cand = np.asarray(chunk_id > chunk_id[:, 4:5])
  assert has_cand.sum() > T
  np.testing.assert_allclose(np.asarray(p.sum(-1))[has_cand], 1.0, rtol=1e-5)
  assert not np.asarray(p)[~has_cand].any()
  # no mass on t's own chunk or later
  assert not np.asarray(jnp.where(jnp.arange(C) >= chunk_id[..., None], p, 0)).any()


def test_reference_against_definition():
  B, T, K, G, D, C = 2, 32, 1, 2, 8, 8
  rng = np.random.default_rng(0)
  chunk_id = chunk_ids(rng, [T, 20], T, mean_chunk=5)
  q, k, v = (jax.random.normal(key, (B, T, h, D))
             for key, h in zip(jax.random.split(jax.random.key(3), 3), (K * G, K, K)))
  _, p = reference(q, k, v, chunk_id, scale=0.3, max_chunks=C, n_sink=3, block_q=16, block_k=16)
  want = slow_teacher(q, k, chunk_id, scale=0.3, max_chunks=C, n_sink=3)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)


def test_dispatcher_runs_reference_on_cpu():
  B, T, D = 1, 64, 16
  rng = np.random.default_rng(1)
  chunk_id = chunk_ids(rng, [T], T)
  q, k, v = (jax.random.normal(key, (B, T, 2, D)) for key in jax.random.split(jax.random.key(1), 3))
  kw = dict(scale=0.25, max_chunks=12, n_sink=4, block_q=32, block_k=32, softcap=None)
  got = da.distill_attention(q, k, v, chunk_id, **kw)
  for a, b in zip(got, reference(q, k, v, chunk_id, **kw)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("heads", TPU_HEADS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_lowers_to_mosaic_for_tpu(heads, dtype, softcap):
  K, G, D = TPU_HEADS[heads]
  B, T = 1, 1024
  sds = jax.ShapeDtypeStruct
  f = functools.partial(da.distill_attention_kernel, scale=0.1, max_chunks=128, n_sink=4, block_q=256, block_k=512,
                        softcap=softcap)  # train.config's blocks
  hlo = lower_for_tpu(f, sds((B, T, K * G, D), dtype), sds((B, T, K, D), dtype), sds((B, T, K, D), dtype),
                      sds((B, T), jnp.int32))
  assert tpu_kernels(hlo) == 2  # the statistics pass and the bins pass
