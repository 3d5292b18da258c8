"""RESULTS_summary.md and summary.png: each measured figure of bench/'s pages beside its target.

Reads the .json files the benchmarks write (a missing page gives a "not measured" row, never an
error) and the machine and command each was measured with. Speed ratios are read from runs that
measured both sides in one process, side by side. `bench/regenerate.py` calls `write` last.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import results_md


@dataclasses.dataclass(frozen=True)
class Figure:
  area: str
  what: str
  value: float | None  # None: not measured
  target: float | None  # None: reported, no target
  higher_is_better: bool
  unit: str  # "x" (ratio) or "%"
  page: str  # RESULTS_<page>.md

  @property
  def met(self) -> bool | None:
    if self.value is None or self.target is None:
      return None
    return self.value >= self.target if self.higher_is_better else self.value <= self.target

  @property
  def score(self) -> float | None:
    """>= 1 where the target is met: value / target, or target / value for a ceiling."""
    if self.met is None or self.value <= 0:
      return None
    return self.value / self.target if self.higher_is_better else self.target / self.value


def _load(out: pathlib.Path, name: str):
  path = out / (f"RESULTS_{name}.json")
  return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: float | None, unit: str) -> str:
  if x is None:
    return "not measured"
  if unit == "%":
    return f"{x:.0%}"
  return f"{x:.2f}x" if x >= 0.1 else f"{x:.4f}x"


def figures(out: pathlib.Path) -> list[Figure]:
  figs = []
  gen = _load(out, "generate")
  for length in (2048, 8192, 16384):
    row = next((r for r in (gen or {}).get("rows", []) if r["prompt"] == length), None)
    figs.append(Figure("dense prefill", f"tok/s vs transformers, {length // 1024}K prompt",
                       row and row["prefill_ratio"], 1.0, True, "x", "generate"))
  for r in (gen or {}).get("rows", []):
    figs.append(Figure("dense decode", f"tok/s vs transformers, {r['prompt']}-token prompt", r["decode_ratio"],
                       None, True, "x", "generate"))
  chunk = _load(out, "chunk") or {}
  defaults = _load(out, "chunk_defaults") or {}
  for context in (8192, 32768):
    dense = next((r.get("dense_of_floor") for r in chunk.get("decode", []) if r["context"] == context), None)
    figs.append(Figure("decode vs floor", f"dense, {context // 1024}K context", dense, 0.6, True, "%", "chunk"))
    for page, doc, rule in (("chunk_defaults", defaults, "defaults (per-head rule)"), ("chunk", chunk, "shared rule")):
      figs += _decode_figures(page, doc, rule, context)
  for r in chunk.get("prefill", []):
    figs.append(Figure("chunk-sparse prefill", f"vs dense, {r['context'] // 1024}K, synthetic chunks "
                       f"({r.get('selection', 'random')} selection), top {r['top_k']}", r["prefill_speedup"],
                       2.0 if r["context"] >= 16384 else None, True, "x", "chunk"))
  scorer = _load(out, "prefill_scorer")
  if scorer:
    n = scorer["prompt_tokens"]
    for r in scorer["rows"][1:]:
      target = 2.0 if "sparse" in r["method"] and n >= 16384 else None
      # The page's ChunkLLM rows decode by the shared rule (bench_prefill_scorer.py names it; its rows compare who
      # scores the prompt, which the per-head rule's decode does not read).
      figs.append(Figure("end to end", f"shared rule, {r['method']}: prefill vs vanilla, {n} tokens, real segmentation, "
                         f"{scorer['budget']:.0%} budget", r["prefill_vs_vanilla"], target, True, "x",
                         "prefill_scorer"))
      figs.append(Figure("end to end", f"shared rule, {r['method']}: decode vs vanilla, {n} tokens, "
                         f"{scorer['budget']:.0%} budget",
                         r["decode_vs_vanilla"], None, True, "x", "prefill_scorer"))
  else:
    figs.append(Figure("end to end", "chunk-sparse prefill vs dense, 16K, real segmentation, 25% budget", None, 2.0,
                       True, "x", "prefill_scorer"))
  mem = _load(out, "memory")
  mem_rows = mem["rows"] if isinstance(mem, dict) else []
  for cache in ("cold", "warm"):  # programs compiled in the run, or loaded from jax's compilation cache
    for method in ("vanilla", "chunkllm"):
      name = ("generate" if method == "vanilla" else "chunk_generate") + (", warm compile cache" if cache == "warm" else "")
      rows = {r["context"]: r for r in mem_rows
              if r["method"] == method and "peak_rss" in r and r.get("compile_cache", "cold") == cache}
      # the target's context is shown, measured or not (with the cache warm, only where measured)
      for context in sorted(set(rows) | ({32768} if cache == "cold" else set())):
        r = rows.get(context)
        figs.append(Figure("peak memory", f"{name}: peak RSS / floor, {context // 1024}K",  # the target is at 32K
                           r and r["peak_rss"] / r["floor"], 1.2 if context == 32768 else None, False, "x", "memory"))
  train = _load(out, "train")
  figs.append(Figure("training", f"teacher rows vs frozen forward, {train['seq_len'] if train else 2048} tokens",
                     train and train["teacher_over_forward"], 1.3, False, "x", "train"))
  figs.append(Figure("training", "adapter step on cached rows vs frozen forward",
                     train and train["cached_step_over_forward"], None, False, "x", "train"))
  return figs


def _decode_figures(page: str, doc: dict, rule: str, context: int) -> list[Figure]:
  """A bench_chunk page's ChunkLLM decode at `context`: against the floor and against its own dense steps."""
  rows = sorted((r for r in doc.get("decode", []) if r["context"] == context), key=lambda r: -r["target_retention"])
  if not rows:
    return [Figure("decode vs floor", f"ChunkLLM {rule}, {context // 1024}K context", None, 0.6, True, "%", page)]
  figs = []
  for r in rows:
    at = f"{context // 1024}K, {r['retention']:.0%} retention"
    figs.append(Figure("decode vs floor", f"ChunkLLM {rule}, {at}", r.get("chunk_of_floor"), 0.6, True, "%", page))
    figs.append(Figure("ChunkLLM decode", f"{rule}: speed vs dense, {at}", r["decode_speedup"], None, True, "x", page))
  return figs


def plot(figs: list[Figure], path: pathlib.Path, title: str) -> None:
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = [f for f in figs if f.score is not None]
  if not shown:
    shown = [Figure("nothing measured", "", 1.0, 1.0, True, "x", "")]
  fig, ax = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.5))
  y = range(len(shown))
  ax.barh(list(y), [f.score for f in shown], color=["tab:green" if f.met else "tab:red" for f in shown])
  ax.set_yticks(list(y), [f"{f.area}: {f.what}" for f in shown], fontsize=7)
  ax.invert_yaxis()
  ax.axvline(1.0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  lo, hi = min(min(f.score for f in shown), 0.5) / 1.3, max(max(f.score for f in shown), 2.0) * 1.3
  ax.set_xlim(lo, hi)
  ax.set_xticks([t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8) if lo <= t <= hi])
  ax.set_xlabel("measured / target (a ceiling: target / measured); right of 1 = met")
  ax.set_title(title, fontsize=9)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def gpu_line(out: pathlib.Path) -> str:
  """Where the GPU figures are: bench_kernels.py's page, once a device run has written it."""
  if (out / "RESULTS.md").is_file():
    return "The GPU figures are RESULTS.md's (`bench/bench_kernels.py`)."
  return ("The GPU figures are still to come: no GPU run has written RESULTS.md yet (`OUT=DIR bash "
          "bench/device_run.sh` on a GPU runs `bench/bench_kernels.py` and the decode on the device).")


def write(out, quick: bool = False) -> pathlib.Path:
  out = pathlib.Path(out)
  figs = figures(out)
  pages = sorted({f.page for f in figs})
  lines = ["# Performance against the targets (CPU)", "",
           "Written by `python bench/regenerate.py` (`--summary`: from the pages' .json alone). Each figure comes "
           "from one page below, where its table, machine and command are; ratios are of two sides measured in "
           "one run. " + gpu_line(out), ""]
  if quick:
    lines += ["**Quick run: tiny shapes, timings meaningless; a check that the pipeline runs.**", ""]
  lines += ["| area | figure | measured | target | met |", "|---|---|---:|---:|:---:|"]
  for f in figs:
    target = "-" if f.target is None else (">= " if f.higher_is_better else "<= ") + _fmt(f.target, f.unit)
    met = {True: "yes", False: "**no**", None: "-"}[f.met]
    lines.append(f"| {f.area} | {f.what} | {_fmt(f.value, f.unit)} | {target} | {met} |")
  lines += ["", "Measured on:", ""]
  for page in pages:
    doc = _load(out, page)
    if doc is None:
      lines.append(f"- RESULTS_{page}: not measured yet")
      continue
    device = doc.get("device", "?") if isinstance(doc, dict) else "?"
    command = doc.get("command", "?") if isinstance(doc, dict) else "?"
    code = doc.get("code") if isinstance(doc, dict) else None
    if code is None and isinstance(doc, dict):  # bench_chunk keeps the commit per row
      code = ", ".join(sorted({r["code"] for r in doc.get("decode", []) + doc.get("prefill", []) if "code" in r}))
    lines.append(f"- RESULTS_{page}: {device}" + (f"; code {code}" if code else "") + f"; `{command}`")
  lines += ["", "![measured against the targets](summary.png)"]
  plot(figs, out / "summary.png", "chunkllm_jax on the CPU: each figure against its target")
  return results_md.write(out / "RESULTS_summary.md", lines)
