"""The ablation tool: its variant syntax (typed values, unknown fields refused before any work), the
user's files kept, perplexity computed from the mean NLL, and a run split over its texts combined into the
rows of the whole run."""

import json

import numpy as np
import pytest

from eval.ppl_variants import combine, compare, main, parse_variant


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


EDGES = [0, 100, 200, 300]
SETTINGS = dict(model="m", method="hybrid", retention=0.5, tokens=300, prefix=0, bin=100, text="t", variants=[""],
                bin_edges=EDGES)


def part_rows(nll_by_variant: dict, first_doc: int, kv: dict, **changes):
  """A part's rows as `main` writes them: nll_by_variant maps a variant to its per-token NLL [docs, 300]."""
  bins = lambda x: x.reshape(-1, 3, 100).sum((0, 2))
  vanilla = bins(nll_by_variant["vanilla"])
  docs = nll_by_variant["vanilla"].shape[0]
  return [dict(variant=v, kv=kv[v], **compare(bins(x), vanilla, x.size), seconds=1.0,
               **{**SETTINGS, "docs": docs, "first_doc": first_doc, **changes})
          for v, x in nll_by_variant.items()]


def test_combined_parts_give_the_rows_of_one_run_over_all_their_texts():
  rng = np.random.default_rng(0)
  vanilla = rng.uniform(0.5, 6.0, size=(5, 300))
  variant = vanilla + rng.uniform(0.0, 0.2, size=(5, 300))
  whole = part_rows({"vanilla": vanilla, "hybrid": variant}, 0, {"vanilla": 1.0, "hybrid": 0.5})
  parts = [part_rows({"vanilla": vanilla[a:b], "hybrid": variant[a:b]}, a, {"vanilla": 1.0, "hybrid": kv})
           for (a, b), kv in (((0, 2), 0.48), ((2, 5), 0.5133333333333333))]
  for got, want in zip(combine(parts), whole):
    assert got["variant"] == want["variant"] and got["docs"] == 5 and got["first_doc"] == 0
    for key in ("nll", "scored_tokens", "perplexity", "ppl_vs_vanilla", "nll_vs_vanilla"):
      assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    np.testing.assert_allclose(got["nll_bins_minus_vanilla"], want["nll_bins_minus_vanilla"], atol=0.02)
  assert combine(parts)[1]["kv"] == pytest.approx((2 * 0.48 + 3 * 0.5133333333333333) / 5)


@pytest.mark.parametrize("spans, changes, match", [
    (((0, 2), (1, 3)), {}, "follow each other"),  # texts 1 in both
    (((0, 2), (3, 5)), {}, "follow each other"),  # text 2 in neither
    (((0, 2), (2, 4)), {"retention": 0.25}, "differ in retention"),
    (((0, 2), (2, 4)), {"tokens": 200}, "differ in tokens"),
])
def test_parts_of_other_runs_are_refused(spans, changes, match):
  rng = np.random.default_rng(1)
  nll = rng.uniform(0.5, 6.0, size=(6, 300))
  kv = {"vanilla": 1.0, "hybrid": 0.5}
  parts = [part_rows({"vanilla": nll[a:b], "hybrid": nll[a:b] + 0.1}, a, kv, **(changes if i else {}))
           for i, (a, b) in enumerate(spans)]
  with pytest.raises(ValueError, match=match):
    combine(parts)


def test_combine_refuses_parts_of_other_variants_and_keeps_an_existing_out(tmp_path):
  rng = np.random.default_rng(2)
  nll = rng.uniform(0.5, 6.0, size=(4, 300))
  files = []
  for i, (a, b) in enumerate(((0, 2), (2, 4))):
    rows = part_rows({"vanilla": nll[a:b], "n_local=8" if i else "hybrid": nll[a:b] + 0.1}, a,
                     {"vanilla": 1.0, "hybrid": 0.5, "n_local=8": 0.5})
    files.append(tmp_path / f"part{i}.jsonl")
    files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "all.jsonl"
  with pytest.raises(SystemExit, match="other variants"):
    main(["--combine", *map(str, files), "--out", str(out)])
  assert not out.exists()
  out.write_text("the user's rows\n")
  with pytest.raises(SystemExit, match="does not overwrite"):
    main(["--combine", *map(str, files), "--out", str(out)])
  assert out.read_text() == "the user's rows\n"


def test_combine_writes_the_whole_runs_rows(tmp_path, capsys):
  rng = np.random.default_rng(3)
  nll = rng.uniform(0.5, 6.0, size=(4, 300))
  parts, files = [], []
  for a, b in ((0, 1), (1, 4)):
    parts.append(part_rows({"vanilla": nll[a:b], "hybrid": nll[a:b] + 0.05}, a, {"vanilla": 1.0, "hybrid": 0.5}))
    files.append(tmp_path / f"part{a}.jsonl")
    files[-1].write_text("".join(json.dumps(r) + "\n" for r in parts[-1]))
  out = tmp_path / "all.jsonl"
  main(["--combine", *map(str, files), "--out", str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["perplexity"] for r in rows] == pytest.approx([r["perplexity"] for r in combine(parts)])
  assert rows[1]["docs"] == 4 and rows[1]["out"] == str(out)
  assert "hybrid" in capsys.readouterr().out
