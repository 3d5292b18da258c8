"""train.run never destroys what a user owns: exports replace only exports, a workdir refuses another
run's settings, --max_to_keep 0 is refused, and a metrics.jsonl cut by a kill stays readable.

Each refusal is checked three ways: the error (type and message), exit code 2 with one `error:` line
from the CLI, and every file that was there before still there, byte for byte."""

import hashlib
import json
import math
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

import jax
import pytest

import chunkllm_jax as cj
from chunkllm_jax import adapter_io
from tests import train_run_fixtures as fx
from train import backbone, checkpoint, config, metrics, run


def _tree(d: Path) -> dict[str, str]:
  """Every file under `d` (or `d` itself) with the hash of its bytes; not a run's lock file, which holds its pid."""
  d = Path(d)
  files = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file() and p.name != ".train.lock")
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _refused(capsys, argv) -> str:
  """Runs train.run in this process, expecting a user error; returns its one stderr line."""
  capsys.readouterr()
  assert run.main(argv + ["--mesh_data", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.fixture
def user_files(tmp_path):
  """A corpus, and a folder of the user's own files beside it."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  mine = tmp_path / "mine"
  (mine / "sub").mkdir(parents=True)
  (mine / "notes.txt").write_text("keep me\n")
  (mine / "sub" / "config.json").write_text('{"format": "chunkllm-adapters/1"}\n')
  return tmp_path, corpus, mine


def _argv(tmp: Path, corpus: str, *extra: str) -> list[str]:
  return fx.command(tmp / "work", corpus, tmp / "data", *extra)[4:]  # without python -m train.run --cpu


def _cfg(argv):
  return config.from_args(run.parse_args(argv))


def _tiny_adapters():
  model_config = cj.ModelConfig(arch="llama", vocab_size=64, eos_ids=(0,), **backbone.TINY_SIZES)
  acfg = cj.AdapterConfig(d_c=8).resolve(model_config)
  return cj.init_adapters(jax.random.key(0), model_config, acfg), model_config


# 1. --export replaces only an earlier export.

WHY = {"mine": "holds files that are not an adapter export", "work": "is the workdir or a folder above it",
       "tmp": "is the workdir or a folder above it", "work/checkpoints": "would replace .*, which the run keeps",
       "data": "would replace .*, which the run keeps", "file": "it is not a folder",
       "mixed": "holds files that are not an adapter export \\(config.json, notes.txt, params\\)"}


@pytest.mark.parametrize("where", list(WHY))
def test_export_refuses_what_is_not_an_export(user_files, capsys, where):
  tmp, corpus, mine = user_files
  (tmp / "work" / "checkpoints" / "2").mkdir(parents=True)
  (tmp / "work" / "checkpoints" / "2" / "state").write_bytes(b"weights")
  (tmp / "work" / "metrics.jsonl").write_text('{"step": 1}\n')
  (tmp / "file").write_text("a file\n")
  (tmp / "mixed" / "params").mkdir(parents=True)  # an export, and the user's notes beside it
  (tmp / "mixed" / "config.json").write_text('{"format": "chunkllm-adapters/1"}\n')
  (tmp / "mixed" / "notes.txt").write_text("keep me\n")
  target = tmp if where == "tmp" else tmp / where
  before = _tree(tmp)
  err = _refused(capsys, _argv(tmp, corpus, "--export", str(target)))
  assert str(target) in err and "give" in err  # names the path, says how to fix it
  assert _tree(tmp) == before
  assert not (tmp / "data").exists()  # refused before the data was built
  with pytest.raises(adapter_io.ExportTargetError, match=WHY[where]):
    run.check_flags(_cfg(_argv(tmp, corpus, "--export", str(target))))


def test_save_adapters_refuses_a_folder_of_user_files(user_files):
  tmp, _, mine = user_files
  adapters, model_config = _tiny_adapters()
  before = _tree(tmp)
  with pytest.raises(adapter_io.ExportTargetError, match=f"cannot export to {mine}: .*notes.txt.*new or empty"):
    cj.save_adapters(adapters, mine, model_config=model_config, backbone="random-tiny", overwrite=True)
  assert _tree(tmp) == before and sorted(p.name for p in tmp.iterdir()) == ["corpus.txt", "mine"]


def test_export_replaces_an_earlier_export_with_normal_permissions(tmp_path):
  adapters, model_config = _tiny_adapters()
  old_umask = os.umask(0o022)
  (tmp_path / "export").mkdir()  # an empty folder made for it
  try:
    cj.save_adapters(adapters, tmp_path / "export", model_config=model_config, backbone="random-tiny")
    run.check_export_path(config.PRESETS["tiny"].replace(workdir=str(tmp_path / "work"),
                                                         export=str(tmp_path / "export")))
    cj.save_adapters(adapters, tmp_path / "export", model_config=model_config, backbone="random-tiny",
                     overwrite=True, extra=dict(trained_steps=2))
  finally:
    os.umask(old_umask)
  assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp or old sibling left
  assert adapter_io.read_export_config(tmp_path / "export")["trained_steps"] == 2
  modes = {stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "export", *(tmp_path / "export").rglob("*")]
           if p.is_dir()}
  assert modes == {0o755}
  modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").rglob("*") if p.is_file()}
  assert modes == {0o644}


def test_an_export_fills_a_users_empty_folder_in_place(tmp_path):
  """A folder the user made for the export stays theirs (the same folder, its permissions kept): it was
  replaced by a new one, and a private folder became world-readable."""
  adapters, model_config = _tiny_adapters()
  mine = tmp_path / "private"
  mine.mkdir(mode=0o700)
  before = mine.stat()
  cj.save_adapters(adapters, mine, model_config=model_config, backbone="random-tiny")
  after = mine.stat()
  assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o700)
  assert sorted(p.name for p in mine.iterdir()) == ["config.json", "params"] and [p.name for p in tmp_path.iterdir()] == ["private"]
  assert cj.load_adapters(mine, model_config).config == adapters.config
  with pytest.raises(ValueError, match=r"extra may not set \['format'\]: the export writes them itself"):
    cj.save_adapters(adapters, tmp_path / "other", model_config=model_config, backbone="random-tiny",
                     extra=dict(format="mine"))


@pytest.mark.parametrize("put", ["params/notes.txt", "params/d/notes.txt", "params/link"])
def test_an_export_with_a_users_file_in_its_params_is_not_replaced(tmp_path, put):
  """A file put inside an earlier export's `params/` is not Orbax's: replacing the export would lose it."""
  adapters, model_config = _tiny_adapters()
  export = tmp_path / "export"
  cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny")
  assert adapter_io._is_export(export)  # an export as written is replaced (the test above)
  (tmp_path / "notes.txt").write_text("keep me\n")
  if put.endswith("link"):
    (export / put).symlink_to(tmp_path / "notes.txt")
  else:
    (export / put).write_text("keep me\n")
  before = _tree(tmp_path)
  with pytest.raises(adapter_io.ExportTargetError, match=f"not an adapter export \\({put}\\)"):
    cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny", overwrite=True)
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("inside", ["params/new", "new", "params/d/new"])
def test_an_export_inside_an_earlier_export_is_refused(tmp_path, inside):
  """An export written into an earlier one's folder (or its params/) was accepted: the earlier export then held
  what no export writes, and every later export to it (a resumed run's) was refused."""
  adapters, model_config = _tiny_adapters()
  export = tmp_path / "export"
  cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny")
  before = _tree(tmp_path)
  with pytest.raises(adapter_io.ExportTargetError, match=f"lies inside the adapter export {export}"):
    cj.save_adapters(adapters, export / inside, model_config=model_config, backbone="random-tiny")
  with pytest.raises(adapter_io.ExportTargetError, match="lies inside the adapter export"):
    run.check_export_path(config.PRESETS["tiny"].replace(workdir=str(tmp_path / "work"), export=str(export / inside)))
  assert _tree(tmp_path) == before
  assert cj.load_adapters(export, model_config).config == adapters.config


def test_the_shipped_exports_hold_only_orbax_files():
  for name in ("smollm2-135m", "gemma3-270m"):
    assert adapter_io._is_export(adapter_io.PACKAGED / name), name


def test_a_failed_export_keeps_the_earlier_one(tmp_path, monkeypatch):
  adapters, model_config = _tiny_adapters()
  export = tmp_path / "export"
  cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny")
  before = _tree(tmp_path)
  real_rename = Path.rename

  def failing_rename(self, target):  # the new export cannot be moved into place
    if ".tmp-" in self.name:
      raise OSError("disk gone")
    return real_rename(self, target)

  monkeypatch.setattr(Path, "rename", failing_rename)
  with pytest.raises(OSError, match="disk gone"):
    cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny", overwrite=True)
  assert _tree(tmp_path) == before
  assert [p.name for p in tmp_path.iterdir()] == ["export"]


INTERRUPTED_EXPORT = """
import os, signal, sys, threading, time
from pathlib import Path
import jax
import chunkllm_jax as cj
from train import backbone
model_config = cj.ModelConfig(arch="llama", vocab_size=64, eos_ids=(0,), **backbone.TINY_SIZES)
adapters = cj.init_adapters(jax.random.key(0), model_config, cj.AdapterConfig(d_c=512).resolve(model_config))
folder = Path(sys.argv[1])

def interrupt_once_orbax_writes():
  while not any(p.name.startswith("params") for p in folder.glob(".export.tmp-*/*")):
    time.sleep(0.0005)
  os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt_once_orbax_writes, daemon=True).start()
try:
  cj.save_adapters(adapters, folder / "export", model_config=model_config, backbone="random-tiny")
except KeyboardInterrupt:
  print("interrupted")
"""


def test_an_export_interrupted_while_orbax_writes_leaves_nothing(tmp_path):
  """Ctrl-C as soon as orbax starts writing the weights: it landed in the save while orbax's threads wrote, and
  the folder's removal raced them, which wrote part of it back (a hidden `.export.tmp-*` left in a third of
  the tries, and tracebacks at exit). The interrupt now waits out the write (a second or less), then arrives:
  the half export is removed whole."""
  for attempt in range(2):
    folder = tmp_path / str(attempt)
    folder.mkdir()
    r = fx.run([sys.executable, "-c", INTERRUPTED_EXPORT, str(folder)])
    assert r.returncode == 0 and r.stdout.strip() == "interrupted", r.stderr[-3000:]
    time.sleep(0.5)  # what a thread left running would write by now
    assert list(folder.iterdir()) == [] and "Traceback" not in r.stderr, r.stderr[-3000:]


KILLED_EXPORT = """
import os, signal, sys
import jax
import chunkllm_jax as cj
from chunkllm_jax import adapter_io
from train import backbone
model_config = cj.ModelConfig(arch="llama", vocab_size=64, eos_ids=(0,), **backbone.TINY_SIZES)
adapters = cj.init_adapters(jax.random.key(0), model_config, cj.AdapterConfig(d_c=8).resolve(model_config))
adapter_io._swap_in = lambda new, directory: os.kill(os.getpid(), signal.SIGKILL)  # killed once written
cj.save_adapters(adapters, sys.argv[1], model_config=model_config, backbone="random-tiny", overwrite=True)
"""


def test_an_export_removes_what_killed_exports_left(tmp_path):
  """A kill between writing an export and moving it in place leaves a hidden sibling; the next export
  there removes it, and only such folders of this host's processes that no longer run."""
  export = tmp_path / "export"
  r = fx.run([sys.executable, "-c", KILLED_EXPORT, str(export)])
  assert r.returncode == -9, r.stderr[-3000:]
  [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp-")]
  assert not export.exists() and {p.name for p in left.iterdir()} == {"config.json", "params"}
  dead = left.name.split("-")[-2]
  host = socket.gethostname()
  kept = {f".export.tmp-{host}-{os.getpid()}-0123abcd": "params",  # a process still running: writing it now
          f".export.tmp-otherhost-{dead}-0123abcd": "params",  # another host's, on a shared disk
          f".export.old-{host}-{dead}-0123abcd": "notes.txt",  # not what an export holds
          f".export.tmp-{host}-{dead}-notmine": "params"}  # not a name an export gives
  for name, entry in kept.items():
    (tmp_path / name / entry).mkdir(parents=True)
  (tmp_path / f".export.old-{host}-{dead}-89abcdef" / "params").mkdir(parents=True)  # a replaced export
  adapters, model_config = _tiny_adapters()
  cj.save_adapters(adapters, export, model_config=model_config, backbone="random-tiny")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *kept])
  assert adapter_io.read_export_config(export)["backbone"] == "random-tiny"


def test_a_diverged_run_stops_before_saving_or_exporting_it(tmp_path):
  """An lr far too high makes the adapters nan by step 3: the run stops there with an error, its finite
  checkpoints kept (not rotated away by nan ones) and no nan adapters exported."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  cmd = fx.command(tmp_path / "work", corpus, tmp_path / "data", "--steps", "8", "--lr", "1e30",
                   "--checkpoint_every", "1", "--max_to_keep", "2", "--eval_every", "0",
                   "--export", str(tmp_path / "export"))
  r = fx.run(cmd)
  assert r.returncode == 2, r.stderr[-3000:]
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith("error: step ") and "training diverged" in err and "nothing is exported" in err, err
  stopped = int(err.split()[2].rstrip(":"))
  assert not (tmp_path / "export").exists()
  assert fx.finished_checkpoints(tmp_path / "work") == [stopped - 2, stopped - 1]
  rows = fx.logged(tmp_path / "work")
  assert sorted(rows) == list(range(1, stopped + 1)) and all(math.isfinite(rows[s]["loss"]) for s in rows if s < stopped)


def test_a_batch_without_distillation_rows_is_named(tmp_path):
  """Sinks that fill nearly the whole sequence leave no chunk to distil: the run says so at the first such step
  (it exported untrained QK Adapters without a word)."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  r = fx.run(fx.command(tmp_path / "work", corpus, tmp_path / "data", "--steps", "2", "--eval_every", "0",
                        "--n_sink", "60", "--warmup_steps", "1"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "never reaches --lr" not in r.stderr  # warmed up by its last step
  warned = [l for l in r.stderr.splitlines() if "no distillation rows" in l]
  assert len(warned) == 1 and warned[0].startswith("warning: step 1: ") and "--n_sink" in warned[0], r.stderr[-3000:]
  assert fx.logged(tmp_path / "work")[1]["n_kl_queries"] == 0


def test_chunks_past_the_table_are_named(tmp_path, capsys):
  """Chunks past --max_chunks get no distillation row: a table too small for any sequence is refused at the door,
  and one that real text passes is warned about once (the KL was 0 at every step and nothing said why)."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  err = _refused(capsys, _argv(tmp_path, corpus, "--steps", "2", "--max_chunks", "2"))
  assert err == ("error: --max_chunks 2 chunks of at most --max_chunk_len 16 tokens cannot hold a sequence of "
                 "--seq_len 64: the chunks past the table would go undistilled; give --max_chunks of at least 4")
  r = fx.run(fx.command(tmp_path / "work", corpus, tmp_path / "data", "--steps", "2", "--eval_every", "0",
                        "--max_chunks", "3", "--max_chunk_len", "20", "--warmup_steps", "1"))
  assert r.returncode == 0, r.stderr[-3000:]
  warned = [l for l in r.stderr.splitlines() if "lie past --max_chunks" in l]
  assert len(warned) == 1 and warned[0].startswith("warning: step 1: ") and "raise --max_chunks" in warned[0], r.stderr
  rows = fx.logged(tmp_path / "work")
  assert all(0 < rows[s]["chunks_past_table"] < 1 for s in rows)


# 2. A workdir remembers the settings its checkpoints depend on.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir after a 2-step run with one checkpoint (and its settings file)."""
  tmp = tmp_path_factory.mktemp("trained")
  corpus = fx.write_corpus(tmp / "corpus.txt")
  r = fx.run(fx.command(tmp / "work", corpus, tmp / "data", "--steps", "2", "--eval_every", "0"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "no distillation rows" not in r.stderr  # the warning of the test above is for runs that learn nothing
  # the tiny recipe warms up over 2 steps: a 2-step run is told that it never trains at --lr
  assert ("warning: the learning rate warms up from 0 over --warmup_steps 2 steps, so a run of --steps 2 never reaches "
          "--lr 0.01") in r.stderr
  assert max(fx.finished_checkpoints(tmp / "work")) == 2
  return tmp, corpus


@pytest.mark.parametrize("flags, named", [
    (["--seq_len", "32"], "seq_len: 64 there, 32 now"),
    (["--batch_size", "2", "--lr", "0.5"], "batch_size: 4 there, 2 now; lr: 0.01 there, 0.5 now"),
    (["--steps", "9"], "steps: 2 there, 9 now"),
    (["--seed", "1", "--dtype", "bfloat16"], "dtype: 'float32' there, 'bfloat16' now; seed: 0 there, 1 now"),
    (["--data", "OTHER"], "data_sha256: "),
])
def test_workdir_refuses_another_runs_settings(trained, capsys, monkeypatch, flags, named):
  """Refused before the model loads: flags and data are compared first."""
  tmp, corpus = trained
  if flags[0] == "--data":
    other = tmp / "other.txt"
    other.write_text(Path(corpus).read_text().replace("today", "tomorrow"))
    flags = ["--data", str(other)]
  argv = _argv(tmp, corpus, "--steps", "2", "--eval_every", "0") + flags
  before = _tree(tmp)
  with monkeypatch.context() as m:
    m.setattr(backbone, "load", _no_model)
    err = _refused(capsys, argv)
  assert err.startswith(f"error: {tmp / 'work'} holds checkpoints of a run with other settings (")
  extend = ("; --steps sets the length of the learning-rate schedule, so a run cannot be extended: train a longer "
            "run in another --workdir" if flags[0] == "--steps" else "")
  assert named in err and err.endswith("): use another --workdir, or restore these flags to resume that run" + extend)
  if flags[0] == "--data":
    assert f"['{corpus}']" in err and f"['{flags[1]}']" in err  # the files, beside their hashes
  assert _tree(tmp) == before  # the other run's checkpoints, data and settings all kept
  with pytest.raises(checkpoint.SettingsMismatchError, match="seq_len|lr|steps|seed|data"):
    run.train(_cfg(argv))
  assert _tree(tmp) == before


def _no_model(*args, **kwargs):
  raise AssertionError("the model was loaded before the refusal")


def _recorded(workdir: Path) -> dict:
  return json.loads((workdir / checkpoint.SETTINGS_FILE).read_text())["settings"]


def test_the_same_data_elsewhere_and_another_backbone(trained, tmp_path):
  """The data is compared by content (a moved corpus is the same data); the backbone by fingerprint."""
  tmp, corpus = trained
  moved = tmp_path / "moved.txt"
  moved.write_bytes(Path(corpus).read_bytes())
  old = _recorded(tmp / "work")
  same = run.run_settings(_cfg(_argv(tmp, str(moved), "--steps", "2")),
                         backbone_fingerprint=old["backbone_fingerprint"], backbone_weights=old["backbone_weights"])
  assert same["data"] == [str(moved)] and checkpoint.check_settings(tmp / "work", same, describe=run.DESCRIBE) == "same"
  other = dict(same, backbone_fingerprint="0123456789abcdef", model="smollm2-135m")
  with pytest.raises(checkpoint.SettingsMismatchError,
                     match=f"backbone_fingerprint: '{old['backbone_fingerprint']}' \\(random-tiny\\) there, "
                     "'0123456789abcdef' \\(smollm2-135m\\) now"):
    checkpoint.check_settings(tmp / "work", other, describe=run.DESCRIBE)


def test_a_shared_teacher_cache_refuses_other_weights(trained, tmp_path, capsys):
  """Another seed of random-tiny has the same config (as a fine-tuned copy of a model has) but other
  weights: the cached hidden states and targets are not its own, so a shared --cache_dir is refused."""
  tmp, corpus = trained
  cache = tmp / "work" / "teacher_cache"
  before = _tree(cache)
  argv = fx.command(tmp_path / "w", corpus, tmp / "data", "--steps", "2", "--eval_every", "0",
                    "--cache_dir", str(cache))[4:]
  err = _refused(capsys, argv + ["--seed", "1"])
  assert err.startswith(f"error: the teacher cache {cache / 'train'} was built for other settings (weights: ")
  assert _tree(cache) == before
  bb = backbone.load(backbone.RANDOM_TINY, "smollm2-135m")
  same = backbone.weights_fingerprint(bb.params)
  assert same == _recorded(tmp / "work")["backbone_weights"]
  assert same != backbone.weights_fingerprint(backbone.load(backbone.RANDOM_TINY, "smollm2-135m", "bfloat16").params)
  # Seeds that differ past their low 32 bits give other weights (jax.random.key alone keeps those bits).
  assert same != backbone.weights_fingerprint(backbone.load(backbone.RANDOM_TINY, "smollm2-135m", seed=2**32).params)


def test_workdir_without_settings_file_is_accepted_and_recorded(trained, tmp_path):
  """A workdir from before the settings file: resumed, and its settings recorded (said in a log line)."""
  tmp, corpus = trained
  work = tmp_path / "old"
  shutil.copytree(tmp / "work" / "checkpoints", work / "checkpoints")
  before = _tree(work)
  r = fx.run(fx.command(work, corpus, tmp / "data", "--steps", "2", "--eval_every", "0"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{work} has checkpoints but no run_settings.json" in r.stderr and "resumed from" in r.stderr
  after = _tree(work)
  assert {k: after[k] for k in before} == before
  assert _recorded(work) == _recorded(tmp / "work")


def test_a_workdir_without_checkpoints_takes_new_settings(tmp_path):
  """Nothing depends on the settings of a run that wrote no checkpoint (say it ran out of memory)."""
  checkpoint.write_settings(tmp_path, {"seq_len": 64})
  assert checkpoint.check_settings(tmp_path, {"seq_len": 32}) == "new"
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(checkpoint.SettingsMismatchError, match="seq_len: 64 there, 32 now"):
    checkpoint.check_settings(tmp_path, {"seq_len": 32})
  assert checkpoint.check_settings(tmp_path, {"seq_len": 64}) == "same"


@pytest.mark.parametrize("settings", ["none", "other"])
def test_a_log_without_checkpoints_is_never_rewritten(tmp_path, capsys, monkeypatch, settings):
  """A workdir whose metrics.jsonl has rows but no checkpoint beside it (a user's file, or a run of other settings
  with --checkpoint_every 0) is refused before the model loads: the run would rewrite the log."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  work = tmp_path / "work"
  work.mkdir()
  (work / "metrics.jsonl").write_text('{"step": 100, "accuracy": 0.1}\n{"step": 200, "accuracy": 0.2}\n')
  if settings == "other":
    checkpoint.write_settings(work, {"seq_len": 32})
  before = _tree(work)
  monkeypatch.setattr(backbone, "load", _no_model)
  err = _refused(capsys, _argv(tmp_path, corpus, "--steps", "2"))
  assert err.startswith(f"error: {work} holds a metrics.jsonl with rows but no checkpoint to resume from")
  assert err.endswith(f"Give another --workdir, or move {work / 'metrics.jsonl'} aside")
  assert _tree(work) == before


def test_the_same_run_started_again_without_checkpoints_logs_each_step_once(tmp_path):
  """With --checkpoint_every 0 the same command starts again from step 0 and logs the same steps once; another
  run's settings are then refused, its log kept."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  cmd = fx.command(tmp_path / "work", corpus, tmp_path / "data", "--steps", "2", "--eval_every", "0",
                   "--checkpoint_every", "0", "--warmup_steps", "1")
  first = fx.run(cmd)
  assert first.returncode == 0, first.stderr[-3000:]
  untimed = lambda: [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_s")}
                     for row in metrics.read_jsonl(tmp_path / "work" / "metrics.jsonl")]
  log = untimed()
  assert [row["step"] for row in log] == [1, 2]
  again = fx.run(cmd)
  assert again.returncode == 0, again.stderr[-3000:]
  assert untimed() == log  # the same rows, once
  kept = (tmp_path / "work" / "metrics.jsonl").read_bytes()
  other = fx.run(cmd + ["--lr", "0.5"])
  assert other.returncode == 2 and "holds a metrics.jsonl with rows but no checkpoint" in other.stderr
  assert (tmp_path / "work" / "metrics.jsonl").read_bytes() == kept


@pytest.mark.parametrize("content", [b"", b" \n\n", b"caf\xe9"])
def test_bad_text_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, content):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(content)
  monkeypatch.setattr(backbone, "load", _no_model)
  err = _refused(capsys, _argv(tmp_path, str(bad), "--steps", "2"))
  assert err.startswith(f"error: {bad}: ") and ("empty" in err or "not UTF-8" in err), err
  assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name, content, named", [
    ("run_settings.json", "my notes on the run\n", "run_settings.json cannot be read"),
    ("run_settings.json", '{"settings": [1, 2]}\n', "run_settings.json cannot be read"),
    (".train.lock", "my lock\n", ".train.lock is not a lock a train.run wrote"),
])
def test_a_users_file_of_a_runs_name_is_never_replaced(tmp_path, capsys, monkeypatch, name, content, named):
  """A workdir without checkpoints that holds a file of the name a run writes, which no run wrote: refused before
  the model loads, the file untouched (the run replaced it)."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  work = tmp_path / "work"
  work.mkdir()
  (work / name).write_text(content)
  before = _tree(work)
  monkeypatch.setattr(backbone, "load", _no_model)
  err = _refused(capsys, _argv(tmp_path, corpus, "--steps", "2"))
  assert named in err and "move it aside" in err, err
  assert _tree(work) == before


def test_a_workdir_in_use_is_refused(tmp_path, capsys, monkeypatch):
  """Two runs never share a workdir: the second is refused, naming the first's pid, before the model loads."""
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  work = tmp_path / "work"
  held = run.WorkdirLock(work)
  monkeypatch.setattr(backbone, "load", _no_model)
  err = _refused(capsys, _argv(tmp_path, corpus, "--steps", "2"))
  assert err == (f"error: another train.run (pid {os.getpid()}) is using --workdir {work}: wait for it to end, or "
                 "give another --workdir")
  held.release()
  run.WorkdirLock(work).release()  # free again once the first ends


# 3. --max_to_keep below 1.

@pytest.mark.parametrize("n", ["0", "-1"])
def test_max_to_keep_below_one_is_refused(user_files, capsys, n):
  tmp, corpus, _ = user_files
  before = _tree(tmp)
  err = _refused(capsys, _argv(tmp, corpus, "--max_to_keep", n))
  assert err == (f"error: --max_to_keep {n} would delete each checkpoint as soon as it is written; "
                 "give 1 or more")
  assert _tree(tmp) == before and not (tmp / "work").exists()


# 4. metrics.jsonl cut by a kill.

def test_a_resumed_run_logs_each_step_once(tmp_path):
  """A run killed after its checkpoint at step 3 had logged steps 4-5; resumed from 3 it logs them again
  (the same values), so the writer drops the rows past 3 first. A line that is not a row is kept."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": i, "split": "train", "loss": 3.0 - i / 10} for i in range(1, 6)] + [{"step": 4, "split": "eval"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "spl')
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
  w.write(4, "train", {"loss": 2.6})
  w.close()
  with pytest.warns(UserWarning, match="skipped a malformed line"):
    got = metrics.read_jsonl(path)
  assert [(r["step"], r["split"]) for r in got] == [(1, "train"), (2, "train"), (3, "train"), (4, "train")]
  assert '{"step": 6, "spl\n' in path.read_text()  # kept as it was, on its own line
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, resume_step=4)  # nothing past 4: left as it is
  w.close()
  with pytest.warns(UserWarning, match="skipped a malformed line"):
    assert [(r["step"], r["split"]) for r in metrics.read_jsonl(path)] == [(1, "train"), (2, "train"),
                                                                          (3, "train"), (4, "train")]


def _tensorboard_events(folder):
  """(file, step, kind) of every event in the folder's event files, in file order ('purge' marks where
  TensorBoard drops the earlier files' events from that step on)."""
  from tensorboardX.proto import event_pb2
  out = []
  for f in sorted(folder.glob("events.out.tfevents.*")):
    data, at = f.read_bytes(), 0
    while at < len(data):  # TFRecord: length (8 bytes), its crc (4), the record, its crc (4)
      n = int.from_bytes(data[at:at + 8], "little")
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 16 + n
      if event.HasField("session_log"):
        out.append((f.name, event.step, "purge"))
      elif event.HasField("summary"):
        out.append((f.name, event.step, event.summary.value[0].tag))
  return out


def test_a_resumed_run_purges_its_tensorboard_steps_past_the_checkpoint(tmp_path):
  """TensorBoard's files are append-only: the resumed run marks the step it starts at, so the killed run's
  steps past its checkpoint are not drawn twice."""
  w = metrics.MetricWriter(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    w.write(step, "train", {"loss": 3.0 - step / 10})
  w.close()
  time.sleep(1.1)  # event files are named by the second they were opened in
  w = metrics.MetricWriter(str(tmp_path), resume_step=3)
  w.write(4, "train", {"loss": 2.6})
  w.close()
  events = _tensorboard_events(tmp_path / "tensorboard")
  files = sorted({f for f, _, _ in events})
  assert len(files) == 2
  assert [(s, k) for f, s, k in events if f == files[1]] == [(4, "purge"), (4, "train/loss")]
  assert [s for f, s, k in events if f == files[0] and k == "train/loss"] == [1, 2, 3, 4, 5]


def test_metrics_after_a_cut_line_stay_readable(tmp_path):
  path = tmp_path / "metrics.jsonl"
  whole = '{"step": 1, "split": "train", "loss": 2.5}\n'
  cut = '{"step": 2, "split": "train", "lo'
  path.write_text(whole + cut)
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(2, "train", {"loss": 2.25})
  w.close()
  text = path.read_text()
  assert text.startswith(whole + cut + "\n")  # the damaged line kept as it was, on its own line
  skipped = []
  with pytest.warns(UserWarning, match=f"{path}:2: skipped a malformed line: bad JSON"):
    rows = metrics.read_jsonl(path, skipped)
  assert rows == [{"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "train", "loss": 2.25}]
  assert [n for n, _ in skipped] == [2]
  # A file that ends whole gets no blank line.
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(3, "train", {"loss": 2.0})
  w.close()
  assert path.read_text() == text + '{"step": 3, "split": "train", "loss": 2.0}\n'


def test_write_atomic_replaces_whole_or_not_at_all_and_keeps_the_mode(tmp_path):
  """The one writer of the run's small files: a write that fails leaves the old file as it was and nothing
  beside it, and a replaced file keeps its permissions."""
  path = tmp_path / "run_settings.json"
  path.write_text("old\n")
  path.chmod(0o640)

  def failing(f):
    f.write(b"half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    adapter_io.write_atomic(path, failing)
  assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["run_settings.json"]
  adapter_io.write_atomic(path, b"new\n")
  assert path.read_text() == "new\n" and (path.stat().st_mode & 0o777) == 0o640
  assert [p.name for p in tmp_path.iterdir()] == ["run_settings.json"]
