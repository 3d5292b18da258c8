"""Peak host memory of `generate` and `chunk_generate` against what they must hold.

  python bench/bench_memory.py --contexts 8192 32768

Each (method, context) runs in a fresh process, so one run's allocations cannot hide in another's:
load smollm2-135m (float32), then generate 8 tokens after a prompt of `context` tokens, vanilla or
ChunkLLM at a 25% KV budget. The floor is what the run cannot do without: the weights, one KV
buffer of the run's size and, for ChunkLLM, its chunk state (the shared rule's working buffer, or the
per-head rule's low-rank keys and sketches, with the chunk table). The report gives the peak RSS, the
RSS after loading (weights + runtime), and both as ratios to the floor; the growth during generation
is the part the decode loops control (a loop that copied the KV buffer into its carry would add a
second buffer here). `--compile-cache warm` measures a run whose programs come from jax's persistent
compilation cache (a later run of a user who sets JAX_COMPILATION_CACHE_DIR), not from the compiler.
Writes bench/RESULTS_memory.md and bench/RESULTS_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402


def child(method: str, context: int, with_torch: bool = False) -> dict:
  """One run in this process: returns the sizes and the peak RSS (bytes)."""
  if not with_torch:
    # torch is a test-only dependency here, and transformers imports it whenever it is installed
    # (about 140 MiB of RSS, loaded for the tokenizer); a user's install has none. A None entry
    # makes it look absent to transformers, as it is there.
    sys.modules.setdefault("torch", None)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  import chunkllm_jax as cj
  from chunkllm_jax import chunk_generation as cg
  from chunkllm_jax import decoding

  def rss() -> int:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

  model = cj.load("smollm2-135m", dtype="float32")
  params = model.params if method == "vanilla" else cj.with_adapters(model.params,
                                                                     cj.load_adapters("smollm2-135m", model.config))
  jax.block_until_ready(params)
  after_load = rss()
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size - 1, context).tolist()
  new = 8
  cfg = model.config
  max_len = decoding.buffer_len(context + new)  # past the trained context on purpose at 32K (a warning)
  kv = 2 * cfg.n_layers * max_len * cfg.n_kv_heads * cfg.head_dim * 4
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  work = 0
  if method == "vanilla":
    out = cj.generate(params, [ids], max_new_tokens=new, eos_ids=(), max_len=max_len)
  else:
    out = cj.chunk_generate(params, [ids], max_new_tokens=new, eos_ids=(), kv_budget=0.25, max_len=max_len)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  if method != "vanilla":  # after the peak is read: a trace here is the benchmark's, not generation's
    # What the chunk state holds beside the KV buffer, from its shapes: the shared rule's working buffer, or
    # the per-head rule's low-rank keys and sketches (the library's default rule), and the chunk table.
    ccfg = cg.resolved(params, cj.ChunkConfig(kv_budget=0.25).validate(max_len, cfg.n_layers))
    tokens = jax.ShapeDtypeStruct((1, context), jnp.int32)
    _, _, state = jax.eval_shape(functools.partial(cg.chunk_prefill, max_len=max_len, ccfg=ccfg), params, tokens,
                                 jax.ShapeDtypeStruct((1,), jnp.int32))
    work = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return dict(method=method, context=context, weights=weights, kv=kv, work=work, floor=weights + kv + work,
              rss_after_load=after_load, peak_rss=peak, prefill_s=float(out.stats["prefill_s"][0]),
              torch_loaded=sys.modules.get("torch") is not None)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
  ap.add_argument("--methods", nargs="+", default=["vanilla", "chunkllm"], choices=["vanilla", "chunkllm"])
  ap.add_argument("--out", default=str(HERE / "RESULTS_memory.md"))
  ap.add_argument("--with-torch", action="store_true",
                  help="let transformers import torch, as it does where torch is installed (the test extras)")
  ap.add_argument("--compile-cache", choices=["cold", "warm"], default="cold",
                  help="warm: each cell first runs once unmeasured to fill a fresh jax persistent compilation cache, "
                       "and the measured run loads its programs from there (a user's later runs with "
                       "JAX_COMPILATION_CACHE_DIR set); cold (default): every program is compiled in the measured run")
  ap.add_argument("--child", nargs=2, metavar=("METHOD", "CONTEXT"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child[0], int(args.child[1]), args.with_torch)))
    return 0
  command = results_md.command_line([__file__] + (sys.argv[1:] if argv is None else list(argv)))
  rows = _earlier_rows(pathlib.Path(args.out).with_suffix(".json"))
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # cold: nothing from a cache
  for context in args.contexts:
    for method in args.methods:
      print(f"{method} at {context} tokens ({args.compile_cache} compile cache) ...", file=sys.stderr, flush=True)
      child_argv = [sys.executable, __file__, "--child", method, str(context)]
      if args.with_torch:
        child_argv.append("--with-torch")
      with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
        if args.compile_cache == "warm":
          env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
          subprocess.run(child_argv, capture_output=True, env=env, check=False)  # fills the cache, unmeasured
        proc = subprocess.run(child_argv, capture_output=True, text=True, env=env, check=False)
      if proc.returncode:  # recorded, and the other runs go on (a kill by the OOM killer is -9)
        why = (proc.stderr.strip().splitlines() or [""])[-1][-300:]
        _put(rows, dict(method=method, context=context, compile_cache=args.compile_cache,
                        failed=f"exit {proc.returncode}: {why}"))
        print(f"  failed: exit {proc.returncode}", file=sys.stderr)
        continue
      r = dict(json.loads(proc.stdout.strip().splitlines()[-1]), compile_cache=args.compile_cache,
               code=results_md.code_version(), command=command)
      _put(rows, r)
      print(f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB = {r['peak_rss'] / r['floor']:.2f}x the floor "
            f"({r['floor'] / 2**30:.2f} GiB)", file=sys.stderr)
      _write(rows, args, command)  # after every run, so a run stopped early keeps what it measured
  print(_write(rows, args, command))
  return 0


def _earlier_rows(path: pathlib.Path) -> list[dict]:
  """The cells an earlier run measured (each with its code and command): a run replaces the cells it
  measures and keeps the others, so one slow cell need not be measured again with the rest."""
  try:
    doc = json.loads(path.read_text())
  except (OSError, ValueError):
    return []
  return [r for r in doc.get("rows", []) if "code" in r] if isinstance(doc, dict) else []


def _cell(r: dict) -> tuple:
  return r["method"], r["context"], r.get("compile_cache", "cold")  # rows from before the setting compiled cold


def _put(rows: list[dict], row: dict) -> None:
  rows[:] = [r for r in rows if _cell(r) != _cell(row)] + [row]
  rows.sort(key=lambda r: (r["context"], r["method"] != "vanilla", r.get("compile_cache", "cold") == "warm"))


def _write(rows: list[dict], args, command: str) -> str:
  """The results page and its .json from the runs so far; returns the markdown."""
  mib = lambda x: f"{x / 2**20:.0f}"
  commands = list(dict.fromkeys([r["command"] for r in rows if "command" in r] + [command]))
  lines = results_md.header(
      "Peak host memory of generation", "`, then `".join(commands),
      "smollm2-135m float32, 8 new tokens, ChunkLLM at kv_budget=0.25 with the shipped adapters; each run in a "
      "fresh process, torch not loaded unless the row says so (a user's install has none; transformers "
      "imports it wherever it is installed). A run replaces the cells it measures and keeps the others: each row names its code. Floor = weights + one KV buffer (+ ChunkLLM's chunk state: the shared rule's working buffer, or the per-head rule's low-rank keys and sketches, and the chunk table). RSS after load holds "
      "the weights and the runtime (Python, jax, XLA); growth = peak - after load, the part generation adds. "
      "Every program is compiled in the measured run, except in rows marked (warm compile cache): those load "
      "them from jax's persistent compilation cache, filled by an unmeasured run just before (`--compile-cache "
      "warm`).") + [
      "| method | context | weights MiB | KV MiB | chunk state MiB | floor MiB | RSS after load MiB | peak RSS MiB | "
      "peak / floor | growth / (KV + chunk state) | code |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    method = r["method"] + (" (warm compile cache)" if r.get("compile_cache") == "warm" else "")
    if "failed" in r:
      lines.append(f"| {method} | {r['context']} | failed: {r['failed']} ||||||||| ")
      continue
    growth = (r["peak_rss"] - r["rss_after_load"]) / max(r["kv"] + r["work"], 1)
    torch = " (torch loaded)" if r.get("torch_loaded", True) else ""  # rows from before the field had it loaded
    lines.append(f"| {method} | {r['context']} | {mib(r['weights'])} | {mib(r['kv'])} | {mib(r['work'])} | "
                 f"{mib(r['floor'])} | {mib(r['rss_after_load'])}{torch} | {mib(r['peak_rss'])} | "
                 f"{r['peak_rss'] / r['floor']:.2f}x | {growth:.2f}x | {r.get('code', '?')} |")
  results_md.write(args.out, lines, dict(device=results_md.machine_line(), command=command,
                                         code=results_md.code_version(), rows=rows))
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
