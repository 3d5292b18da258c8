"""The ablation tool: its variant syntax (typed values, unknown fields refused before any work), the
user's files kept, and perplexity computed from the mean NLL."""

import numpy as np
import pytest

from eval.ppl_variants import compare, main, parse_variant


def test_variants_parse_to_typed_chunk_config_fields():
  assert parse_variant("") == {}
  assert parse_variant("recent_share=0.75,n_local=8,kv_budget=None,scorer=attention") == dict(
      recent_share=0.75, n_local=8, kv_budget=None, scorer="attention")
  assert parse_variant("selection_layers=7;15,dense_layers=0;") == dict(selection_layers=(7, 15), dense_layers=(0,))


def test_an_unknown_field_is_refused():
  with pytest.raises(SystemExit, match="unknown ChunkConfig field 'recent'"):
    parse_variant("recent=0.5")


def test_an_existing_out_file_is_kept(tmp_path):
  out = tmp_path / "mine.jsonl"
  out.write_text("the user's rows\n")
  with pytest.raises(SystemExit, match="does not overwrite"):
    main(["--out", str(out), "--variants", "n_local=8"])
  assert out.read_text() == "the user's rows\n"


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.3])
def test_perplexity_change_is_of_the_mean_nll_not_the_summed_one(shift):
  rng = np.random.default_rng(int(shift * 100))
  vanilla_nll = rng.uniform(0.5, 6.0, size=300)  # per scored token
  variant_nll = vanilla_nll + shift + rng.uniform(-0.01, 0.01, size=300)
  edges = [0, 100, 200, 300]
  bins = lambda x: [x[a:b].sum() for a, b in zip(edges[:-1], edges[1:])]
  row = compare(bins(variant_nll), bins(vanilla_nll), 300)
  assert row["perplexity"] == pytest.approx(np.exp(variant_nll.mean()), rel=1e-9)
  assert row["ppl_vs_vanilla"] == pytest.approx(np.exp(variant_nll.mean()) / np.exp(vanilla_nll.mean()) - 1, abs=1e-9)
  assert row["nll_vs_vanilla"] == pytest.approx(variant_nll.sum() / vanilla_nll.sum() - 1, abs=1e-9)
  assert len(row["nll_bins_minus_vanilla"]) == 3
