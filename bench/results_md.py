"""Where the CPU benchmarks write: one results page and its JSON per script, the machine and commit.

Each bench/RESULTS_<name>.md has two parts. Above `KEEP` is what its script measured last: the
machine, the command, the code version and the tables, rewritten by every run. Below `KEEP` is the
hand-written history (before/after tables of earlier rounds, what a profile showed), which no run
touches. The `.json` beside the page holds the same run as data, for `bench/regenerate.py`'s
summary and for re-rendering without measuring again.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
KEEP = "<!-- analysis below is kept when the script rewrites this file -->"


def machine_line() -> str:
  """The CPU (model, family and model numbers, AVX-512 or not), cores and jax/XLA backend (and the
  accelerator, where jax runs on one); imports
  jax only if the caller already did. Hosts sold under one name differ several times over in what
  XLA and torch get from them (bench/RESULTS_generate.md), so the numbers name the generation."""
  model, detail = platform.processor() or platform.machine(), []
  try:
    info = dict(line.split(":", 1) for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if ":" in line and not line.startswith("processor"))
    info = {k.strip(): v.strip() for k, v in info.items()}
    model = info.get("model name", model)
    if "cpu family" in info:
      detail.append(f"family {info['cpu family']}, model {info.get('model', '?')}")
    detail.append("AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512")
  except OSError:
    pass
  cpu = f"{model} ({'; '.join(detail)})" if detail else model
  line = f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    line += f", jax {jax.__version__} ({jax.default_backend()})"
    if jax.default_backend() != "cpu":  # the figures are the accelerator's: name it
      line += f" on {jax.devices()[0].device_kind}"
  return line


def code_version() -> str:
  """The commit measured, and whether the library or the benchmarks differ from it."""
  run = lambda *a: subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
  head = run("rev-parse", "--short", "HEAD") or "unknown"
  dirty = run("status", "--porcelain", "--", "chunkllm_jax/*.py", "pallas_kernels/*.py", "bench/*.py")  # not pages
  return head + (" + uncommitted changes" if dirty else "")


def kept_part(md: pathlib.Path) -> str:
  """The hand-written part of a results page (below `KEEP`), or '' if there is none."""
  if not md.exists():
    return ""
  text = md.read_text()
  return text.split(KEEP, 1)[1].strip("\n") if KEEP in text else ""


def write(md, lines: list[str], data: dict | list | None = None) -> pathlib.Path:
  """Writes the measured part of `md` (and `data` as `md`'s .json), keeping its hand-written part.

  A page without the marker gets one at its end, so notes can be added below it later."""
  md = pathlib.Path(md)
  md.parent.mkdir(parents=True, exist_ok=True)
  kept = kept_part(md)
  md.write_text("\n".join(lines).rstrip("\n") + "\n\n" + KEEP + ("\n\n" + kept if kept else "") + "\n")
  if data is not None:
    md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
  return md


def command_line(argv: list[str] | None = None) -> str:
  """The command this process runs, as a user would type it from the repository root."""
  argv = sys.argv if argv is None else argv
  script = pathlib.Path(argv[0]).resolve()
  try:
    script = script.relative_to(HERE.parent)
  except ValueError:
    pass
  return " ".join(["python", str(script), *argv[1:]])


def header(title: str, command: str | None = None, notes: str = "") -> list[str]:
  """The top of a results page: title, machine, code version and the command that wrote it."""
  lines = [f"# {title}", "", f"Machine: {machine_line()}. Code: {code_version()}.", "",
           f"Command: `{command or command_line()}`", ""]
  return lines + ([notes, ""] if notes else [])
