"""The train step: only the adapters move, the loss falls, and sharding does not change the result."""

import jax
import numpy as np
import pytest

import chunkllm_jax as cj
from tests.tiny_models import random_batch, tiny_params
from train import step as step_lib
from train.losses import LossConfig

LOSS = LossConfig(n_sink=2, max_chunk_len=5, max_chunks=16, recall_k=2, block_q=16, block_k=16)


def _setup(lr=1e-2):
  params = tiny_params("llama")
  schedule = step_lib.make_schedule(lr, 1, 10, 0.1)
  optimizer = step_lib.make_optimizer(schedule, 0.01, 1.0)
  adapters = cj.init_adapters(jax.random.key(1), params.config, cj.AdapterConfig(d_c=16))
  return params, schedule, optimizer, step_lib.init_state(adapters, optimizer)


def _compiled(mesh, state, params, batch, schedule, optimizer):
  shapes = {k: v.shape for k, v in batch.items()}
  return step_lib.compile_steps(mesh, state, params, shapes, optimizer=optimizer, schedule=schedule,
                                loss_config=LOSS)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_only_adapters_change_and_the_loss_falls():
  params, schedule, optimizer, state = _setup()
  batch = {k: v for k, v in random_batch(8, 32, seed=4).items() if k != "lengths"}
  backbone_before = _host(params.backbone)
  adapters_before = _host(state.adapters.params)
  train, _ = _compiled(cj.make_mesh(data=1, model=1), state, params, batch, schedule, optimizer)
  losses = []
  for _ in range(6):
    state, metrics = train(state, params, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 6
  after = _host(state.adapters.params)
  assert all((a != b).any() for a, b in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(after)))
  jax.tree.map(np.testing.assert_array_equal, backbone_before, _host(params.backbone))
  assert losses[-1] < 0.8 * losses[0], losses
  # The optimizer state holds adapter-shaped moments only: never a copy of the backbone.
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_adapter = sum(x.size for x in jax.tree.leaves(state.adapters))
  assert n_opt <= 2 * n_adapter + 8


@pytest.mark.multi_device
@pytest.mark.parametrize("data,model", [(4, 2), (8, 1)])
def test_sharded_step_equals_unsharded(data, model):
  params, schedule, optimizer, state = _setup()
  batch = {k: v for k, v in random_batch(8, 32, seed=5).items() if k != "lengths"}
  train1, _ = _compiled(cj.make_mesh(data=1, model=1), state, params, batch, schedule, optimizer)
  want_state, want = train1(state, params, batch)
  want_state, want = _host(want_state), _host(want)

  _, _, _, state = _setup()
  mesh = cj.make_mesh(data=data, model=model)
  train, evaluate = _compiled(mesh, state, params, batch, schedule, optimizer)
  sharded_params = cj.shard_params(params, mesh)
  assert sharded_params.backbone["layers"]["wq"].sharding.spec[2] == "model"
  got_state, got = train(state, sharded_params, batch)
  assert got_state.adapters.params["chunk"]["inner"]["kernel"].sharding.is_fully_replicated
  for k in ("loss", "kl", "bce", "chunk_recall", "grad_norm"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _host(got_state), want_state)
  ev = evaluate(got_state.adapters, sharded_params, batch)
  assert np.isfinite(float(ev["loss"]))
