"""The ablation tool's variant syntax: typed values, and unknown fields refused before any work."""

import pytest

from eval.ppl_variants import main, parse_variant


def test_variants_parse_to_typed_chunk_config_fields():
  assert parse_variant("") == {}
  assert parse_variant("recent_share=0.75,n_local=8,kv_budget=None,scorer=attention") == dict(
      recent_share=0.75, n_local=8, kv_budget=None, scorer="attention")


def test_an_unknown_field_is_refused():
  with pytest.raises(SystemExit, match="unknown ChunkConfig field 'recent'"):
    parse_variant("recent=0.5")


def test_an_existing_out_file_is_kept(tmp_path):
  out = tmp_path / "mine.jsonl"
  out.write_text("the user's rows\n")
  with pytest.raises(SystemExit, match="does not overwrite"):
    main(["--out", str(out), "--variants", "n_local=8"])
  assert out.read_text() == "the user's rows\n"
