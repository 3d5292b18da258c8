"""The programs users run on a TPU or a GPU lower for one, from this CPU-only install: `chunk_generate`'s
prefill and decode loop under both selection rules, through XLA and through the Pallas kernels (Mosaic on
a TPU, Triton on a GPU); `generate`'s; on a TPU, the training step under each teacher and the teacher's
attention from XLA and from the distillation kernel. This catches what a device's lowering rules refuse
(an op, a dtype, a kernel's Mosaic IR; tests/kernel_fixtures.py) before a user's run does. Tiny random
models of both attention families (llama; gemma3's sliding windows, QK-norm and soft-capping)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import chunk_generation as cg
from chunkllm_jax import decoding
from chunkllm_jax import dense_generation as dg
from chunkllm_jax.decoding import Sampling
from tests.kernel_fixtures import gpu_kernels, lower_for_gpu, lower_for_tpu, planning_for, tpu_kernels
from tests.tiny_models import SOFTCAP, chunk_params, random_batch, tiny_params
from train import step as step_lib
from train import teacher
from train.losses import TEACHERS, LossConfig

T, NEW = 64, 8
sds = jax.ShapeDtypeStruct


def lower(platform: str, fn, *args) -> str:
  return (lower_for_tpu if platform == "tpu" else lower_for_gpu)(fn, *args)


def lower_programs(progs, params, platform: str = "tpu") -> tuple[str, str]:
  """The prefill's and the decode loop's lowerings for `platform`."""
  toks, lens, key = sds((1, T), jnp.int32), sds((1,), jnp.int32), decoding.row_keys(0, 1)
  first, state = jax.eval_shape(progs.prefill.jitted, params, toks, lens, key)
  return (lower(platform, progs.prefill.jitted, params, toks, lens, key),
          lower(platform, progs.loop.jitted, params, first, state, key, jnp.int32(NEW)))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("selection", ["kv_head", "shared"])
@pytest.mark.parametrize("attention", ["xla", "pallas"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_chunk_generate_lowers_for_the_device(monkeypatch, arch, selection, attention, platform):
  params = chunk_params(arch, head_dim=16)  # a head dim the per-head GPU kernel takes
  max_len = decoding.buffer_len(T + NEW)
  ccfg = cj.ChunkConfig(kv_budget=0.5, max_chunk_len=8, selection=selection, attention=attention)
  ccfg = cg.resolved(params, ccfg.validate(max_len, params.config.n_layers))
  progs = decoding.programs(cg._prefill_state, cg._step_state, cg.ChunkSettings(max_len, ccfg),
                            enter_fn=cg._enter_state, sampling=Sampling(0.0, 0, 1.0), max_new=NEW, eos_ids=(),
                            pad_id=0)
  with planning_for(monkeypatch, "tpu" if platform == "tpu" else "gpu"):
    prefill, loop = lower_programs(progs, params, platform)
  # The kernels in the decode loop: on a TPU the shared rule's (compaction and decode; the per-head rule has
  # a GPU kernel only, and its XLA reference runs), on a GPU both rules' decode kernels. The prompt is
  # read densely.
  count = tpu_kernels if platform == "tpu" else gpu_kernels
  kernels = attention == "pallas" and (platform == "cuda" or selection == "shared")
  assert count(prefill) == 0
  assert (count(loop) > 0) == kernels


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_generate_lowers_for_the_device(arch, platform):
  params = tiny_params(arch)
  progs = decoding.programs(dg.dense_prefill, dg.dense_step, dg.DenseSettings(decoding.buffer_len(T + NEW)),
                            sampling=Sampling(0.8, 20, 0.9), max_new=NEW, eos_ids=(1,), pad_id=0)
  lower_programs(progs, params, platform)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_teacher_lowers_for_tpu(monkeypatch, attention):
  params = tiny_params("gemma3", n_layers=3, layer_sliding=(False, True, False), **SOFTCAP)
  batch = random_batch(2, 256, p_boundary=0.1)
  chunk_id = jnp.asarray(np.where(np.arange(256) < 4, -1, np.arange(256) // 16))[None].repeat(2, 0)
  f = functools.partial(teacher.teacher_chunk_attention, max_chunks=32, block_q=128, block_k=128,
                        attention=attention, n_sink=4)
  with planning_for(monkeypatch, "tpu"):
    hlo = lower_for_tpu(f, params, batch["tokens"], chunk_id)
  assert tpu_kernels(hlo) == (2 if attention == "pallas" else 0)  # the kernel's two passes, in the layer scan


@pytest.mark.parametrize("target", TEACHERS)
def test_train_step_lowers_for_tpu(target):
  params = tiny_params("llama")
  schedule = step_lib.make_schedule(1e-2, 1, 10, 0.1)
  optimizer = step_lib.make_optimizer(schedule, 0.01, 1.0)
  state = step_lib.init_state(cj.init_adapters(jax.random.key(1), params.config, cj.AdapterConfig(d_c=16)), optimizer)
  loss = LossConfig(teacher=target, n_sink=2, max_chunk_len=5, max_chunks=16, recall_k=2, score_queries=2,
                    block_q=16, block_k=16)
  f = functools.partial(step_lib.train_step, optimizer=optimizer, schedule=schedule, loss_config=loss)
  lower_for_tpu(f, state, params, random_batch(2, 32))
