"""The two results pages that one command each rebuilds: docs/results.md (`python -m eval.results_page`)
and bench/'s pages with their summary (`python bench/regenerate.py`). The verdicts are computed from
rows, the hand-written history survives a rewrite, and every command the pages name parses."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import report
from eval import results_page as rp
from eval import run as eval_run

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# docs/results.md


def niah_rows(method, budget, found, n=10, kv=None):
  kv = kv if kv is not None else (1.0 if budget == "full" else float(budget))
  return [dict(task="niah_single", method=method, retention=budget, example=f"e{i}", score=float(i < found),
               kv_retention=kv) for i in range(n)]


@pytest.mark.parametrize("found_50, found_25, base_50, base_25, verdicts", [
    (10, 9, 5, 3, ["met", "met", "met", "met"]),  # 100% and above; 90% and 60 points over
    (9, 9, 5, 3, ["not met", "met", "met", "met"]),  # 90% < 98.6% at 50%
    (10, 8, 5, 3, ["met", "met", "not met", "met"]),  # 80% < 90% at 25%
    (10, 9, 10, 9, ["met", "not met", "met", "not met"]),  # a tie is neither above nor 10 points over
])
def test_niah_verdicts_follow_the_targets(found_50, found_25, base_50, base_25, verdicts):
  records = (niah_rows("vanilla", "full", 10) + niah_rows("hybrid", "0.5", found_50) + niah_rows("hybrid", "0.25", found_25)
             + niah_rows("streamingllm", "0.5", base_50) + niah_rows("streamingllm", "0.25", base_25 - 1)
             + niah_rows("sepllm", "0.25", base_25))
  lines = rp.niah_verdicts(report.summarize(records))
  assert len(lines) == 2 and all(line.startswith(rp.CHUNKLLM["hybrid"]) for line in lines)
  assert [v for line in lines for v in re.findall(r": (met|not met)\)", line)] == verdicts
  assert "best baseline (sepllm" in lines[1]  # the best at 25% is SepLLM here
  assert "not measured here: sepllm, fixllm" in lines[0] and "not measured here: fixllm" in lines[1]


def test_perplexity_verdict():
  def ppl(method, budget, nll):
    return dict(task="perplexity", method=method, retention=budget, example="d0", nll=nll * 100, n_scored=100,
                nll_bins=[nll], token_bins=[1], bin_edges=[0, 1], kv_retention=0.5)
  lines = rp.ppl_verdicts(report.summarize([ppl("vanilla", "full", 3.0), ppl("hybrid", "0.5", 3.01),
                                            ppl("chunkllm", "0.5", 3.05)]))
  assert [line.split(": ")[-1] for line in lines] == ["not met).", "met)."]  # chunkllm +5.1%, hybrid +1.0%


@pytest.mark.parametrize("budgets", [("0.5", "0.25"), ("0.5",)])
def test_the_tradeoff_plot_is_drawn_where_a_method_ran_at_several_budgets(tmp_path, budgets):
  """tradeoff.png (quality against the KV measured) where some method has a curve, linked from results.md;
  with one budget a method there is no curve, and a tradeoff.png of an earlier report is removed."""
  def ppl(method, budget, nll):
    return dict(task="perplexity", method=method, retention=budget, example="d0", nll=nll * 100, n_scored=100,
                nll_bins=[nll], token_bins=[1], bin_edges=[0, 1], kv_retention=1.0 if budget == "full" else float(budget))
  def niah(method, budget, found):  # with the fields the heatmaps read
    return [dict(r, kind="single", length=1024, depth=0.5) for r in niah_rows(method, budget, found)]
  records = niah("vanilla", "full", 10) + [ppl("vanilla", "full", 3.0)]
  for b in budgets:
    records += niah("hybrid", b, 10) + niah("streamingllm", b, 4) + [ppl("hybrid", b, 3.01)]
  (tmp_path / "tradeoff.png").write_bytes(b"an earlier report's")
  paths = report.write_all(tmp_path, records, dict(model="m", dtype="float32", methods=["vanilla", "hybrid"]))
  plot = tmp_path / "tradeoff.png"
  assert (plot in paths) == (len(budgets) > 1) == plot.exists()
  assert ("](tradeoff.png)" in (tmp_path / "results.md").read_text()) == (len(budgets) > 1)
  if len(budgets) > 1:
    assert plot.read_bytes().startswith(b"\x89PNG")
  curves = report._budget_curves(report.summarize(records)["long_context"], "pct_of_vanilla")
  assert curves["streamingllm"] == sorted((100 * float(b), 40.0) for b in budgets)


def test_page_keeps_its_history_and_rewrites_to_the_same_page(tmp_path):
  page = tmp_path / "results.md"
  page.write_text("# An earlier page\n\nwritten by hand\n")
  rp.write(page)
  first = page.read_text()
  assert first.startswith("# Measured results") and first.endswith("# An earlier page\n\nwritten by hand\n")
  rp.write(page)
  assert page.read_text() == first


def test_every_measurement_has_its_rows_and_a_command_that_parses():
  names = [m.name for m in rp.MEASUREMENTS]
  assert len(set(names)) == len(names)
  for m in rp.MEASUREMENTS:
    assert (REPO / "docs" / m.folder).is_dir(), m.folder
    for cmd in m.commands:
      argv = shlex.split(cmd)
      if argv[:3] == ["python", "-m", "eval.run"]:
        args = eval_run._parser().parse_args(argv[3:])
        assert f"docs/{m.folder}" == args.out, cmd
        if m.rerun:  # the command resumes the folder: its settings are those the rows were made with
          args.out = str(REPO / args.out)
          eval_run._check_fingerprint(Path(args.out), eval_run._fingerprint(eval_run._resolve(args)))
    if m.others:
      assert (REPO / "docs" / m.others / "results.jsonl").is_file(), m.others
  page = (REPO / "docs" / "results.md").read_text()
  assert rp.KEEP in page  # the page in the repository is the one the command writes
  assert page.split(rp.KEEP)[0].strip() == rp.render().strip(), "docs/results.md is stale: python -m eval.results_page"


# ------------------------------------------------------------------------------------------------
# bench/


@pytest.fixture(scope="module")
def bench(bench_script):
  sys.path.insert(0, str(REPO / "bench"))
  return dict(results_md=bench_script("results_md"), summary=bench_script("summary"),
              regenerate=bench_script("regenerate"))


def test_results_md_keeps_the_hand_written_part(bench, tmp_path):
  md = bench["results_md"]
  page = tmp_path / "RESULTS_x.md"
  md.write(page, ["# X", "", "| a |", "|---|", "| 1 |"], {"rows": [1]})
  assert page.read_text().rstrip().endswith(md.KEEP)
  page.write_text(page.read_text() + "\n## What a profile showed\n\nnotes\n")
  md.write(page, ["# X", "", "| a |", "|---|", "| 2 |"], {"rows": [2]})
  text = page.read_text()
  assert "| 2 |" in text and "| 1 |" not in text and text.endswith("## What a profile showed\n\nnotes\n")
  assert json.loads(page.with_suffix(".json").read_text()) == {"rows": [2]}
  assert md.command_line([str(REPO / "bench" / "x.py"), "--a", "1"]) == "python bench/x.py --a 1"


def test_summary_sets_each_figure_against_its_target(bench, tmp_path):
  (tmp_path / "RESULTS_generate.json").write_text(json.dumps(dict(rows=[
      dict(prompt=2048, prefill_ratio=1.1, decode_ratio=1.3), dict(prompt=8192, prefill_ratio=0.8, decode_ratio=1.1)])))
  (tmp_path / "RESULTS_memory.json").write_text(json.dumps(dict(rows=[
      dict(method="vanilla", context=32768, peak_rss=110, floor=100),
      dict(method="chunkllm", context=32768, peak_rss=150, floor=100)])))
  (tmp_path / "RESULTS_train.json").write_text(json.dumps(dict(seq_len=2048, teacher_over_forward=1.05,
                                                               cached_step_over_forward=0.01)))
  figs = {(f.area, f.what): f for f in bench["summary"].figures(tmp_path)}
  assert figs[("dense prefill", "tok/s vs transformers, 2K prompt")].met is True
  assert figs[("dense prefill", "tok/s vs transformers, 8K prompt")].met is False
  assert figs[("dense prefill", "tok/s vs transformers, 16K prompt")].value is None  # not measured: no verdict
  assert figs[("peak memory", "generate: peak RSS / floor, 32K")].met is True  # a ceiling: 1.10 <= 1.2
  assert figs[("peak memory", "chunk_generate: peak RSS / floor, 32K")].met is False
  assert figs[("training", "teacher rows vs frozen forward, 2048 tokens")].met is True
  assert figs[("decode vs floor", "dense, 8K context")].value is None
  page = bench["summary"].write(tmp_path).read_text()
  assert "| dense prefill | tok/s vs transformers, 8K prompt | 0.80x | >= 1.00x | **no** |" in page
  assert (tmp_path / "summary.png").stat().st_size > 0


def test_regenerate_quick_replaces_the_full_runs_options(bench, tmp_path):
  regen = bench["regenerate"]
  for step in regen.STEPS:
    full, quick = regen.argv_for(step, tmp_path, False), regen.argv_for(step, tmp_path, True)
    script = step.command[0]
    assert script == "-m" or (REPO / script).is_file(), script
    assert any(str(tmp_path / f"RESULTS_{step.name}") in a for a in full + quick)  # always into --out
    for opt in (a for a in step.quick if a.startswith("--")):
      assert quick.count(opt) == 1
  with pytest.raises(SystemExit):
    regen.main(["--quick"])  # never over bench/'s own pages


def test_regenerate_summary_from_the_pages_in_the_repository(tmp_path):
  for f in (REPO / "bench").glob("RESULTS_*.json"):
    shutil.copy(f, tmp_path / f.name)
  proc = subprocess.run([sys.executable, str(REPO / "bench" / "regenerate.py"), "--summary", "--out", str(tmp_path)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| dense prefill | tok/s vs transformers, 2K prompt |" in (tmp_path / "RESULTS_summary.md").read_text()


def test_bench_memory_replaces_the_cells_it_measures_and_keeps_the_others(bench_script, tmp_path):
  memory = bench_script("bench_memory")
  path = tmp_path / "RESULTS_memory.json"
  old = [dict(method="vanilla", context=8192, peak_rss=2, floor=1, code="a"),
         dict(method="chunkllm", context=8192, peak_rss=3, floor=1, code="a"),
         dict(method="vanilla", context=32768, peak_rss=9, floor=1)]  # from before rows named their code
  path.write_text(json.dumps(dict(rows=old)))
  rows = memory._earlier_rows(path)
  assert [(r["method"], r["context"]) for r in rows] == [("vanilla", 8192), ("chunkllm", 8192)]
  memory._put(rows, dict(method="vanilla", context=32768, peak_rss=4, floor=1, code="b"))
  memory._put(rows, dict(method="vanilla", context=8192, peak_rss=1.5, floor=1, code="b"))
  assert [(r["method"], r["context"], r["code"]) for r in rows] == [
      ("vanilla", 8192, "b"), ("chunkllm", 8192, "a"), ("vanilla", 32768, "b")]
  assert memory._earlier_rows(tmp_path / "missing.json") == []
  memory._put(rows, dict(method="vanilla", context=8192, peak_rss=1.2, floor=1, code="c", compile_cache="warm"))
  memory._put(rows, dict(method="vanilla", context=8192, peak_rss=1.4, floor=1, code="c", compile_cache="cold"))
  assert [(r["method"], r["context"], r.get("compile_cache"), r["code"]) for r in rows] == [
      ("vanilla", 8192, "cold", "c"), ("vanilla", 8192, "warm", "c"), ("chunkllm", 8192, None, "a"),
      ("vanilla", 32768, None, "b")]  # a warm cell beside the cold one; rows from before the setting are cold
