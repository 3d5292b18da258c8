"""The parameter pytree: a frozen backbone and (optionally) trainable adapters, side by side.

Every backbone leaf is first *described* (`backbone_spec`): shape plus logical axes. Weight import
checks against the description, sharding reads its logical axes, and `init_backbone` draws random
weights of the same shapes, so the three can never disagree.

Layer weights are stacked on a leading `layers` axis so the forward pass can `lax.scan` over them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from chunkllm_jax.config import ModelConfig


class LeafSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names, see sharding.py


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelParams:
  """What `forward`, `generate` and `chunk_generate` take.

  backbone: the frozen decoder weights (nested dict, see `backbone_spec`).
  adapters: ChunkLLM's trainable QK and Chunk Adapters, or None for a plain model.
  config: static; carried here so that `forward(params, tokens)` needs nothing else.
  """

  backbone: dict[str, Any]
  adapters: Any = None
  config: ModelConfig = dataclasses.field(default=None, metadata=dict(static=True))

  def replace(self, **kw) -> "ModelParams":
    return dataclasses.replace(self, **kw)


def backbone_spec(cfg: ModelConfig) -> dict[str, Any]:
  """Shapes and logical axes of every backbone leaf, in the layout this library uses."""
  L, D, V, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.d_ff
  H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  layers = {
      "attn_norm": LeafSpec((L, D), ("layers", "embed")),
      "wq": LeafSpec((L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim")),
      "wk": LeafSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "wv": LeafSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "wo": LeafSpec((L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed")),
      "mlp_norm": LeafSpec((L, D), ("layers", "embed")),
      "w_gate": LeafSpec((L, D, F), ("layers", "embed", "ffw")),
      "w_up": LeafSpec((L, D, F), ("layers", "embed", "ffw")),
      "w_down": LeafSpec((L, F, D), ("layers", "ffw", "embed")),
  }
  if cfg.qkv_bias:
    layers["bq"] = LeafSpec((L, H, Dh), ("layers", "q_heads", "head_dim"))
    layers["bk"] = LeafSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"))
    layers["bv"] = LeafSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"))
  if cfg.o_bias:
    layers["bo"] = LeafSpec((L, D), ("layers", "embed"))
  if cfg.qk_norm:
    layers["q_norm"] = LeafSpec((L, Dh), ("layers", "head_dim"))
    layers["k_norm"] = LeafSpec((L, Dh), ("layers", "head_dim"))
  if cfg.sandwich_norm:
    layers["post_attn_norm"] = LeafSpec((L, D), ("layers", "embed"))
    layers["post_mlp_norm"] = LeafSpec((L, D), ("layers", "embed"))
  spec = {
      "embed": LeafSpec((V, D), ("vocab", "embed")),
      "final_norm": LeafSpec((D,), ("embed",)),
      "layers": layers,
  }
  if not cfg.tie_embeddings:
    spec["lm_head"] = LeafSpec((D, V), ("embed", "vocab"))
  return spec


def is_spec(x) -> bool:
  return isinstance(x, LeafSpec)


def init_backbone(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32) -> ModelParams:
  """Random backbone weights of the right shapes: for tests and synthetic benchmarks."""
  from chunkllm_jax import checks  # here: checks imports this module

  checks.check_key(key, "init_backbone")
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"init_backbone takes a ModelConfig, got {type(cfg).__name__}")
  dtype = checks.check_float_dtype(dtype, "init_backbone")
  spec = backbone_spec(cfg)
  leaves, treedef = jax.tree.flatten(spec, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))

  def draw(k, s: LeafSpec):
    if s.axes[-1] in ("embed", "head_dim") and len(s.shape) <= 2:  # norms and biases
      base = 0.0 if cfg.norm_plus_one else 1.0
      return (base + 0.1 * jax.random.normal(k, s.shape)).astype(dtype)
    fan_in = s.shape[1] if s.axes[0] == "layers" else s.shape[0]
    if s.axes[-2:] == ("q_heads", "head_dim") or s.axes[-2:] == ("kv_heads", "head_dim"):
      if len(s.shape) == 3:  # q/k/v biases
        return (0.1 * jax.random.normal(k, s.shape)).astype(dtype)
    if s.axes[:2] == ("layers", "q_heads"):  # wo: fan-in is heads * head_dim
      fan_in = s.shape[1] * s.shape[2]
    return (jax.random.normal(k, s.shape) * fan_in**-0.5).astype(dtype)

  return ModelParams(backbone=jax.tree.unflatten(treedef, [draw(k, s) for k, s in zip(keys, leaves)]),
                     config=cfg)


def shape_problems(want: dict[str, tuple], have: dict[str, tuple], implied_by: str) -> list[str]:
  """One line per leaf that is missing, unexpected, or of the wrong shape (leaves keyed by path)."""
  problems = []
  for name in sorted(want.keys() | have.keys()):
    if name not in have:
      problems.append(f"{name}: missing (expected shape {want[name]})")
    elif name not in want:
      problems.append(f"{name}: unexpected tensor of shape {have[name]}")
    elif have[name] != want[name]:
      problems.append(f"{name}: shape {have[name]}, but {implied_by} implies {want[name]}")
  return problems


def leaf_shapes(tree, is_leaf=None) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {jax.tree_util.keystr(p): tuple(getattr(x, "shape", x)) for p, x in flat}


def check_backbone_shapes(backbone: dict, cfg: ModelConfig, source: str) -> None:
  """Raises a ValueError naming every leaf whose shape disagrees with the config."""
  want = leaf_shapes(backbone_spec(cfg), is_leaf=is_spec)
  problems = shape_problems(want, leaf_shapes(backbone), "the config")
  if problems:
    raise ValueError(f"weights in {source} do not match their config:\n  " + "\n  ".join(problems))
