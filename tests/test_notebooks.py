"""The notebooks of notebooks/, executed end to end on the real model so that they cannot rot.

Each runs in a fresh kernel of this very Python (a kernelspec written to a temporary directory, so
that a `python3` kernel installed for another interpreter is never picked), from `notebooks/`, on
one CPU device, with the Hub offline. A cell that raises fails the test; then the printed results
are checked, and that nothing was written beside the notebooks.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300


def _files(directory: Path) -> set[Path]:
  return {p for p in directory.rglob("*") if ".ipynb_checkpoints" not in p.parts}


# The client runs in a child process: its ZMQ / asyncio threads then never share a process with the
# rest of the suite's XLA compiles (a full run once died of a segfault in a later test's compile
# while those threads were still alive).
_RUNNER = """
import sys, nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
src, dst, kernels, conn, path, timeout = sys.argv[1:]
nb = nbformat.read(src, as_version=4)
km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]),
                   connection_file=conn)
try:
  NotebookClient(nb, km=km, timeout=int(timeout), kernel_name="python3",
                 resources={"metadata": {"path": path}}).execute()
finally:
  nbformat.write(nb, dst)
"""


def execute(name: str, tmp_path: Path, **env_extra: str) -> nbformat.NotebookNode:
  """Runs every cell of notebooks/<name>; returns the executed notebook (the file is not touched)."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
      f"{name} is committed with outputs: strip them"
  kernels = tmp_path / "kernels"
  write_kernel_spec(kernels / "python3")  # argv: this sys.executable -m ipykernel_launcher
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "IPYTHONDIR": str(tmp_path / "ipython"), **env_extra}
  for k in ("XLA_FLAGS", "MPLBACKEND", "CHUNKLLM_NOTEBOOK_INSTALL"):  # one device and inline plots, as a user has
    env.pop(k, None)
  before = _files(NOTEBOOKS)
  executed = tmp_path / f"executed-{name}"
  run = subprocess.run([sys.executable, "-c", _RUNNER, str(NOTEBOOKS / name), str(executed), str(kernels),
                        str(tmp_path / "kernel-connection.json"), str(NOTEBOOKS), str(CELL_TIMEOUT_S)],
                       env=env, capture_output=True, text=True, timeout=4 * CELL_TIMEOUT_S)
  assert executed.is_file(), f"{name} did not run:\n{run.stderr[-3000:]}"
  nb = nbformat.read(executed, as_version=4)
  assert _files(NOTEBOOKS) == before, f"{name} wrote files into notebooks/"
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors and run.returncode == 0, (errors, run.stderr[-3000:])  # a failing cell stops the run
  return nb


def stdout(nb: nbformat.NotebookNode) -> str:
  return "".join(o.text for c in nb.cells for o in c.get("outputs", [])
                 if o.output_type == "stream" and o.name == "stdout")


def n_images(nb: nbformat.NotebookNode) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def number(pattern: str, text: str) -> float:
  m = re.search(pattern, text)
  assert m, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
  return float(m.group(1))


@pytest.mark.real_model
def test_quickstart_runs_and_reports_chunk_stats(tmp_path):
  nb = execute("quickstart.ipynb", tmp_path)
  out = stdout(nb)
  assert "backend 'cpu'" in out
  assert "Paris" in out  # vanilla generation on the short prompt
  assert 0.0 < number(r"kv_retention: ([0-9.]+)", out) < 1.0
  assert number(r"n_chunks: (\d+)", out) > 10
  assert number(r"n_selections: (\d+)", out) >= 1
  assert "ChunkLLM answer:" in out and "vanilla answer:" in out
  assert number(r"(\d+) chunks selected", out) == 16  # TOP_CHUNKS, read from the state's [B, C] mask
  assert re.search(r"passkey in chunk \d+ of \d+", out)
  assert n_images(nb) >= 1  # the chunk plot, shown inline


@pytest.mark.real_model
def test_train_adapters_trains_exports_and_reloads(tmp_path):
  workdir = tmp_path / "work"
  nb = execute("train_adapters.ipynb", tmp_path, CHUNKLLM_NOTEBOOK_WORKDIR=str(workdir))
  out = stdout(nb)
  assert math.isfinite(number(r"final train loss: (\S+)", out))
  assert (workdir / "run" / "metrics.jsonl").is_file() and (workdir / "export" / "config.json").is_file()
  assert 0.0 < number(r"reloaded adapters: .*kv_retention ([0-9.]+)", out) < 1.0
  assert n_images(nb) >= 1  # the loss curve
