"""What training costs against the frozen forward pass, side by side on one batch.

    python -m train.throughput --model smollm2-135m --seq_len 2048 --batch_size 1

Four programs on the same tokens, each timed after its compilation (best of `--repeats`):
- `forward`: the frozen backbone's layers, no output layer (the pass the teacher is built on);
  `forward_logits` adds the output layer (`cj.forward`);
- `teacher`: one sequence's teacher rows for the cache (`teacher_cache.teacher_rows`: the frozen
  pass, the selection layers' chunk mass at each row, layer 0's output);
- `cached_step`: one AdamW step of the adapters on those rows (what training does once the cache
  holds the sequence);
- `uncached_step`: one step with the teacher inside it (`--teacher_cache false`).
The recipe is the shipped one: head-max rows on the selection layers of the model's preset (or
`--layers`). Prints JSON; `--out` also writes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m train.throughput", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--tokenizer", default="", help="for --model random-tiny: whose vocabulary (e.g. smollm2-135m)")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--max_chunks", type=int, default=256)
  p.add_argument("--layers", type=int, nargs="+", default=None,
                 help="selection layers (QK Adapters); default: the model's preset, else every full-attention layer")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)

  import chunkllm_jax as cj
  from chunkllm_jax import model as model_lib
  from train import backbone
  from train import step as step_lib
  from train import teacher_cache
  from train.config import PRESETS
  from train.losses import LossConfig, rows_config_of

  bb = backbone.load(args.model, args.tokenizer)
  cfg, params = bb.config, bb.params
  preset = PRESETS.get(args.model)
  layers = tuple(args.layers or (preset.selection_layers if preset else ()) or cfg.full_attention_layers)
  B, T = args.batch_size, args.seq_len
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  labels = (rng.rand(B, T) < 0.04).astype(np.int8)  # about one sentence end per 25 tokens
  lengths = np.full((B,), T, np.int32)
  loss_config = LossConfig(teacher="head_max", max_chunks=args.max_chunks)
  rc = rows_config_of(loss_config, layers)

  def hidden(params, tokens_BT):
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = jnp.ones((B, T), bool)
    x, _, _ = model_lib.run_layers(params, model_lib.embed(params, tokens_BT), positions,
                                   model_lib.self_attend_fn(cfg, positions, valid))
    return x

  t_fwd = _time(jax.jit(hidden), params, tokens, repeats=args.repeats)
  t_logits = _time(jax.jit(cj.forward), params, tokens, repeats=args.repeats)
  teacher = teacher_cache._teacher_one  # the very program that fills the cache
  t_teacher = _time(teacher, params, tokens, labels, lengths, rc, repeats=args.repeats)
  rows = jax.device_get(teacher(params, tokens, labels, lengths, rc))

  schedule = step_lib.make_schedule(1e-3, 1, 10, 0.1)
  optimizer = step_lib.make_optimizer(schedule, 0.01, 1.0)
  mesh = cj.make_mesh(data=1, model=1)

  def step_time(batch) -> float:  # a fresh state each time: a step donates the one it is given
    adapters = cj.init_adapters(jax.random.key(0), cfg, cj.AdapterConfig(qk_layers=layers))
    state = step_lib.init_state(adapters, optimizer)
    train, _ = step_lib.compile_steps(mesh, state, params, {k: v.shape for k, v in batch.items()},
                                      optimizer=optimizer, schedule=schedule, loss_config=loss_config)
    holder = [state]

    def one_step(batch):  # the state is donated: thread it through
      holder[0], metrics = train(holder[0], params, batch)
      return metrics

    return _time(one_step, batch, repeats=args.repeats)

  t_cached = step_time(rows)
  t_uncached = step_time(dict(tokens=tokens, labels=labels))
  import os
  import sys
  command = " ".join(["python -m train.throughput", *(sys.argv[1:] if argv is None else argv)])
  out = dict(model=args.model, device=f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}",
             command=command, batch_size=B, seq_len=T,
             selection_layers=list(layers), forward_s=t_fwd, forward_logits_s=t_logits, teacher_s=t_teacher,
             cached_step_s=t_cached, uncached_step_s=t_uncached,
             teacher_over_forward=t_teacher / t_fwd, cached_step_over_forward=t_cached / t_fwd,
             uncached_step_over_forward=t_uncached / t_fwd, forward_tokens_per_s=B * T / t_fwd,
             cached_step_tokens_per_s=B * T / t_cached)
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    Path(args.out).write_text(text + "\n")
  return out


if __name__ == "__main__":
  main()
