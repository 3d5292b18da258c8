"""Perplexity of one method under ChunkConfig variants, side by side on the same texts.

An ablation tool: each variant is the method's configuration at the target retention
(`methods.method_config`, as `eval.run` builds it) with some fields replaced, run through the
perplexity program of `eval.perplexity` (the very steps generation runs). It prints, per variant,
the measured KV, the perplexity over every scored token and its change from vanilla's, and the
summed NLL's difference from vanilla per position bin.

  python -m eval.ppl_variants --tokens 1024 --docs 3 --retention 0.5 \\
      --variants "" recent_share=0.0,boundary_tokens=False kv_budget=None,kv_budget_tokens=278

"" is the method's own configuration (today's defaults for `hybrid`); each row records the fields it
ran with (`methods.config_summary`), so rows of earlier defaults stay readable as what they were.

A long run can be split over the texts and its parts combined into the rows of the whole run:

  python -m eval.ppl_variants --tokens 8192 --docs 4 --out part0.jsonl
  python -m eval.ppl_variants --tokens 8192 --docs 4 --first_doc 4 --out part1.jsonl
  python -m eval.ppl_variants --combine part0.jsonl part1.jsonl --out all.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import chunkllm_jax as cj
from eval import methods as M
from eval import perplexity as P
from eval.run import BROWN


def parse_variant(text: str) -> dict:
  """"field=value,field=value" -> {field: value}; values are ints, floats, None, True, False or strings,
  or tuples of them written with semicolons ("selection_layers=7;15")."""
  def value(v: str):
    if v in ("None", "True", "False"):
      return {"None": None, "True": True, "False": False}[v]
    for kind in (int, float):
      try:
        return kind(v)
      except ValueError:
        pass
    return v

  def typed(v: str):  # "a;b;c": a tuple (selection_layers=7;15, dense_layers=0;1)
    return tuple(value(x) for x in v.split(";") if x) if ";" in v else value(v)
  fields = {f.name for f in dataclasses.fields(cj.ChunkConfig)}
  out = {}
  for item in filter(None, text.split(",")):
    name, _, v = item.partition("=")
    if name not in fields:
      raise SystemExit(f"unknown ChunkConfig field {name!r} in variant {text!r}")
    out[name] = typed(v)
  return out


def compare(nll_bins, vanilla_bins, n_scored: int) -> dict:
  """A variant's perplexity (exp of the mean NLL over the scored tokens) and its change from
  vanilla's on the same tokens. The summed NLL's relative change is kept too, under its own name:
  it understates the perplexity's change several times over (a mean NLL of 3.6 nats that grows 2.7%
  is a perplexity 10% higher)."""
  nll, ref = float(np.sum(nll_bins)), float(np.sum(vanilla_bins))
  return dict(nll=nll, scored_tokens=int(n_scored), perplexity=float(np.exp(nll / n_scored)),
              ppl_vs_vanilla=float(np.exp((nll - ref) / n_scored) - 1), nll_vs_vanilla=nll / ref - 1,
              nll_bins_minus_vanilla=(np.asarray(nll_bins) - np.asarray(vanilla_bins)).round(2).tolist())


def combine(parts: list[list[dict]]) -> list[dict]:
  """The rows of one run over the texts of several (each a list of rows, one per variant, on its own texts):
  NLLs, scored tokens and per-bin NLLs summed per variant, KV averaged over the texts. Refuses parts of
  other settings, of the same texts, or with other variants."""
  same = ("model", "method", "retention", "tokens", "prefix", "bin", "text", "variants", "bin_edges")
  first = parts[0]
  if any(rows[0]["variant"] != "vanilla" for rows in parts):
    raise ValueError("each part's first row must be vanilla's")
  for rows in parts[1:]:
    if [r["variant"] for r in rows] != [r["variant"] for r in first]:
      raise ValueError("the parts ran other variants: " + ", ".join(r["variant"] for r in rows))
    for a, b in zip(rows, first):
      bad = [k for k in same if a.get(k) != b.get(k)]
      if bad:
        raise ValueError(f"the parts differ in {', '.join(bad)}")
  spans = sorted((r[0].get("first_doc", 0), r[0].get("first_doc", 0) + r[0]["docs"]) for r in parts)
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"the parts' texts [first, end) must follow each other, without overlap: {spans}")
  out, vanilla_nll = [], None
  for rows in zip(*parts):
    n, docs, nll = (sum(r[k] for r in rows) for k in ("scored_tokens", "docs", "nll"))
    vanilla_nll = nll if vanilla_nll is None else vanilla_nll  # each part's first row is vanilla's
    out.append(dict(rows[0], kv=sum(r["kv"] * r["docs"] for r in rows) / docs, nll=nll, scored_tokens=n,
                    perplexity=float(np.exp(nll / n)), ppl_vs_vanilla=float(np.exp((nll - vanilla_nll) / n) - 1),
                    nll_vs_vanilla=nll / vanilla_nll - 1,
                    nll_bins_minus_vanilla=np.sum([r["nll_bins_minus_vanilla"] for r in rows], 0).round(2).tolist(),
                    seconds=sum(r["seconds"] for r in rows), docs=docs, first_doc=spans[0][0],
                    parts=[r.get("out") for r in rows]))
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--method", default="hybrid", choices=[m for m in M.METHODS if m != "vanilla"])
  p.add_argument("--retention", type=float, default=0.5)
  p.add_argument("--tokens", type=int, default=1024, help="tokens per text")
  p.add_argument("--prefix", type=int, default=256, help="prefilled tokens before scoring starts")
  p.add_argument("--docs", type=int, default=3)
  p.add_argument("--first_doc", type=int, default=0, help="skip this many texts first (a run split over its texts)")
  p.add_argument("--bin", type=int, default=128, help="position bin width")
  p.add_argument("--text", default=str(BROWN), help="a one-sentence-a-line text (blank lines between documents), or 'generated'")
  p.add_argument("--variants", nargs="+", default=[""], help='"field=value,..." per variant; "" is the method as is')
  p.add_argument("--out", default=None, help="write the rows here as JSON lines")
  p.add_argument("--combine", nargs="+", metavar="PART",
                 help="instead of a run: combine the rows of runs over disjoint texts (their --out files) into --out")
  args = p.parse_args(argv)
  if args.first_doc < 0:
    raise SystemExit(f"--first_doc must be >= 0, got {args.first_doc}")
  if args.out and Path(args.out).exists():
    raise SystemExit(f"--out {args.out} exists; name a new file (this tool does not overwrite)")
  if args.combine:
    if not args.out:
      raise SystemExit("--combine needs --out")
    try:
      parts = [[json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()] for f in args.combine]
      rows = combine(parts)
    except (OSError, ValueError, KeyError) as e:
      raise SystemExit(f"cannot combine {' '.join(args.combine)}: {e}")
    Path(args.out).write_text("".join(json.dumps({**r, "out": args.out}) + "\n" for r in rows))
    for r in rows:
      print(f"{r['variant']:50s} KV {r['kv']:6.1%}  perplexity {r['perplexity']:7.3f} {r['ppl_vs_vanilla']:+7.2%}")
    return
  variants = [(v, parse_variant(v)) for v in args.variants]  # bad fields fail before the model loads

  model = cj.load(args.model, dtype="float32")
  params = cj.with_adapters(model.params, cj.load_adapters(args.model, model.config))
  docs = P.text_windows(model.tokenizer, args.first_doc + args.docs, args.tokens,
                        None if args.text == "generated" else args.text)[args.first_doc:]
  settings = M.settings_for(model)
  edges = P.position_bins(args.prefix, args.tokens, max(1, (args.tokens - args.prefix) // args.bin))
  rows, vanilla = [], None
  for label, fields in [("vanilla", None)] + variants:
    method = "vanilla" if fields is None else args.method
    logp, stats = P.token_logprobs(method, params, docs, args.prefix, args.retention, settings, overrides=fields)
    bins = np.sum([P.binned_nll(row, args.prefix, edges)[0] for row in logp], 0)
    vanilla = bins if vanilla is None else vanilla
    kv = float(np.mean([s["kv_retention"] for s in stats]))
    row = dict(variant=label or args.method, kv=kv, **compare(bins, vanilla, logp.size),
               bin_edges=edges.tolist(), seconds=stats[0]["seconds"])
    rows.append(row)
    print(f"{row['variant']:50s} KV {kv:6.1%}  perplexity {row['perplexity']:7.3f} {row['ppl_vs_vanilla']:+7.2%}  "
          f"(summed NLL {row['nll_vs_vanilla']:+6.2%})  NLL - vanilla per bin:",
          " ".join(f"{d:6.1f}" for d in row["nll_bins_minus_vanilla"]), flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps({**r, **vars(args)}) + "\n" for r in rows))


if __name__ == "__main__":
  main()
