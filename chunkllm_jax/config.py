"""Model configuration: one frozen dataclass for every supported decoder architecture.

A `ModelConfig` is hashable and registered as static, so it can ride inside the parameter
pytree (see `params.py`) and be used as a compile-time constant under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


class ConfigError(ValueError):
  """A config that this library cannot run (unknown architecture, missing field, ...)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as in the `rope_scaling` field of HF configs.

  kind: "linear", "llama3" or "yarn".
  """

  kind: str
  factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of a decoder-only transformer.

  Fields are the union of what Llama, Mistral, Qwen2, Qwen3 and Gemma 3 need; the flags
  (`qkv_bias`, `qk_norm`, `norm_plus_one`, ...) switch the per-architecture details.
  """

  arch: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position: int = 8192
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  activation: str = "silu"  # "silu" or "gelu_tanh"
  norm_plus_one: bool = False  # Gemma: RMSNorm scale is (1 + w)
  embed_scale: bool = False  # Gemma: embeddings are multiplied by sqrt(d_model)
  sandwich_norm: bool = False  # Gemma: extra norms after attention and after the MLP
  query_pre_attn_scalar: float | None = None  # Gemma: scale is this ** -0.5, not head_dim ** -0.5
  sliding_window: int | None = None
  # Per layer: True where the layer uses the sliding window (Gemma 3 local layers, Mistral).
  layer_sliding: tuple[bool, ...] = ()
  local_rope_theta: float | None = None  # RoPE base of sliding layers, when it differs
  attn_softcap: float | None = None
  final_softcap: float | None = None
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise ConfigError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_position"):
      v = getattr(self, name)  # checked first: a zero would divide below, a float would reach array shapes
      if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.layer_sliding and len(self.layer_sliding) != self.n_layers:
      raise ConfigError(f"layer_sliding has {len(self.layer_sliding)} entries for {self.n_layers} layers")
    if any(self.layer_sliding) and not self.sliding_window:
      raise ConfigError("layer_sliding marks sliding layers but sliding_window is not set")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ConfigError(f"unknown activation {self.activation!r}")

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  @property
  def attn_scale(self) -> float:
    base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return float(base) ** -0.5

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    return self.layer_sliding or (False,) * self.n_layers

  @property
  def full_attention_layers(self) -> tuple[int, ...]:
    """Layers that attend over the whole context: the ones ChunkLLM can make sparse."""
    return tuple(i for i, s in enumerate(self.sliding_layers) if not s)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# From a Hugging Face config.json


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention factor for a context `factor` times the trained one (transformers' get_mscale)."""
  return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _rope_scaling_from_hf(rs: Mapping[str, Any] | None, max_position: int) -> RopeScaling | None:
  """`max_position` stands in for an absent `original_max_position_embeddings`, as in transformers."""
  if not rs:
    return None
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return RopeScaling("linear", factor=float(rs["factor"]))
  original = int(rs.get("original_max_position_embeddings") or max_position)
  if kind == "llama3":
    return RopeScaling(
        "llama3",
        factor=float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=original,
    )
  if kind == "yarn":
    if rs.get("truncate", True) is False:  # unrounded correction range (gpt-oss): not implemented
      raise ConfigError("rope_scaling of type 'yarn' with truncate=false is not supported")
    factor = float(rs["factor"])
    attention_factor = rs.get("attention_factor")
    if attention_factor is None and rs.get("mscale") and rs.get("mscale_all_dim"):
      # DeepSeek-style: cos/sin scaled by the ratio of two mscales, as transformers computes it.
      attention_factor = yarn_mscale(factor, float(rs["mscale"])) / yarn_mscale(factor, float(rs["mscale_all_dim"]))
    return RopeScaling(
        "yarn",
        factor=factor,
        original_max_position=original,
        beta_fast=float(rs.get("beta_fast") or 32.0),  # null reads as the default, as in transformers
        beta_slow=float(rs.get("beta_slow") or 1.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
    )
  raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3, yarn)")


_HF_ARCH = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


# HF's `hidden_act` names -> ModelConfig.activation (gelu_new and gelu_pytorch_tanh are both the tanh form).
_HF_ACTIVATION = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


# What transformers' config classes take for a field that config.json leaves out, where that is not
# this reader's own fallback (head_dim = d_model / heads, rope_theta 1e4, no sliding window, ...).
# A field present as null keeps its null.
_HF_CLASS_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(max_position_embeddings=131072, sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(max_position_embeddings=32768),
    "qwen3": dict(max_position_embeddings=32768, head_dim=128),
    "gemma3": dict(max_position_embeddings=131072, head_dim=256, query_pre_attn_scalar=256, rope_theta=1e6,
                   num_key_value_heads=4),
}


def _eos_tuple(eos) -> tuple[int, ...]:
  if eos is None:
    return ()
  if isinstance(eos, int):
    return (eos,)
  return tuple(int(e) for e in eos)


def _lift_rope_parameters(hf: dict) -> dict:
  """Lifts transformers 5's `rope_parameters` into the older `rope_theta`/`rope_scaling` fields, with
  transformers' precedence, so configs written by either generation of transformers (or holding both
  forms) read the same: a `rope_scaling` replaces `rope_parameters` (for Gemma 3, it updates the
  full-attention entry), and a RoPE dict's own `rope_theta` wins over the top-level field."""
  hf = dict(hf)
  if isinstance(hf.get("text_config"), dict):
    hf["text_config"] = _lift_rope_parameters(hf["text_config"])
  rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
  if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):  # Gemma 3: one per layer type
    local = (rp.get("sliding_attention") or {}).get("rope_theta")
    if local is not None:
      hf["rope_local_base_freq"] = local
    rp = {**(rp.get("full_attention") or {}), **(rs or {})}
  elif rs:
    rp = rs
  if not isinstance(rp, dict):
    return hf
  if rp.get("rope_theta") is not None:
    hf["rope_theta"] = rp["rope_theta"]
  scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
  hf["rope_scaling"] = scaling if scaling.get("rope_type", scaling.get("type", "default")) != "default" else None
  return hf


def _size(hf: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
  """An int field of config.json (absent or null: `default`); 2.5, "64", true and 0 are refused by name."""
  v = hf.get(key)
  if v is None:
    if default is None:
      raise KeyError(key)
    return default
  if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < minimum:
    raise ConfigError(f"config.json field {key!r} must be an int >= {minimum}, got {v!r}")
  return int(v)


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
  """Builds a `ModelConfig` from the dict of an HF `config.json`."""
  hf = _lift_rope_parameters(dict(hf))
  model_type = hf.get("model_type")
  if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text tower
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
    model_type = "gemma3_text"
  arch = _HF_ARCH.get(model_type)
  if arch is None:
    raise ConfigError(
        f"unknown architecture model_type={model_type!r} (architectures={hf.get('architectures')}); "
        f"supported model types: {', '.join(sorted(_HF_ARCH))}")
  hf = {**_HF_CLASS_DEFAULTS[arch], **hf}
  try:
    n_heads = _size(hf, "num_attention_heads")
    d_model = _size(hf, "hidden_size")
    n_layers = _size(hf, "num_hidden_layers")
    max_position = _size(hf, "max_position_embeddings", 8192)
    rope_scaling = hf.get("rope_scaling")
    nested = isinstance(hf.get("rope_parameters"), dict) and "full_attention" in hf["rope_parameters"]
    if rope_scaling and hf.get("original_max_position_embeddings") and not nested:
      # A top-level original_max_position_embeddings (Phi-3 style) wins over the scaling's own, as in
      # transformers (for a RoPE dict per layer type, it is not read).
      rope_scaling = {**rope_scaling, "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    common = dict(
        arch=arch,
        vocab_size=_size(hf, "vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_size(hf, "num_key_value_heads", n_heads),
        head_dim=_size(hf, "head_dim", d_model // n_heads),
        d_ff=_size(hf, "intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling_from_hf(rope_scaling, max_position),
        max_position=max_position,
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma3")),
        bos_id=hf.get("bos_token_id"),
        eos_ids=_eos_tuple(hf.get("eos_token_id")),
        pad_id=_size(hf, "pad_token_id", 0, minimum=0),
    )
  except KeyError as e:
    raise ConfigError(f"config.json of model_type={model_type!r} lacks the field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:  # float("x"), int(None): name the field, not just the value
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.json of model_type={model_type!r} has a field of the wrong type: {e}") from None

  # The MLP's activation, read from the field transformers reads for the architecture (Gemma 3's is
  # `hidden_activation`): a checkpoint trained with another one would otherwise run silently with the usual one.
  act_field, act_default = ("hidden_activation", "gelu_pytorch_tanh") if arch == "gemma3" else ("hidden_act", "silu")
  common["activation"] = _HF_ACTIVATION.get(str(hf.get(act_field) or act_default))
  if common["activation"] is None:
    raise ConfigError(f"config.json of model_type={model_type!r} has {act_field}={hf.get(act_field)!r}; "
                      f"supported: {', '.join(sorted(_HF_ACTIVATION))}")
  if arch == "llama" and hf.get("mlp_bias"):
    raise ConfigError("Llama with mlp_bias=true (biases on the MLP's projections) is not supported")
  if arch in ("llama", "mistral"):
    # transformers' Mistral has no attention biases whatever its config says; Llama's follow attention_bias.
    bias = arch == "llama" and bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if arch == "mistral" else None
    return ModelConfig(
        **common, qkv_bias=bias, o_bias=bias, sliding_window=window,
        layer_sliding=(True,) * n_layers if window else ())
  if arch == "qwen2":
    if hf.get("use_sliding_window"):
      raise ConfigError("Qwen2 with use_sliding_window=true is not supported")
    return ModelConfig(**common, qkv_bias=True)
  if arch == "qwen3":
    if hf.get("use_sliding_window"):
      raise ConfigError("Qwen3 with use_sliding_window=true is not supported")
    bias = bool(hf.get("attention_bias", False))  # Qwen3's attention_bias is on o_proj too, as Llama's
    return ModelConfig(**common, qkv_bias=bias, o_bias=bias, qk_norm=True)
  # gemma3
  local_rope = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
  if local_rope.get("rope_type", local_rope.get("type", "default")) != "default":
    # Sliding layers get an unscaled RoPE at local_rope_theta here: their scaling would be lost.
    raise ConfigError(f"Gemma 3 with a scaled RoPE on its sliding layers (rope_parameters.sliding_attention."
                      f"rope_type={local_rope.get('rope_type', local_rope.get('type'))!r}) is not supported")
  if hf.get("attn_logit_softcapping") is not None:
    # transformers' Gemma 3 never applies it, Google's reference does: which one a checkpoint meant is unknown.
    raise ConfigError(f"Gemma 3 with attn_logit_softcapping={hf['attn_logit_softcapping']!r} is not supported "
                      "(transformers ignores that field for Gemma 3; it is null in Google's checkpoints)")
  if hf.get("use_bidirectional_attention"):  # EmbeddingGemma: no causal mask, an encoder
    raise ConfigError("Gemma 3 with use_bidirectional_attention=true (an embedding model) is not supported")
  layer_types = hf.get("layer_types")
  if layer_types:
    sliding = tuple(t == "sliding_attention" for t in layer_types)
  else:
    pattern = int(hf.get("sliding_window_pattern", 6))
    sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
  bias = bool(hf.get("attention_bias", False))  # on q, k, v and o, as Llama's
  return ModelConfig(
      **common,
      qkv_bias=bias,
      o_bias=bias,
      qk_norm=True,
      norm_plus_one=True,
      embed_scale=True,
      sandwich_norm=True,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or common["head_dim"]),
      sliding_window=int(hf.get("sliding_window") or 4096),
      layer_sliding=sliding,
      local_rope_theta=float(hf.get("rope_local_base_freq", 10000.0)),
      final_softcap=hf.get("final_logit_softcapping"),
  )
