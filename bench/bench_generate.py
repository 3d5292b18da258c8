"""Vanilla prefill and decode speed: chunkllm_jax against transformers (torch), same CPU, same dtype.

  python bench/bench_generate.py --lengths 512 2048 8192 --new-tokens 32

Both sides load the same GGUF (dequantised to float32), run greedy decoding on the same prompt,
and are timed after a warm-up (JAX compile excluded). Prints the ratios and writes
bench/RESULTS_generate.md and bench/RESULTS_generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import registry  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402


def filler_tokens(tokenizer, n: int) -> list[int]:
  text = ("The committee met again on Tuesday to review the budget, and the chair asked every member "
          "to read the report before the vote. ") * (n // 20 + 8)
  return tokenizer(text)["input_ids"][:n]


def bench_jax(params, ids, new_tokens, repeats):
  runs = []
  for _ in range(repeats + 1):  # the first run compiles; compile time is not in the stats anyway
    # max_len on purpose: a speed run may go past the trained context (smollm2's 8192 positions).
    out = cj.generate(params, [ids], max_new_tokens=new_tokens, eos_ids=(), max_len=len(ids) + new_tokens)
    runs.append((float(out.stats["prefill_s"][0]), float(out.stats["decode_tok_s"][0])))
  runs = runs[1:]
  return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), out.new_tokens(0)


def bench_torch(model, ids, new_tokens, repeats):
  import torch

  prefill, decode = [], []
  with torch.inference_mode():
    for _ in range(repeats):
      x = torch.tensor([ids])
      t0 = time.perf_counter()
      out = model(x, use_cache=True)
      t1 = time.perf_counter()
      past, tok, toks = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
      t2 = time.perf_counter()
      for _ in range(new_tokens - 1):
        toks.append(int(tok))
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      toks.append(int(tok))
      t3 = time.perf_counter()
      prefill.append(t1 - t0)
      decode.append((new_tokens - 1) / (t3 - t2))
  return statistics.median(prefill), statistics.median(decode), toks


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=str(HERE / "RESULTS_generate.md"))
  args = ap.parse_args(argv)
  # Refused before either model loads: a decode speed needs a step after the first new token (with one, torch's
  # side timed no step and the ratio divided by zero at the end of the run), a median at least one run.
  if min(args.lengths) < 1 or args.new_tokens < 2 or args.repeats < 1:
    ap.error(f"--lengths must be >= 1, --new-tokens >= 2 and --repeats >= 1; got {args.lengths}, {args.new_tokens}, "
             f"{args.repeats}")

  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(os.cpu_count())
  model = cj.load(args.model, dtype="float32")
  gguf = registry.resolve(args.model)
  hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  hf.eval()

  rows = []
  for n in args.lengths:
    ids = filler_tokens(model.tokenizer, n)
    jp, jd, jtoks = bench_jax(model.params, ids, args.new_tokens, args.repeats)
    tp, td, ttoks = bench_torch(hf, ids, args.new_tokens, max(1, args.repeats - 1))
    same = list(map(int, jtoks)) == ttoks
    row = dict(prompt=n, jax_prefill_tok_s=n / jp, torch_prefill_tok_s=n / tp, prefill_ratio=tp / jp,
               jax_decode_tok_s=jd, torch_decode_tok_s=td, decode_ratio=jd / td, same_tokens=same)
    rows.append(row)
    print(json.dumps(row), flush=True)

  device = f"{results_md.machine_line()}, torch {torch.__version__}"
  lines = results_md.header(
      f"Vanilla generation: chunkllm_jax vs transformers ({args.model}, float32)",
      notes=f"Greedy, batch 1, {args.new_tokens} new tokens, medians of {args.repeats} runs (JAX compile "
            "excluded); the same GGUF weights on both sides, torch with sdpa and all cores. Ratio > 1 means "
            f"JAX is faster. torch {torch.__version__}.") + [
      "| prompt | prefill tok/s JAX | prefill tok/s torch | prefill ratio | decode tok/s JAX | decode tok/s torch | decode ratio | same greedy tokens |",
      "|---:|---:|---:|---:|---:|---:|---:|:---:|",
  ]
  for r in rows:
    lines.append(f"| {r['prompt']} | {r['jax_prefill_tok_s']:.0f} | {r['torch_prefill_tok_s']:.0f} | "
                 f"{r['prefill_ratio']:.2f}x | {r['jax_decode_tok_s']:.1f} | {r['torch_decode_tok_s']:.1f} | "
                 f"{r['decode_ratio']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
  results_md.write(args.out, lines, dict(device=device, command=results_md.command_line(),
                                         code=results_md.code_version(), model=args.model, rows=rows))
  print("\n".join(lines))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
