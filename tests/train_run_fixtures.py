"""Running `python -m train.run` on the tiny preset in subprocesses, and reading back what it logged."""

import os
import subprocess
import sys
import time
from pathlib import Path

from train import metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ["weather", "news", "markets", "games", "food", "roads", "songs", "books", "rivers", "trains"]
NOT_COMPARED = ("tokens_per_s", "step_s")  # wall-clock figures


def write_corpus(path: Path, n_docs: int = 3, n_sentences: int = 40) -> str:
  docs = []
  for d in range(n_docs):
    docs.append(" ".join(f"Story {d} line {i} is about the {WORDS[(i * 7 + d) % len(WORDS)]} of today."
                         for i in range(n_sentences)))
  path.write_text("\n\n".join(docs) + "\n")
  return str(path)


def env(n_devices: int) -> dict[str, str]:
  e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", PYTHONPATH=str(REPO))
  if n_devices > 1:  # multi-device executables stay out of the persistent cache (conftest.py)
    e["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return e


def command(workdir: Path, corpus: str, data_dir: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "train.run", "--cpu", "--preset", "tiny", "--data", corpus,
          "--workdir", str(workdir), "--data_dir", str(data_dir), *extra]


def run(cmd: list[str], n_devices: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env(n_devices), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], n_devices: int = 1) -> subprocess.Popen:
  return subprocess.Popen(cmd, env=env(n_devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def finished_checkpoints(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 240) -> None:
  t0 = time.time()
  while not finished_checkpoints(workdir):
    if proc.poll() is not None or time.time() - t0 > timeout:
      raise AssertionError(f"no checkpoint appeared (exit {proc.poll()}):\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.02)


def logged(workdir: Path, split: str = "train") -> dict[int, dict]:
  """The last logged line of each step, without the wall-clock figures."""
  out = {}
  for row in metrics.read_jsonl(workdir / "metrics.jsonl"):
    if row["split"] == split:
      out[row["step"]] = {k: v for k, v in row.items() if k not in NOT_COMPARED}
  return out
