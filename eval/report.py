"""From the results file to summary.json, results.md and the plots.

Every score is shown beside the KV retention its run measured (the mean over examples of
chunk_generate's `kv_retention`), and each method's score as a percent of vanilla's on the same
examples, the paper's form ("98.64% of vanilla at 48.58% KV"). Speed (prefill seconds and decode
tokens/s, compilation excluded) sits beside the quality. Perplexity is lower-is-better, so it is
shown with its change against vanilla instead.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from eval import niah
from eval import perplexity as ppl

FULL = "full"
METHOD_ORDER = ("vanilla", "oracle", "chunkllm", "hybrid", "streamingllm", "sepllm", "fixllm")


def _mean(xs) -> float | None:
  xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
  return sum(xs) / len(xs) if xs else None


def _order(key):
  """Tasks: NIAH, then LongBench-format, perplexity, short text; methods as METHOD_ORDER; budgets large to small."""
  task, method, label = key
  kind = 0 if task.startswith("niah_") else {"perplexity": 2, "short_text": 3}.get(task, 1)
  m = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
  r = -1.0 if label == FULL else (-0.5 if label == "default" else -float(label))
  return kind, task, m, r


def _is_long(task: str) -> bool:
  return task not in ("perplexity", "short_text")


def _off_budget_chunks(rs: Sequence[dict], label: str) -> float | None:
  """The worst row's distance from its KV target, in its method's mean chunks: |measured - target|
  x the tokens seen (the prompt and half the answer) / the mean chunk length. None where there is
  no fractional target, or the rows do not say their prompt length and chunk length."""
  try:
    target = float(label)
  except ValueError:
    return None
  worst = None
  for r in rs:
    if not (0.0 < target < 1.0) or r.get("kv_retention") is None or not r.get("prompt_tokens") \
        or not r.get("mean_chunk_len"):
      return None
    seen = r["prompt_tokens"] + len(r.get("new_tokens") or ()) / 2
    off = abs(r["kv_retention"] - target) * seen / r["mean_chunk_len"]
    worst = off if worst is None else max(worst, off)
  return worst


def summarize(records: Sequence[dict]) -> dict:
  """Per task, one row per (method, retention): score, measured retention, speed, and against vanilla."""
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in records:
    groups[(r["task"], r["method"], str(r["retention"]))].append(r)
  tasks: dict[str, list[dict]] = defaultdict(list)
  for key in sorted(groups, key=_order):
    task, method, label = key
    rs = groups[key]
    row = dict(method=method, retention=label, n=len(rs), kv_retention=_mean(r.get("kv_retention") for r in rs),
               expected_retention=_mean(r.get("expected_retention") for r in rs),
               prefill_s=_mean(r.get("prefill_s") for r in rs), decode_tok_s=_mean(r.get("decode_tok_s") for r in rs),
               chunk_overflow=any(bool(r.get("chunk_overflow")) for r in rs),
               kv_min=min((r["kv_retention"] for r in rs if r.get("kv_retention") is not None), default=None),
               kv_max=max((r["kv_retention"] for r in rs if r.get("kv_retention") is not None), default=None),
               off_budget_chunks=_off_budget_chunks(rs, label))
    if task == "perplexity":
      nll, n = sum(r["nll"] for r in rs), sum(r["n_scored"] for r in rs)
      row.update(score=math.exp(nll / max(n, 1)), nll=nll / max(n, 1), tok_s=_mean(r.get("tok_s") for r in rs))
      sums = np.sum([r["nll_bins"] for r in rs], axis=0)
      counts = np.sum([r["token_bins"] for r in rs], axis=0)
      row.update(bin_edges=rs[0]["bin_edges"], bin_nll=(sums / np.maximum(counts, 1)).tolist())
    else:
      row["score"] = 100.0 * _mean(r["score"] for r in rs)
      if "recall" in rs[0]:
        row["recall"] = 100.0 * _mean(r["recall"] for r in rs)
    tasks[task].append(row)

  # Against vanilla, on the examples both have.
  by_example = {(r["task"], r["method"], str(r["retention"]), str(r["example"])): r for r in records}
  for task, rows in tasks.items():
    for row in rows:
      if row["method"] == "vanilla":
        continue
      pairs = [(by_example[(task, "vanilla", FULL, str(r["example"]))], r)
               for r in groups[(task, row["method"], row["retention"])]
               if (task, "vanilla", FULL, str(r["example"])) in by_example]
      if not pairs:
        continue
      if task == "perplexity":
        v = math.exp(sum(a["nll"] for a, _ in pairs) / max(sum(a["n_scored"] for a, _ in pairs), 1))
        row["ppl_change_pct"] = 100.0 * (row["score"] / v - 1.0)
      else:
        v = _mean(a["score"] for a, _ in pairs)
        m = _mean(b["score"] for _, b in pairs)
        row["pct_of_vanilla"] = 100.0 * m / v if v else None
        row["identical_to_vanilla"] = _mean(float(a.get("new_tokens") == b.get("new_tokens")) for a, b in pairs)
  return dict(tasks=dict(tasks), long_context=long_context_average(tasks))


def long_context_average(tasks: dict[str, list[dict]]) -> list[dict]:
  """The mean over the long-context tasks (NIAH kinds and LongBench tasks) of each (method, retention),
  over the tasks that vanilla and it both ran; with its percent of vanilla's mean on those tasks."""
  rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
  for task, task_rows in tasks.items():
    if _is_long(task):
      for row in task_rows:
        rows[(row["method"], row["retention"])][task] = row
  vanilla = rows.get(("vanilla", FULL), {})
  out = []
  for (method, label), by_task in sorted(rows.items(), key=lambda kv: _order(("", *kv[0]))):
    common = [t for t in by_task if t in vanilla]
    if not common:
      continue
    score = _mean(by_task[t]["score"] for t in common)
    v = _mean(vanilla[t]["score"] for t in common)
    out.append(dict(method=method, retention=label, n_tasks=len(common), score=score,
                    kv_retention=_mean(by_task[t]["kv_retention"] for t in common),
                    pct_of_vanilla=100.0 * score / v if v and method != "vanilla" else None,
                    decode_tok_s=_mean(by_task[t]["decode_tok_s"] for t in common),
                    prefill_s=_mean(by_task[t]["prefill_s"] for t in common)))
  return out


# ----------------------------------------------------------------------------------------------
# Markdown


def _f(x, fmt="{:.1f}", none="-") -> str:
  return none if x is None else fmt.format(x)


def _pct(x) -> str:
  return _f(None if x is None else 100 * x, "{:.1f}%")


def headline(summary: dict) -> list[str]:
  out = []
  names = {"chunkllm": "ChunkLLM", "oracle": "Oracle (scorer='attention', no training)",
           "hybrid": "ChunkLLM, prompt scored by attention (prefill_scorer='attention')"}
  for row in summary["long_context"]:
    if row["method"] in names and row["pct_of_vanilla"] is not None:
      n = row["n_tasks"]
      out.append(f"{names[row['method']]} (target {row['retention']}): {row['pct_of_vanilla']:.2f}% of vanilla's "
                 "long-context "
                 f"average at {100 * row['kv_retention']:.2f}% KV (measured; {n} task{'s' * (n != 1)})")
  return out


def markdown(summary: dict, settings: dict, bad_lines: Sequence) -> str:
  lines = ["# Evaluation results", "",
           f"Model `{settings.get('model')}` ({settings.get('dtype')}), "
           f"methods {', '.join(settings.get('methods', []))}. "
           "KV = the retention each run measured (mean over examples); `% vanilla` = the score as a percent of "
           "vanilla's on the same examples; speed excludes compilation.", ""]
  lines += [f"- {h}" for h in headline(summary)] + [""]
  if bad_lines:
    lines += [f"- {len(bad_lines)} malformed line(s) in results.jsonl were skipped: lines "
              + ", ".join(str(b.line) for b in bad_lines), ""]
  if summary["long_context"]:
    lines += ["## Long-context average (NIAH kinds and LongBench-format tasks)", "",
              "| method | target | score | KV | % vanilla | tasks | prefill s | decode tok/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["long_context"]:
      lines.append(f"| {r['method']} | {r['retention']} | {_f(r['score'], '{:.2f}')} | {_pct(r['kv_retention'])} | "
                   f"{_f(r['pct_of_vanilla'], '{:.2f}%')} | {r['n_tasks']} | {_f(r['prefill_s'], '{:.2f}')} | "
                   f"{_f(r['decode_tok_s'])} |")
    lines.append("")
  for task, rows in summary["tasks"].items():
    if task == "perplexity":
      lines += ["## perplexity (lower is better)", "",
                "| method | target | perplexity | vs vanilla | KV | expected KV | tokens/s | n |",
                "|---|---|---|---|---|---|---|---|"]
      for r in rows:
        lines.append(f"| {r['method']} | {r['retention']} | {r['score']:.3f} | "
                     f"{_f(r.get('ppl_change_pct'), '{:+.2f}%')} | {_pct(r['kv_retention'])} | "
                     f"{_pct(r.get('expected_retention'))} | {_f(r.get('tok_s'))} | {r['n']} |")
    else:
      extra = "identical to vanilla" if task == "short_text" else "expected KV"
      lines += [f"## {task}", "",
                f"| method | target | score | KV | KV min-max | worst row off target (chunks) | {extra} | % vanilla "
                "| prefill s | decode tok/s | n |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
      for r in rows:
        mid = _pct(r.get("identical_to_vanilla")) if task == "short_text" else _pct(r.get("expected_retention"))
        flag = " (chunk table overflowed)" if r.get("chunk_overflow") else ""
        spread = f"{_pct(r.get('kv_min'))}-{_pct(r.get('kv_max'))}" if r.get("kv_min") is not None else "-"
        lines.append(f"| {r['method']} | {r['retention']} | {r['score']:.2f}{flag} | {_pct(r['kv_retention'])} | "
                     f"{spread} | {_f(r.get('off_budget_chunks'), '{:.2f}')} | "
                     f"{mid} | {_f(r.get('pct_of_vanilla'), '{:.2f}%')} | {_f(r['prefill_s'], '{:.2f}')} | "
                     f"{_f(r['decode_tok_s'])} | {r['n']} |")
    lines.append("")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots


def niah_plots(records: Sequence[dict], out: Path) -> list[Path]:
  """One heatmap figure per method: a row of panels per retention target, a column per kind."""
  recs = [r for r in records if r["task"].startswith("niah_")]
  paths = []
  for method in [m for m in METHOD_ORDER if any(r["method"] == m for r in recs)]:
    mine = [r for r in recs if r["method"] == method]
    labels = sorted({str(r["retention"]) for r in mine}, key=lambda l: _order(("", method, l)))
    kv = {l: _mean(r["kv_retention"] for r in mine if str(r["retention"]) == l) for l in labels}
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in mine:
      row = f"r={r['retention']} (KV {100 * kv[str(r['retention'])]:.1f}%)"
      acc[(row, r["kind"])][(r["length"], r["depth"])].append(r["score"])
    cells = {k: {c: float(np.mean(v)) for c, v in cell.items()} for k, cell in acc.items()}
    lengths = sorted({r["length"] for r in mine})
    depths = sorted({r["depth"] for r in mine})
    title = f"NIAH, {method}: KV retention measured (target: measured) " + ", ".join(
        f"{l}: {100 * kv[l]:.1f}%" for l in labels)
    path = out / f"niah_{method}.png"
    niah.heatmap(cells, lengths, depths, path, title)
    paths.append(path)
  return paths


def perplexity_plot(summary: dict, out: Path) -> list[Path]:
  rows = summary["tasks"].get("perplexity")
  if not rows:
    return []
  curves = {}
  for r in rows:
    edges = np.asarray(r["bin_edges"], float)
    label = f"{r['method']} r={r['retention']} (KV {100 * r['kv_retention']:.1f}%, ppl {r['score']:.2f})"
    curves[label] = ((edges[:-1] + edges[1:]) / 2, np.asarray(r["bin_nll"]))
  path = out / "perplexity.png"
  ppl.plot(curves, path, "NLL by position (teacher forced after the prefix)")
  return [path]


def _budget_curves(rows: Sequence[dict], value: str) -> dict[str, list[tuple[float, float]]]:
  """Per method but vanilla, its (measured KV %, `value`) points at fractional budgets, by measured KV."""
  curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
  for r in rows:
    try:
      float(r["retention"])
    except ValueError:  # "full" or "default": not a point of a budget's curve
      continue
    if r["method"] != "vanilla" and r.get(value) is not None and r.get("kv_retention") is not None:
      curves[r["method"]].append((100.0 * r["kv_retention"], r[value]))
  return {m: sorted(pts) for m, pts in curves.items()}


PLOT_NAMES = {"hybrid": "ChunkLLM, prompt by attention (hybrid)", "chunkllm": "ChunkLLM, QK Adapters alone (chunkllm)",
              "oracle": "attention scorer, no training (oracle)"}


def tradeoff_plot(summary: dict, out: Path) -> list[Path]:
  """tradeoff.png: quality against the KV each run measured, a line per method over its budgets (the
  long-context average as a percent of vanilla's, and perplexity's change from vanilla's), written where
  some method ran at two budgets or more: the curve a user picks a budget from."""
  panels = [(title, curves, ylabel, ref) for title, curves, ylabel, ref in (
      ("long-context average (NIAH, LongBench-format)", _budget_curves(summary["long_context"], "pct_of_vanilla"),
       "% of vanilla's score", 100.0),
      ("perplexity", _budget_curves(summary["tasks"].get("perplexity", ()), "ppl_change_pct"),
       "perplexity vs vanilla (%)", 0.0)) if curves]
  if not any(len(pts) > 1 for _, curves, _, _ in panels for pts in curves.values()):
    return []
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.5 * len(panels), 4.2))
  for ax, (title, curves, ylabel, ref) in zip(axes[0], panels):
    ax.axhline(ref, color="black", linewidth=1.5, label="vanilla (100% KV)")
    for method in sorted(curves, key=lambda m: _order(("", m, "full"))):
      kv, y = zip(*curves[method])
      ax.plot(kv, y, marker="o", label=PLOT_NAMES.get(method, method))
    ax.set_xlim(0, 102)
    ax.set_xlabel("KV read, measured (% of the tokens seen)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = out / "tradeoff.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def write_all(out: Path, records: Sequence[dict], settings: dict, bad_lines: Sequence = ()) -> list[Path]:
  """summary.json, results.md and the plots under `out`; returns their paths."""
  out.mkdir(parents=True, exist_ok=True)
  summary = summarize(records)
  summary.update(settings={k: v for k, v in settings.items() if _jsonable(v)}, headline=headline(summary),
                 bad_lines=[dict(line=b.line, reason=b.reason) for b in bad_lines])
  paths = [out / "summary.json", out / "results.md"]
  paths[0].write_text(json.dumps(summary, indent=1) + "\n")
  curve = tradeoff_plot(summary, out)
  text = markdown(summary, settings, bad_lines)
  if curve:  # under the headline: the budgets side by side before the tables of each
    head, sep, rest = text.partition("\n## ")
    text = f"{head}\n![quality against the KV measured, per method and budget]({curve[0].name})\n\n{sep.lstrip()}{rest}"
  paths[1].write_text(text + "\n")
  paths += niah_plots(records, out) + perplexity_plot(summary, out) + curve
  # A plot this report has no rows for is an earlier report's (a rerun with fewer methods): left beside
  # results.md, it would show results the tables no longer hold. Only the names written above are removed.
  ours = {out / f"niah_{m}.png" for m in METHOD_ORDER} | {out / "perplexity.png", out / "tradeoff.png"}
  for stale in sorted(ours - set(paths)):
    stale.unlink(missing_ok=True)
  return paths


def _jsonable(v) -> bool:
  try:
    json.dumps(v)
    return True
  except TypeError:
    return False


def main(argv=None) -> int:
  """`python -m eval.report --out DIR`: the report of every result in DIR/results.jsonl, for a folder
  filled by several `eval.run` calls (each call reports only the runs it planned)."""
  import argparse
  import sys

  from eval.results_io import ResultsFile, is_run_config

  p = argparse.ArgumentParser(prog="python -m eval.report", description=main.__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="a folder holding results.jsonl (and run_config.json)")
  args = p.parse_args(argv)
  out = Path(args.out)
  if not (out / "results.jsonl").is_file():
    print(f"error: {out / 'results.jsonl'} does not exist", file=sys.stderr)
    return 2
  try:
    ours = is_run_config(out / "run_config.json")
  except (OSError, ValueError):  # missing, unreadable or not JSON
    ours = False
  if not ours:  # its summary.json, results.md and plots would replace files of those names eval.run did not write
    print(f"error: {out} has no run_config.json of eval.run's: give a folder eval.run made", file=sys.stderr)
    return 2
  results = ResultsFile(out / "results.jsonl")
  config = out / "run_config.json"
  settings = json.loads(config.read_text()) if config.is_file() else {}
  present = {r.get("method") for r in results.records}  # every method in the folder, not one call's
  settings["methods"] = [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER) - {None})
  for p_ in write_all(out, results.records, settings, results.bad_lines):
    print(p_, file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
