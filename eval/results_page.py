"""docs/results.md in one command: every current measurement of the method, each beside its target.

  python -m eval.results_page            # rebuild the page from the folders' rows (seconds)
  python -m eval.results_page --run      # first run every evaluation whose rows are missing (hours; resumes)
  python -m eval.results_page --run --only niah_smollm2   # one of them

`results_sections.MEASUREMENTS` is the list: for each, the folder of its rows and the command that
fills it. The page is rebuilt from the rows themselves (eval.report.summarize), so a folder that
gained rows shows them, and the verdicts against the targets are computed, never typed:
- NIAH, at 50% measured KV: at least 98.6% of vanilla and above every baseline; at 25%: at least
  90% of vanilla and 10 points over the best baseline (baselines: StreamingLLM, SepLLM, FixLLM);
- perplexity within +2% of vanilla at 50%.
The needle-rank tables and the held-out KL and recall of the adapters come from their JSON files.
The hand-written history of earlier rounds sits below the page's marker and is kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from eval import report
from eval.results_io import ResultsFile
from eval.results_sections import DEFAULT_CHECKS, MEASUREMENTS, Measurement

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGE = DOCS / "results.md"
KEEP = "<!-- history below is kept when `python -m eval.results_page` rewrites this page -->"

BASELINES = ("streamingllm", "sepllm", "fixllm")
CHUNKLLM = {"hybrid": "ChunkLLM, `hybrid` (the prompt read densely, by the frozen attention)",
            "chunkllm": "ChunkLLM, QK Adapters alone (the paper's rule)"}
SHARED_NAME = ("the shared rule (`--selection shared`: the QK Adapters choose at each chunk boundary for every layer "
               "and head; the default until the twenty-seventh session)")
NIAH_TARGETS = {"0.5": (98.6, 0.0), "0.25": (90.0, 10.0)}  # budget: (% of vanilla, points over the best baseline)
PPL_TARGET = 2.0  # % over vanilla at 50%


# ------------------------------------------------------------------------------------------------
# Evaluations


def _pct(x) -> str:
  return "-" if x is None else f"{x:.1f}%"


def _long_rows(summary: dict) -> dict[tuple[str, str], dict]:
  return {(r["method"], r["retention"]): r for r in summary["long_context"]}


def _chunkllm_names(variant: str) -> dict[str, str]:
  """The variants' flags reach `hybrid` (and `oracle`) only: the paper's rule takes none of them."""
  rule = variant if "KV head" in variant else SHARED_NAME + (f", with {variant}" if variant else "")
  return {m: f"{name}, with {rule}" if m == "hybrid" else name for m, name in CHUNKLLM.items()}


def niah_verdicts(summary: dict, variant: str = "") -> list[str]:
  """Each ChunkLLM row at 50% and 25% against the NIAH targets, in words."""
  rows = _long_rows(summary)
  out = []
  for method, name in _chunkllm_names(variant).items():
    for budget, (pct_target, margin) in NIAH_TARGETS.items():
      row = rows.get((method, budget))
      if row is None or row["pct_of_vanilla"] is None:
        continue
      base = {m: rows[(m, budget)] for m in BASELINES if (m, budget) in rows}
      best = max(base.values(), key=lambda r: r["score"]) if base else None
      keeps = row["pct_of_vanilla"] >= pct_target
      over = None if best is None else row["score"] - best["score"]
      beats = over is not None and (over >= margin if margin else over > 0)
      missing = [m for m in BASELINES if m not in base]
      line = (f"{name}, {float(budget):.0%} budget: **{row['pct_of_vanilla']:.1f}% of vanilla** at "
              f"{100 * row['kv_retention']:.1f}% measured KV (target {pct_target:g}%: "
              f"{'met' if keeps else 'not met'})")
      if best is not None:
        need = f"{margin:g} points over" if margin else "above"
        line += (f"; {over:+.1f} points against the best baseline ({best['method']}, {best['score']:.1f}; target "
                 f"{need}: {'met' if beats else 'not met'})")
      if missing:
        line += f"; not measured here: {', '.join(missing)}"
      out.append(line + ".")
  return out


def ppl_verdicts(summary: dict, variant: str = "") -> list[str]:
  names = _chunkllm_names(variant)
  out = []
  for row in summary["tasks"].get("perplexity", []):
    if row["method"] in names and row["retention"] == "0.5" and row.get("ppl_change_pct") is not None:
      ok = row["ppl_change_pct"] <= PPL_TARGET
      out.append(f"{names[row['method']]}: **{row['ppl_change_pct']:+.2f}%** perplexity at "
                 f"{100 * row['kv_retention']:.1f}% measured KV (target +{PPL_TARGET:g}%: {'met' if ok else 'not met'}).")
  return out


def _records(folder: str) -> list[dict]:
  path = DOCS / folder / "results.jsonl"
  return ResultsFile(path).records if path.exists() else []


def section_records(m: Measurement) -> list[dict]:
  """The folder's rows, and those of `m.others` for the methods the folder has none of."""
  records = _records(m.folder)
  if records and m.others:
    own = {r["method"] for r in records}
    records += [r for r in _records(m.others) if r["method"] not in own]
  return records


def eval_section(m: Measurement) -> list[str]:
  records = section_records(m)
  if not records:
    return ["Not measured yet."]
  summary = report.summarize(records)
  tasks = [t for t in summary["tasks"] if report._is_long(t)]
  per_task = {t: {(r["method"], r["retention"]): r for r in summary["tasks"][t]} for t in tasks}
  out = []
  if "perplexity" in summary["tasks"]:
    out += [f"- {v}" for v in ppl_verdicts(summary, m.variant)] + [""]
    out += ["| method | budget | perplexity | vs vanilla | KV measured | texts |", "|---|---|---:|---:|---:|---:|"]
    for r in summary["tasks"]["perplexity"]:
      change = "-" if r.get("ppl_change_pct") is None else f"{r['ppl_change_pct']:+.2f}%"
      out.append(f"| {r['method']} | {r['retention']} | {r['score']:.2f} | {change} | "
                 f"{_pct(100 * r['kv_retention'] if r['kv_retention'] is not None else None)} | {r['n']} |")
  elif "short_text" in summary["tasks"]:
    out += ["| method | budget | score | identical to vanilla | KV measured | items |", "|---|---|---:|---:|---:|---:|"]
    for r in summary["tasks"]["short_text"]:
      same = "-" if r.get("identical_to_vanilla") is None else f"{100 * r['identical_to_vanilla']:.0f}%"
      out.append(f"| {r['method']} | {r['retention']} | {r['score']:.2f} | {same} | "
                 f"{_pct(100 * r['kv_retention'] if r['kv_retention'] is not None else None)} | {r['n']} |")
  elif not any(t.startswith("niah_") for t in tasks):  # LongBench-format tasks: a score per task
    out += [f"| method | budget | {' | '.join(tasks)} | mean | KV measured | % vanilla |",
            "|---|---|" + "---:|" * (len(tasks) + 3)]
    for r in summary["long_context"]:
      cells = [per_task[t].get((r["method"], r["retention"])) for t in tasks]
      out.append(f"| {r['method']} | {r['retention']} | "
                 + " | ".join("-" if x is None else f"{x['score']:.1f}" for x in cells)
                 + f" | {r['score']:.1f} | {100 * r['kv_retention']:.1f}% | {_pct(r['pct_of_vanilla'])} |")
  else:
    out += [f"- {v}" for v in niah_verdicts(summary, m.variant)] + [""]
    out += [f"| method | budget | found, {' / '.join(t.removeprefix('niah_') for t in tasks)} | mean score | "
            "KV measured (min-max) | % vanilla |",
            "|---|---|---|---:|---|---:|"]
    for r in summary["long_context"]:
      cells = []
      for t in tasks:
        x = per_task[t].get((r["method"], r["retention"]))
        cells.append("-" if x is None else f"{round(x['score'] * x['n'] / 100)}/{x['n']}")
      kv = [per_task[t].get((r["method"], r["retention"])) for t in tasks]
      lo = min((x["kv_min"] for x in kv if x and x["kv_min"] is not None), default=None)
      hi = max((x["kv_max"] for x in kv if x and x["kv_max"] is not None), default=None)
      span = f" ({100 * lo:.1f}-{100 * hi:.1f}%)" if lo is not None else ""
      out.append(f"| {r['method']} | {r['retention']} | {' / '.join(cells)} | {r['score']:.1f} | "
                 f"{100 * r['kv_retention']:.1f}%{span} | {_pct(r['pct_of_vanilla'])} |")
  return out




def variant_figure(paths: Path | tuple[Path, ...], budget: str) -> tuple[float, str] | None:
  """The per-head variant's perplexity change at `budget` in eval.ppl_variants files (the last row there is),
  as `method_figure`'s."""
  paths = paths if isinstance(paths, tuple) else (paths,)
  rows = [json.loads(line) for path in paths if path.exists() for line in path.read_text().splitlines()
          if line.strip()]
  rows = [r for r in rows if r.get("variant") not in (None, "vanilla") and f"{r['retention']:g}" == f"{float(budget):g}"]
  if not rows:
    return None
  r = rows[-1]
  return -100 * r["ppl_vs_vanilla"], f"{100 * r['ppl_vs_vanilla']:+.2f}% perplexity at {100 * r['kv']:.1f}% KV"


def method_figure(records: list[dict], method: str, budget: str) -> tuple[float, str] | None:
  """A method's figure in a section's rows at one budget, as (key, text): % of vanilla (NIAH,
  LongBench; larger is better) or the change in perplexity (smaller is better, so its key is the
  negated change), with the measured KV; None where not measured."""
  summary = report.summarize([r for r in records if r["method"] in ("vanilla", method)])
  if "perplexity" in summary["tasks"]:
    row = {r["retention"]: r for r in summary["tasks"]["perplexity"] if r["method"] == method}.get(budget)
    if row is None or row.get("ppl_change_pct") is None:
      return None
    return -row["ppl_change_pct"], f"{row['ppl_change_pct']:+.2f}% perplexity at {100 * row['kv_retention']:.1f}% KV"
  row = _long_rows(summary).get((method, budget))
  if row is None or row["pct_of_vanilla"] is None:
    return None
  return row["pct_of_vanilla"], (f"{row['pct_of_vanilla']:.1f}% of vanilla ({row['score']:.1f}) at "
                                 f"{100 * row['kv_retention']:.1f}% KV")


def best_baseline(records: list[dict], budget: str) -> str:
  figures = {m: method_figure(records, m, budget) for m in BASELINES}
  best = max(((f, m) for m, f in figures.items() if f is not None), default=None)
  return "-" if best is None else f"{best[1]}: {best[0][1]}"


def defaults_section() -> list[str]:
  by_name = {m.name: m for m in MEASUREMENTS}
  out = ["## Default settings", "",
         "`chunk_generate`'s defaults, and the eval's `hybrid`: each KV head of each sparse layer chooses the "
         "chunks it reads at every decode step (`selection=\"kv_head\"`), scored from low-rank keys (a quarter "
         "of K's coordinates in a basis of its KV head's prompt keys) and a 128-bit sketch of the signs of what "
         "they miss, read as SimHash's angle (`score_estimate=\"lowrank\"`, `score_sketch=128`, "
         "`sketch_estimate=\"simhash\"`: 14-16% of the KV's bytes, kept and read besides the KV shown), under "
         "the budget's shape: three quarters of it to the most recent tokens (`recent_share=0.75`) and the last "
         "token of the chunks left out (`boundary_tokens`), within a quarter of what the budget leaves after the "
         "sinks, local and open chunk, the newest first (`boundary_share=0.25`). Until the forty-sixth session "
         "every one was read, and so were the other columns measured (the perplexity at 8K on its 8 texts, run again "
         "with the cap: +0.58% at 49.9% KV, against +0.63% before; history, forty-ninth session); every NIAH set "
         "and LongBench run again gave the same tokens at 25% "
         "and 50% (the cap binds where the last tokens are many against the budget: the first positions of the "
         "2K perplexity texts, where it moved gemma3-270m from +1.05% to +0.85% at 50%). "
         "Beside it: the shared rule, one selection at each "
         "chunk boundary by the QK Adapters for every layer and head (`selection=\"shared\"`, the default until "
         "the twenty-seventh session), with the same budget shape and with its first defaults (the budget by "
         "score alone and chunks whole, `--recent_share 0 --no-boundary_tokens`); the per-head rule's other "
         "scores, SparQ's estimate over a quarter of K's dimensions (which touch every cache line of K: all of "
         "K is read besides the KV shown) and QJL's reading of the same sketch; and the best of StreamingLLM, "
         "SepLLM and FixLLM where the section measured them. The perplexity of today's defaults comes from "
         "`eval.ppl_variants` (the same texts and computation as the sections' `eval.run`; its files under "
         "eval_ppl_variants/ and commands in the history below):", "",
         "| check | budget | **today's defaults: per KV head, low-rank + sketch (SimHash)** | shared rule | shared "
         "rule, first defaults | per KV head, SparQ | per KV head, low-rank + sketch (QJL) | best baseline |",
         "|---|---|---|---|---|---|---|---|"]
  for label, today, shared, first, sparq, qjl in DEFAULT_CHECKS:
    for budget in NIAH_TARGETS:
      figures = [(variant_figure(tuple(DOCS / f for f in m) if isinstance(m, tuple) else DOCS / m, budget)
                  if isinstance(m, tuple) or m.endswith(".jsonl") else
                  method_figure(_records(by_name[m].folder), "hybrid", budget)) if m else None
                 for m in (today, shared, first, sparq, qjl)]
      if figures[:3] == [None, None, None]:
        continue
      cells = ["-" if f is None else f[1] for f in figures]
      out.append(f"| {label} | {float(budget):.0%} | **{cells[0]}** | {' | '.join(cells[1:])} | "
                 f"{best_baseline(section_records(by_name[shared or today]), budget)} |")
  return out


# ------------------------------------------------------------------------------------------------
# Needle ranks and held-out metrics


def _ranks(folder: Path) -> list[dict] | None:
  path = folder / "needle_ranks.json"
  return json.loads(path.read_text()) if path.exists() else None


def ranks_section(m: Measurement) -> list[str]:
  after = _ranks(DOCS / m.folder)
  before = _ranks(DOCS / m.before) if m.before else None
  if after is None:
    return ["Not measured yet."]
  key = lambda r: (r["tokens"] // 1024, r["depth"])
  first = {key(r): r for r in before or []}
  out = ["At the prompt's last token (the first decode selection), the needle chunk's rank among the candidates "
         "(1 = top; a 25% budget keeps about the top quarter). Teacher: the frozen model's head-averaged chunk "
         "attention at the selection layers; oracle: the attention scorer's vote.", "",
         "| prompt | candidates | teacher per layer | first adapters' vote, sum / max | retrained per layer | "
         "**retrained vote, sum / max** | oracle vote |", "|---|---:|---|---|---|---|---:|"]
  for r in after:
    b = first.get(key(r))
    bv = "-" if b is None else f"{b['student_vote_rank']['sum']} / {b['student_vote_rank']['max']}"
    out.append(f"| {r['tokens']} tokens, depth {r['depth']:g} | {r['n_candidates']} | "
               f"{' / '.join(map(str, r['teacher_rank']))} | {bv} | {' / '.join(map(str, r['student_rank']))} | "
               f"**{r['student_vote_rank']['sum']} / {r['student_vote_rank']['max']}** | "
               f"{r['oracle_vote_rank']['sum']} |")
  return out


def held_out_section(m: Measurement) -> list[str]:
  path = DOCS / m.folder / "train_evaluate.json"
  if not path.exists():
    return ["Not measured yet."]
  rows = json.loads(path.read_text())
  out = ["| adapters | KL to the head-max rows | chunk recall@16 | boundary F1 |", "|---|---:|---:|---:|"]
  for i, r in enumerate(rows):
    name = m.labels[i] if i < len(m.labels) else r["adapters"]
    out.append(f"| {name} | {r['kl']:.3f} | {r['chunk_recall']:.3f} | {r['boundary_f1']:.3f} |")
  return out


# ------------------------------------------------------------------------------------------------


def render() -> str:
  lines = ["# Measured results: what ChunkLLM keeps, at what KV", "",
           "Written by `python -m eval.results_page` from the rows of each folder below (`--run` first fills "
           "what is missing). Verdicts are computed against the targets: NIAH at 50% measured KV at least 98.6% "
           "of vanilla and above every baseline, at 25% at least 90% and 10 points over the best baseline; "
           "perplexity within +2% of vanilla at 50%. Baselines: StreamingLLM, SepLLM, FixLLM; `oracle` is the "
           "training-free attention scorer. Every figure is on a 2-core CPU; speed columns of the folders' "
           "own reports come from runs that shared the cores and are not comparisons.", "",
           "LongBench-format tasks: one mini task, mini_kv_qa, with vanilla, the defaults and the baselines (below); the mini set is "
           "beyond a 135M model, and each task takes 10-20 minutes per method on this CPU.", "",
           "The NIAH rows were measured with each target needle at its depth's share of the haystack's sentences; "
           "`eval.run` now puts it at its depth in tokens by default (Brown's sentences differ in length: at 2K "
           "tokens the two placements were 0.03 apart on average and at most 0.16, at 8K at most 0.13). The scores "
           "average over depths 0.1-0.9. The commands below name `--needle_placement sentences`, which re-runs "
           "them as measured; a folder refuses needles of the other placement. The perplexity rows of the window "
           "baselines fitted one SepLLM window to each batch of texts, whose texts then read 44-62% of the KV at "
           "a 50% target (the mean is what the tables show); `eval.perplexity` now fits it to each text, which "
           "moved SepLLM's perplexity change by 0.09 points on 8 texts of 1K tokens.", ""]
  lines += defaults_section() + [""]
  for m in MEASUREMENTS:
    lines += [f"## {m.title}", ""]
    if m.note:
      lines += [m.note, ""]
    section = {"eval": eval_section, "needle_ranks": ranks_section, "held_out": held_out_section}[m.kind]
    lines += section(m) + [""]
    if m.kind == "eval" and (DOCS / m.folder / "tradeoff.png").exists():  # eval.report's, where budgets make a curve
      lines += [f"![quality against the KV measured, per method and budget]({m.folder}/tradeoff.png)", ""]
    cmds = "; then ".join(f"`{c}`" for c in m.commands)
    also = f" (and [{m.others}/]({m.others}/) for the other methods)" if m.others else ""
    lines += [f"Rows: [{m.folder}/]({m.folder}/){also}. Command: {cmds}" + ("" if m.rerun else f" (not rerun by "
              f"`--run`: it needs {m.outside}, kept outside the repository)") + "."]
    if m.before:
      lines[-1] += f" The first adapters' ranks: [{m.before}/]({m.before}/)."
    lines.append("")
  return "\n".join(lines)


def write(page: Path = PAGE) -> Path:
  kept = ""
  if page.exists():
    text = page.read_text()
    kept = text.split(KEEP, 1)[1].strip("\n") if KEEP in text else text.strip("\n")
  page.write_text(render().rstrip("\n") + "\n\n" + KEEP + ("\n\n" + kept if kept else "") + "\n")
  return page


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m eval.results_page", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", action="store_true", help="run each measurement's commands first (they resume)")
  ap.add_argument("--only", nargs="+", choices=[m.name for m in MEASUREMENTS], default=None, metavar="NAME",
                  help="these measurements alone (their names: eval/results_sections.py)")
  ap.add_argument("--out", default=str(PAGE), help="the page (default docs/results.md)")
  args = ap.parse_args(argv)
  if args.run:
    todo = [m for m in MEASUREMENTS if m.rerun and (args.only is None or m.name in args.only)]
    for i, m in enumerate(todo, 1):
      for cmd in m.commands:
        print(f"[{i}/{len(todo)}] {m.name}: {cmd}", flush=True)
        argv_ = shlex.split(cmd)
        rc = subprocess.run([sys.executable, *argv_[1:]], cwd=REPO, check=False).returncode
        if rc:
          print(f"{m.name}: exit {rc}; the page is written from the rows there are", file=sys.stderr)
  page = write(Path(args.out))
  print(f"wrote {page}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
