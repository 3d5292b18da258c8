"""Per-head decode attention, GPU (Triton-style) kernel: interpret mode on CPU against the jnp reference,
the dispatcher's routing, and the lowering to Triton IR for CUDA.

No GPU ran these: the Triton compile (registers, pipelining) and the speed are unchecked here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import head_decode_attention as hda
from pallas_kernels import head_decode_attention_gpu as hdg
from pallas_kernels.chunk_decode_attention import combine_splits
from pallas_kernels.dispatch import implementation
from tests.kernel_fixtures import lower_for_gpu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
partials_gpu = jax.jit(hdg.head_decode_partials_gpu,
                       static_argnames=("scale", "softcap", "block_size", "n_splits", "interpret"))
reference = jax.jit(hda.head_decode_partials_reference, static_argnames=("scale", "softcap"))


@jax.jit
def merge(parts):
  """The merged output [B, H, D] (f32) and whether any partial holds NaN."""
  acc, m, l = parts
  B, P, K, G, D = acc.shape
  out = combine_splits(acc.reshape(B, P, K * G, D), m.reshape(B, P, K * G, 1), l.reshape(B, P, K * G, 1))
  return out, jnp.stack([jnp.isnan(p).any() for p in parts]).any()


def inputs(B, K, G, D, N, W, dtype, seed, *, case="ragged"):
  """Fresh queries, a flat K/V of N rows, and each head's W slots: distinct rows in random order (as a head's
  slots are), visible at random, with `used` as the case says."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  rows = np.stack([np.stack([rng.permutation(N)[:W] for _ in range(K)]) for _ in range(B)])
  ok = rng.random((B, K, W)) < 0.7
  used = rng.integers(1, W + 1, size=(B, K))
  if case == "empty_head":  # a head that reads nothing, beside one that reads every slot
    used[0, 0], used[-1, -1], ok[-1, -1] = 0, W, True
  if case == "nothing":
    ok[:] = False
  if case == "every_slot":
    ok[:], used[:] = True, W
  return (draw(B, K, G, D), draw(N, D), draw(N, D), jnp.asarray(rows, jnp.int32), jnp.asarray(ok),
          jnp.asarray(used, jnp.int32))


SHAPES = [  # B, K, G, D, N, W, block, n_splits, softcap, dtype
    (2, 2, 1, 16, 300, 64, 16, 2, None, jnp.float32),  # G = 1: queries padded to 16
    (2, 3, 3, 64, 900, 300, 64, 3, None, jnp.float32),  # W not a multiple of the block: padded slots
    (1, 3, 3, 64, 700, 256, 128, 8, 30.0, jnp.float32),  # more splits than blocks; soft-capped logits
    (3, 1, 4, 32, 400, 96, 32, 2, None, jnp.bfloat16),
]


@pytest.mark.parametrize("case", ["ragged", "empty_head", "nothing", "every_slot"])
@pytest.mark.parametrize("B,K,G,D,N,W,bs,n_splits,softcap,dtype", SHAPES)
def test_gpu_kernel_matches_reference(case, B, K, G, D, N, W, bs, n_splits, softcap, dtype):
  args = inputs(B, K, G, D, N, W, dtype, seed=B + K + G + D + W, case=case)
  scale = D ** -0.5
  parts = partials_gpu(*args, scale=scale, softcap=softcap, block_size=bs, n_splits=n_splits, interpret=True)
  assert [p.shape for p in parts] == [(B, n_splits, K, G, D)] + [(B, n_splits, K, G)] * 2
  assert all(p.dtype == jnp.float32 for p in parts)
  out, has_nan = merge(parts)
  assert not has_nan  # interpret mode starts outputs as NaN: every element must be written
  ref, _ = merge(reference(*args, scale=scale, softcap=softcap))
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=tol, atol=tol)
  used, ok = np.asarray(args[5]), np.asarray(args[4])
  seen = (ok & (np.arange(W) < used[..., None])).any(-1)  # [B, K]: heads that read anything
  assert np.all(np.asarray(out).reshape(B, K, G, D)[~seen] == 0)
  if case == "nothing":
    assert not np.any(np.asarray(out))


def test_the_reference_is_attention_over_each_heads_slots():
  """The reference's merged output is softmax attention of each query head over its KV head's visible slots."""
  B, K, G, D, N, W = 2, 2, 3, 16, 50, 12
  q, k, v, rows, ok, used = inputs(B, K, G, D, N, W, jnp.float32, seed=3)
  out, _ = merge(reference(q, k, v, rows, ok, used, scale=0.3))
  q, k, v, rows, ok, used = map(np.asarray, (q, k, v, rows, ok, used))
  want = np.zeros((B, K, G, D), np.float32)
  for b in range(B):
    for h in range(K):
      sel = rows[b, h][ok[b, h] & (np.arange(W) < used[b, h])]
      if sel.size:
        s = q[b, h] @ k[sel].T * 0.3
        p = np.exp(s - s.max(-1, keepdims=True))
        want[b, h] = (p / p.sum(-1, keepdims=True)) @ v[sel]
  np.testing.assert_allclose(np.asarray(out), want.reshape(B, K * G, D), rtol=1e-5, atol=1e-5)


def test_dispatch_routes_by_backend_and_head_dim(monkeypatch):
  """The kernel runs on a GPU and in interpret mode (it has no TPU version), the reference on CPU and TPU and for
  head dims the kernel cannot take as they are."""
  assert implementation(False, "gpu", tpu_version=False) == "gpu"
  assert implementation(True, "cpu", tpu_version=False) == "gpu"
  assert implementation(False, "tpu", tpu_version=False) == "xla"
  assert implementation(False, "cpu", tpu_version=False) == "xla"
  assert [hda.kernel_fits(d) for d in (8, 16, 48, 64, 256)] == [False, True, False, True, True]
  assert hda.runs_kernel(64, backend="gpu") and not hda.runs_kernel(48, backend="gpu")
  assert not hda.runs_kernel(64, backend="tpu") and not hda.runs_kernel(64)

  calls = []  # counted at trace time
  gpu = hdg.head_decode_partials_gpu
  monkeypatch.setattr(hdg, "head_decode_partials_gpu", lambda *a, **k: calls.append(1) or gpu(*a, **k))
  args = inputs(2, 2, 2, 16, 100, 40, jnp.float32, seed=5)
  run = lambda **kw: jax.jit(functools.partial(hda.head_decode_partials, scale=0.25, block_size=16, **kw))(*args)
  on_cpu = run()
  assert on_cpu[0].shape[1] == 1 and not calls  # the reference: one split
  on_gpu = run(interpret=True, backend="gpu")
  assert on_gpu[0].shape[1] == hdg.split_count(3) and len(calls) == 1  # 40 slots: 3 blocks of 16
  assert [hdg.split_count(n) for n in (1, 4, 5, 128)] == [1, 1, 2, 32]
  np.testing.assert_allclose(merge(on_gpu)[0], merge(on_cpu)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="power of 2"):
    hdg.head_decode_partials_gpu(*inputs(1, 1, 2, 48, 20, 8, jnp.float32, seed=6), scale=0.1, interpret=True)


@pytest.mark.parametrize("N, dtype", [(30 * 32768 * 3, jnp.bfloat16), (2**25, jnp.float32)])
def test_lowers_to_triton_for_cuda(N, dtype):
  """The Triton lowering runs without a GPU; it rejects e.g. tensor sizes that are not powers of 2, so this
  catches what interpret mode lets through (not what Triton's compiler rejects). The first buffer is smollm2-135m's
  stacked K at 32K in bfloat16; the second (8 GiB) takes 64-bit offsets."""
  f = jax.jit(functools.partial(hdg.head_decode_partials_gpu, scale=0.125, softcap=30.0))
  sds = jax.ShapeDtypeStruct
  B, K, G, D, W = 1, 3, 3, 64, 16384
  args = (sds((B, K, G, D), dtype), sds((N, D), dtype), sds((N, D), dtype), sds((B, K, W), jnp.int32),
          sds((B, K, W), jnp.bool_), sds((B, K), jnp.int32))
  hlo = lower_for_gpu(f, *args)
  assert "xla.gpu.triton" in hlo and 'name = "head_decode_attention_gpu"' in hlo
