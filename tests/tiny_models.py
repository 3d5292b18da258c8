"""The tiny random models and inputs every unit test builds on: one config family, one way to
make weights, one way to make prompts and labelled batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import chunkllm_jax as cj
from chunkllm_jax import adapters as adp

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
            max_position=512)
ARCH_FLAGS = {
    "llama": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    # Gemma 3 with a sliding layer 0 (QK Adapters and the teacher apply to layer 1 only).
    "gemma3": dict(qk_norm=True, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                   sandwich_norm=True, sliding_window=6, layer_sliding=(True, False),
                   local_rope_theta=10000.0, tie_embeddings=True, query_pre_attn_scalar=16.0),
}
SOFTCAP = dict(attn_softcap=50.0)  # Gemma 2-style logit soft-capping, for the paths that must honour it


def tiny_config(arch="llama", **kw) -> cj.ModelConfig:
  return cj.ModelConfig(arch=arch, **{**TINY, **ARCH_FLAGS[arch], **kw})


@functools.lru_cache(maxsize=None)  # immutable arrays: safe to share between tests
def tiny_params(arch="llama", seed=0, dtype=jnp.float32, **kw) -> cj.ModelParams:
  return cj.init_backbone(jax.random.key(seed), tiny_config(arch, **kw), dtype=dtype)


def chunk_params(arch="llama", seed=0, **kw) -> cj.ModelParams:
  """A 3-layer tiny model with random adapters (for Gemma 3, layer 1 slides)."""
  if arch == "gemma3":
    kw.setdefault("layer_sliding", (False, True, False))
  p = tiny_params(arch, seed=seed, n_layers=3, **kw)
  # Larger embeddings make the random model's next token depend on its context (not constant).
  p = p.replace(backbone={**p.backbone, "embed": p.backbone["embed"] * 8})
  return adp.with_adapters(p, adp.init_adapters(jax.random.key(seed + 1), p.config, adp.AdapterConfig(d_c=8)))


def prompts(lengths, vocab=96, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n) for n in lengths]


def random_batch(B, T, *, p_boundary=0.2, lengths=None, seed=0, vocab=96):
  """tokens [B, T] int32, labels [B, T] int8 (boundaries with probability p_boundary), lengths [B]."""
  rng = np.random.RandomState(seed)
  lengths = np.full((B,), T) if lengths is None else np.asarray(lengths)
  return dict(tokens=jnp.asarray(rng.randint(0, vocab, (B, T)), jnp.int32),
              labels=jnp.asarray(rng.rand(B, T) < p_boundary, jnp.int8),
              lengths=jnp.asarray(lengths, jnp.int32))
