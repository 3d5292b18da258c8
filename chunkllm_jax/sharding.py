"""Sharding: one table maps logical axes to mesh axes; the only place a NamedSharding is born.

To try another strategy, edit `LOGICAL_TO_MESH`. A dimension that a mesh axis does not divide
(SmolLM2's 9 query heads on 4 devices, say) is replicated along that axis instead of failing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chunkllm_jax import checks
from chunkllm_jax.params import ModelParams, backbone_spec, is_spec

MESH_AXES = ("data", "model")

LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": "data",
    "layers": None,
    "embed": None,
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "ffw": "model",
    "cache_seq": None,
    "seq": None,
    "chunks": None,
    "adapter": None,
}


def make_mesh(data: int | None = None, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `data` x `model` mesh; `data` defaults to all devices left after `model`."""
  given = jax.devices() if devices is None else devices
  devices = list(np.asarray(given, dtype=object).ravel())  # a list, or an array of them
  if not all(isinstance(d, jax.Device) for d in devices):
    raise TypeError(f"devices must be a list of jax devices (jax.devices()), got {given!r:.60}")
  if not devices:
    raise ValueError("devices is empty: give at least one device (jax.devices())")
  # Checked here: 0 made an empty mesh that failed inside jax at the first generate, model=0 divided by
  # zero, a negative size or a float failed in numpy's reshape.
  model = checks.check_count("model", model)
  if data is not None:
    data = checks.check_count("data", data)
  if data is None:
    if len(devices) % model:
      raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"a {data}x{model} mesh needs {data * model} devices; {len(devices)} are available")
  mesh = Mesh(np.asarray(devices[: data * model]).reshape(data, model), MESH_AXES)
  checks.check_mesh(mesh)  # `devices` given twice over is refused here, not at the first placement
  return mesh


def logical_to_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  """NamedSharding for an array with these logical axes; raises if two axes share a mesh axis."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axis = LOGICAL_TO_MESH.get(name) if name else None
    if name and name not in LOGICAL_TO_MESH:
      raise KeyError(f"logical axis {name!r} is not in LOGICAL_TO_MESH")
    if mesh_axis is not None and mesh_axis in used:
      raise ValueError(f"logical axes {tuple(axes)} map two dimensions to mesh axis {mesh_axis!r}")
    if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
      mesh_axis = None  # not divisible: replicate this dimension
    if mesh_axis is not None:
      used.add(mesh_axis)
    spec.append(mesh_axis)
  return NamedSharding(mesh, P(*spec))


def params_sharding(params: ModelParams, mesh: Mesh, adapter_axes: Any = None) -> ModelParams:
  """A ModelParams-shaped pytree of NamedShardings (adapters replicated unless axes are given)."""
  checks.check_mesh(mesh)  # shard_params and the train steps come here without passing generate's door
  spec = backbone_spec(params.config)
  backbone = jax.tree.map(lambda s: logical_to_sharding(mesh, s.axes, s.shape), spec, is_leaf=is_spec)
  adapters = None
  if params.adapters is not None:
    adapters = jax.tree.map(lambda x: NamedSharding(mesh, P()), params.adapters)
  return ModelParams(backbone=backbone, adapters=adapters, config=params.config)


def shard_params(params: ModelParams, mesh: Mesh) -> ModelParams:
  """`params` placed on `mesh` by `LOGICAL_TO_MESH` (adapters replicated)."""
  checks.check_params(params, "shard_params")
  checks.check_mesh(mesh)
  return jax.device_put(params, params_sharding(params, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """For token-like arrays [B, ...]: batch over `data`, the rest replicated."""
  return logical_to_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def n_devices(mesh: Mesh | None) -> int:
  return 1 if mesh is None else math.prod(mesh.shape.values())
