"""Tiny random models and batches shared by the adapter, teacher and loss tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import chunkllm_jax as cj

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
ARCH_FLAGS = {
    "llama": dict(),
    # Gemma 3 with a sliding layer 0 (QK adapters and the teacher apply to layer 1 only), and an
    # attention softcap (Gemma 2 style) so that the teacher path exercises it.
    "gemma3": dict(qk_norm=True, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                   sandwich_norm=True, sliding_window=6, layer_sliding=(True, False),
                   local_rope_theta=10000.0, tie_embeddings=True, query_pre_attn_scalar=16.0,
                   attn_softcap=50.0),
}


def tiny_config(arch="llama", **kw) -> cj.ModelConfig:
  return cj.ModelConfig(arch=arch, **{**TINY, **ARCH_FLAGS[arch], **kw})


@functools.lru_cache(maxsize=None)  # immutable arrays: safe to share between tests
def tiny_params(arch="llama", seed=0) -> cj.ModelParams:
  return cj.init_backbone(jax.random.key(seed), tiny_config(arch))


def random_batch(B, T, *, p_boundary=0.2, lengths=None, seed=0, vocab=96):
  """tokens [B, T] int32, labels [B, T] int8 (boundaries with probability p_boundary), lengths [B]."""
  rng = np.random.RandomState(seed)
  lengths = np.full((B,), T) if lengths is None else np.asarray(lengths)
  return dict(tokens=jnp.asarray(rng.randint(0, vocab, (B, T)), jnp.int32),
              labels=jnp.asarray(rng.rand(B, T) < p_boundary, jnp.int8),
              lengths=jnp.asarray(lengths, jnp.int32))
