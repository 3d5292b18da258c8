"""The sharded train and eval steps: AdamW on the adapters only, the frozen backbone an argument.

Placement (one `jax.jit` with explicit shardings): the backbone is sharded over `model` by the
sharding table, the batch over `data`, and the adapters and optimizer state are replicated. The
train state is donated, so its buffers are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from chunkllm_jax.adapters import Adapters
from chunkllm_jax.params import ModelParams
from chunkllm_jax.sharding import batch_sharding, params_sharding, replicated
from train.losses import LossConfig, training_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a checkpoint holds besides the data position: never the backbone."""

  step: jnp.ndarray  # int32 []
  adapters: Adapters
  opt_state: Any


def make_schedule(lr: float, warmup_steps: int, steps: int, end_lr_ratio: float) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(steps, warmup_steps + 1), lr * end_lr_ratio)


def make_optimizer(schedule: optax.Schedule, weight_decay: float, clip_norm: float):
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def init_state(adapters: Adapters, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), adapters=adapters, opt_state=optimizer.init(adapters))


def train_step(state: TrainState, params: ModelParams, batch: dict[str, Any], *, optimizer,
               schedule: optax.Schedule, loss_config: LossConfig):
  """One AdamW update of the adapters. Returns (new state, metrics)."""
  grad_fn = jax.value_and_grad(training_loss, has_aux=True)
  (_, metrics), grads = grad_fn(state.adapters, params, batch, loss_config)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.adapters)
  adapters = optax.apply_updates(state.adapters, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return TrainState(step=state.step + 1, adapters=adapters, opt_state=opt_state), metrics


def eval_step(adapters: Adapters, params: ModelParams, batch: dict[str, Any], *, loss_config: LossConfig):
  return training_loss(adapters, params, batch, loss_config)[1]


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every value of `tree` is finite (a diverged step's adapters are not)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def batch_shardings(mesh: Mesh, batch_shapes: dict[str, tuple[int, ...]]):
  return {k: batch_sharding(mesh, s) for k, s in batch_shapes.items()}


def compile_steps(mesh: Mesh, state: TrainState, params: ModelParams, batch_shapes: dict[str, tuple[int, ...]],
                  *, optimizer, schedule, loss_config: LossConfig) -> tuple[Callable, Callable]:
  """(train_step(state, params, batch), eval_step(adapters, params, batch)), jitted with shardings."""
  rep = replicated(mesh)
  state_sh = jax.tree.map(lambda _: rep, state)
  params_sh = params_sharding(params.replace(adapters=None), mesh)
  batch_sh = batch_shardings(mesh, batch_shapes)
  train = jax.jit(
      lambda s, p, b: train_step(s, p, b, optimizer=optimizer, schedule=schedule, loss_config=loss_config),
      in_shardings=(state_sh, params_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=(0,))
  evaluate = jax.jit(
      lambda a, p, b: eval_step(a, p, b, loss_config=loss_config),
      in_shardings=(state_sh.adapters, params_sh, batch_sh), out_shardings=rep)
  return train, evaluate
