"""bench/bench_kernels.py --smoke: at tiny shapes, in interpret mode on the CPU, every kernel builds, runs and
passes its correctness check, every timing section produces numbers, and the report, the JSON and the plot are
written. The script is meant for a lent GPU or TPU that few sessions get: this keeps it from rotting meanwhile."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_kernels(bench_script):
  return bench_script("bench_kernels")


def test_smoke_run_checks_pass_and_writes_outputs(bench_kernels, tmp_path):
  doc = bench_kernels.main(["--smoke", "--out", str(tmp_path)])
  for name in ("RESULTS.md", "RESULTS.json", "kernels_speed.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert json.loads((tmp_path / "RESULTS.json").read_text()) == doc
  assert doc["smoke"] and doc["interpret"] and doc["family"] == "gpu"

  cases = doc["cases"]
  failed = {k: c.get("error") for k, c in cases.items() if c["status"] != "ok"}
  assert not failed, failed
  assert not doc["notes"], doc["notes"]
  checks = [c for k, c in cases.items() if k.startswith("check/")]
  assert {(c["kernel"], c["dtype"]) for c in checks} == {
      (k, d) for k in ("decode", "gather", "prefill", "distill") for d in ("float32", "bfloat16")}
  for c in checks:
    assert c["verdict"] == "pass" and 0 <= c["err"] <= c["bound"], c

  # every timed section measured something: bandwidth, dense and chunk decode, gather, distill, prefill
  assert cases["bandwidth"]["copy_bandwidth"] > 0
  for r in ("1", "0.25"):
    dec = cases[f"decode/256/{r}"]
    assert dec["inplace"]["2"]["time_s"] > 0 and dec["compacted"]["2"]["time_s"] > 0
    assert dec["gather"]["time_s"] > 0
    assert dec["per_head"]["2"]["time_s"] > 0 and dec["per_head_gathered"]["time_s"] > 0  # the default rule
  assert cases["decode/256/1"]["retention"] == 1.0 > cases["decode/256/0.25"]["retention"]
  assert all("time_s" in m for m in cases["decode_dense/256"]["baselines"].values())
  assert cases["distill/256"]["kernel"]["time_s"] > 0 and cases["distill/256"]["dense"]["time_s"] > 0
  assert cases["prefill_dense/256"]["dense"]["time_s"] > 0
  assert cases["prefill/all/256/1"]["blocks_read"] == 1.0
  assert cases["prefill/consistent/256/0.25"]["retention"] < 1.0

  md = (tmp_path / "RESULTS.md").read_text()
  assert "SMOKE RUN" in md and "meaningless" in md
  assert md.count("(smoke stand-in") == 5  # the five targets, judged and labelled
  assert "per-head decode speedup" in md and "| per-head kernel |" in md
  from kernel_programs import KEEP  # bench/ is on the path once the script is loaded

  assert KEEP in md

  # the report can be rebuilt from the JSON alone
  (tmp_path / "kernels_speed.png").unlink()
  bench_kernels.main(["--render", "--out", str(tmp_path)])
  assert (tmp_path / "kernels_speed.png").exists()
  assert (tmp_path / "RESULTS.md").read_text() == md

  # --resume keeps finished cases and records the one a killed run died in (no case runs again here)
  doc["cases"]["prefill/consistent/256/0.25"]["status"] = "running"
  (tmp_path / "killed.json").write_text(json.dumps(doc))
  again = bench_kernels.main(["--smoke", "--out", str(tmp_path / "resumed"), "--resume",
                              str(tmp_path / "killed.json")])
  assert again["cases"]["decode/256/0.25"] == cases["decode/256/0.25"]
  killed = again["cases"]["prefill/consistent/256/0.25"]
  assert killed["status"] == "error" and "killed" in killed["error"]
  assert any("killed" in n for n in again["notes"])
  assert "killed" in (tmp_path / "resumed" / "RESULTS.md").read_text()


def test_smoke_never_writes_over_the_real_results(bench_kernels):
  with pytest.raises(SystemExit):
    bench_kernels.main(["--smoke", "--out", str(ROOT / "bench")])


def test_device_script_runs_every_part(tmp_path):
  """bench/device_run.sh, the one prepared run for a lent accelerator, at tiny shapes on the CPU (BENCH_SMOKE=1):
  every part writes its page; an unknown part is a failure, not a silent skip; without BENCH_SMOKE a CPU is
  refused."""
  import os
  import subprocess
  import sys

  env = dict(os.environ, OUT=str(tmp_path), BENCH_SMOKE="1",
             PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))
  done = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh")], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for name in ("RESULTS.md", "RESULTS.json", "kernels_speed.png", "RESULTS_chunk_device.md",
               "RESULTS_chunk_device.json", "RESULTS_chunk_device_kernel.md", "RESULTS_chunk_device_kernel.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert "read by the per-head decode kernel" in (tmp_path / "RESULTS_chunk_device_kernel.md").read_text()
  cases = json.loads((tmp_path / "RESULTS.json").read_text())["cases"]
  assert any(k.startswith("prefill/") for k in cases) and any(k.startswith("decode/") for k in cases)
  for page in ("RESULTS_chunk_device.md", "RESULTS_chunk_device_kernel.md"):  # the budget as users set it
    assert "| 1024 |" in (tmp_path / page).read_text() and "a KV budget" in (tmp_path / page).read_text(), page
  bad = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh")], env=dict(env, PARTS="nonsense"),
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown part nonsense" in bad.stderr
  # without BENCH_SMOKE on a CPU it refuses at once (its full shapes would run for hours here)
  cpu = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh")], capture_output=True, text=True,
                       env={k: v for k, v in dict(env, JAX_PLATFORMS="cpu").items() if k != "BENCH_SMOKE"})
  assert cpu.returncode == 2 and "no GPU or TPU here" in cpu.stderr, cpu.stderr
