"""The refusal check that every command-line tool writing fixed names into --out shares: a folder holding the
user's files is refused with one `error:` line (exit 2) before the model loads, and left byte for byte."""

from pathlib import Path

import pytest


def users_folder(out: Path, held: dict[str, bytes]) -> Path:
  """`out`, made and holding the user's files (name -> bytes)."""
  out.mkdir()
  for name, data in held.items():
    (out / name).write_bytes(data)
  return out


def assert_refused_untouched(run, out: Path, held: dict[str, bytes], tool: str, monkeypatch, capsys) -> None:
  """`run()` (the tool's main on `out`) returns 2 with one line naming the folder and the tool, without loading
  the model, and `out` still holds exactly `held`."""
  import chunkllm_jax as cj

  monkeypatch.setattr(cj, "load", lambda *a, **k: pytest.fail("loaded the model for a refused --out"))
  capsys.readouterr()
  assert run() == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: --out {out} holds files that {tool} did not write ("), err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == held  # byte for byte, nothing added
