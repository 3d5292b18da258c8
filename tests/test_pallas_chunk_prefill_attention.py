"""Chunk-sparse prefill attention: Pallas kernel (interpret mode) against the jnp reference, and its
lowering to Mosaic for a TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import attention
from pallas_kernels import chunk_prefill_attention as cpa
from tests.kernel_fixtures import TPU_HEADS, chunking, lower_for_tpu, tpu_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
MASK_ARGS = ("block_q", "block_k", "n_sink", "n_local")
kernel = jax.jit(cpa.chunk_prefill_attention_kernel,
                 static_argnames=("scale", *MASK_ARGS, "interpret"))
reference = jax.jit(cpa.chunk_prefill_attention_reference, static_argnames=("scale", *MASK_ARGS))
block_lists = jax.jit(cpa.prefill_block_lists, static_argnames=(*MASK_ARGS, "max_chunks"))


def slow_visible(chunk_id, sel_BTN, *, n_sink, n_local):
  """The mask rule, one (t, s) pair at a time."""
  B, T = chunk_id.shape
  out = np.zeros((B, T, T), bool)
  for b in range(B):
    for t in range(T):
      for s in range(t + 1):
        ct, cs = chunk_id[b, t], chunk_id[b, s]
        if ct >= 0 and cs >= 0:
          out[b, t, s] = s < n_sink or cs >= ct - n_local or cs in list(sel_BTN[b, t])
  return out


SHAPES = [  # B, T, K, G, D, block_q, block_k, n_local, n_sel, dtype
    (2, 128, 2, 1, 32, 32, 32, 1, 3, jnp.float32),
    (2, 128, 1, 4, 32, 32, 16, 0, 2, jnp.float32),
    (2, 128, 2, 4, 16, 16, 32, 2, 4, jnp.bfloat16),
    (2, 64, 1, 3, 16, 16, 16, 1, 0, jnp.float32),  # no selections (top_chunks=0): a 0-wide block
]


@pytest.mark.parametrize("case", ["ragged", "empty_blocks", "every_block"])
@pytest.mark.parametrize("B,T,K,G,D,bq,bk,n_local,n_sel,dtype", SHAPES)
def test_kernel_matches_reference(case, B, T, K, G, D, bq, bk, n_local, n_sel, dtype):
  rng = np.random.default_rng(T + bq + bk + n_sel)
  kq, kk, kv = jax.random.split(jax.random.key(n_sel), 3)
  q = jax.random.normal(kq, (B, T, K * G, D), dtype)
  k = jax.random.normal(kk, (B, T, K, D), dtype)
  v = jax.random.normal(kv, (B, T, K, D), dtype)
  lengths = [T] + list(rng.integers(T // 4, T, size=B - 1))
  chunk_id, sel, C = chunking(rng, lengths, T, n_sel=n_sel)
  kw = dict(block_q=bq, block_k=bk, n_sink=4, n_local=n_local)
  ids, n = block_lists(chunk_id, sel, **kw, max_chunks=C)
  if case == "empty_blocks":  # query blocks with nothing listed give zeros
    n = n.at[0, ::2].set(0)
  elif case == "every_block":
    ids = jnp.broadcast_to(jnp.arange(T // bk, dtype=jnp.int32), ids.shape)
    n = jnp.full(n.shape, T // bk, jnp.int32)
  out = kernel(q, k, v, ids, n, chunk_id, sel, scale=D ** -0.5, **kw, interpret=True)
  assert not jnp.isnan(out).any()  # interpret mode starts the output as NaN
  ref = reference(q, k, v, ids, n, chunk_id, sel, scale=D ** -0.5, **kw)
  assert out.shape == ref.shape == q.shape and out.dtype == dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  if case == "empty_blocks":
    assert not jnp.any(out[0, :bq])


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("bad", ["sel_batch", "sel_short", "n_batch"])
def test_refuses_lists_of_the_wrong_shape(bad, kernel):
  """Per-row inputs that would broadcast are refused by both kernels' one check: the TPU kernel read past the
  selections in interpret mode, the GPU kernel gave row 0's block-list length to every row."""
  from pallas_kernels.chunk_prefill_attention_gpu import chunk_prefill_attention_gpu

  call = dict(tpu=cpa.chunk_prefill_attention_kernel, gpu=chunk_prefill_attention_gpu)[kernel]
  B, T, D, bq = 2, 32, 16, 16
  rng = np.random.default_rng(6)
  chunk_id, sel, C = chunking(rng, [T, 20], T, n_sel=2, mean_chunk=8)
  kw = dict(block_q=bq, block_k=bq, n_sink=4, n_local=1)
  ids, n = block_lists(chunk_id, sel, **kw, max_chunks=C)
  sel, n = {"sel_batch": (sel[:1], n), "sel_short": (sel[:, :bq], n), "n_batch": (sel, n[:1])}[bad]
  q = k = v = jnp.ones((B, T, 1, D))
  with pytest.raises(AssertionError, match="shape"):
    call(q, k, v, ids, n, chunk_id, sel, scale=0.25, **kw, interpret=True)


@pytest.mark.parametrize("n_local", [0, 2])
def test_block_lists_lose_nothing(n_local):
  """Attention over the helper's lists equals attention over every block."""
  B, T, D, bq, bk = 2, 128, 16, 32, 16
  rng = np.random.default_rng(n_local)
  chunk_id, sel, C = chunking(rng, [T, 77], T, n_sel=3)
  kw = dict(block_q=bq, block_k=bk, n_sink=4, n_local=n_local)
  ids, n = block_lists(chunk_id, sel, **kw, max_chunks=C)
  q, k, v = (jax.random.normal(key, (B, T, 2, D)) for key in jax.random.split(jax.random.key(0), 3))
  every = jnp.broadcast_to(jnp.arange(T // bk, dtype=jnp.int32), ids.shape)
  sparse = reference(q, k, v, ids, n, chunk_id, sel, scale=0.25, **kw)
  dense = reference(q, k, v, every, jnp.full(n.shape, T // bk), chunk_id, sel, scale=0.25, **kw)
  np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-6)
  assert int(n.sum()) < n.size * (T // bk)  # and it does skip blocks


def test_dense_setting_is_causal_attention():
  """n_local >= max_chunks gives the model's dense causal attention on the tokens."""
  B, T, K, G, D = 2, 64, 1, 3, 16
  rng = np.random.default_rng(5)
  lengths = jnp.array([T, 41])
  chunk_id, sel, C = chunking(rng, list(np.asarray(lengths)), T, n_sel=2)
  kw = dict(block_q=32, block_k=16, n_sink=4, n_local=C)
  ids, n = block_lists(chunk_id, sel, **kw, max_chunks=C)
  q, k, v = (jax.random.normal(key, (B, T, h, D))
             for key, h in zip(jax.random.split(jax.random.key(2), 3), (K * G, K, K)))
  out = kernel(q, k, v, ids, n, chunk_id, sel, scale=0.25, **kw, interpret=True)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  want = attention.causal_attention(q, k, v, pos, pos < lengths[:, None], attention.NO_WINDOW,
                                    scale=0.25)
  valid = np.asarray(pos < lengths[:, None])
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)


def test_mask_rule_against_loops():
  T = 48
  rng = np.random.default_rng(3)
  chunk_id, sel, _ = chunking(rng, [T, 30], T, n_sel=2, mean_chunk=6)
  pos = jnp.arange(T)
  fast = jax.vmap(lambda c, s: cpa.token_visible(pos[:, None], pos[None], c[:, None], c[None], s,
                                                 n_sink=3, n_local=1))(chunk_id, sel)
  want = slow_visible(np.asarray(chunk_id), np.asarray(sel), n_sink=3, n_local=1)
  np.testing.assert_array_equal(fast, want)


def test_dispatcher_runs_reference_on_cpu():
  B, T, D, bq, bk = 1, 64, 16, 32, 16
  rng = np.random.default_rng(4)
  chunk_id, sel, C = chunking(rng, [T], T, n_sel=2, mean_chunk=8)
  kw = dict(scale=0.25, block_q=bq, block_k=bk, n_sink=4, n_local=1)
  ids, n = block_lists(chunk_id, sel, **{a: kw[a] for a in MASK_ARGS}, max_chunks=C)
  q, k, v = (jax.random.normal(key, (B, T, 2, D)) for key in jax.random.split(jax.random.key(1), 3))
  np.testing.assert_array_equal(cpa.chunk_prefill_attention(q, k, v, ids, n, chunk_id, sel, **kw),
                                reference(q, k, v, ids, n, chunk_id, sel, **kw))


@pytest.mark.parametrize("heads", TPU_HEADS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_for_tpu(heads, dtype):
  K, G, D = TPU_HEADS[heads]
  B, T, block, N, n_sel = 1, 1024, 256, 4, 8  # chunk_prefill.PREFILL_BLOCK
  sds = jax.ShapeDtypeStruct
  f = functools.partial(cpa.chunk_prefill_attention_kernel, scale=0.1, block_q=block, block_k=block, n_sink=4,
                        n_local=4)
  hlo = lower_for_tpu(f, sds((B, T, K * G, D), dtype), sds((B, T, K, D), dtype), sds((B, T, K, D), dtype),
                      sds((B, T // block, N), jnp.int32), sds((B, T // block), jnp.int32), sds((B, T), jnp.int32),
                      sds((B, T, n_sel), jnp.int32))
  assert tpu_kernels(hlo) == 1
