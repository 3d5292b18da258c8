"""Two processes on localhost (2 CPU devices each, gloo collectives) train like one process with 4."""

import socket

import numpy as np
import pytest

from tests import train_run_fixtures as fx

FLAGS = ["--steps", "3", "--checkpoint_every", "0", "--eval_every", "3", "--mesh_model", "2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # four short runs in subprocesses
def test_two_processes_match_one(tmp_path):
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  # Each run builds its own copy of the data (process 0 of the pair builds, the other waits).
  one = fx.start(fx.command(tmp_path / "one", corpus, tmp_path / "data_one", *FLAGS), n_devices=4)
  port = _free_port()
  procs = [fx.start(fx.command(tmp_path / "two", corpus, tmp_path / "data", *FLAGS,
                               "--coordinator", f"localhost:{port}", "--num_processes", "2",
                               "--process_id", str(i)), n_devices=2) for i in (0, 1)]
  for p in [one, *procs]:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
  want, got = fx.logged(tmp_path / "one"), fx.logged(tmp_path / "two")
  assert sorted(got) == [1, 2, 3]
  for step in want:
    for k in ("loss", "kl", "bce", "chunk_recall", "boundary_f1", "grad_norm"):
      np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k} at {step}")
  ev_want, ev_got = fx.logged(tmp_path / "one", "eval"), fx.logged(tmp_path / "two", "eval")
  assert sorted(ev_want) == sorted(ev_got) == [3]
  for k in ("loss", "chunk_recall", "boundary_f1"):
    np.testing.assert_allclose(ev_got[3][k], ev_want[3][k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow  # two short runs in subprocesses
def test_two_processes_both_refuse_a_cache_of_other_settings(tmp_path):
  """Each process checks the cache before any writes: both exit with the error, neither waits on the other."""
  import json

  from train import teacher_cache

  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  (tmp_path / "cache" / "train").mkdir(parents=True)
  other = tmp_path / "cache" / "train" / teacher_cache.CACHE_FILE
  other.write_text(json.dumps(dict(backbone="another model")))
  port = _free_port()
  procs = [fx.start(fx.command(tmp_path / "two", corpus, tmp_path / "data", *FLAGS, "--cache_dir",
                               str(tmp_path / "cache"), "--coordinator", f"localhost:{port}", "--num_processes", "2",
                               "--process_id", str(i)), n_devices=2) for i in (0, 1)]
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and "was built for other settings" in out, out[-3000:]
  assert json.loads(other.read_text()) == dict(backbone="another model")  # left as it was
