"""bench/summary.py: each rule's decode page gives its own rows against the floor, named by the rule; a
page not yet measured gives a "not measured" row, never an error."""

import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def _decode_row(context, target, retention, of_floor, speedup):
  return dict(context=context, target_retention=target, retention=retention, dense_of_floor=0.4,
              chunk_of_floor=of_floor, decode_speedup=speedup)


@pytest.mark.parametrize("with_defaults", [True, False])
def test_each_rules_decode_is_its_own_row(bench_script, monkeypatch, tmp_path, with_defaults):
  monkeypatch.syspath_prepend(str(BENCH))
  summary = bench_script("summary")
  shared = [_decode_row(c, t, t, 0.5 if c == 8192 else 0.7, 2.0) for c in (8192, 32768) for t in (0.5, 0.25)]
  (tmp_path / "RESULTS_chunk.json").write_text(json.dumps(dict(decode=shared, prefill=[])))
  if with_defaults:
    rows = [_decode_row(8192, 0.25, 0.26, 0.3, 1.1)]  # one context measured, the other not
    (tmp_path / "RESULTS_chunk_defaults.json").write_text(json.dumps(dict(decode=rows)))
  figs = {(f.area, f.what): f for f in summary.figures(tmp_path)}
  per_head = figs.get(("decode vs floor", "ChunkLLM defaults (per-head rule), 8K, 26% retention"))
  if with_defaults:
    assert (per_head.value, per_head.met, per_head.page) == (0.3, False, "chunk_defaults")
    assert figs[("ChunkLLM decode", "defaults (per-head rule): speed vs dense, 8K, 26% retention")].value == 1.1
  else:
    assert per_head is None
    assert figs[("decode vs floor", "ChunkLLM defaults (per-head rule), 8K context")].value is None
  assert figs[("decode vs floor", "ChunkLLM defaults (per-head rule), 32K context")].value is None
  shared_32k = figs[("decode vs floor", "ChunkLLM shared rule, 32K, 25% retention")]
  assert (shared_32k.value, shared_32k.met, shared_32k.page) == (0.7, True, "chunk")
  assert figs[("decode vs floor", "dense, 8K context")].value == 0.4
  page = summary.write(tmp_path).read_text()
  assert "| decode vs floor | ChunkLLM shared rule, 8K, 50% retention | 50% | >= 60% | **no** |" in page


def test_memory_rows_with_the_compile_cache_warm_are_their_own(bench_script, monkeypatch, tmp_path):
  """A cell measured with the programs from jax's compilation cache never stands in for the run that compiles."""
  monkeypatch.syspath_prepend(str(BENCH))
  summary = bench_script("summary")
  rows = [dict(method="chunkllm", context=32768, peak_rss=122, floor=100),  # from before the setting: compiled
          dict(method="chunkllm", context=32768, peak_rss=119, floor=100, compile_cache="warm")]
  (tmp_path / "RESULTS_memory.json").write_text(json.dumps(dict(rows=rows)))
  figs = {(f.area, f.what): f for f in summary.figures(tmp_path)}
  compiled = figs[("peak memory", "chunk_generate: peak RSS / floor, 32K")]
  warm = figs[("peak memory", "chunk_generate, warm compile cache: peak RSS / floor, 32K")]
  assert (compiled.value, compiled.met, warm.value, warm.met) == (1.22, False, 1.19, True)
  assert ("peak memory", "generate, warm compile cache: peak RSS / floor, 32K") not in figs  # not measured warm


@pytest.mark.parametrize("gpu_page", [True, False])
def test_the_gpu_figures_are_cited_only_once_a_device_run_wrote_them(bench_script, monkeypatch, tmp_path, gpu_page):
  monkeypatch.syspath_prepend(str(BENCH))
  summary = bench_script("summary")
  if gpu_page:
    (tmp_path / "RESULTS.md").write_text("# kernels on a GPU\n")
  head = summary.write(tmp_path).read_text().split("\n\n")[1]
  assert ("The GPU figures are RESULTS.md's" in head) == gpu_page
  assert ("The GPU figures are still to come" in head) == (not gpu_page)
