"""One dense decode step of a real model, per KV buffer length and context: milliseconds a step.

  python bench/decode_step.py --models gemma3-270m smollm2-135m --cases 2048:1000 2048:2000 4096:2000

`kv_cache.decode_step` compiled once per buffer length (its buffer donated, as the decode loop
does), run at the given context (`cache.length`), best of three rounds of five steps. The buffer
length matters beyond the context: it sets the decode blocks (`attention.decode_blocks`), and a
block as long as the buffer once made XLA copy the buffer twice a layer. Writes
bench/RESULTS_decode_step.md and .json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax.kv_cache import decode_step, init_cache  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402


def step_ms(params, buffer_len: int, context: int, rounds: int = 3, steps: int = 5) -> float:
  cache = init_cache(params.config, 1, buffer_len, params.backbone["embed"].dtype)
  cache = cache.replace(length=jnp.array([context], jnp.int32))
  tok = jnp.array([5], jnp.int32)
  exe = jax.jit(decode_step, donate_argnums=2).lower(params, tok, cache).compile()
  logits, cache = exe(params, tok, cache)
  logits.block_until_ready()
  best = float("inf")
  for _ in range(rounds):  # the context grows by `steps` a round: negligible next to it
    t0 = time.perf_counter()
    for _ in range(steps):
      logits, cache = exe(params, tok, cache)
    logits.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / steps)
  return best * 1e3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
  ap.add_argument("--cases", nargs="+", default=["2048:1000", "2048:2000", "4096:2000"],
                  help="buffer_len:context pairs")
  ap.add_argument("--out", default=str(HERE / "RESULTS_decode_step.md"))
  args = ap.parse_args(argv)
  try:
    cases = [tuple(map(int, c.split(":"))) for c in args.cases]
  except ValueError:
    cases = None
  if cases is None or any(len(c) != 2 for c in cases):  # one error line, not a traceback
    ap.error(f"--cases takes buffer_len:context pairs of whole numbers, such as 2048:1000; got {' '.join(args.cases)}")
  for buffer_len, context in cases:
    if not 0 < context < buffer_len:
      ap.error(f"context {context} must lie inside the buffer ({buffer_len})")
  command = results_md.command_line([__file__] + (sys.argv[1:] if argv is None else list(argv)))
  lines = results_md.header("One dense decode step, per KV buffer length and context", command,
                            "`kv_cache.decode_step`, float32, batch 1, buffer donated; best of 3 rounds of 5 steps.")
  lines += ["| model | buffer | context | ms per decode step |", "|---|---:|---:|---:|"]
  rows = []
  for name in args.models:
    params = cj.load(name, dtype="float32").params.replace(adapters=None)
    for buffer_len, context in cases:
      ms = step_ms(params, buffer_len, context)
      rows.append(dict(model=name, buffer_len=buffer_len, context=context, ms=ms))
      lines.append(f"| {name} | {buffer_len} | {context} | {ms:.1f} |")
      print(lines[-1], flush=True)
  results_md.write(args.out, lines, dict(device=results_md.machine_line(), command=command,
                                         code=results_md.code_version(), rows=rows))
  print("\n".join(lines))
  return rows


if __name__ == "__main__":
  main()
