"""Metric sinks: a JSONL file (one line per logged step, exact floats) and TensorBoard (tensorboardX).

Only process 0 writes. JSONL floats are Python reprs, so two runs can be compared bitwise.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from chunkllm_jax import adapter_io

METRICS_FILE = "metrics.jsonl"


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats (works on every process: each holds a copy)."""
  return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
          for k, v in metrics.items()}


def mean_metrics(batches: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in batches])) for k in batches[0]} if batches else {}


class MetricWriter:
  """`resume_step`: the step a resumed run starts after; the rows a killed run logged past it are dropped
  (the resumed run logs those steps again, with the same values), so no step is in the file twice."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
    self._enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(workdir) / METRICS_FILE
    if resume_step is not None and path.exists():
      _drop_rows_after(path, resume_step)
    cut = _ends_mid_line(path)
    self._jsonl = open(path, "a", encoding="utf-8")
    if cut:  # a kill cut the last row short: keep it on its own line, so the next row stays whole
      self._jsonl.write("\n")
      self._jsonl.flush()
    if tensorboard:
      from tensorboardX import SummaryWriter  # light: no TensorFlow

      # TensorBoard hides the killed run's events from the resumed step on (its event files are append-only),
      # as the JSONL rows past it are dropped above.
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _ends_mid_line(path: Path) -> bool:
  if not path.is_file() or path.stat().st_size == 0:
    return False
  with open(path, "rb") as f:
    f.seek(-1, 2)
    return f.read(1) != b"\n"


def read_jsonl(path, skipped: list[tuple[int, str]] | None = None) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl. A malformed line (a row cut short by a kill) is warned about with
  the file and line number, appended to `skipped` as (line number, reason) when a list is passed,
  and passed over."""
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict):
          raise ValueError(f"a {type(row).__name__}, not an object")
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        reason = f"bad JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
        warnings.warn(f"{path}:{line_no}: skipped a malformed line: {reason}", stacklevel=2)
        if skipped is not None:
          skipped.append((line_no, reason))
        continue
      rows.append(row)
  return rows


def _drop_rows_after(path: Path, step: int) -> None:
  """Rewrites `path` (whole or not at all) without the rows logged after `step`; a line that is not a row
  (a row a kill cut short) is kept as it is."""
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

  def after(line: str) -> bool:
    try:
      return json.loads(line)["step"] > step
    except (ValueError, KeyError, TypeError):
      return False

  kept = [line for line in lines if not after(line)]
  if len(kept) == len(lines):
    return
  adapter_io.write_atomic(path, "".join(kept).encode("utf-8"))
