"""Chunk selection: the scorers, the vote and the two keep rules (top-k, token budget) against the
same rules written with numpy, one row at a time; and the config checks that run before compiling."""

import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.selection import (FILL_PASSES, adapter_probs, adapter_window_probs, attention_probs, choose,
                                    chunk_lengths, local_count, order_by_score, score_read_share, vote_scores)


def softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def scores(q_SBd, key_SBCd, n_cand_B, vote):
  """The selection layers' vote for one query per row: [B, C] (jnp)."""
  probs = jnp.stack([adapter_probs(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(n_cand_B)[:, None])
                     for q, k in zip(q_SBd, key_SBCd)])
  return vote_scores(probs, vote)[:, 0]


@pytest.mark.parametrize("vote", ["sum", "max"])
@pytest.mark.parametrize("top_chunks, n_local", [(3, 1), (5, 0), (8, 2)])
def test_top_chunks_selection_matches_numpy(vote, top_chunks, n_local):
  rng = np.random.RandomState(top_chunks * 10 + n_local)
  S, B, C, d = 4, 3, 12, 8
  q = rng.randn(S, B, d).astype(np.float32) * 2
  keys = rng.randn(S, B, C, d).astype(np.float32) * 2
  n_chunks = np.asarray([C, 7, n_local + 1])  # full table, partly full, one candidate (or none)
  n_cand = np.maximum(n_chunks - n_local, 0)
  cfg = ChunkConfig(top_chunks=top_chunks, n_local=n_local, max_chunks=C, vote=vote)
  score = scores(q, keys, n_cand, vote)
  got = np.asarray(choose(score[:, None], jnp.asarray(n_cand)[:, None], jnp.ones((B, C), jnp.int32),
                          jnp.zeros((B, 1), jnp.int32), jnp.ones((B, 1), jnp.int32), cfg))[:, 0]
  for b in range(B):
    want = np.zeros(C, bool)
    if n_cand[b]:
      p = softmax(np.einsum("sd,scd->sc", q[:, b], keys[:, b, :n_cand[b]]) / np.sqrt(d))
      want[np.argsort(-(p.sum(0) if vote == "sum" else p.max(0)), kind="stable")[:top_chunks]] = True
    np.testing.assert_array_equal(got[b], want)


def test_max_vote_keeps_a_chunk_one_sharp_layer_wants():
  """Three layers prefer chunk 0; one layer is sure of chunk 5. The sum keeps 0 (2.2 against 1.1),
  the max keeps 5."""
  S, C, d = 4, 8, 2
  q = np.zeros((S, 1, d), np.float32)
  keys = np.zeros((S, 1, C, d), np.float32)
  q[:, 0, 0] = 1.0
  keys[:3, 0, 0, 0] = 3.0  # three layers: chunk 0 (p = 0.74 each)
  keys[3, 0, 5, 0] = 40.0  # one layer: chunk 5 (p = 1), which the others give 0.04 each
  for vote, want in [("sum", 0), ("max", 5)]:
    best = int(jnp.argmax(scores(q, keys, np.asarray([C]), vote)[0]))
    assert best == want, vote


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("keep, boundary_tokens, boundary_share",
                         [("chunk", False, 1.0), ("boundary", False, 1.0), ("chunk", True, 1.0), ("chunk", True, 0.25)])
@pytest.mark.parametrize("recent_share", [0.0, 0.5, 1.0])
def test_budget_fills_in_score_order_within_one_chunk(seed, budget, keep, boundary_tokens, boundary_share,
                                                      recent_share):
  """On random segmentations: the most recent candidates that fit the recent share of the budget
  come first, then chunks in score order while they fit, then FILL_PASSES - 1 more passes over those
  left out that fit what remains; the kept tokens never pass the budget. With `boundary_tokens`
  the budget pays first for the last tokens of the chunks left out: every candidate's, where
  `boundary_share` of what the budget leaves holds them, and a chunk then costs the rest of it (where
  they leave no candidate room, the best by score alone is read whole in place of the oldest of them,
  if it fits what the budget leaves without them); else that share's worth, and chunks cost their length."""
  rng = np.random.RandomState(seed)
  B, C, n_sink = 4, 40, 4
  lengths = rng.randint(1, 40, (B, C))
  n_chunks = rng.randint(1, C + 1, B)
  ends = n_sink - 1 + np.cumsum(lengths, 1)
  starts = ends - lengths + 1
  lens = np.asarray(chunk_lengths(jnp.asarray(starts), jnp.asarray(ends), jnp.asarray(n_chunks)))
  n_local = 2
  n_cand = np.maximum(n_chunks - n_local, 0)
  seen = ends[np.arange(B), n_chunks - 1] + 1
  fixed = n_sink + np.asarray([lens[b, max(n_chunks[b] - n_local, 0):n_chunks[b]].sum() for b in range(B)])
  score = rng.rand(B, C).astype(np.float32)
  cfg = ChunkConfig(n_sink=n_sink, n_local=n_local, max_chunks=C, kv_budget=budget, keep=keep,
                    boundary_tokens=boundary_tokens, boundary_share=boundary_share, recent_share=recent_share)
  got = np.asarray(choose(jnp.asarray(score)[:, None], jnp.asarray(n_cand)[:, None], jnp.asarray(lens),
                          jnp.asarray(fixed)[:, None], jnp.asarray(seen)[:, None], cfg))[:, 0]
  for b in range(B):
    n_last = 0
    if boundary_tokens:  # the last tokens read: every candidate's, or the share's worth of what the budget leaves
      n_last = n_cand[b] if boundary_share == 1.0 else \
          min(n_cand[b], int(np.floor(boundary_share * max(np.ceil(budget * seen[b]) - fixed[b], 0))))
    every = boundary_tokens and n_last == n_cand[b]
    cost = np.ones(C, int) if keep == "boundary" else lens[b] - int(every)
    always = fixed[b] + n_last  # sinks, local, open (and the last tokens)
    room = int(np.ceil(budget * seen[b])) - always
    key = np.where(np.arange(C) < n_cand[b], score[b], -1.0)
    newer = 0  # candidates from the newest back, while they and what is always read fit the share
    for c in range(n_cand[b] - 1, -1, -1):
      newer += cost[c]
      if always + newer > np.floor(recent_share * np.ceil(budget * seen[b])):
        break
      key[c] = np.inf
    want, used = np.zeros(C, bool), 0
    scored = [c for c in range(n_cand[b]) if np.isfinite(key[c])]
    room_scored = room - sum(cost[c] for c in range(n_cand[b]) if not np.isfinite(key[c]))
    if every and scored and min(cost[c] for c in scored) > room_scored:
      best = max(scored, key=lambda c: (key[c], -c))  # the oldest of equal scores
      want[best] = cost[best] + 1 <= room_scored + len(scored)  # whole, in place of the scored last tokens
    held = 0 if every or not boundary_tokens else n_last  # held for the last tokens while as many are left out
    for _ in range(FILL_PASSES):  # each pass: in score order over the chunks left out that fit what
      left, took, n = room - used, 0, 0  # remains, while their running sum fits it
      n_out = n_cand[b] - want.sum()
      freed = lambda k: held - min(held, n_out - k)  # once k more chunks are taken, fewer are left out
      for c in np.argsort(-key, kind="stable")[:n_cand[b]]:
        if want[c] or cost[c] > left + freed(1):
          continue
        n += 1
        if took + cost[c] > left + freed(n):
          break
        want[c], took = True, took + cost[c]
      used += took
    np.testing.assert_array_equal(got[b], want)
    if every and scored and min(cost[c] for c in scored) > room_scored:
      # What is read whole, with the sinks, local and open chunks, fits the budget.
      assert fixed[b] + lens[b][got[b]].sum() <= max(np.ceil(budget * seen[b]), fixed[b])
    else:  # (the last tokens held: only as many as chunks are left out)
      read = always - held + min(held, n_cand[b] - got[b].sum()) + cost[got[b]].sum()
      assert read <= max(np.ceil(budget * seen[b]), always)


@pytest.mark.parametrize("kw, want", [
    (dict(kv_budget=0.25), [13, 50, 200]), (dict(kv_budget=0.25, kv_budget_min_tokens=100), [50, 100, 200]),
    (dict(kv_budget_tokens=30, kv_budget_min_tokens=100), [50, 100, 100]),
    (dict(kv_budget_tokens=150, kv_budget_min_tokens=100), [50, 150, 150])])
def test_budget_tokens_with_a_floor(kw, want):
  """The budget in tokens: a share or a count, never under the floor, never over the tokens seen."""
  np.testing.assert_array_equal(ChunkConfig(**kw).budget_tokens(jnp.asarray([50, 200, 800])), want)


@pytest.mark.parametrize("kw, err, match", [
    (dict(kv_budget=0.0), ValueError, r"kv_budget is a fraction"),
    (dict(kv_budget=1.5), ValueError, r"kv_budget is a fraction"),
    (dict(kv_budget=0.5, kv_budget_tokens=10), ValueError, "not both"),
    (dict(kv_budget_tokens=0), ValueError, "kv_budget_tokens=0 must be >= 1"),
    (dict(kv_budget_tokens=2.5), TypeError, "must be an int"),
    (dict(kv_budget=0.5, kv_budget_min_tokens=-1), ValueError, "kv_budget_min_tokens=-1 must be >= 0"),
    (dict(kv_budget=0.5, kv_budget_min_tokens=2.5), TypeError, "kv_budget_min_tokens must be an int"),
    (dict(kv_budget_min_tokens=64), ValueError, "a floor under a KV budget"),
    (dict(scorer="oracle"), ValueError, "scorer must be"),
    (dict(vote="per_layer"), ValueError, "vote must be"),
    (dict(kv_budget=0.5, recent_share=1.5), ValueError, "recent_share is a share"),
    (dict(kv_budget=0.5, boundary_share=0.0), ValueError, r"boundary_share is a share .* in \(0, 1\]"),
    (dict(kv_budget=0.5, boundary_share=float("nan")), ValueError, "boundary_share is a share"),
    (dict(top_chunks="16"), TypeError, "top_chunks must be an int"),
])
def test_bad_settings_are_named(kw, err, match):
  with pytest.raises(err, match=match):
    ChunkConfig(**kw).validate(128, 3)


@pytest.mark.parametrize("kw, reads", [
    (dict(kv_budget=0.5), True),  # a budget pays; a dense prefill (the attention scores the prompt), chunks whole
    (dict(kv_budget_tokens=64), True),
    (dict(), False),  # no budget: `top_chunks` chunks, the paper's count, and no more
    (dict(boundary_tokens=True), True),  # asked for: one read a chunk left out, beyond the count
    (dict(kv_budget=0.5, prefill_scorer="adapter"), False),  # the chunk-sparse prefill reads chunks whole
    (dict(kv_budget=0.5, prefill="sparse"), False),
    (dict(kv_budget=0.5, keep="boundary"), False),  # every chunk read is one boundary token already
    (dict(kv_budget=0.5, boundary_tokens=False), False),
    (dict(kv_budget=0.5, selection="shared", prefill_scorer="adapter", prefill="dense", boundary_tokens=True), True),
])
def test_boundary_tokens_default_to_on_where_a_budget_pays_for_them(kw, reads):
  cfg = ChunkConfig(**kw).validate(128, 3)
  assert cfg.reads_boundary_tokens is reads
  assert cfg.resolve((0, 2), qk_layers=(0, 2)).boundary_tokens is reads  # resolved: what the rows record


@pytest.mark.parametrize("layers, scorer, match", [
    ((7,), "adapter", "not full-attention layers"),
    ((1,), "adapter", "not full-attention layers"),  # layer 1 slides
    ((2,), "adapter", "have no QK Adapter"),
    ((), "attention", "is empty"),
])
def test_bad_selection_layers_are_named(layers, scorer, match):
  with pytest.raises(ValueError, match=match):
    ChunkConfig(selection_layers=layers, scorer=scorer).resolve((0, 2, 3), qk_layers=(0, 3))


def test_selection_layers_default_to_the_stored_choice_then_every_qk_layer():
  assert ChunkConfig().resolve((0, 1, 2), (0, 1, 2), stored_layers=(2,)).selection_layers == (2,)
  assert ChunkConfig().resolve((0, 1, 2), (0, 1, 2)).selection_layers == (0, 1, 2)
  assert ChunkConfig(selection_layers=(1,), scorer="attention").resolve((0, 1), (0,)).selection_layers == (1,)


def test_score_queries_default_per_scorer():
  assert ChunkConfig(scorer="attention").resolve((0, 1), (0, 1)).score_queries == 16
  assert ChunkConfig().resolve((0, 1), (0, 1)).score_queries == 1  # the paper's boundary query
  assert ChunkConfig().resolve((0, 1), (0, 1), stored_queries=8).score_queries == 8  # as the adapters trained
  assert ChunkConfig(score_queries=3).resolve((0, 1), (0, 1), stored_queries=8).score_queries == 3


@pytest.mark.parametrize("fields, mode", [
    (dict(), "dense"),  # the default: the prompt scored by attention
    (dict(prefill_scorer="adapter"), "sparse"),
    (dict(scorer="attention", prefill_scorer=None), "dense"),
    (dict(prefill_scorer=None), "sparse"),  # the adapters score the prompt
    (dict(prefill="sparse"), "sparse"),
    (dict(prefill_scorer="adapter", prefill="dense"), "dense"),
])
def test_prefill_mode_follows_the_prompt_scorer_unless_given(fields, mode):
  ccfg = ChunkConfig(**fields)
  assert ccfg.prefill_mode == mode
  assert ccfg.resolve((0, 1), (0, 1)).prefill == mode


@pytest.mark.parametrize("Q", [1, 3])
def test_adapter_window_probs_match_a_numpy_reference(Q):
  """Per query: softmax over the candidates that end at or before it; then the max over the window."""
  rng = np.random.default_rng(Q)
  B, R, C, d = 2, 3, 7, 4
  q = rng.normal(size=(B, R, Q, d)).astype(np.float32)
  key = rng.normal(size=(B, C, d)).astype(np.float32)
  ends = np.sort(rng.choice(np.arange(4, 40), size=(B, C), replace=False), axis=1).astype(np.int32)
  n_cand = rng.integers(0, C + 1, size=(B, R)).astype(np.int32)
  q_pos = rng.integers(-2, 45, size=(B, R, Q)).astype(np.int32)
  got = np.asarray(adapter_window_probs(jnp.asarray(q), jnp.asarray(key), jnp.asarray(ends), jnp.asarray(n_cand),
                                        jnp.asarray(q_pos)))
  want = np.zeros((B, R, C), np.float32)
  for b in range(B):
    for r in range(R):
      for i in range(Q):
        ok = (np.arange(C) < n_cand[b, r]) & (ends[b] <= q_pos[b, r, i])
        if ok.any():
          s = key[b] @ q[b, r, i] / np.sqrt(d)
          e = np.where(ok, np.exp(s - s[ok].max()), 0.0)
          want[b, r] = np.maximum(want[b, r], e / e.sum())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fill_passes_use_the_budget_that_one_pass_leaves(monkeypatch):
  """One pass in score order stops at the first chunk that does not fit; the passes after it fill
  the rest with shorter chunks: on 64 random rows, the mean shortfall drops to under a quarter and
  no row is short by as much as its smallest chunk left out."""
  from chunkllm_jax import selection
  rng = np.random.RandomState(0)
  B, C = 64, 120
  lens = rng.randint(5, 64, (B, C))
  seen = lens.sum(1) + 200
  score = rng.rand(B, C).astype(np.float32)
  cfg = ChunkConfig(max_chunks=C, kv_budget=0.25, recent_share=0.0, boundary_tokens=False)  # score order alone

  def shortfall():
    got = np.asarray(choose(jnp.asarray(score)[:, None], jnp.full((B, 1), C), jnp.asarray(lens),
                            jnp.full((B, 1), 100), jnp.asarray(seen)[:, None], cfg))[:, 0]
    left_out = np.where(got, 10**6, lens).min(1)
    return np.ceil(0.25 * seen) - 100 - (lens * got).sum(1), left_out

  short, left_out = shortfall()
  monkeypatch.setattr(selection, "FILL_PASSES", 1)
  one_pass, _ = shortfall()
  assert np.all(short >= 0) and short.mean() < 0.25 * one_pass.mean()
  assert np.all(short < left_out)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("key_block", [512, 16, 7])
@pytest.mark.parametrize("heads", ["max", "mean"])
def test_attention_probs_match_a_numpy_loop(seed, key_block, heads):
  """The frozen-attention scorer against numpy, whether the keys fit one block or many (7 divides
  none of the lengths, so the last block is clamped): per query and head, the softmax over the
  candidates' tokens (none after the query's position), summed per chunk; then the max or mean over
  heads. A row with no query (position -1) or no candidate scores 0."""
  rng = np.random.default_rng(seed)
  B, R, H, K, D, T, C, n_sink = 2, 3, 4, 2, 8, 61, 9, 2
  q = rng.normal(size=(B, R, H, D)).astype(np.float32)
  k = rng.normal(size=(B, T, K, D)).astype(np.float32)
  ends = np.full((B, C), -1, np.int32)
  ends[0, :7] = np.sort(rng.choice(np.arange(n_sink, T - 1), 7, replace=False))
  ends[1, :4] = np.sort(rng.choice(np.arange(n_sink, 40), 4, replace=False))
  n_cand = np.asarray([[7, 5, 6], [4, 0, 3]], np.int32)
  q_pos = np.asarray([[T - 1, int(ends[0, 3]) + 1, -1], [50, 45, int(ends[1, 1])]], np.int32)
  got = np.asarray(attention_probs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(ends), jnp.asarray(n_cand),
                                   n_sink=n_sink, scale=0.4, q_pos_BR=jnp.asarray(q_pos), heads=heads,
                                   key_block=key_block))
  for b in range(B):
    for r in range(R):
      c = int(n_cand[b, r])
      want = np.zeros(C)
      hi = min(int(ends[b, c - 1]), int(q_pos[b, r])) if c else -1
      if hi >= n_sink:
        s = np.einsum("hd,thd->ht", q[b, r], np.repeat(k[b, n_sink:hi + 1], H // K, axis=1)) * 0.4
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        cum = np.concatenate([np.zeros((H, 1)), np.cumsum(p, -1)], -1)
        at = lambda e: cum[:, min(max(e - n_sink + 1, 0), hi - n_sink + 1)]
        mass = np.stack([at(int(ends[b, i])) - at(int(ends[b, i - 1]) if i else n_sink - 1) for i in range(c)], -1)
        want[:c] = mass.max(0) if heads == "max" else mass.mean(0)
      np.testing.assert_allclose(got[b, r], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("C", [1, 2, 40, 1024, 4096])
def test_the_score_order_is_a_stable_descending_sort(C):
  """`order_by_score` (one int32 sort): best first, ties by position, on scores apart by more than its
  resolution, with the values `choose` plants (inf for the recent chunks, -1 for non-candidates) and
  exact ties among them."""
  rng = np.random.default_rng(C)
  score = (2.0 ** (rng.permutation(C) / 64)).astype(np.float32)[None, None].repeat(2, 1)  # 1.1% apart; two rows
  score[0, 0, ::7] = np.inf
  score[0, 0, 1::5] = -1.0
  score[0, 1, ::3] = 0.0
  got = np.asarray(order_by_score(jnp.asarray(score)))
  for r in range(2):
    np.testing.assert_array_equal(got[0, r], np.argsort(-score[0, r], kind="stable"))


def test_scores_closer_than_the_keys_resolution_go_by_position():
  score = np.zeros((1, 1, 1024), np.float32)  # 1024 chunks: the index takes 10 bits, scores keep 13 of 23
  score[0, 0, [5, 9, 700]] = [0.5, 0.50004, 0.7]  # 5 and 9: 8e-5 apart, under 2^-13 relative: tied
  assert np.asarray(order_by_score(jnp.asarray(score)))[0, 0, :3].tolist() == [700, 5, 9]
  score[0, 0, 9] = 0.5003  # 6e-4 apart: in score order
  assert np.asarray(order_by_score(jnp.asarray(score)))[0, 0, :3].tolist() == [700, 9, 5]


@pytest.mark.parametrize("head_dim, itemsize, rank, estimate, want", [
    (64, 4, None, "sparq", 0.5),  # the exact score: all of K, half the KV
    (64, 4, 16, "sparq", 0.5),  # 16 of 64 float32 dims: all 4 lines of every key
    (64, 4, 2, "sparq", 0.25),  # 2 dims touch at most 2 of the 4 lines
    (256, 2, 64, "sparq", 0.5),  # gemma3's bfloat16 keys: 8 lines
    (64, 4, 16, "lowrank", 17 / 128),  # 16 coordinates and the missed length a key, contiguous
])
def test_what_the_per_head_scores_read(head_dim, itemsize, rank, estimate, want):
  assert score_read_share(head_dim, itemsize, rank, estimate) == pytest.approx(want)


def _local_count_numpy(ends, n, pos, cfg):
  """`local_count` one row at a time: the most of the n_local newest chunks (at least one) that fit the recent
  share of the budget with the sinks and the open chunk."""
  most = min(cfg.n_local, n)
  if not (cfg.budgeted and cfg.recent_share > 0) or cfg.n_local <= 1:
    return most
  end_of = lambda i: ends[i] + 1 if i >= 0 else cfg.n_sink
  room = int(np.floor(cfg.recent_share * int(cfg.budget_tokens(pos + 1)))) - cfg.n_sink - max(pos + 1 - end_of(n - 1), 0)
  fit = max([m for m in range(1, most + 1) if end_of(n - 1) - end_of(n - 1 - m) <= room], default=1)
  return min(fit, most)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kw", [dict(), dict(kv_budget=0.25), dict(kv_budget=0.5), dict(kv_budget_tokens=100),
                                dict(kv_budget=0.25, recent_share=0.0), dict(kv_budget=0.25, n_local=1),
                                dict(kv_budget=1.0)])
def test_local_chunks_fit_the_recent_share(seed, kw):
  """Under a budget with a recent share, the local chunks always read are as many of the n_local newest as fit
  that share (at least the newest); without one, n_local of them."""
  rng = np.random.RandomState(seed)
  cfg = ChunkConfig(n_sink=4, max_chunks=64, **{"n_local": 4, **kw})
  B, C = 6, cfg.max_chunks
  lengths = [rng.randint(1, 65, size=C) for _ in range(B)]  # chunks of 1 to 64 tokens
  lengths[3][:] = 64  # text closed by force: every chunk as long as a chunk gets
  ends = np.stack([cfg.n_sink - 1 + np.cumsum(x) for x in lengths]).astype(np.int32)
  n = np.array([0, 1, 3, 12, 40, C])
  pos = np.array([ends[b, n[b] - 1] + 1 + rng.randint(0, 40) if n[b] else 30 for b in range(B)])
  got = np.asarray(local_count(jnp.asarray(ends), jnp.asarray(n, jnp.int32), jnp.asarray(pos, jnp.int32), cfg))
  want = [_local_count_numpy(ends[b], int(n[b]), int(pos[b]), cfg) for b in range(B)]
  np.testing.assert_array_equal(got, want)
  if kw in (dict(kv_budget=0.25), dict(kv_budget_tokens=100)):  # 4 chunks of 64 pass a quarter of ~800 tokens
    assert got[3] < 4
  if not kw or "recent_share" in kw:
    np.testing.assert_array_equal(got, np.minimum(cfg.n_local, n))
