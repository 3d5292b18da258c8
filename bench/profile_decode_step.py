"""Where a decode step's time goes: XLA's own per-operation times from a `jax.profiler` trace.

  python bench/profile_decode_step.py --context 16384
  python bench/profile_decode_step.py --context 16384 --chunk                     # the default rule
  python bench/profile_decode_step.py --context 16384 --chunk --budget            # ... under a KV budget
  python bench/profile_decode_step.py --context 16384 --selection shared          # the paper's rule

Times one dense `kv_cache.decode_step` (without `--chunk` or `--selection`) or one ChunkLLM `chunk_decode_step`
on bench_chunk.py's synthetic model, state and cache (smollm2-135m's shape, float32; ChunkLLM reads the top
chunks of a 25% retention (`--ratio`), or with `--budget` a KV budget of it, as users set one),
jitted with the buffers donated as the generate loops do, and prints the operations that took the
most time per step (a fusion's name, its output shape and the ops it fuses most; a loop's, the largest
operations of its body), from the trace's events. A benchmark tells how fast a step is; this tells which
operation to look at. The profiler's events make short operations look costlier than they are: check a
lead with an interleaved benchmark (bench/RESULTS_decode_step.md, fiftieth session).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import math
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_chunk as bc  # noqa: E402  (sets JAX_PLATFORMS=cpu unless set)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chunkllm_jax import chunk_generation as cg  # noqa: E402
from chunkllm_jax import kv_cache  # noqa: E402
import results_md  # noqa: E402


def _fused_ops(hlo: str, name: str) -> str:
  """A fusion's output shape and its most frequent operations, from the compiled HLO text; for a loop, the
  costliest-looking operations of its body (its fusions, dots and gathers with their output shapes), so that
  the loop can be told apart from the others."""
  m = re.search(r"%" + re.escape(name) + r" = (\S+)", hlo)
  if not m:
    return ""
  shape = m.group(1)[:48]
  body_of = re.search(r"%" + re.escape(name) + r" = .*?\bbody=%([\w.-]+)", hlo)
  if body_of:
    return "loop over: " + _loop_body(hlo, body_of.group(1))
  called = re.search(r"%" + re.escape(name) + r" = .*?calls=%([\w.-]+)", hlo)
  if not called:
    return shape
  body = re.search(r"^%" + re.escape(called.group(1)) + r" .*?^}", hlo, re.S | re.M)
  ops = collections.Counter(re.findall(r"= \w+\[[^\]]*\]\S* ([\w-]+)\(", body.group(0) if body else ""))
  for skip in ("parameter", "constant", "bitcast", "broadcast"):
    ops.pop(skip, None)
  return f"{shape}  " + " ".join(f"{k}:{v}" for k, v in ops.most_common(5))


def _loop_body(hlo: str, computation: str, most: int = 4) -> str:
  """A while loop's body as its largest fusions, dots and gathers: `name shape` each, the largest outputs first."""
  body = re.search(r"^%" + re.escape(computation) + r" .*?^}", hlo, re.S | re.M)
  found = re.findall(r"%([\w.-]+) = \w+\[([\d,]*)\]\S* (?:fusion|dot|gather)\(", body.group(0) if body else "")
  size = lambda dims: math.prod(int(d) for d in dims.split(",") if d)
  found.sort(key=lambda f: -size(f[1]))
  return ", ".join(f"{n}[{d}]" for n, d in found[:most]) or computation


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=16384)
  ap.add_argument("--ratio", type=float, default=0.25, help="ChunkLLM's target KV retention")
  ap.add_argument("--steps", type=int, default=3, help="traced steps (after two untraced)")
  ap.add_argument("--top", type=int, default=25, help="operations listed")
  ap.add_argument("--chunk", action="store_true", help="ChunkLLM's step (default: dense), with the flags below")
  # ChunkConfig's fields; a flag not given leaves the library's default.
  ap.add_argument("--selection", default=None, choices=["kv_head", "shared"])
  ap.add_argument("--score_rank", type=int, default=None)
  ap.add_argument("--score_estimate", default=None, choices=["lowrank", "sparq", "exact"])
  ap.add_argument("--score_sketch", type=int, default=None)
  ap.add_argument("--sketch_estimate", default=None, choices=["simhash", "qjl"])
  ap.add_argument("--head_refresh", type=int, default=None)
  ap.add_argument("--budget", action="store_true",
                  help="ChunkLLM reads a KV budget of --ratio (kv_budget), as users set it, not top_k chunks")
  args = ap.parse_args(argv)

  L = args.context
  params = bc.make_params()
  max_len = L + 256
  cache = bc.random_cache(L, max_len, jax.random.key(L))
  tok = jnp.zeros((1,), jnp.int32)
  at = lambda c: c.replace(length=jnp.full((1,), L + 10, jnp.int32))  # mid-chunk: a plain step
  if not (args.chunk or args.selection):
    step = jax.jit(kv_cache.decode_step, donate_argnums=(2,)).lower(params, tok, cache).compile()
    state = None
    run = lambda c, s: (step(params, tok, at(c))[1], None)
  else:
    selection = bc.selection_rule(args)
    read = dict(kv_budget=args.ratio) if args.budget else {}
    ccfg = bc.chunk_config(bc.top_k_for(args.ratio, L, bc.chunk_config(1, max_len)), max_len, **read, **selection)
    state = bc.synthetic_state(params, cache, jax.random.key(7), L, ccfg)
    step = jax.jit(functools.partial(cg.chunk_decode_step, ccfg=ccfg), donate_argnums=(2, 3)).lower(
        params, tok, cache, state).compile()
    run = lambda c, s: step(params, tok, at(c), s)[1:]
  hlo = step.as_text()
  for _ in range(2):
    cache, state = jax.block_until_ready(run(cache, state))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(args.steps):
      cache, state = jax.block_until_ready(run(cache, state))
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    jax.profiler.stop_trace()
    events = json.load(gzip.open(next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))))["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for e in events:  # complete events of the executable's operations (XLA's thunks), not the host's calls
    if e.get("ph") == "X" and re.search(r"%" + re.escape(e["name"]) + r" = ", hlo):
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  print(f"{results_md.machine_line()}\n{'dense' if state is None else ccfg.selection} decode step at "
        f"{L} keys: {step_ms:.1f} ms a step, traced (a loop's time includes its body's operations)")
  print(f"{'ms/step':>8} {'calls':>6}  operation")
  for name, us in total.most_common(args.top):
    print(f"{us / args.steps / 1e3:8.2f} {count[name] / args.steps:6.0f}  {name[:36]:36s} {_fused_ops(hlo, name)}")


if __name__ == "__main__":
  main()
