"""bench/bench_generate.py refuses counts it cannot time, with one error line, before either model loads (one new
token once ran the whole benchmark and then divided by zero: torch's side timed no decode step)."""

import pytest


@pytest.mark.parametrize("flag, value", [("--new-tokens", "1"), ("--repeats", "0"), ("--lengths", "0")])
def test_counts_it_cannot_time_are_refused_before_loading(bench_script, capsys, monkeypatch, tmp_path, flag, value):
  bench = bench_script("bench_generate")
  monkeypatch.setattr(bench.cj, "load", lambda *a, **kw: pytest.fail("loaded a model for a refused command"))
  with pytest.raises(SystemExit) as e:
    bench.main(["--lengths", "64", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "g.md"), flag, value])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "error: --lengths must be >= 1, --new-tokens >= 2 and --repeats >= 1" in err[-1], err
  assert not (tmp_path / "g.md").exists()
