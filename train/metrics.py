"""Metric sinks: a JSONL file (one line per logged step, exact floats) and TensorBoard (tensorboardX).

Only process 0 writes. JSONL floats are Python reprs, so two runs can be compared bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats (works on every process: each holds a copy)."""
  return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v))
          for k, v in metrics.items()}


def mean_metrics(batches: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in batches])) for k in batches[0]} if batches else {}


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self._enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # light: no TensorFlow

      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

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


def read_jsonl(path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
