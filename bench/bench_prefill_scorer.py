"""What scoring the prompt by attention costs: prefill and decode speed on the README demo's prompt.

  python bench/bench_prefill_scorer.py --context 4096 --repeats 3

Vanilla `generate`, `chunk_generate` with the default prompt scorer (the prompt scored by the frozen
attention of the selection layers, then dense prefill) and the shared rule's decode (`selection="shared"`:
one selection at each boundary, by the QK Adapters), the same with the chunk-sparse prefill, and the
adapters-only rule (`prefill_scorer="adapter"`, sparse prefill), at a 25% KV budget, timed in turn in
one process (JAX compile excluded; medians). Writes bench/RESULTS_prefill_scorer.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import haystack  # noqa: E402
from chunkllm_jax.prompts import encode_prompt  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--context", type=int, default=4096)
  ap.add_argument("--budget", type=float, default=0.25)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=str(HERE / "RESULTS_prefill_scorer.md"))
  args = ap.parse_args()

  model = cj.load(args.model)
  params = cj.with_adapters(model.params, cj.load_adapters(args.model, model.config))  # the shipped adapters
  text, _ = haystack.passkey_prompt(model.tokenizer, args.context, 0.5)  # the README demo's prompt
  ids = encode_prompt(model.tokenizer, text)
  # max_len on purpose: a speed run may go past the trained context (smollm2's 8192 positions)
  max_len = len(ids) + 12
  # The shared rule, named: its selections are what the prompt's scorer makes (the per-head rule, the library's
  # default since e012c1c, chooses at each decode step from the cache and runs no QK Adapter there).
  chunk = dict(max_new_tokens=12, selection="shared", scorer="adapter", kv_budget=args.budget, max_len=max_len)
  runs = {
      "vanilla": lambda: cj.generate(params, [ids], max_new_tokens=12, max_len=max_len),
      "default (prompt by attention, dense prefill)": lambda: cj.chunk_generate(params, [ids], **chunk),
      "prompt by attention, sparse prefill (the default before)": lambda: cj.chunk_generate(
          params, [ids], prefill="sparse", **chunk),
      "adapters only (sparse prefill)": lambda: cj.chunk_generate(params, [ids], prefill_scorer="adapter", **chunk),
  }
  times = {name: [] for name in runs}
  for rep in range(args.repeats + 1):  # the first round compiles
    for name, run in runs.items():
      st = run().stats
      if rep:
        times[name].append((float(st["prefill_s"][0]), float(st["decode_tok_s"][0])))
        print(f"{name}: prefill {times[name][-1][0]:.2f}s, decode {times[name][-1][1]:.1f} tok/s", flush=True)
  med = {n: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for n, v in times.items()}
  p0, d0 = med["vanilla"]
  lines = results_md.header(
      f"The prompt's scorer: prefill and decode speed ({args.model}, {len(ids)}-token prompt, "
      f"{args.budget:.0%} budget)",
      notes=f"The README demo's passkey prompt. Medians of {args.repeats} rounds, the methods in turn in one process "
            "(compile excluded); ratio > 1 means faster than vanilla.") + [
      "| method | prefill s | prefill vs vanilla | decode tok/s | decode vs vanilla |", "|---|---:|---:|---:|---:|"]
  rows = []
  for n, (p, d) in med.items():
    lines.append(f"| {n} | {p:.2f} | {p0 / p:.2f}x | {d:.1f} | {d / d0:.2f}x |")
    rows.append(dict(method=n, prefill_s=p, prefill_vs_vanilla=p0 / p, decode_tok_s=d, decode_vs_vanilla=d / d0))
  results_md.write(args.out, lines, dict(device=results_md.machine_line(), command=results_md.command_line(),
                                         code=results_md.code_version(), model=args.model, prompt_tokens=len(ids),
                                         budget=args.budget, rows=rows))
  print("\n".join(lines))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
