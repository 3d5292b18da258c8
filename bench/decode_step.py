"""One dense decode step of a real model, per KV buffer length and context: milliseconds a step.

  python bench/decode_step.py --models gemma3-270m smollm2-135m --cases 2048:1000 2048:2000 4096:2000
  python bench/decode_step.py --blocks 2048,256 2048,1024,512,256 --rounds 15   # block sizes side by side

`kv_cache.decode_step` compiled once per buffer length (its buffer donated, as the decode loop
does), run at the given context (`cache.length`), best of `--rounds` rounds of five steps. The buffer
length matters beyond the context: it sets the decode blocks (`attention.decode_blocks`), and a
block as long as the buffer once made XLA copy the buffer twice a layer. With `--blocks`, each
candidate for `attention.DECODE_BLOCKS` is compiled into a program of its own and the candidates'
rounds run interleaved, so that their ratio is not the host's drift between two runs. Writes
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
from decode_block import decode_blocks_set  # noqa: E402


def compiled_step(params, tok, cache, blocks: tuple[int, ...] | None):
  """`decode_step` compiled with its buffer donated, reading `blocks` (None: `attention.DECODE_BLOCKS`).
  A function of its own per call: jax keeps a function's trace, which would hold the first blocks."""
  with decode_blocks_set(blocks):  # read while tracing only
    return jax.jit(lambda p, t, c: decode_step(p, t, c), donate_argnums=2).lower(params, tok, cache).compile()


def step_ms(params, buffer_len: int, context: int, blocks=(None,), rounds: int = 3, steps: int = 5) -> list[float]:
  """Milliseconds a step for each candidate in `blocks`: best of `rounds`, the candidates interleaved."""
  tok = jnp.array([5], jnp.int32)
  fresh = lambda: init_cache(params.config, 1, buffer_len, params.backbone["embed"].dtype).replace(
      length=jnp.array([context], jnp.int32))
  exes = [compiled_step(params, tok, fresh(), b) for b in blocks]
  if len({e.as_text() for e in exes}) < len(exes):
    raise SystemExit(f"--blocks {blocks}: two candidates compile to the same program at buffer {buffer_len}")
  caches = []
  for exe in exes:
    logits, cache = exe(params, tok, fresh())
    logits.block_until_ready()
    caches.append(cache)
  best = [float("inf")] * len(exes)
  for _ in range(rounds):  # the context grows by `steps` a round: negligible next to it
    for i, exe in enumerate(exes):
      t0 = time.perf_counter()
      for _ in range(steps):
        logits, caches[i] = exe(params, tok, caches[i])
      logits.block_until_ready()
      best[i] = min(best[i], (time.perf_counter() - t0) / steps)
  return [b * 1e3 for b in best]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
  ap.add_argument("--cases", nargs="+", default=["2048:1000", "2048:2000", "4096:2000"],
                  help="buffer_len:context pairs")
  ap.add_argument("--blocks", nargs="+", default=None,
                  help="candidates for attention.DECODE_BLOCKS, comma-separated, largest first (2048,256), timed side "
                       "by side (default: the library's alone)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=str(HERE / "RESULTS_decode_step.md"))
  args = ap.parse_args(argv)
  try:
    blocks = [tuple(int(b) for b in c.split(",")) for c in args.blocks] if args.blocks else [None]
  except ValueError:
    blocks = None
  if blocks is None or any(b is not None and (min(b) < 1 or list(b) != sorted(b, reverse=True)) for b in blocks):
    ap.error(f"--blocks takes block sizes, comma-separated and largest first (2048,256); got {' '.join(args.blocks)}")
  if args.rounds < 1:
    ap.error(f"--rounds must be >= 1; got {args.rounds}")
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
  what = (f"`kv_cache.decode_step`, float32, batch 1, buffer donated; best of {args.rounds} rounds of 5 steps"
          + (", the block sizes' programs interleaved." if len(blocks) > 1 else "."))
  lines = results_md.header("One dense decode step, per KV buffer length and context", command, what)
  names = [",".join(map(str, b)) for b in blocks] if len(blocks) > 1 else []
  columns = ([f"ms, blocks {n}" for n in names] + [f"{n} vs {names[0]}" for n in names[1:]]) or ["ms per decode step"]
  lines += ["| model | buffer | context | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
  rows = []
  for name in args.models:
    params = cj.load(name, dtype="float32").params.replace(adapters=None)
    for buffer_len, context in cases:
      ms = step_ms(params, buffer_len, context, blocks, args.rounds)
      rows.append(dict(model=name, buffer_len=buffer_len, context=context, ms=ms[0] if len(ms) == 1 else ms,
                       **({"blocks": names} if names else {})))
      cells = [f"{m:.1f}" for m in ms] + [f"{ms[0] / m:.2f}x" for m in ms[1:]]
      lines.append(f"| {name} | {buffer_len} | {context} | " + " | ".join(cells) + " |")
      print(lines[-1], flush=True)
  results_md.write(args.out, lines, dict(device=results_md.machine_line(), command=command,
                                         code=results_md.code_version(), rows=rows))
  print("\n".join(lines))
  return rows


if __name__ == "__main__":
  main()
