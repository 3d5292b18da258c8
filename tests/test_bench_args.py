"""The benchmark scripts refuse arguments they cannot measure with one error line (exit 2), before they
measure or write anything (they ended in tracebacks, or measured and recorded nonsense)."""

import pytest


@pytest.mark.parametrize("script, argv, message", [
    ("bench_chunk", ["--rounds", "0"], "--prefill-repeats must be >= 1"),
    ("bench_chunk", ["--lengths", "0"], "--prefill-repeats must be >= 1"),
    ("bench_chunk", ["--ratios", "1.5"], "--ratios and --prefill-ratio are KV retention targets in (0, 1]"),
    ("bench_chunk", ["--prefill-ratio", "0"], "--ratios and --prefill-ratio are KV retention targets in (0, 1]"),
    ("bench_chunk", ["--render"], "--render rewrites"),
    ("decode_block", ["--blocks", "abc"], "--blocks takes block sizes"),
    ("decode_block", ["--blocks", "sideways:256"], "--blocks takes positive block sizes"),
    ("decode_block", ["--blocks", "256,0"], "--blocks takes positive block sizes"),
    ("decode_block", ["--contexts", "0"], "--contexts and --rounds must be >= 1"),
    ("decode_block", ["--rounds", "0"], "--contexts and --rounds must be >= 1"),
    ("bench_bytes", ["--text", "{tmp}/missing.txt"], "is not a file"),
    ("compile_time", ["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
])
def test_bad_arguments_get_one_error_line(bench_script, capsys, tmp_path, script, argv, message):
  bench = bench_script(script)
  out = ["--out", str(tmp_path / "page.md")] if script != "decode_block" else []
  with pytest.raises(SystemExit) as e:
    bench.main([a.format(tmp=tmp_path) for a in argv] + out)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "error: " in err[-1] and message in err[-1], err
  assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_a_text_too_short_for_the_longest_context_is_refused(bench_script, capsys, tmp_path):
  """bench_bytes fills contexts up to 128K tokens from the text's sentences: a short text stopped the cases short
  (or, under two sentences, raised ValueError from the random start)."""
  bench = bench_script("bench_bytes")
  text = tmp_path / "short.txt"
  text.write_text("One sentence here. Another one there. " * 200)
  with pytest.raises(SystemExit) as e:
    bench.main(["--text", str(text), "--out", str(tmp_path / "bytes.md")])
  assert e.value.code == 2
  assert "the 131072-token case needs that many" in capsys.readouterr().err
  assert not (tmp_path / "bytes.md").exists()


@pytest.mark.real_model
def test_regenerate_quick_bytes_step_fits_its_short_text(bench_script, monkeypatch, tmp_path):
  """regenerate.py --quick cuts bench_bytes' text to 60000 characters (about 12K tokens): its cases must fit that,
  where the full run's reach 128K tokens (the step was refused, and --quick failed)."""
  from chunkllm_jax.haystack import filler_sentences

  regen, bench = bench_script("regenerate"), bench_script("bench_bytes")
  text = tmp_path / "text.txt"
  text.write_text(" ".join(filler_sentences(1200, 0)))
  step = next(s for s in regen.STEPS if s.name == "bytes")
  monkeypatch.chdir(regen.ROOT)  # regenerate runs its steps from the repository root
  bench.main(regen.argv_for(step, tmp_path, True, text)[2:])
  assert (tmp_path / "RESULTS_bytes.md").is_file()


@pytest.mark.real_model
def test_compile_time_measures_a_cold_and_a_warm_process(bench_script, tmp_path):
  """Each column is a process of its own; the warm one reads the compilation cache the cold one filled."""
  import json

  bench = bench_script("compile_time")
  bench.main(["--prompt-tokens", "64", "--out", str(tmp_path / "RESULTS_compile_time.md")])
  data = json.loads((tmp_path / "RESULTS_compile_time.json").read_text())
  for run in ("cold", "warm"):
    assert data[run]["chunk_generate_s"] > 0 and data[run]["generate_s"] > 0, data
  page = (tmp_path / "RESULTS_compile_time.md").read_text()
  assert "| `chunk_generate` |" in page and "| `generate` |" in page
