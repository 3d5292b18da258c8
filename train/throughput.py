"""Training throughput against the frozen forward pass alone, on the same batch.

    python -m train.throughput --model smollm2-135m --seq_len 2048 --batch_size 1

The ratio (train step time / `cj.forward` time) is what the adapters, the blockwise teacher and the
backward pass through the adapters add to one plain forward of the backbone.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
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
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--max_chunks", type=int, default=256)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)

  import chunkllm_jax as cj
  from train import step as step_lib
  from train.losses import LossConfig

  model = cj.load(args.model, dtype="float32", tokenizer=False)
  B, T = args.batch_size, args.seq_len
  rng = np.random.RandomState(0)
  batch = dict(tokens=rng.randint(0, model.config.vocab_size, (B, T)).astype(np.int32),
               labels=(rng.rand(B, T) < 0.04).astype(np.int8))  # ~ one sentence end per 25 tokens
  schedule = step_lib.make_schedule(1e-3, 1, 10, 0.1)
  optimizer = step_lib.make_optimizer(schedule, 0.01, 1.0)
  mesh = cj.make_mesh()
  state = step_lib.init_state(cj.init_adapters(jax.random.key(0), model.config), optimizer)
  train, _ = step_lib.compile_steps(mesh, state, model.params, {k: v.shape for k, v in batch.items()},
                                    optimizer=optimizer, schedule=schedule,
                                    loss_config=LossConfig(max_chunks=args.max_chunks))
  holder = [state]

  def one_step(params, b):  # the state is donated: thread it through
    holder[0], m = train(holder[0], params, b)
    return m

  t_train = _time(one_step, model.params, batch, repeats=args.repeats)
  t_fwd = _time(jax.jit(cj.forward), model.params, batch["tokens"], repeats=args.repeats)
  out = dict(model=args.model, batch_size=B, seq_len=T, device=str(jax.devices()[0].platform),
             train_step_s=t_train, forward_s=t_fwd, train_tokens_per_s=B * T / t_train,
             forward_tokens_per_s=B * T / t_fwd, ratio=t_train / t_fwd)
  print(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()
