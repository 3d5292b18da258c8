"""bench/bench_prefill_scorer.py times the shared rule's decode beside each prompt scorer, whatever the library's
default rule: its page, the README and bench/summary.py read its rows as the QK Adapters' decode."""

import sys
import types


def test_every_chunkllm_row_decodes_by_the_shared_rule(bench_script, monkeypatch, tmp_path):
  bench = bench_script("bench_prefill_scorer")
  calls = []
  out = types.SimpleNamespace(stats={"prefill_s": [1.0], "decode_tok_s": [10.0]})
  model = types.SimpleNamespace(params="params", config="config", tokenizer="tokenizer")
  monkeypatch.setattr(bench.cj, "load", lambda name: model)  # no weights: what each row asks for is the point
  monkeypatch.setattr(bench.cj, "load_adapters", lambda name, cfg: "adapters")
  monkeypatch.setattr(bench.cj, "with_adapters", lambda params, adapters: params)
  monkeypatch.setattr(bench.haystack, "passkey_prompt", lambda tok, n, depth: ("text", "12345"))
  monkeypatch.setattr(bench, "encode_prompt", lambda tok, text: list(range(64)))
  monkeypatch.setattr(bench.cj, "generate", lambda *a, **kw: out)
  monkeypatch.setattr(bench.cj, "chunk_generate", lambda *a, **kw: calls.append(kw) or out)
  monkeypatch.setattr(sys, "argv", ["bench_prefill_scorer.py", "--repeats", "1", "--out", str(tmp_path / "p.md")])
  bench.main()
  assert len(calls) == 6  # three ChunkLLM rows, a compiling round and a timed one
  assert {kw.get("selection") for kw in calls} == {"shared"}
  assert {kw.get("prefill_scorer", "attention") for kw in calls} == {"attention", "adapter"}
  assert (tmp_path / "p.json").exists()
