"""ChunkLLM vs vanilla on the real smollm2-135m with its shipped adapters, at one long context.

  python bench/bench_real.py --context 8192 --ratios 0.5 0.25

A Brown-corpus document (or generated filler when the file is missing) of `--context` tokens with
a pass key hidden at 50% depth, then the question. Vanilla `generate` and `chunk_generate` (sparse
prefill, the default; top_k set per target retention from the prompt's own segmentation) run the
same prompt, interleaved, `--repeats` times; the table gives medians of prefill seconds and decode
tokens/s (compilation excluded), the measured KV retention, and both answers.
Writes bench/RESULTS_real.md and bench/RESULTS_real.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import haystack  # noqa: E402

cg = importlib.import_module("chunkllm_jax.chunk_generate")
BROWN = HERE.parent.parent / "shared" / "data" / "brown.txt"


def document(tok, n_tokens: int, key: str) -> list[int]:
  fact = f"The pass key is {key}. Remember it. {key} is the pass key."
  if BROWN.exists():
    lines = BROWN.read_text().splitlines()[:20000]
    words, text = 0, []
    for line in lines:  # about 1.3 tokens per word
      text.append(line)
      words += len(line.split())
      if words * 1.35 > n_tokens:
        break
    text.insert(len(text) // 2, fact)
    body = " ".join(text)
  else:
    body = haystack.needle_document(tok, n_tokens, 0.5, fact)
  msgs = [{"role": "user", "content": body + "\n\nWhat is the pass key? Answer with the number only."}]
  ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
  ids = ids["input_ids"] if isinstance(ids, dict) else ids
  return list(ids[-n_tokens:]) if len(ids) > n_tokens else list(ids)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--context", type=int, default=8192)
  ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
  ap.add_argument("--new", type=int, default=32, help="new tokens per run")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default=str(HERE / "RESULTS_real.md"))
  args = ap.parse_args()
  model = cj.load("smollm2-135m", dtype="float32")
  params = cj.with_adapters(model.params, cj.load_adapters("smollm2-135m", model.config))
  tok = model.tokenizer
  key = haystack.passkey(7)
  ids = document(tok, args.context - args.new - 16, key)
  T = len(ids)
  max_len = T + args.new
  kw = dict(max_new_tokens=args.new, eos_ids=(), max_len=max_len)
  print(f"prompt: {T} tokens, pass key {key}", flush=True)

  # The prompt's own mean chunk length sets top_k for each target retention.
  probe = cj.chunk_generate(params, [ids], **dict(kw, max_new_tokens=2))
  mean_chunk = (T - 4) / max(int(probe.stats["n_chunks"][0]), 1)
  configs = {"vanilla": None}
  for r in args.ratios:
    configs[f"chunkllm ~{r:.0%}"] = max(1, round((r * T - 4) / mean_chunk) - 4)
  runs = {name: [] for name in configs}
  for rep in range(args.repeats):
    for name, top_k in (configs.items() if rep % 2 == 0 else reversed(list(configs.items()))):
      out = cj.generate(params, [ids], **kw) if top_k is None else cj.chunk_generate(params, [ids], top_k=top_k, **kw)
      runs[name].append(out)
      print(f"  {name}: prefill {out.stats['prefill_s'][0]:.1f} s, decode {out.stats['decode_tok_s'][0]:.2f} tok/s",
            flush=True)
  rows = []
  for name, top_k in configs.items():
    outs = runs[name]
    answer = tok.decode(outs[-1].new_tokens(0), skip_special_tokens=True).strip()
    rows.append(dict(method=name, top_k=top_k, prefill_s=statistics.median(o.stats["prefill_s"][0] for o in outs),
                     decode_tok_s=statistics.median(o.stats["decode_tok_s"][0] for o in outs),
                     kv_retention=float(outs[-1].stats.get("kv_retention", np.ones(1))[0]),
                     n_chunks=int(outs[-1].stats.get("n_chunks", np.zeros(1))[0]), answer=answer,
                     correct=key in answer))
  base = rows[0]
  lines = ["# ChunkLLM vs vanilla on the real smollm2-135m (issue 4)", "",
           f"Device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}. float32, batch 1, "
           f"shipped adapters (`adapters_data/smollm2-135m`). Prompt: {T} tokens of Brown text with a pass key at "
           f"50% depth, chat template; mean chunk length {mean_chunk:.1f} tokens; {args.new} new tokens; medians of "
           f"{args.repeats} interleaved runs.", "", f"Command: `python bench/bench_real.py {' '.join(sys.argv[1:])}`", "",
           "| method | top_k | KV retention | prefill s | prefill speedup | decode tok/s | decode speedup | answer |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['top_k'] or '-'} | {r['kv_retention']:.1%} | {r['prefill_s']:.1f} | "
                 f"{base['prefill_s'] / r['prefill_s']:.2f}x | {r['decode_tok_s']:.2f} | "
                 f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['answer'][:40]!r} ({'right' if r['correct'] else 'wrong'}) |")
  md = pathlib.Path(args.out)
  md.write_text("\n".join(lines) + "\n")
  md.with_suffix(".json").write_text(json.dumps(dict(prompt_tokens=T, mean_chunk=mean_chunk, rows=rows), indent=1))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
