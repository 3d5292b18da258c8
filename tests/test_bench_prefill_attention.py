"""bench/prefill_attention.py at a tiny length: every tile size runs, matches torch's sdpa, and is timed."""

import pytest


@pytest.fixture(scope="module")
def prefill_attention(bench_script):
  return bench_script("prefill_attention")


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
