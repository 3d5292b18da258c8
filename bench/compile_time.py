"""What a process spends compiling `generate` and `chunk_generate`, with jax's compilation cache cold and warm.

  python bench/compile_time.py --model smollm2-135m --prompt-tokens 2048

Each measurement is a fresh process (so nothing compiled earlier in it counts): the first with an empty
persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`, a new temporary folder), which it fills, the second
with that cache. A process loads the model and its shipped adapters, then runs `chunk_generate` at a 25% KV
budget and `generate` on one prompt of random token ids, 8 new tokens each; it counts the seconds of the calls
that built a program (`decoding.Compiled.executable`: tracing, lowering and compiling, or loading from the cache).
Writes bench/RESULTS_compile_time.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402

MAX_NEW_TOKENS = 8


def measure(model: str, prompt_tokens: int) -> dict:
  """In this process: the seconds spent building programs for each call (run as the child)."""
  sys.modules.setdefault("torch", None)  # a user's install has none; transformers would import it
  import numpy as np

  import chunkllm_jax as cj
  from chunkllm_jax import decoding

  spent = [0.0]
  built = decoding.Compiled.executable

  def timed(self, *args):
    n = len(self.executables)
    t0 = time.perf_counter()
    exe = built(self, *args)
    if len(self.executables) > n:
      spent[0] += time.perf_counter() - t0
    return exe

  decoding.Compiled.executable = timed
  m = cj.load(model, dtype="float32")
  params = cj.with_adapters(m.params, cj.load_adapters(model, m.config))
  ids = np.random.RandomState(0).randint(0, m.config.vocab_size, prompt_tokens).tolist()
  cj.chunk_generate(params, [ids], max_new_tokens=MAX_NEW_TOKENS, kv_budget=0.25)
  chunk_s = spent[0]
  cj.generate(m.params, [ids], max_new_tokens=MAX_NEW_TOKENS)
  return dict(chunk_generate_s=chunk_s, generate_s=spent[0] - chunk_s)


def run_child(model: str, prompt_tokens: int, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             HF_HUB_OFFLINE="1")
  out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--prompt-tokens", str(prompt_tokens)],
                       env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"the measuring process failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--prompt-tokens", type=int, default=2048)
  ap.add_argument("--out", default=str(HERE / "RESULTS_compile_time.md"))
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.prompt_tokens < 1:
    ap.error(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
  if args.child:
    print(json.dumps(measure(args.model, args.prompt_tokens)))
    return
  with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache_dir:
    cold = run_child(args.model, args.prompt_tokens, cache_dir)
    print(f"cold cache: {cold}", file=sys.stderr)
    warm = run_child(args.model, args.prompt_tokens, cache_dir)
    print(f"warm cache: {warm}", file=sys.stderr)
  lines = results_md.header(
      "Compile time of one process: jax's compilation cache cold and warm",
      notes=f"{args.model}, float32, one prompt of {args.prompt_tokens} tokens, {MAX_NEW_TOKENS} new tokens; "
            "`chunk_generate` at `kv_budget=0.25` (the shipped adapters), then `generate`. Seconds spent building "
            "programs (tracing, lowering and compiling them, or loading them from the cache), each column a fresh "
            "process; the warm one reads the cache the cold one filled (`JAX_COMPILATION_CACHE_DIR`).")
  lines += ["| call | cold cache s | warm cache s | warm / cold |", "|---|---:|---:|---:|"]
  for call in ("chunk_generate", "generate"):
    c, w = cold[f"{call}_s"], warm[f"{call}_s"]
    lines.append(f"| `{call}` | {c:.1f} | {w:.1f} | {w / c:.2f}x |")
  results_md.write(args.out, lines, dict(model=args.model, prompt_tokens=args.prompt_tokens, cold=cold, warm=warm,
                                         device=results_md.machine_line()))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
