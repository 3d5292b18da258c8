"""Rotary position embeddings, with the frequency scalings that HF configs use.

The tables are computed once in numpy per config and stacked per layer, so a Gemma 3 model
(local layers: base 10k, global layers: base 1M and maybe scaled) runs under one `lax.scan`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from chunkllm_jax.config import ModelConfig, RopeScaling


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
  return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def inv_freq_and_mscale(base: float, dim: int, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] and the factor cos/sin are multiplied by (YaRN's mscale)."""
  inv = _default_inv_freq(base, dim)
  if scaling is None:
    return inv, 1.0
  if scaling.kind == "linear":
    return inv / scaling.factor, 1.0
  if scaling.kind == "llama3":
    s = scaling
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled), 1.0
  if scaling.kind == "yarn":
    s = scaling

    def correction_dim(n_rot):
      return dim * math.log(s.original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the frequency is kept, 0 where it is interpolated
    inv = inv / s.factor * (1 - extrapolation) + inv * extrapolation
    mscale = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return inv, float(mscale)
  raise ValueError(f"unknown rope scaling {scaling.kind!r}")


def layer_rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer inverse frequencies [L, head_dim/2] and mscale [L]."""
  global_inv, global_m = inv_freq_and_mscale(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)
  if cfg.local_rope_theta is not None:
    local_inv, local_m = inv_freq_and_mscale(cfg.local_rope_theta, cfg.head_dim, None)
  else:
    local_inv, local_m = global_inv, global_m
  sliding = np.asarray(cfg.sliding_layers)[:, None]
  inv = np.where(sliding, local_inv[None], global_inv[None]).astype(np.float32)
  mscale = np.where(sliding[:, 0], local_m, global_m).astype(np.float32)
  return inv, mscale


def apply_rope(x_BTHD: jnp.ndarray, positions_BT: jnp.ndarray, inv_freq_F: jnp.ndarray,
               mscale: jnp.ndarray) -> jnp.ndarray:
  """Rotates the two halves of each head (HF's `rotate_half` convention)."""
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
  cos = (jnp.cos(angles_BTF) * mscale).astype(x_BTHD.dtype)[:, :, None, :]
  sin = (jnp.sin(angles_BTF) * mscale).astype(x_BTHD.dtype)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
