"""The selection-family ceiling (eval.selection_ceiling): a full budget is vanilla exactly, the
chosen units follow a plain loop's rule, and bad arguments stop before the model loads."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from eval import selection_ceiling as SC
from tests.tiny_models import tiny_params

T, PREFIX = 96, 24


def _setup(arch="llama", n_layers=3, seed=0):
  kw = dict(layer_sliding=(True, False, False)) if arch == "gemma3" else {}
  params = tiny_params(arch, n_layers=n_layers, **kw)
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, params.config.vocab_size, T), jnp.int32)
  ends = np.sort(np.random.default_rng(seed + 1).choice(np.arange(6, T), 14, replace=False))
  unit_of, unit_end = SC.units(T, 4, ends=ends)
  cfg = params.config
  sparse = np.array([i != 0 and not cfg.sliding_layers[i] for i in range(cfg.n_layers)])
  return params, tokens, unit_of, unit_end, sparse


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dense_pass_is_the_model_and_a_full_budget_reads_everything(arch):
  params, tokens, unit_of, unit_end, sparse = _setup(arch)
  van, mass = SC.vanilla_nll(params, tokens, unit_of, len(unit_end), PREFIX)
  logp = jax.nn.log_softmax(cj.forward(params, tokens[None])[0], -1)
  ref = -np.take_along_axis(np.asarray(logp[:-1]), np.asarray(tokens[1:, None]), -1)[PREFIX - 1:, 0]
  np.testing.assert_allclose(np.asarray(van), ref, atol=1e-5)
  cfg = params.config
  assert mass.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, T, len(unit_end))
  for sharing in SC.SHARING:
    for timing in SC.TIMING:
      nll, share = SC.family_nll(params, tokens, unit_of, unit_end, mass, sparse, sparse,
                                 SC.Budget(retention=1.0, recent_share=0.0), sharing, timing, PREFIX)
      if timing == "fresh":  # every earlier unit fits the whole budget
        np.testing.assert_allclose(np.asarray(nll), ref, atol=1e-5)
      assert 0.0 < float(share) <= 1.0


def _loop_choice(score_TU, unit_end, budget: SC.Budget, timing: str):
  """The rule written as a loop over queries: candidates by the window and the serving boundary,
  taken in score order while their lengths fit."""
  lens = np.diff(unit_end, prepend=budget.n_sink - 1)
  take = np.zeros(score_TU.shape, bool)
  for t in range(score_TU.shape[0]):
    recent, room = (float(x) for x in budget.split(jnp.asarray(t + 1.0)))
    start = t + 1 - recent
    at = t
    if timing == "boundary":
      before = unit_end[unit_end < t]
      at = int(before[-1]) if len(before) else 0
    cand = [u for u in range(len(unit_end)) if unit_end[u] < start and unit_end[u] <= at]
    used = 0
    for u in sorted(cand, key=lambda u: -score_TU[at, u]):
      used += lens[u]
      if used > room:
        break
      take[t, u] = True
  return take


@pytest.mark.parametrize("timing", SC.TIMING)
@pytest.mark.parametrize("retention,recent_share", [(0.5, 0.75), (0.3, 0.0), (0.8, 0.5)])
def test_choice_matches_a_loop(timing, retention, recent_share):
  rng = np.random.default_rng(7)
  _, unit_end = SC.units(T, 4, ends=np.sort(rng.choice(np.arange(6, T), 14, replace=False)))
  score = rng.permutation(T * len(unit_end)).reshape(T, len(unit_end)).astype(np.float32)  # no ties
  budget = SC.Budget(retention, recent_share)
  lens = np.diff(unit_end, prepend=3)
  got = np.asarray(SC.choose_units(jnp.asarray(score), jnp.asarray(unit_end), jnp.asarray(lens), budget, timing))
  np.testing.assert_array_equal(got, _loop_choice(score, unit_end, budget, timing))
  assert got.any()


def test_a_shared_selection_is_one_selection_and_a_tight_budget_reads_less():
  params, tokens, unit_of, unit_end, sparse = _setup(n_layers=4)
  _, mass = SC.vanilla_nll(params, tokens, unit_of, len(unit_end), PREFIX)
  budget = SC.Budget(retention=0.5, recent_share=0.5)
  pos = jnp.arange(T)
  recent, _ = budget.split(pos + 1)
  cand = jnp.asarray(unit_end)[None, :] < (pos + 1 - recent)[:, None]
  shared = SC._family_scores(mass, cand, "shared", jnp.asarray(sparse))
  assert np.all(np.asarray(shared) == np.asarray(shared)[1:2, :1])  # every layer and head, one score
  per_head = SC._family_scores(mass, cand, "kv_head", jnp.asarray(sparse))
  assert not np.allclose(np.asarray(per_head)[1], np.asarray(per_head)[2])
  _, share = SC.family_nll(params, tokens, unit_of, unit_end, mass, sparse, sparse, budget, "kv_head", "fresh", PREFIX)
  assert 0.3 < float(share) < 0.6  # about half of what each query has seen


def test_pages_cover_the_text_after_the_sinks():
  unit_of, ends = SC.units(40, 4, page=8)
  assert ends.tolist() == [11, 19, 27, 35]
  assert (unit_of[:4] == -1).all() and (unit_of[36:] == -1).all()  # sinks, and the open tail
  assert unit_of[4:12].tolist() == [0] * 8


@pytest.mark.parametrize("argv,message", [
    (["--retention", "1.5"], "--retention must be in"),
    (["--tokens", "8192"], "--tokens <= 4096"),
    (["--families", "shared/later"], "a family is sharing/timing"),
    (["--unit", "sentences"], "--unit is 'chunks' or a page size"),
    (["--scorer", "sparq", "--rank", "0"], "--rank must be from 1 to the head dimension, 64; got 0"),
    (["--scorer", "sparq", "--rank", "65"], "--rank must be from 1 to the head dimension, 64; got 65"),
    (["--scorer", "sparq", "--sketch", "64"], "--sketch is a multiple of 32 bits for --scorer lowrank"),
    (["--scorer", "lowrank", "--sketch", "40"], "--sketch is a multiple of 32 bits"),
    (["--scorer", "lowrank", "--sketch_estimate", "qjl"], "give --sketch too"),
    (["--docs", "0"], "--docs must be at least 1; got 0"),
    (["--text", "{tmp}/nowhere.txt"], "--text .*nowhere.txt is not a file"),
])
def test_bad_arguments_stop_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(SC.cj, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  (tmp_path / "text.txt").write_text("One sentence.\n")
  text = [] if "--text" in argv else ["--text", str(tmp_path / "text.txt")]
  with pytest.raises(SystemExit) as e:
    SC.main([a.format(tmp=tmp_path) for a in argv] + text)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "error: " in err and re.search(message, err), err


def test_an_existing_out_file_is_kept(tmp_path, capsys):
  out = tmp_path / "mine.jsonl"
  out.write_text("the user's rows\n")
  with pytest.raises(SystemExit):
    SC.main(["--out", str(out)])
  assert "does not overwrite" in capsys.readouterr().err
  assert out.read_text() == "the user's rows\n"


def test_the_bound_holds_and_is_exact_on_one_token_units():
  rng = np.random.default_rng(3)
  K, G, Tq, S, D = 2, 2, 5, 20, 8
  q = jnp.asarray(rng.normal(size=(K, G, Tq, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(S, K, D)), jnp.float32)
  unit_of = np.full(S, -1, np.int32)
  unit_of[2:8], unit_of[8:12], unit_of[12:13], unit_of[13:18] = 0, 1, 2, 3
  bound = np.asarray(SC.unit_bound(q, k, jnp.asarray(unit_of), 4, 0.5))
  true = 0.5 * np.einsum("kgtd,skd->kgts", np.asarray(q), np.asarray(k))
  for u in range(4):
    best = true[..., unit_of == u].max(-1)
    assert (bound[..., u] >= best - 1e-5).all()
  np.testing.assert_allclose(bound[..., 2], true[..., 12], rtol=1e-5, atol=1e-5)  # one key: exact
  mass = np.asarray(SC.estimated_mass(jnp.asarray(bound), jnp.asarray(unit_of), 4))
  assert np.isfinite(mass).all() and np.allclose(mass.max(-1), 1.0)
  # exp(logit) * length, up to one constant per query
  ratio = mass / (np.exp(bound) * np.bincount(unit_of[unit_of >= 0]))
  np.testing.assert_allclose(ratio / ratio[..., :1], 1.0, rtol=1e-4)


def test_the_centroid_is_the_mean_key():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)
  k = rng.normal(size=(12, 2, 8)).astype(np.float32)
  unit_of = np.array([-1, -1, 0, 0, 0, 1, 1, 2, 2, 2, 2, -1], np.int32)
  got = np.asarray(SC.unit_centroid(q, jnp.asarray(k), jnp.asarray(unit_of), 3, 0.25))
  for u in range(3):
    want = 0.25 * np.einsum("kgtd,kd->kgt", np.asarray(q), k[unit_of == u].mean(0))
    np.testing.assert_allclose(got[..., u], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scorer, sketch, estimate", [(s, 0, "qjl") for s in SC.SCORERS]
                         + [("lowrank", 64, "qjl"), ("lowrank", 64, "simhash")])
def test_empty_padding_units_change_no_family(scorer, sketch, estimate):
  """Texts of different chunk counts are padded to one unit count (one compile): the padding is never chosen."""
  params, tokens, unit_of, unit_end, sparse = _setup(n_layers=3)
  _, padded_end = SC.units(T, 4, ends=unit_end, pad_to=len(unit_end) + 5)
  assert padded_end.tolist() == unit_end.tolist() + [T] * 5
  budget = SC.Budget(retention=0.5, recent_share=0.5)
  rank = params.config.head_dim // 2
  _, mass = SC.vanilla_nll(params, tokens, unit_of, len(unit_end), PREFIX, scorer, rank, sketch, estimate)
  _, padded_mass = SC.vanilla_nll(params, tokens, unit_of, len(padded_end), PREFIX, scorer, rank, sketch, estimate)
  assert np.isfinite(np.asarray(padded_mass)).all()
  for sharing, timing in [("shared", "boundary"), ("kv_head", "fresh")]:
    want = SC.family_nll(params, tokens, unit_of, unit_end, mass, sparse, sparse, budget, sharing, timing, PREFIX)
    got = SC.family_nll(params, tokens, unit_of, padded_end, padded_mass, sparse, sparse, budget, sharing, timing,
                        PREFIX)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5)
    np.testing.assert_allclose(float(got[1]), float(want[1]), atol=1e-6)


def test_scoring_reads_are_what_each_scorer_reads():
  assert SC.scoring_reads("attention", 50, 1000, 64, 16) == 0.5  # all of K
  assert SC.scoring_reads("sparq", 50, 1000, 64, 16) == 0.5  # 16 of 64 float32 dims touch all 4 lines of a key
  assert SC.scoring_reads("sparq", 50, 1000, 64, 2) == 2 / 8  # 2 dims: at most 2 of the 4 lines
  assert SC.scoring_reads("sparq", 50, 1000, 256, 64, itemsize=2) == 0.5  # gemma3's bf16 keys: 8 lines
  assert SC.scoring_reads("bound", 50, 1000, 64, 16) == 2 * 50 / 2000  # min and max key a unit
  assert SC.scoring_reads("centroid", 50, 1000, 64, 16) == 50 / 2000
  assert SC.scoring_reads("lowrank", 50, 1000, 64, 16) == 17 / 128  # 16 coordinates a key and the rest's length
  assert SC.scoring_reads("lowrank", 50, 1000, 64, 16, sketch=128) == 17 / 128 + 16 / 512  # and 16 bytes of signs
