"""QK and Chunk Adapters: shapes from the config, the math by hand, and the fit check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import adapters as ad
from tests.tiny_models import tiny_config, tiny_params


def mlp_by_hand(p, x):
  h = x @ p["inner"]["kernel"] + p["inner"]["bias"]
  return (h * jax.nn.sigmoid(h)) @ p["outer"]["kernel"] + p["outer"]["bias"]


@pytest.mark.parametrize("arch,acfg,qk_layers,hidden", [
    ("llama", ad.AdapterConfig(), (0, 1), 8),
    ("gemma3", ad.AdapterConfig(), (1,), 8),
    ("llama", ad.AdapterConfig(d_c=16, chunk_hidden=5, qk_layers=(1,)), (1,), 5),
])
def test_init_shapes_follow_the_configs(arch, acfg, qk_layers, hidden):
  cfg = tiny_config(arch)
  a = ad.init_adapters(jax.random.key(0), cfg, acfg)
  assert a.config.qk_layers == qk_layers and a.config.chunk_hidden == hidden
  shapes = jax.tree.map(lambda x: tuple(x.shape), a.params)
  assert shapes == ad.expected_shapes(a.config, cfg)
  assert shapes["qk"]["q"]["inner"]["kernel"] == (len(qk_layers), cfg.d_model, a.config.d_c)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a))
  # Layers get independent initial weights.
  if len(qk_layers) > 1:
    q = a.params["qk"]["q"]["inner"]["kernel"]
    assert not np.allclose(q[0], q[1])


def test_adapters_apply_the_documented_math():
  cfg = tiny_config()
  a = ad.init_adapters(jax.random.key(1), cfg, ad.AdapterConfig(d_c=16))
  h = jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model))
  layer1 = jax.tree.map(lambda w: w[1], a.params["qk"])
  q, k = ad.qk_adapter_apply(layer1, h)
  np.testing.assert_allclose(q, mlp_by_hand(layer1["q"], h), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(k, mlp_by_hand(layer1["k"], h), rtol=1e-5, atol=1e-6)
  logit = ad.chunk_adapter_logits(a.params["chunk"], h.astype(jnp.bfloat16))  # any input dtype; f32 out
  assert logit.shape == (2, 5) and logit.dtype == jnp.float32
  # Stacked layers run under vmap, as inside a layer scan.
  qs, ks = jax.vmap(ad.qk_adapter_apply, in_axes=(0, None))(a.params["qk"], h)
  np.testing.assert_allclose(qs[1], q, rtol=1e-5, atol=1e-6)
  assert ks.shape == (2, 2, 5, 16)


def test_chunk_scores_and_keys():
  rng = np.random.RandomState(0)
  q, k = jnp.asarray(rng.randn(1, 6, 4), jnp.float32), jnp.asarray(rng.randn(1, 6, 4), jnp.float32)
  ends = jnp.asarray([[1, 4, -1]])
  keys = ad.chunk_keys(k, ends)
  np.testing.assert_array_equal(keys[0, :2], k[0, jnp.asarray([1, 4])])
  cand = jnp.arange(3) < jnp.asarray([0, 0, 1, 1, 1, 2])[None, :, None]
  s = ad.chunk_scores(q, keys, cand)
  np.testing.assert_allclose(s[0, 5, :2], q[0, 5] @ keys[0, :2].T / 2.0, rtol=1e-6)
  S = jax.nn.softmax(s, -1)
  assert np.isfinite(S).all()
  np.testing.assert_allclose(S[0, 2:].sum(-1), 1.0, rtol=1e-6)
  assert (S[0, 2:4, 1:] == 0).all() and (S[0, 5, 2] == 0)


def test_with_adapters_attaches_and_checks_the_fit():
  params = tiny_params("llama")
  a = ad.init_adapters(jax.random.key(0), params.config)
  attached = ad.with_adapters(params, a)
  assert attached.adapters is a and attached.backbone is params.backbone
  # The pytree round-trips with the adapter config as static structure.
  leaves, tree = jax.tree.flatten(attached)
  assert jax.tree.unflatten(tree, leaves).adapters.config == a.config
  assert jax.jit(lambda p: p.adapters.config.d_c)(attached) == 64
  # Adapters made for another width do not fit (shapes suffice: eval_shape).
  other = lambda **kw: jax.eval_shape(ad.init_adapters, jax.random.key(0), params.config.replace(**kw))
  wide = other(d_model=48)
  with pytest.raises(ValueError, match=r"d_model=32"):
    ad.with_adapters(params, wide)
  # Nor do adapters for layers the model lacks, or for sliding-window layers.
  deep = other(n_layers=3)
  with pytest.raises(ValueError, match="out of range"):
    ad.with_adapters(params, deep)
  gemma = tiny_params("gemma3")
  with pytest.raises(ValueError, match="sliding"):
    ad.with_adapters(gemma, a)
  with pytest.raises(TypeError):
    ad.with_adapters(params, a.params)
