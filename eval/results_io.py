"""The results file: one JSON line per (task, method, retention, example), appended as results come.

An evaluation takes hours on a CPU and can be killed at any point, so every finished example is
written (and flushed to disk) at once, and a rerun skips the keys already there. The file is only
ever appended to: a line cut short by a kill, or damaged later, is reported with its line number
and passed over (its example is then computed again), and every other line is kept as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

KEY_FIELDS = ("task", "method", "retention", "example")


# The settings every run_config.json has held, from the first: the mark of a folder eval.run wrote.
_FIRST_SETTINGS = ("model", "adapters", "dtype", "filler", "niah_max_new", "max_prompt_tokens", "ppl_prefix",
                   "ppl_bins", "chunk_len", "fix_chunk_len", "window", "seed", "longbench_dir", "brown")


def is_run_config(path: Path) -> bool:
  """Whether `path` is a run_config.json that eval.run wrote (`run._write_fingerprint`): the mark of its folders,
  which eval.run resumes and eval.report rewrites."""
  config = json.loads(path.read_text())
  return isinstance(config, dict) and all(k in config for k in _FIRST_SETTINGS)


def retention_label(retention: float | None) -> str:
  """How a retention target is written in keys: 'default' (None), or the number ('0.5', '1')."""
  return "default" if retention is None else f"{retention:g}"


def result_key(record: dict) -> tuple[str, str, str, str]:
  return tuple(str(record[f]) for f in KEY_FIELDS)


@dataclasses.dataclass(frozen=True)
class BadLine:
  line: int  # 1-based
  reason: str


def _check(obj: Any) -> dict:
  if not isinstance(obj, dict):
    raise ValueError(f"a line must hold a JSON object, got {type(obj).__name__}")
  missing = [f for f in KEY_FIELDS if f not in obj]
  if missing:
    raise ValueError(f"missing key fields {missing}")
  return obj


class ResultsFile:
  """Reads what a results JSONL already holds, and appends to it.

  `records` keeps the valid lines in file order (the first of two lines with one key wins, as the
  second can only come from two runs writing at once); `bad_lines` lists what was passed over.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.records: list[dict] = []
    self.bad_lines: list[BadLine] = []
    self._index: dict[tuple, dict] = {}
    if self.path.exists():
      self._read()

  def _read(self) -> None:
    with open(self.path, encoding="utf-8", errors="replace") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = _check(json.loads(line))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
          reason = f"bad JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
          warnings.warn(f"{self.path}:{line_no}: skipped a malformed result line: {reason}", stacklevel=3)
          self.bad_lines.append(BadLine(line_no, reason))
          continue
        key = result_key(record)
        if key not in self._index:
          self._index[key] = record
          self.records.append(record)

  def __contains__(self, key: tuple) -> bool:
    return tuple(str(k) for k in key) in self._index

  def get(self, key: tuple) -> dict | None:
    return self._index.get(tuple(str(k) for k in key))

  def missing(self, keys: Iterable[tuple]) -> list[tuple]:
    return [k for k in keys if k not in self]

  def append(self, record: dict) -> None:
    """Writes one result line and flushes it to disk; a key already present is an error."""
    record = _check(dict(record))
    key = result_key(record)
    if key in self._index:
      raise ValueError(f"result {key} is already in {self.path}")
    line = json.dumps(record, sort_keys=True, allow_nan=True)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "ab") as f:
      # A kill mid-write can leave a last line without its newline: start on a fresh line, so that
      # only the damaged line is lost, never the one written now.
      if f.tell() > 0:
        with open(self.path, "rb") as r:
          r.seek(-1, os.SEEK_END)
          if r.read(1) != b"\n":
            f.write(b"\n")
      f.write(line.encode("utf-8") + b"\n")
      f.flush()
      os.fsync(f.fileno())
    self._index[key] = record
    self.records.append(record)
