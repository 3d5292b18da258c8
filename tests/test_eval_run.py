"""python -m eval.run: resumable results (an interrupted run recomputes nothing it wrote and loses
nothing; a malformed line is reported by number and skipped), the whole run with the model calls
stubbed out, --out refused where it holds files that eval.run did not write, and one --quick run on
the real smollm2-135m."""

import json

import numpy as np
import pytest

from eval import methods as M
from eval import niah
from eval import run as eval_run
from eval.results_io import ResultsFile, is_run_config
from tests.eval_fixtures import N_RESULTS, Stubs, run_stubbed
from tests.out_folder_fixtures import assert_refused_untouched, users_folder


# ----------------------------------------------------------------------------------------------
# The results file


def rec(i, **kw):
  return {"task": "t", "method": "vanilla", "retention": "full", "example": f"e{i}", "score": i, **kw}


def test_results_append_reload_and_refuse_duplicates(tmp_path):
  path = tmp_path / "r.jsonl"
  f = ResultsFile(path)
  for i in range(3):
    f.append(rec(i))
  again = ResultsFile(path)
  assert [r["score"] for r in again.records] == [0, 1, 2] and not again.bad_lines
  assert ("t", "vanilla", "full", "e1") in again and ("t", "vanilla", "full", "e9") not in again
  with pytest.raises(ValueError, match="already in"):
    again.append(rec(1))


def test_malformed_lines_are_reported_by_number_and_skipped(tmp_path):
  path = tmp_path / "results.jsonl"
  lines = [json.dumps(rec(0)), '{"task": "t", "meth', json.dumps([1, 2]), "", json.dumps({"task": "t"}),
           json.dumps(rec(4))]
  path.write_text("\n".join(lines) + "\n" + json.dumps(rec(5))[:20])  # the last line cut by a kill
  with pytest.warns(UserWarning) as caught:
    f = ResultsFile(path)
  assert [b.line for b in f.bad_lines] == [2, 3, 5, 7]
  assert all(f"results.jsonl:{n}:" in str(w.message) for n, w in zip([2, 3, 5, 7], caught))
  assert "bad JSON" in f.bad_lines[0].reason and "missing key fields" in f.bad_lines[2].reason
  assert [r["score"] for r in f.records] == [0, 4]
  f.append(rec(5))  # after a cut line: on a line of its own, nothing else touched
  with pytest.warns(UserWarning):
    g = ResultsFile(path)
  assert [r["score"] for r in g.records] == [0, 4, 5] and [b.line for b in g.bad_lines] == [2, 3, 5, 7]
  assert path.read_text().splitlines()[:6] == lines


# ----------------------------------------------------------------------------------------------
# The whole run, with the model calls stubbed out


def test_interrupted_run_resumes_without_recomputing_or_losing(monkeypatch, tmp_path, capsys):
  out = tmp_path / "ev"
  with pytest.raises(KeyboardInterrupt):
    run_stubbed(monkeypatch, out, Stubs(stop_after=23))
  assert len((out / "results.jsonl").read_text().splitlines()) == 23

  rest = Stubs()
  run_stubbed(monkeypatch, out, rest)
  assert len(rest.computed) == N_RESULTS - 23
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == len({tuple(json.loads(l)[k] for k in ("task", "method", "retention", "example"))
                            for l in lines}) == N_RESULTS

  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["tasks"]) == {"niah_single", "niah_multivalue", "mini_kv_qa", "short_text", "perplexity"}
  short = {r["method"]: r for r in summary["tasks"]["short_text"]}
  assert short["chunkllm"]["identical_to_vanilla"] == 1.0 and short["chunkllm"]["retention"] == "default"
  avg = {(r["method"], r["retention"]): r for r in summary["long_context"]}
  assert avg[("chunkllm", "0.5")]["pct_of_vanilla"] == pytest.approx(100.0)
  assert avg[("chunkllm", "0.25")]["kv_retention"] == pytest.approx(0.25)
  ppl = {(r["method"], r["retention"]): r for r in summary["tasks"]["perplexity"]}
  assert ppl[("sepllm", "0.5")]["ppl_change_pct"] == pytest.approx(100 * (np.exp(0.2) - 1))
  md = (out / "results.md").read_text()
  assert "ChunkLLM (target 0.5): 100.00% of vanilla's long-context average at 50.00% KV" in md
  for name in ["niah_vanilla.png", "niah_chunkllm.png", "niah_sepllm.png", "perplexity.png"]:
    assert (out / name).stat().st_size > 1000

  # A damaged line: reported with its number, its example alone runs again, nothing else is lost.
  lines[4] = lines[4][:30]
  (out / "results.jsonl").write_text("\n".join(lines) + "\n")
  again = Stubs()
  capsys.readouterr()
  with pytest.warns(UserWarning, match="results.jsonl:5:"):
    run_stubbed(monkeypatch, out, again)
  assert len(again.computed) == 1
  assert "results.jsonl:5: malformed result line skipped" in capsys.readouterr().err
  with pytest.warns(UserWarning, match="results.jsonl:5:"):  # still there: the file is only appended to
    assert len(ResultsFile(out / "results.jsonl").records) == N_RESULTS
  assert "lines 5" in (out / "results.md").read_text()

  with pytest.raises(eval_run.UsageError, match="other settings"):
    run_stubbed(monkeypatch, out, Stubs(), extra=["--window", "128"])

  # A folder from before --vote, --recent_share and --boundary_tokens existed holds results of what they
  # were then (the sum vote, no recent share, no boundary tokens): it resumes as such, and refuses today's
  # defaults of the last two.
  cfg = json.loads((out / "run_config.json").read_text())
  del cfg["vote"], cfg["recent_share"], cfg["boundary_tokens"]
  (out / "run_config.json").write_text(json.dumps(cfg))
  old = Stubs()
  with pytest.warns(UserWarning, match="results.jsonl:5:"):
    run_stubbed(monkeypatch, out, old, extra=["--recent_share", "0", "--no-boundary_tokens"])
  assert not old.computed
  with pytest.raises(eval_run.UsageError, match="other settings.*vote"):
    run_stubbed(monkeypatch, out, Stubs(), extra=["--vote", "max", "--recent_share", "0", "--no-boundary_tokens"])
  with pytest.raises(eval_run.UsageError, match="other settings.*boundary_tokens.*recent_share"):
    run_stubbed(monkeypatch, out, Stubs())


# ----------------------------------------------------------------------------------------------
# --out: a new or empty folder, or eval.run's own; never a folder of the user's files

USERS_FOLDERS = {  # what the user's folder holds (name -> bytes)
    "report_files": {"results.md": b"# my notes\n", "summary.json": b'{"mine": true}\n'},
    "own_run_config": {"run_config.json": b'{"lr": 0.1}\n'},
    "run_config_list": {"run_config.json": b"[1, 2]\n", "results.jsonl": b""},
    "damaged_run_config": {"run_config.json": b'{"model": ', "results.md": b"mine\n"},
    "other_files": {"notes.txt": b"mine\n"},
}


@pytest.mark.parametrize("held", list(USERS_FOLDERS))
def test_a_folder_eval_run_did_not_make_is_refused_untouched(tmp_path, monkeypatch, capsys, held):
  from tests.eval_fixtures import FLAGS

  out = users_folder(tmp_path / "ev", USERS_FOLDERS[held])
  assert_refused_untouched(lambda: eval_run.cli([*FLAGS, "--out", str(out)]), out, USERS_FOLDERS[held], "eval.run",
                           monkeypatch, capsys)


@pytest.mark.parametrize("folder", ["new", "empty", "own", "own_with_other_files"])
def test_a_new_empty_or_own_folder_is_written_and_resumed(tmp_path, monkeypatch, folder):
  out = tmp_path / "ev"
  if folder != "new":
    out.mkdir()
  if folder.startswith("own"):
    run_stubbed(monkeypatch, out, Stubs())
    (out / "results.md").write_text("stale\n")  # the report is the tool's own: rewritten
  if folder == "own_with_other_files":
    (out / "notes.txt").write_text("mine\n")  # next to the tool's files: kept, untouched
  stubs = Stubs()
  run_stubbed(monkeypatch, out, stubs)
  assert len(stubs.computed) == (0 if folder.startswith("own") else N_RESULTS)  # the own folder resumes
  assert len(ResultsFile(out / "results.jsonl").records) == N_RESULTS
  assert (out / "results.md").read_text().startswith("#")
  assert folder != "own_with_other_files" or (out / "notes.txt").read_text() == "mine\n"


def test_a_narrower_rerun_reports_its_own_results_and_names_the_rest(tmp_path, monkeypatch, capsys):
  """A rerun into the same folder with fewer methods reports those (the folder's results.jsonl keeps the rest, which
  eval.report reports); the plots of the methods it left out are removed, not left beside tables without them."""
  out = tmp_path / "ev"
  run_stubbed(monkeypatch, out, Stubs())
  assert (out / "niah_sepllm.png").exists() and (out / "notes.png").write_bytes(b"mine") == 4
  capsys.readouterr()
  stubs = Stubs()
  run_stubbed(monkeypatch, out, stubs, extra=["--methods", "vanilla", "chunkllm"])
  assert not stubs.computed and len(ResultsFile(out / "results.jsonl").records) == N_RESULTS
  assert not (out / "niah_sepllm.png").exists() and (out / "niah_chunkllm.png").exists()
  assert (out / "notes.png").read_bytes() == b"mine"  # not a name the report writes
  assert "sepllm" not in (out / "results.md").read_text()
  n_sepllm = sum(r["method"] == "sepllm" for r in ResultsFile(out / "results.jsonl").records)
  assert f"holds {n_sepllm} more (other methods" in capsys.readouterr().err


def test_vanilla_rows_come_from_a_folder_of_the_same_examples(tmp_path, monkeypatch):
  """--vanilla_from: a sweep of a sparse method's settings copies vanilla's rows (marked with their folder)
  instead of running vanilla again; the report reads them as this run's."""
  first = tmp_path / "first"
  run_stubbed(monkeypatch, first, Stubs())
  stubs, out = Stubs(), tmp_path / "sweep"
  run_stubbed(monkeypatch, out, stubs, extra=["--methods", "chunkllm", "--recent_share", "0.5",
                                              "--vanilla_from", str(first)])
  assert stubs.computed and not [c for c in stubs.computed if c[0] == "vanilla"]
  theirs = [r for r in ResultsFile(first / "results.jsonl").records if r["method"] == "vanilla"]
  ours = [r for r in ResultsFile(out / "results.jsonl").records if r["method"] == "vanilla"]
  assert [dict(r, copied_from="first") for r in theirs] == ours
  summary = json.loads((out / "summary.json").read_text())
  avg = {(r["method"], r["retention"]): r for r in summary["long_context"]}
  assert avg[("chunkllm", "0.5")]["pct_of_vanilla"] == pytest.approx(100.0)
  again = Stubs()  # resumed: nothing copied twice, nothing run
  run_stubbed(monkeypatch, out, again, extra=["--methods", "chunkllm", "--recent_share", "0.5",
                                              "--vanilla_from", str(first)])
  assert not again.computed and len(ResultsFile(out / "results.jsonl").records) == len(ours) + len(stubs.computed)


@pytest.mark.parametrize("source, flags, says", [
    ("first", ["--ppl_prefix", "16"], "ppl_prefix"),  # vanilla's own rows differ: refused
    ("first", ["--seed", "1"], "seed"),
    ("plain", [], "not a folder of eval.run's"),
])
def test_vanilla_rows_from_other_examples_are_refused_before_anything_is_written(tmp_path, monkeypatch, source,
                                                                                 flags, says):
  first = tmp_path / "first"
  run_stubbed(monkeypatch, first, Stubs())
  (tmp_path / "plain").mkdir()
  out, stubs = tmp_path / "sweep", Stubs()
  with pytest.raises(eval_run.UsageError, match=says):  # `cli`: one error line, exit code 2
    run_stubbed(monkeypatch, out, stubs, extra=[*flags, "--vanilla_from", str(tmp_path / source)])
  assert not out.exists() and not stubs.computed


def test_every_result_folder_in_docs_is_recognised_as_eval_runs():
  """The mark of an eval.run folder (its run_config.json's first settings) is in every folder it ever wrote."""
  from pathlib import Path
  configs = sorted((Path(__file__).parents[1] / "docs").glob("**/run_config.json"))
  assert len(configs) > 10 and [c for c in configs if not is_run_config(c)] == []


@pytest.mark.real_model
def test_quick_run_on_the_real_model(smollm2, tmp_path):
  out = eval_run.main(["--quick", "--out", str(tmp_path / "q")], model=smollm2)
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["tasks"]) == {"niah_single", "short_text", "perplexity"}
  short = {r["method"]: r for r in summary["tasks"]["short_text"]}
  assert short["hybrid"]["identical_to_vanilla"] == 1.0  # short prompts fit the budget: nothing dropped
  for task, rows in summary["tasks"].items():
    if task != "short_text":
      (chunk,) = [r for r in rows if r["method"] == "hybrid"]
      # the budget is met unless the sinks, local and open chunks alone exceed it, as on the quick
      # perplexity text (two chunks); the expected KV says so
      assert chunk["kv_retention"] == pytest.approx(chunk["expected_retention"], abs=0.1)
  (niah_chunk,) = [r for r in summary["tasks"]["niah_single"] if r["method"] == "hybrid"]
  assert 0.3 < niah_chunk["kv_retention"] < 0.6
  assert (out / "niah_hybrid.png").exists() and (out / "perplexity.png").exists()


def test_the_filler_text_is_fingerprinted_by_contents_not_path(tmp_path):
  """A results folder moves with its repository: the same text elsewhere resumes, another text refuses."""
  a, b, moved = tmp_path / "a" / "brown.txt", tmp_path / "b" / "brown.txt", tmp_path / "c" / "brown.txt"
  for path, text in ((a, "One sentence.\n"), (b, "Another sentence.\n"), (moved, "One sentence.\n")):
    path.parent.mkdir()
    path.write_text(text)
  assert eval_run.text_id(a) == eval_run.text_id(moved) != eval_run.text_id(b)
  assert eval_run.text_id(a).startswith("brown.txt sha256:")
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  fp = {"model": "m", "brown": eval_run.text_id(a)}
  (out / "run_config.json").write_text(json.dumps(fp))
  eval_run._check_fingerprint(out, dict(fp, brown=eval_run.text_id(moved)))
  with pytest.raises(eval_run.UsageError, match="other settings.*brown"):
    eval_run._check_fingerprint(out, dict(fp, brown=eval_run.text_id(b)))
  # A folder written before: its run_config.json holds the path; the same file name passes.
  (out / "run_config.json").write_text(json.dumps(dict(fp, brown="/somewhere/else/brown.txt")))
  eval_run._check_fingerprint(out, fp)
  (out / "run_config.json").write_text(json.dumps(dict(fp, brown="/somewhere/else/other.txt")))
  with pytest.raises(eval_run.UsageError, match="other settings"):
    eval_run._check_fingerprint(out, fp)


@pytest.mark.parametrize("sketch, recorded, given, resumes", [
    (128, None, "qjl", True),  # a folder from before the setting: its sketch was read with QJL's estimate
    (128, None, "simhash", False),
    (128, "simhash", "simhash", True),
    (0, None, "simhash", True),  # no sketch: the estimate does not enter the result
    (0, None, "qjl", True),
])
def test_the_sketch_estimate_is_fingerprinted_only_with_a_sketch(tmp_path, sketch, recorded, given, resumes):
  """Folders of the per-head rule with low-rank keys, from before `sketch_estimate` was recorded and after."""
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  rule = {"model": "m", "selection": "kv_head", "score_rank": 16, "score_estimate": "lowrank", "score_sketch": sketch}
  old = {**rule, **({"sketch_estimate": recorded} if recorded else {})}
  (out / "run_config.json").write_text(json.dumps(old))
  new = eval_run._selection_key({**rule, "sketch_estimate": given, "head_refresh": 1})
  if resumes:
    eval_run._check_fingerprint(out, new)
  else:
    with pytest.raises(eval_run.UsageError, match="other settings.*sketch_estimate"):
      eval_run._check_fingerprint(out, new)


@pytest.mark.parametrize("suites, recorded, resumes", [
    (["niah"], None, False),  # a folder from before: its needles sat at the depth's share of the sentences
    (["niah"], "tokens", True),
    (["ppl"], None, True),  # no needles: the placement does not enter the result
])
def test_needle_placement_is_fingerprinted_for_niah_runs(tmp_path, suites, recorded, resumes):
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  args = eval_run._parser().parse_args(["--model", "m", "--suites", *suites, "--filler", "generated", "--out", str(out)])
  fp = eval_run._fingerprint(args)
  (out / "run_config.json").write_text(json.dumps({k: v for k, v in fp.items() if k != "needle_placement"}
                                                  | ({"needle_placement": recorded} if recorded else {})))
  if resumes:
    eval_run._check_fingerprint(out, fp)
  else:
    with pytest.raises(eval_run.UsageError, match="other settings.*needle_placement"):
      eval_run._check_fingerprint(out, fp)


def test_an_adapter_export_is_fingerprinted_by_contents_not_path(tmp_path):
  """Results of an export resume from another clone; retrained adapters in the same folder refuse."""
  def export(where, weights):
    (where / "params").mkdir(parents=True)
    (where / "config.json").write_text("{}")
    (where / "params" / "w").write_bytes(weights)
    return where

  a, moved = export(tmp_path / "a" / "export", b"1234"), export(tmp_path / "c" / "export", b"1234")
  other = export(tmp_path / "b" / "export", b"4321")
  assert eval_run.adapters_id(a) == eval_run.adapters_id(moved) != eval_run.adapters_id(other)
  assert eval_run.adapters_id(a).startswith("export sha256:")
  assert eval_run.adapters_id("smollm2-135m") == "smollm2-135m" and eval_run.adapters_id(None) is None
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  fp = {"model": "m", "adapters": eval_run.adapters_id(a)}
  (out / "run_config.json").write_text(json.dumps(fp))
  eval_run._check_fingerprint(out, dict(fp, adapters=eval_run.adapters_id(moved)))
  with pytest.raises(eval_run.UsageError, match="other settings.*adapters"):
    eval_run._check_fingerprint(out, dict(fp, adapters=eval_run.adapters_id(other)))
  # Folders written before hold the export's path: one that still exists must hold the same files,
  # one that is gone passes on the folder's name.
  (out / "run_config.json").write_text(json.dumps(dict(fp, adapters=str(moved))))
  eval_run._check_fingerprint(out, fp)
  (out / "run_config.json").write_text(json.dumps(dict(fp, adapters=str(other))))
  with pytest.raises(eval_run.UsageError, match="other settings"):
    eval_run._check_fingerprint(out, fp)
  (out / "run_config.json").write_text(json.dumps(dict(fp, adapters="/gone/export")))
  eval_run._check_fingerprint(out, fp)


@pytest.mark.parametrize("recorded, given, resumes", [
    # A folder of the shared rule recorded the per-head defaults of its day (SparQ, no sketch); run again
    # with --selection shared today (whose per-head defaults are low-rank keys and a sketch) it resumes.
    (dict(selection="shared", score_rank=None, score_estimate="sparq", score_sketch=0), dict(selection="shared"), True),
    (dict(score_rank=None, score_estimate="sparq", score_sketch=0), dict(selection="shared"), True),  # before --selection
    (dict(selection="shared", score_estimate="sparq", score_sketch=0), dict(), False),  # today's default is per head
    # The per-head rule's exact mass was "no score_rank" before it was named "exact".
    (dict(selection="kv_head", score_rank=None, score_estimate="sparq", score_sketch=0),
     dict(selection="kv_head", score_estimate="exact"), True),
    (dict(selection="kv_head", score_rank=16, score_estimate="lowrank", score_sketch=128, sketch_estimate="simhash"),
     dict(score_rank=16), True),  # the measured per-head settings are today's defaults, the rank given
])
def test_a_folders_selection_rule_is_compared_by_what_it_does(tmp_path, recorded, given, resumes):
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  (out / "run_config.json").write_text(json.dumps({"model": "m", **recorded}))
  args = eval_run._parser().parse_args(["--model", "m", *sum(([f"--{k}", str(v)] for k, v in given.items()), [])])
  new = eval_run._selection_key({"model": "m", **eval_run._selection_rule(args)})
  if resumes:
    eval_run._check_fingerprint(out, new)
  else:
    with pytest.raises(eval_run.UsageError, match="other settings.*selection"):
      eval_run._check_fingerprint(out, new)


@pytest.mark.parametrize("recorded, flags, resumes", [
    (dict(boundary_tokens=True), ["--boundary_share", "1"], True),  # from before --boundary_share: every last token
    (dict(boundary_tokens=True), ["--boundary_share", "0.25"], False),
    (dict(boundary_tokens=True, boundary_share=0.25), ["--boundary_share", "0.25"], True),
    (dict(boundary_tokens=False), ["--no-boundary_tokens", "--boundary_share", "0.25"], True),  # no last token read
    (dict(boundary_tokens=False, boundary_share=None), ["--no-boundary_tokens"], True),
])
def test_a_folders_last_token_share_counts_only_where_they_are_read(tmp_path, recorded, flags, resumes):
  out = tmp_path / "ev"
  out.mkdir()
  (out / "results.jsonl").write_text(json.dumps(rec(0)) + "\n")
  args = eval_run._parser().parse_args(["--model", "m", *flags])
  rule = eval_run._selection_rule(args)  # today's per-head rule, on both sides
  (out / "run_config.json").write_text(json.dumps({"model": "m", **rule, **recorded}))
  new = eval_run._selection_key({"model": "m", **rule, "boundary_tokens": args.boundary_tokens,
                                 "boundary_share": args.boundary_share})
  if resumes:
    eval_run._check_fingerprint(out, new)
  else:
    with pytest.raises(eval_run.UsageError, match="other settings.*boundary_share"):
      eval_run._check_fingerprint(out, new)


def test_eval_report_rewrites_only_folders_eval_run_made(tmp_path, capsys):
  """`python -m eval.report --out DIR` rewrites summary.json, results.md and the plots: only where DIR's
  run_config.json is eval.run's; a results.jsonl beside the user's own results.md is refused untouched."""
  from eval import report

  (tmp_path / "results.jsonl").write_text("")
  (tmp_path / "results.md").write_text("mine\n")
  assert report.main(["--out", str(tmp_path)]) == 2
  assert "no run_config.json of eval.run's" in capsys.readouterr().err
  assert (tmp_path / "results.md").read_text() == "mine\n" and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("selection, has_oracle", [("kv_head", False), ("shared", True)])
def test_all_methods_run_oracle_only_where_it_differs_from_hybrid(tmp_path, selection, has_oracle):
  args = eval_run._parser().parse_args(["--model", "m", "--filler", "generated", "--selection", selection,
                                        "--out", str(tmp_path / "ev")])
  methods = eval_run._resolve(args).methods
  assert ("oracle" in methods) == has_oracle and "hybrid" in methods and "vanilla" in methods


def test_oracle_needs_the_shared_rule(tmp_path):
  """oracle's scorer is the shared rule's: asked for by name with the per-head rule it is refused at the door (its
  config would be refused by ChunkConfig; `--methods all` leaves it out instead)."""
  args = eval_run._parser().parse_args(["--model", "m", "--filler", "generated", "--methods", "vanilla", "oracle",
                                        "--out", str(tmp_path / "ev")])
  with pytest.raises(eval_run.UsageError, match="add --selection shared"):
    eval_run._resolve(args)
  args = eval_run._parser().parse_args(["--model", "m", "--filler", "generated", "--methods", "vanilla", "oracle",
                                        "--selection", "shared", "--out", str(tmp_path / "ev")])
  assert eval_run._resolve(args).methods == ["vanilla", "oracle"]
  with pytest.raises(ValueError, match="scorer='attention' makes the shared rule's selections"):
    M.base_config("oracle", M.MethodSettings(selection="kv_head")).validate(64, 2)


@pytest.mark.parametrize("flags, refused", [
    (["--methods", "vanilla", "hybrid", "--vote", "max"], True),  # the per-head rule votes on nothing
    (["--methods", "hybrid", "--selection_layers", "7"], True),
    (["--methods", "hybrid", "--vote", "max", "--selection", "shared"], False),
    (["--methods", "hybrid", "chunkllm", "--vote", "max"], False),  # chunkllm's rule is the shared one
    (["--methods", "vanilla", "hybrid"], False),
])
def test_the_vote_flags_need_a_method_that_votes(tmp_path, flags, refused):
  args = eval_run._parser().parse_args(["--model", "m", "--filler", "generated", "--out", str(tmp_path / "ev"),
                                        *flags])
  if refused:
    with pytest.raises(eval_run.UsageError, match="none of --methods .* votes"):
      eval_run._resolve(args)
  else:
    eval_run._resolve(args)


def test_hybrid_takes_the_vote_under_the_shared_rule_alone():
  settings = dict(vote="max", selection_layers=(1,))
  per_head = M.base_config("hybrid", M.MethodSettings(**settings)).validate(64, 2)
  shared = M.base_config("hybrid", M.MethodSettings(selection="shared", **settings)).validate(64, 2)
  assert (per_head.vote, per_head.selection_layers) == ("sum", None)
  assert (shared.vote, shared.selection_layers) == ("max", (1,))
  assert M.base_config("chunkllm", M.MethodSettings(**settings)).validate(64, 2).vote == "max"


@pytest.mark.parametrize("filler", ["repeated", "python"])
def test_a_needles_only_filler_has_no_perplexity_to_measure(tmp_path, filler):
  args = eval_run._parser().parse_args(["--model", "m", "--filler", filler, "--suites", "niah", "ppl",
                                        "--out", str(tmp_path / "r")])
  with pytest.raises(eval_run.UsageError, match=f"--filler {filler} is a haystack for needles"):
    eval_run._resolve(args)
  args = eval_run._parser().parse_args(["--model", "m", "--filler", filler, "--suites", "niah",
                                        "--out", str(tmp_path / "r")])
  assert eval_run._resolve(args).filler == filler
  if filler == "python":  # the haystack changes with the packages' versions: a resumed run must share them
    assert eval_run._fingerprint(eval_run._resolve(args))["python_filler"] == niah.python_versions()


@pytest.mark.parametrize("brown_exists", [True, False])
def test_the_default_filler_is_named_when_the_text_is_missing(tmp_path, capsys, monkeypatch, brown_exists):
  """Outside the repository's layout the default Brown text is not there: the generated filler is used, and said."""
  brown = tmp_path / "brown.txt"
  if brown_exists:
    brown.write_text("One sentence.\n")
  monkeypatch.setattr(eval_run, "BROWN", brown)  # the default path
  args = eval_run._resolve(eval_run._parser().parse_args(["--out", str(tmp_path / "o")]))
  assert args.filler == ("brown" if brown_exists else "generated")
  assert ("no Brown text at --brown" in capsys.readouterr().err) != brown_exists


@pytest.mark.parametrize("content, says", [(None, "does not exist"), (b"", "the file is empty"),
                                           (b"caf\xe9", "not UTF-8 text")])
def test_a_brown_text_given_is_read_or_refused(tmp_path, content, says):
  """A --brown path the user gives is never replaced by generated text; a bad one is named before the model loads."""
  brown = tmp_path / "mine.txt"
  if content is not None:
    brown.write_bytes(content)
  with pytest.raises(eval_run.UsageError, match=f"--brown {brown}.*{says}"):
    eval_run._resolve(eval_run._parser().parse_args(["--brown", str(brown), "--out", str(tmp_path / "o")]))
