"""train.throughput runs the shipped recipe's four programs and reports each against the forward pass."""

import pytest

from train import throughput


def test_throughput_reports_every_program(tmp_path):
  layers = ["0", "1"]
  out = throughput.main(["--model", "random-tiny", "--tokenizer", "smollm2-135m", "--seq_len", "64",
                         "--max_chunks", "16", "--repeats", "1", "--layers", *layers,
                         "--out", str(tmp_path / "t.json")])
  assert out["selection_layers"] == [int(x) for x in layers]
  for k in ("forward_s", "forward_logits_s", "teacher_s", "cached_step_s", "uncached_step_s"):
    assert 0 < out[k] < 60, (k, out[k])
  assert out["teacher_over_forward"] == pytest.approx(out["teacher_s"] / out["forward_s"])
  assert (tmp_path / "t.json").read_text().startswith("{")
