"""`python -m train.run` end to end on the tiny preset: resume after SIGKILL, export, bad checkpoints."""

import dataclasses
import json
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import adapter_io
from tests import train_run_fixtures as fx
from train import evaluate, metrics, run

STEPS = ["--steps", "24", "--checkpoint_every", "4", "--eval_every", "8", "--max_to_keep", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run (it also exports its adapters) and, beside it, one killed by SIGKILL
  right after its first checkpoint (each builds its own copy of the data)."""
  tmp = tmp_path_factory.mktemp("train_run")
  corpus = fx.write_corpus(tmp / "corpus.txt")
  ref = fx.start(fx.command(tmp / "ref", corpus, tmp / "data", *STEPS, "--export", str(tmp / "export")))
  killed = fx.start(fx.command(tmp / "killed", corpus, tmp / "data_killed", *STEPS))
  fx.wait_for_checkpoint(killed, tmp / "killed")
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  out = ref.communicate(timeout=600)[0]
  assert ref.returncode == 0, out[-3000:]
  assert killed.returncode == -signal.SIGKILL
  return tmp, corpus, tmp / "ref"


@pytest.mark.slow  # three short runs in subprocesses
def test_killed_run_resumes_with_the_same_losses(reference):
  tmp, corpus, ref = reference
  workdir = tmp / "killed"
  assert max(fx.logged(workdir)) < 24
  cmd = fx.command(workdir, corpus, tmp / "data_killed", *STEPS)
  r = fx.run(cmd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr
  want, got = fx.logged(ref), fx.logged(workdir)
  assert sorted(got) == list(range(1, 25))
  assert got == want  # bitwise: floats are logged as exact reprs
  rows = [(r["step"], r["split"]) for r in metrics.read_jsonl(workdir / "metrics.jsonl")]
  assert len(rows) == len(set(rows))  # the steps the killed run logged past its checkpoint are not there twice
  assert sorted(fx.logged(ref, "eval")) == [8, 16, 24]
  assert fx.logged(workdir, "eval") == fx.logged(ref, "eval")
  assert want[24]["loss"] < want[1]["loss"]


@pytest.mark.slow  # two short runs in a subprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_checkpoints_its_last_step(reference, tmp_path, sig):
  """SIGTERM or Ctrl-C between checkpoints: the step under way finishes and is checkpointed, so the
  resumed run repeats no step, and it ends with the uninterrupted run's losses."""
  tmp, corpus, ref = reference
  workdir = tmp_path / "stopped"
  cmd = fx.command(workdir, corpus, tmp / "data", *STEPS, "--checkpoint_every", "100")  # none due after step 1
  proc = fx.start(cmd)
  while not (workdir / "metrics.jsonl").exists() or max(fx.logged(workdir), default=0) < 5:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(sig)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + sig, out[-3000:]  # as a shell reports the signal: 143 for SIGTERM, 130 for Ctrl-C
  last = max(fx.logged(workdir))
  assert f"stopped after step {last}, which is checkpointed" in out
  assert fx.finished_checkpoints(workdir)[-1] == last
  r = fx.run(cmd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints' / str(last)}" in r.stderr
  assert fx.logged(workdir) == fx.logged(ref)


def test_export_round_trips_and_checks_the_backbone(reference):
  tmp, _, _ = reference
  meta = adapter_io.read_export_config(tmp / "export")
  assert meta["backbone"] == "random-tiny" and meta["trained_steps"] == 24
  model_config = adapter_io.config_from_json(meta["model_config"])
  adapters = cj.load_adapters(str(tmp / "export"), expected_config=model_config)
  # Saving what was loaded and loading it again gives the same bits.
  cj.save_adapters(adapters, tmp / "export2", model_config=model_config, backbone="random-tiny")
  again = cj.load_adapters(str(tmp / "export2"), model_config)
  assert again.config == adapters.config and again.config.score_queries == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(adapters.params), jax.device_get(again.params))
  # The adapters' query window is stored with them, so inference scores as training did.
  windowed = adapters.replace(config=dataclasses.replace(adapters.config, score_queries=4))
  cj.save_adapters(windowed, tmp / "export_window", model_config=model_config, backbone="random-tiny")
  assert cj.load_adapters(str(tmp / "export_window"), model_config).config.score_queries == 4
  # bfloat16 storage (the shipped adapters): half the bytes, loaded back as float32.
  cj.save_adapters(adapters, tmp / "export_bf16", model_config=model_config, backbone="random-tiny",
                   dtype="bfloat16")
  half = cj.load_adapters(str(tmp / "export_bf16"), model_config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16).astype(np.float32), b),
               adapters.params, half.params)
  with pytest.raises(FileExistsError):
    cj.save_adapters(adapters, tmp / "export2", model_config=model_config, backbone="random-tiny")
  with pytest.raises(adapter_io.AdapterLoadError, match="trained for backbone 'random-tiny'.*\n.*n_layers"):
    cj.load_adapters(str(tmp / "export"), model_config.replace(n_layers=3))
  params = cj.init_backbone(jax.random.key(0), model_config)
  assert cj.with_adapters(params, adapters).adapters is adapters


def test_evaluate_reproduces_the_runs_last_eval(reference, capsys):
  """train.evaluate on the export scores the held-out batches as the run's own last eval did."""
  tmp, corpus, ref = reference
  last = fx.logged(ref, "eval")[24]
  argv = ["--preset", "tiny", "--data", corpus, "--data_dir", str(tmp / "data"), "--adapters", str(tmp / "export"),
          "--compare_n_local", "1", "0", "--out", str(tmp / "evaluate.json")]
  assert evaluate.main(argv) == 0
  rows = json.loads((tmp / "evaluate.json").read_text())
  assert [r["n_local"] for r in rows] == [1, 0]
  for k in evaluate.COLUMNS:
    if k == "teacher_far_mass":  # a metric of the token_mean target only: null in strict JSON
      assert rows[0][k] is None and k not in last
    else:
      assert rows[0][k] == pytest.approx(last[k], rel=1e-4, abs=1e-6), k
  table = capsys.readouterr().out
  assert "| " + str(tmp / "export") + " | 1 |" in table and "teacher_far_mass" not in table  # no row has it
  # under the paper's target: with no local chunk left out, all of the teacher's mass is on candidates
  assert evaluate.main(argv + ["--teacher", "token_mean"]) == 0
  rows = json.loads((tmp / "evaluate.json").read_text())
  assert rows[1]["teacher_far_mass"] == pytest.approx(1.0) and rows[0]["teacher_far_mass"] < 0.99
  assert "teacher_far_mass" in capsys.readouterr().out


def _copy_run(reference, name):
  tmp, corpus, ref = reference
  workdir = tmp / name
  shutil.copytree(ref / "checkpoints", workdir / "checkpoints")
  return tmp, corpus, workdir


def _main(capsys, argv) -> str:
  """Runs train.run in this process (it fails before compiling anything); its last stderr line."""
  capsys.readouterr()
  assert run.main([a for a in argv if a != "--cpu"] + ["--mesh_data", "1"]) == 2
  return capsys.readouterr().err.strip().splitlines()[-1]


def _snapshot(d):
  return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_an_error_and_is_kept(reference, capsys):
  tmp, corpus, workdir = _copy_run(reference, "corrupt")
  latest = max(fx.finished_checkpoints(workdir))
  victim = max((p for p in (workdir / "checkpoints" / str(latest) / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  before = _snapshot(workdir / "checkpoints")
  err = _main(capsys, fx.command(workdir, corpus, tmp / "data", *STEPS, "--steps", "40")[3:])
  assert err.startswith(f"error: checkpoint {workdir / 'checkpoints' / str(latest)} cannot be read")
  assert _snapshot(workdir / "checkpoints") == before


def test_checkpoint_of_another_model_is_refused(reference, capsys):
  tmp, corpus, workdir = _copy_run(reference, "other_model")
  before = _snapshot(workdir / "checkpoints")
  err = _main(capsys, fx.command(workdir, corpus, tmp / "data", *STEPS, "--d_c", "4")[3:])
  assert err.startswith("error: checkpoint") and "written for another model or adapter config" in err
  assert _snapshot(workdir / "checkpoints") == before


def test_corrupt_export_is_an_error_and_is_kept(reference):
  tmp, _, _ = reference
  d = tmp / "export_corrupt"
  shutil.copytree(tmp / "export", d)
  victim = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:10])
  with pytest.raises(adapter_io.AdapterLoadError, match="cannot be read"):
    cj.load_adapters(str(d))
  assert victim.stat().st_size == 10
  (d / "config.json").write_text("{not json")
  with pytest.raises(adapter_io.AdapterLoadError, match="config.json"):
    cj.load_adapters(str(d))
  with pytest.raises(FileNotFoundError, match="no adapter export"):
    cj.load_adapters(str(tmp / "nowhere"))
