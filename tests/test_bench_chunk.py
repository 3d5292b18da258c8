"""bench/bench_chunk.py: bench/RESULTS_chunk.md is the shared rule's page (regenerate.py's `chunk` step, read by
summary.py under that rule's name), so a run that would set another rule's decode there is refused before it
measures; the shared rule, or another page, runs."""

import pytest


class _Measuring(Exception):
  """Raised where the benchmark would start measuring (the machine's bandwidth comes first)."""


def _stop():
  raise _Measuring


@pytest.mark.parametrize("flags, runs", [([], False), (["--selection", "kv_head"], False),
                                         (["--selection", "shared"], True), (["--out", "{tmp}/mine.md"], True)])
def test_the_shared_rules_page_takes_the_shared_rule_alone(bench_script, capsys, monkeypatch, tmp_path, flags, runs):
  bench = bench_script("bench_chunk")
  monkeypatch.setattr(bench, "machine_rates", _stop)
  page = bench.HERE / "RESULTS_chunk.md"
  before = page.read_text()
  argv = ["--lengths", "64", "--rounds", "1", "--prefill-lengths"] + [f.format(tmp=tmp_path) for f in flags]
  with pytest.raises(_Measuring if runs else SystemExit) as e:
    bench.main(argv)
  if not runs:
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "RESULTS_chunk.md is the shared rule's page" in err and "add --selection shared" in err, err
  assert page.read_text() == before


def test_with_budget_chunkllm_reads_a_kv_budget(bench_script, tmp_path):
  """--budget: ChunkLLM's step runs at `kv_budget` = each ratio, as users set it (not top_k chunks), and
  reads what the budget allows; the page says which read it timed."""
  bench = bench_script("bench_chunk")
  rows = bench.bench_decode(bench.make_params(), 512, [0.5], rounds=1, budget=True)
  (row,) = rows
  assert row["kv_budget"] == 0.5 and row["top_k"] is None
  assert abs(row["retention"] - 0.5) < 0.02, row["retention"]
  lines = bench.write_outputs(tmp_path / "page.md", "python bench/bench_chunk.py --budget", rows, [], [])
  assert any("a KV budget of the target retention (`kv_budget`" in line for line in lines)
  assert any(line.startswith("| 512 | - |") for line in lines)


def test_render_keeps_the_machine_and_command_it_was_measured_with(bench_script, tmp_path):
  """--render rewrites a page from its .json: the machine and the command are the measured run's, not the host's
  that renders it, and the verdict reads the prefill at the target's context."""
  import json
  import shutil

  bench = bench_script("bench_chunk")
  page = tmp_path / "RESULTS_x.md"
  shutil.copy(bench.HERE / "RESULTS_chunk.json", page.with_suffix(".json"))
  data = json.loads(page.with_suffix(".json").read_text())
  data["device"] = "a machine of long ago"
  page.with_suffix(".json").write_text(json.dumps(data))
  bench.main(["--render", "--out", str(page)])
  text = page.read_text()
  assert "Machine: a machine of long ago." in text and f"Command: `{data['command']}`" in text
  assert json.loads(page.with_suffix(".json").read_text())["device"] == "a machine of long ago"
  p16 = next(r for r in data["prefill"] if r["context"] == bench.PREFILL_TARGET_CONTEXT)
  assert f"- Prefill: {p16['prefill_speedup']:.2f}x (target {bench.TARGET_PREFILL:g}x)" in text
