"""bench/prefill_attention.py at a tiny length: every tile size runs, matches torch's sdpa, and is timed."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefill_attention():
  """The script as a module (bench/ is not a package)."""
  spec = importlib.util.spec_from_file_location("prefill_attention", ROOT / "bench" / "prefill_attention.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("tiles", [[(64, 64)], [(128, 64), (64, 128)]])
def test_each_tile_size_matches_torch_and_is_timed(prefill_attention, tiles):
  pytest.importorskip("torch")
  rows = prefill_attention.attention_rows(320, tiles, repeats=1)  # 320: no tile size divides it
  assert [r["label"] for r in rows] == (["torch sdpa (before)"] + [f"JAX {q} x {k} tiles" for q, k in tiles]
                                        + ["torch sdpa (after)"])
  for r in rows:
    assert r["ms"] > 0 and r["vs_torch"] > 0
  for r in rows[1:-1]:
    assert r["err"] < 1e-5, r
