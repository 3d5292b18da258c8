"""ChunkLLM's trainable parts: the per-layer QK Adapters and the one Chunk Adapter.

The backbone never sees these modules. The QK Adapters read a layer's attention input `h` (the
normed hidden state that feeds W_Q/W_K); the Chunk Adapter reads layer 0's output hidden state.

QK Adapter weights are stacked on a leading axis, one entry per QK-adapter layer (by default the
model's full-attention layers), in the order of `AdapterConfig.qk_layers`, so a `lax.scan` or
`vmap` over those layers applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from chunkllm_jax import checks
from chunkllm_jax.attention import NEG_INF
from chunkllm_jax.config import ModelConfig
from chunkllm_jax.params import ModelParams, leaf_shapes, shape_problems


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Adapter sizes. `None` fields are filled from the model config by `resolve`.

  d_c: width of the chunk-scoring space (the QK Adapters' output).
  chunk_hidden: hidden width of the Chunk Adapter's FFN; None -> d_model // 4.
  qk_layers: layers with a QK Adapter; None -> the model's full-attention layers.
  selection_layers: the layers whose scores choose the shared selection at inference, as picked
    for this backbone by `python -m train.pick_layers` and stored with the adapters; None -> every
    QK layer (`ChunkConfig.selection_layers` overrides it).
  score_queries: the QK Adapters score a selection with the q~ of the last this many tokens, the
    max over them, as they were trained (1: the boundary token alone, the paper's rule);
    `ChunkConfig.score_queries` overrides it.
  """

  d_c: int = 64
  chunk_hidden: int | None = None
  qk_layers: tuple[int, ...] | None = None
  selection_layers: tuple[int, ...] | None = None
  score_queries: int = 1

  def check(self) -> "AdapterConfig":
    """Types and ranges, before any weight is made or read: a bad field fails here by name, not in Flax or
    jax. (`check_layers` checks the layers against a model.)"""
    sizes = ("d_c", "score_queries") + (() if self.chunk_hidden is None else ("chunk_hidden",))
    for name in sizes:
      v = getattr(self, name)
      if not checks.is_int(v) or v < 1:
        raise ValueError(f"AdapterConfig.{name} must be an int >= 1, got {v!r}")
    for name in ("qk_layers", "selection_layers"):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (tuple, list)) and all(checks.is_int(i) for i in v)):
        raise ValueError(f"AdapterConfig.{name} must be a tuple of layer indices (or None), got {v!r}")
    return self

  def resolve(self, cfg: ModelConfig) -> "AdapterConfig":
    self.check()
    qk = cfg.full_attention_layers if self.qk_layers is None else tuple(self.qk_layers)
    return dataclasses.replace(self, chunk_hidden=self.chunk_hidden or cfg.d_model // 4, qk_layers=qk)


class MLPAdapter(nn.Module):
  """Dense -> SiLU -> Dense, in float32 whatever the dtype of the input."""

  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, name="inner")(x.astype(jnp.float32))
    return nn.Dense(self.out, name="outer")(jax.nn.silu(x))


class QKAdapter(nn.Module):
  """One layer's Q- and K-adapters: h [B, T, D] -> (q~, k~), each [B, T, d_c]."""

  d_c: int

  @nn.compact
  def __call__(self, h_BTD):
    return MLPAdapter(self.d_c, self.d_c, name="q")(h_BTD), MLPAdapter(self.d_c, self.d_c, name="k")(h_BTD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapters:
  """Adapter weights plus their (static, resolved) config.

  params: {"qk": QKAdapter params stacked over `config.qk_layers`, "chunk": MLPAdapter params}.
  """

  params: dict[str, Any]
  config: AdapterConfig = dataclasses.field(default=None, metadata=dict(static=True))

  def replace(self, **kw) -> "Adapters":
    return dataclasses.replace(self, **kw)


def init_adapters(key: jax.Array, model_config: ModelConfig,
                  adapter_config: AdapterConfig = AdapterConfig()) -> Adapters:
  """Fresh adapter weights for a model (float32, Flax's default initialisers)."""
  if not isinstance(adapter_config, AdapterConfig):
    raise TypeError(f"adapter_config must be an AdapterConfig, got {type(adapter_config).__name__}")
  checks.check_key(key, "init_adapters")
  acfg = adapter_config.resolve(model_config)
  check_layers(acfg, model_config)
  return _init(key, model_config, acfg)


@jax.jit  # both configs are static pytrees; one compiled program instead of many eager ops
def _init(key, model_config: ModelConfig, acfg: AdapterConfig) -> Adapters:
  D = model_config.d_model
  k_qk, k_chunk = jax.random.split(key)
  dummy = jnp.zeros((1, 1, D), jnp.float32)
  qk_keys = jax.random.split(k_qk, len(acfg.qk_layers))
  qk = jax.vmap(lambda k: QKAdapter(acfg.d_c).init(k, dummy)["params"])(qk_keys)
  chunk = MLPAdapter(acfg.chunk_hidden, 1).init(k_chunk, dummy)["params"]
  return Adapters(params={"qk": qk, "chunk": chunk}, config=acfg)


def qk_adapter_apply(p_layer, h_BTD):
  """One layer's (q~ [B, T, d_c], k~ [B, T, d_c]); `p_layer` is one slice of params["qk"]."""
  d_c = p_layer["q"]["outer"]["kernel"].shape[-1]
  q_BTd, k_BTd = QKAdapter(d_c).apply({"params": p_layer}, h_BTD)
  chex.assert_shape([q_BTd, k_BTd], (*h_BTD.shape[:-1], d_c))
  return q_BTd, k_BTd


def chunk_adapter_logits(p_chunk, h0_BTD):
  """Logits of p_t (the probability that token t closes a chunk) from layer 0's output. [B, T]."""
  hidden = p_chunk["inner"]["kernel"].shape[-1]
  logit_BT1 = MLPAdapter(hidden, 1).apply({"params": p_chunk}, h0_BTD)
  return logit_BT1[..., 0]


def chunk_keys(k_BTd, chunk_end_BC):
  """k~ at each chunk's boundary token: [B, C, d_c]. Chunks with no end (-1) read token 0."""
  return jnp.take_along_axis(k_BTd, jnp.maximum(chunk_end_BC, 0)[..., None], axis=1)


def chunk_scores(q_BTd, chunk_key_BCd, candidate_BTC=None):
  """s[t, j] = q~_t . k~_{e_j} / sqrt(d_c), float32 [B, T, C].

  With `candidate_BTC`, non-candidates get a large finite negative, so `softmax` over the last axis
  is the student distribution S (a row with no candidate comes out uniform, not NaN: mask it).
  """
  d_c = q_BTd.shape[-1]
  chex.assert_shape(chunk_key_BCd, (q_BTd.shape[0], None, d_c))
  s_BTC = jnp.einsum("btd,bcd->btc", q_BTd, chunk_key_BCd, preferred_element_type=jnp.float32) * d_c**-0.5
  if candidate_BTC is not None:
    s_BTC = jnp.where(candidate_BTC, s_BTC, NEG_INF)
  return s_BTC


def check_layers(acfg: AdapterConfig, cfg: ModelConfig) -> None:
  """The adapters' QK layers must be full-attention layers of the model (`init_adapters`, `fit_problems`)."""
  for i in acfg.qk_layers:
    if not 0 <= i < cfg.n_layers:
      raise ValueError(f"QK-adapter layer {i} is out of range for a {cfg.n_layers}-layer model")
    if cfg.sliding_layers[i]:
      raise ValueError(f"layer {i} is a sliding-window layer; QK Adapters apply to full-attention "
                       f"layers only ({cfg.full_attention_layers})")
  if list(acfg.qk_layers) != sorted(set(acfg.qk_layers)):
    raise ValueError(f"qk_layers must be strictly increasing, got {acfg.qk_layers}")
  outside = [i for i in acfg.selection_layers or () if i not in acfg.qk_layers]
  if outside:  # the stored choice is among the layers the adapters score (`train.pick_layers`)
    raise ValueError(f"selection_layers {outside} have no QK Adapter (qk_layers {tuple(acfg.qk_layers)})")


def expected_shapes(acfg: AdapterConfig, cfg: ModelConfig) -> dict[str, Any]:
  """Shape of every adapter leaf for this backbone, in the layout of `Adapters.params`."""
  n, D, d_c, F = len(acfg.qk_layers), cfg.d_model, acfg.d_c, acfg.chunk_hidden

  def mlp(d_in, hidden, out, lead=()):
    return {"inner": {"kernel": (*lead, d_in, hidden), "bias": (*lead, hidden)},
            "outer": {"kernel": (*lead, hidden, out), "bias": (*lead, out)}}

  return {"qk": {"q": mlp(D, d_c, d_c, (n,)), "k": mlp(D, d_c, d_c, (n,))}, "chunk": mlp(D, F, 1)}


def fit_problems(adapters: Adapters, cfg: ModelConfig, model: str) -> list[str]:
  """Why these adapters do not fit a model of config `cfg` (empty: they fit): their QK layers must be its
  full-attention layers and every weight must have the shape `cfg` gives it. `model` names the model in the
  messages. The one check of `with_adapters` and, before an export names its backbone, `save_adapters`."""
  if not isinstance(adapters, Adapters):
    raise TypeError(f"expected an Adapters (cj.init_adapters(...), cj.load_adapters(...)), "
                    f"got {type(adapters).__name__}")
  try:
    check_layers(adapters.config.check(), cfg)
  except ValueError as e:
    return [str(e)]
  want = leaf_shapes(expected_shapes(adapters.config, cfg), is_leaf=lambda x: isinstance(x, tuple))
  return shape_problems(want, leaf_shapes(adapters.params), f"{model} (d_model={cfg.d_model}) and the adapter config")


def with_adapters(params: ModelParams, adapters: Adapters) -> ModelParams:
  """`params` with these adapters attached; raises a ValueError if they do not fit the backbone."""
  checks.check_params(params, "with_adapters")
  problems = fit_problems(adapters, params.config, "the backbone")
  if problems:
    raise ValueError("adapters do not fit this backbone:\n  " + "\n  ".join(problems))
  return params.replace(adapters=adapters)
