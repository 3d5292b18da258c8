"""Chunk-selective decode attention, GPU (Triton-style) kernel: interpret mode on CPU against the
jnp reference, the dispatchers' routing, and the lowering to Triton IR for CUDA.

No GPU ran these: the Triton compile (dot sizes, registers) and the speed are unchecked here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import chunk_attention, chunk_kernels
from pallas_kernels import chunk_decode_attention as cda
from pallas_kernels import chunk_decode_attention_gpu as cdg
from pallas_kernels.dispatch import implementation
from tests.kernel_fixtures import decode_case_mask, lower_for_gpu, selection_mask

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# jitted, so the cases that share a shape share one compile
partials_gpu = jax.jit(cdg.decode_partials_gpu,
                       static_argnames=("scale", "block_size", "n_splits", "interpret"))
reference = jax.jit(cda.chunk_decode_attention_reference, static_argnames=("scale", "block_size"))
block_list = jax.jit(cda.decode_block_list, static_argnames=("block_size",))


@jax.jit
def merge(parts):
  """The merged output (f32) and whether any partial holds NaN."""
  return cda.combine_splits(*parts), jnp.stack([jnp.isnan(p).any() for p in parts]).any()


def inputs(B, S, K, G, D, dtype, seed):
  """Fresh q, k, v from numpy (no jax.random compile per shape)."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return draw(B, K * G, D), draw(B, S, K, D), draw(B, S, K, D)


SHAPES = [  # B, S, K, G, D, block, n_splits, dtype
    (2, 256, 2, 1, 32, 32, 2, jnp.float32),  # G = 1: heads padded to 16
    (2, 256, 1, 4, 32, 32, 3, jnp.float32),  # 8 blocks in 3 splits: a short last split
    (3, 192, 3, 3, 48, 24, 2, jnp.float32),  # G, block, D not powers of 2: all padded
    (2, 256, 2, 4, 64, 64, 4, jnp.bfloat16),
    (3, 128, 2, 4, 16, 16, 1, jnp.bfloat16),
]


@pytest.mark.parametrize("case", ["ragged", "empty_row", "nothing", "every_block", "cut_list"])
@pytest.mark.parametrize("B,S,K,G,D,bs,n_splits,dtype", SHAPES)
def test_gpu_kernel_matches_reference(case, B, S, K, G, D, bs, n_splits, dtype):
  rng = np.random.default_rng(100 + S + K + G + bs)  # not the TPU test's inputs
  q, k, v = inputs(B, S, K, G, D, dtype, seed=100 + D)
  lengths = rng.integers(S // 4, S + 1, size=B)
  mask = decode_case_mask(case, rng, lengths, S)
  ids, n = block_list(mask, block_size=bs)
  if case == "cut_list":  # tokens in blocks left off the list must be invisible
    n = jnp.minimum(n, 2)
  scale = D ** -0.5
  parts = partials_gpu(q, k, v, ids, n, mask, scale=scale, block_size=bs, n_splits=n_splits,
                       interpret=True)
  assert [p.shape for p in parts] == [(B, n_splits, K * G, D)] + [(B, n_splits, K * G, 1)] * 2
  assert all(p.dtype == jnp.float32 for p in parts)
  out, has_nan = merge(parts)
  assert not has_nan  # interpret mode starts outputs as NaN: every element must be written
  out = out.astype(dtype)
  ref = reference(q, k, v, ids, n, mask, scale=scale, block_size=bs)
  assert out.shape == ref.shape == (B, K * G, D) and out.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  if case == "empty_row":
    assert int(n[0]) == 0 and not jnp.any(out[0])
  if case == "nothing":
    assert not jnp.any(n) and not jnp.any(out)


def test_dispatchers_route_to_the_gpu_kernel(monkeypatch):
  """backend="gpu" picks the GPU kernel; CPU without it keeps the reference; chunk_generate's
  pallas path takes the GPU partials (through `partials`) where the backend is a GPU."""
  B, S, K, G, D, bs = 2, 128, 2, 2, 32, 32
  rng = np.random.default_rng(7)
  q, k, v = inputs(B, S, K, G, D, jnp.float32, seed=7)
  mask = selection_mask(rng, [S, 70], S)
  ids, n = block_list(mask, block_size=bs)
  kw = dict(scale=0.2, block_size=bs)
  ref = reference(q, k, v, ids, n, mask, **kw)
  on_cpu = jax.jit(functools.partial(cda.chunk_decode_attention, **kw))
  np.testing.assert_array_equal(on_cpu(q, k, v, ids, n, mask), ref)

  calls = []  # counted at trace time
  gpu_partials = cdg.decode_partials_gpu
  monkeypatch.setattr(cdg, "decode_partials_gpu",
                      lambda *a, **k: calls.append(1) or gpu_partials(*a, **k))
  on_gpu = jax.jit(functools.partial(cda.chunk_decode_attention, **kw, interpret=True,
                                     backend="gpu"))
  np.testing.assert_allclose(on_gpu(q, k, v, ids, n, mask), ref, rtol=1e-5, atol=1e-5)
  assert len(calls) == 1

  # chunk_kernels on a "GPU": the working buffer's blocks and the open chunk (M = 24: padded)
  W, M = 128, 24
  _, work_k, work_v = inputs(B, W, K, G, D, jnp.float32, seed=8)
  _, open_k, open_v = inputs(B, M, K, G, D, jnp.float32, seed=9)
  used = jnp.array([100, 0], jnp.int32)
  work_ok = jnp.arange(W)[None] < used[:, None]
  open_ok = jnp.arange(M)[None] < jnp.array([[M], [5]])
  args = (q[:, None], work_k, work_v, work_ok, used, open_k, open_v, open_ok)
  xla = jax.jit(lambda q, wk, wv, wok, used, ok, ov, ook: chunk_attention.packed_decode_attention(
      q, wk[None], wv[None], 0, wok, -(-used.max() // 32) * 32, ok, ov, ook, scale=0.2, softcap=None,
      blocks=(64, 32)))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what dispatch.implementation reads
  assert implementation(False) == "gpu"
  pallas = jax.jit(functools.partial(chunk_kernels.decode_attention_kernel, scale=0.2, block=32,
                                     interpret=True))
  np.testing.assert_allclose(pallas(*args), xla(*args), rtol=1e-5, atol=1e-5)
  assert len(calls) == 3


@pytest.mark.parametrize("B,S,K,G,D,bs,n_splits,dtype", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_lowers_to_triton_for_cuda(B, S, K, G, D, bs, n_splits, dtype):
  """The Triton lowering runs without a GPU; it rejects e.g. tensor sizes that are not powers
  of 2, so this catches what interpret mode lets through (not what Triton's compiler rejects)."""
  f = jax.jit(functools.partial(cdg.chunk_decode_attention_gpu, scale=0.1, block_size=bs,
                                n_splits=n_splits))
  sds = jax.ShapeDtypeStruct
  args = (sds((B, K * G, D), dtype), sds((B, S, K, D), dtype), sds((B, S, K, D), dtype),
          sds((B, S // bs), jnp.int32), sds((B,), jnp.int32), sds((B, S), jnp.bool_))
  hlo = lower_for_gpu(f, *args)
  assert "xla.gpu.triton" in hlo and 'name = "chunk_decode_attention_gpu"' in hlo
