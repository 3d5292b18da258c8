"""The eval harness's methods on tiny random models: full coverage is vanilla exactly, each baseline
reads what it says it reads (measured retention = a slow count of its visible tokens), the budget
model counts like chunk_generate, and teacher-forced perplexity is exact under full coverage."""

import dataclasses

import jax
import numpy as np
import pytest

from chunkllm_jax import model
from chunkllm_jax.chunk_config import ChunkConfig
from eval import methods as M
from eval import perplexity as P
from tests.tiny_models import chunk_params
from tests.tiny_models import prompts

SEPS = tuple(range(0, 96, 7))  # the tiny vocabulary's "separator tokens"
SETTINGS = M.MethodSettings(separator_ids=SEPS, batch_size=4)


@pytest.fixture(scope="module")
def params():
  p = chunk_params()
  chunk = p.adapters.params["chunk"]
  # A closing bias, so that the random Chunk Adapter makes chunks of about 8 tokens (not of 1).
  chunk = {**chunk, "outer": {**chunk["outer"], "bias": chunk["outer"]["bias"] - 2.0}}
  return p.replace(adapters=p.adapters.replace(params={**p.adapters.params, "chunk": chunk}))


def rows(lengths, seed):
  return [r.tolist() for r in prompts(lengths, seed=seed)]


def slow_retention(seq, prompt_len, n_steps, ends, n_sink, n_local, keep_boundary):
  """chunk_generate's kv_retention by enumerating the visible positions of each decode step, for
  selections that take every candidate (keep_boundary) or none (streaming)."""
  total = 0.0
  for p in range(prompt_len, prompt_len + n_steps):
    done = [e for e in ends if e < p]
    chunks = list(zip([n_sink] + [e + 1 for e in done[:-1]], done))
    local = chunks[len(chunks) - min(n_local, len(chunks)):]
    visible = set(range(n_sink))
    for a, b in local:
      visible |= set(range(a, b + 1))
    if keep_boundary:
      visible |= {b for _, b in chunks[: len(chunks) - len(local)]}
    visible |= set(range(done[-1] + 1 if done else n_sink, p + 1))
    total += len(visible) / (p + 1)
  return total / n_steps


def test_full_coverage_chunkllm_is_vanilla_and_the_quick_segmentation_is_chunk_prefills(params):
  prompts_ = rows([150, 131, 110], seed=3)  # one batch (lengths within length_batches' spread)
  van = M.run_method("vanilla", None, params, prompts_, 24, None, SETTINGS, eos_ids=())
  chk = M.run_method("chunkllm", None, params, prompts_, 24, 1.0, SETTINGS, eos_ids=())
  for (vt, vs), (ct, cs) in zip(van, chk):
    assert ct == vt and len(ct) == 24
    assert vs["kv_retention"] == 1.0 and cs["kv_retention"] == pytest.approx(1.0)
    assert cs["top_chunks"] >= cs["max_chunks"] and not cs["chunk_overflow"]
  # The layer-0 segmentation the budgets use makes the chunks chunk_generate made (decode feeds
  # every new token but the last).
  seg = M.adapter_segmentation(params, [p + ct[:-1] for p, (ct, _) in zip(prompts_, chk)])
  assert [len(e) for e in seg.ends] == [cs["n_chunks"] for _, cs in chk]
  assert min(len(e) for e in seg.ends) > 5 and 3 < seg.mean_len < 20


@pytest.mark.parametrize("method", ["streamingllm", "sepllm"])
def test_baselines_read_what_they_say(params, method):
  """streamingllm: sinks + a window of fixed 16-token chunks; sepllm: sinks + every separator + a
  window, chunks ending at separators. The measured retention is a slow count of exactly that."""
  prompts_ = rows([300, 280], seed=5)
  n_new = 40
  out = M.run_method(method, None, params, prompts_, n_new, 0.5, SETTINGS, eos_ids=())
  for prompt, (new, st) in zip(prompts_, out):
    seq = prompt + new[:-1]
    if method == "streamingllm":
      ends = list(range(4 + 16 - 1, len(seq), 16))
      assert (st["boundaries"], st["top_chunks"], st["max_chunk_len"]) == ("fixed", 0, 16)
      # the window is about half of what is seen
      assert abs(4 + 16 * st["n_local"] + 8 - 0.5 * (len(prompt) + n_new / 2)) <= 16
    else:
      ends = M.separator_chunk_ends(seq, SEPS, 4, 64)
      assert (st["boundaries"], st["keep"]) == ("separators", "boundary") and st["top_chunks"] >= st["max_chunks"]
      assert all(seq[e] in SEPS or e - s + 1 == 64 for s, e in zip([4] + [e + 1 for e in ends[:-1]], ends))
    assert st["n_chunks"] == len(ends)
    slow = slow_retention(seq, len(prompt), n_new - 1, ends, 4, st["n_local"], method == "sepllm")
    assert st["kv_retention"] == pytest.approx(slow, abs=1e-5)
  measured = np.mean([st["kv_retention"] for _, st in out])
  assert abs(measured - 0.5) < 0.08  # matched budget (the estimate cannot know the new tokens' separators)


def separator_rows(n=320):
  """Two rows of random tokens, one with a separator every 6th token and one every 20th."""
  rng = np.random.RandomState(7)
  plain = [t for t in range(96) if t not in SEPS]
  def row(every):
    r = rng.choice(plain, n).tolist()
    for i in range(4 + every - 1, n, every):
      r[i] = SEPS[1 + i % (len(SEPS) - 1)]
    return r
  return [row(6), row(20)]


@pytest.mark.parametrize("retention", [0.5, 0.25])
def test_sepllm_window_fits_each_row(params, retention):
  """Two rows of one batch, one dense in separators (every 6th token) and one sparse (every 20th):
  each gets its own window, and each row's measured retention is within one of its chunks of the
  target (one window for both would overshoot on the dense row and undershoot on the other)."""
  prompts_ = separator_rows()
  n_new = 3  # the prompt sets the retention, as in the needle runs
  out = M.run_method("sepllm", None, params, prompts_, n_new, retention, SETTINGS, eos_ids=())
  assert out[0][1]["n_local"] != out[1][1]["n_local"]
  for every, (_, st) in zip([6, 20], out):
    assert abs(st["kv_retention"] - retention) <= every / 320


def test_perplexity_fits_the_sepllm_window_to_each_text(params):
  """Perplexity's texts get their windows as generation's prompts do: of two texts in one call, one dense in
  separators (every 6th token) and one sparse (every 20th), each reads the target within one of its chunks
  (one window for both read 0.36 and 0.68 at a target of 0.5)."""
  retention = 0.5
  docs = separator_rows()
  _, stats = P.token_logprobs("sepllm", params, docs, 64, retention, SETTINGS)
  assert stats[0]["n_local"] != stats[1]["n_local"]
  for every, st in zip([6, 20], stats):
    assert abs(st["kv_retention"] - retention) <= every / 320


def test_budget_model_counts_like_the_slow_count():
  rng = np.random.RandomState(0)
  for _ in range(20):
    T, n_new, n_local = int(rng.randint(40, 120)), int(rng.randint(2, 30)), int(rng.randint(0, 5))
    ends = sorted(set(rng.choice(np.arange(4, T + n_new), size=rng.randint(1, 20), replace=False).tolist()))
    seg = M.Segmentation((tuple(ends),), (T + n_new,), 4)
    for top_chunks, keep in [(0, "chunk"), (10**4, "boundary")]:
      ccfg = M.ChunkConfig(top_chunks=top_chunks, n_local=n_local, keep=keep)
      slow = slow_retention(None, T, n_new - 1, ends, 4, n_local, keep == "boundary")
      assert M.expected_retention(ccfg, seg, [T], n_new) == pytest.approx(slow, abs=1e-9)


@pytest.mark.parametrize("method", ["chunkllm", "fixllm", "streamingllm", "sepllm"])
@pytest.mark.parametrize("retention", [0.5, 0.25])
def test_knobs_meet_the_budget(method, retention):
  """On a 4K-token prompt with 24-token chunks (3 separators each), each method's knob gives an
  expected retention within half a chunk's share of the target."""
  T, n_new = 4096, 32
  seps = tuple(range(4 + 7, T, 8))  # a separator every 8 tokens: sepllm's chunks
  seg = M.Segmentation((tuple(range(4 + 23, T, 24)),), (T,), 4) if method != "sepllm" else \
      M.Segmentation((seps,), (T,), 4)
  settings = M.MethodSettings(separator_ids=(1,), fix_chunk_len=24)
  ccfg, info = M.method_config(method, retention, [T], n_new, T + 128, settings, seg)
  step = 16 if method == "streamingllm" else (8 if method == "sepllm" else 24)
  assert abs(info["expected_retention"] - retention) <= step / T
  if method == "sepllm":
    assert ccfg.top_chunks == ccfg.max_chunks >= len(seps) + n_new  # every separator, and no overflow
    # sinks + 1 token per separator + whole 8-token chunks in the window fill the budget
    assert abs(4 + len(seps) + 7 * ccfg.n_local - retention * T) < 16


@pytest.mark.parametrize("method", ["hybrid", "chunkllm", "sepllm"])
def test_the_chunk_table_never_passes_the_buffer(method):
  """Perplexity segments the whole text and also counts its scored tokens as new ones: at smollm2-135m's 8K
  (prefix 256, 7936 scored, 1 chunk per 20 tokens) chunks + new tokens passed the buffer's 8192 positions, a
  table `ChunkConfig.validate` refuses. The table stops at the buffer: a chunk holds a token at least."""
  N, prefix = 8192, 256
  seg = M.Segmentation((tuple(range(4 + 19, N, 20)),), (N,), 4)
  for retention in (0.5, 0.25, 1.0, None):
    ccfg, _ = M.method_config(method, retention, [prefix], N - prefix, N, M.MethodSettings(separator_ids=(1,)), seg)
    assert len(seg.ends[0]) < ccfg.max_chunks <= N
    ccfg.validate(N, 30)


def test_sepllm_over_budget_says_so():
  """At a budget below its separators' share (1/8 here), sepllm keeps the smallest window, and its
  expected retention is the real, higher one."""
  T, seps = 4096, tuple(range(11, 4096, 8))
  seg = M.Segmentation((seps,), (T,), 4)
  ccfg, info = M.method_config("sepllm", 0.05, [T], 32, T + 128, M.MethodSettings(separator_ids=(1,)), seg)
  assert ccfg.n_local == 1 and info["expected_retention"] > 0.12


@pytest.mark.parametrize("method", ["sepllm", "streamingllm"])
def test_default_window_past_every_chunk_is_the_whole_table(method):
  """With no retention target a windowed method keeps `window` tokens of chunks; on a short text of short
  separator chunks (3.5 tokens: 256 / 3.5 = 73 chunks) that is more chunks than the table holds (54 chunks
  and 8 new tokens: 64), and the window is then every chunk (the configuration validates), not a refusal of
  a setting nobody gave."""
  T = 196
  ends = tuple(4 + round(3.5 * (i + 1)) - 1 for i in range(int((T - 4) / 3.5)))
  seg = M.Segmentation((ends,), (T,), 4) if method == "sepllm" else None
  ccfg, _ = M.method_config(method, None, [T], 8, 256, M.MethodSettings(separator_ids=(1,)), seg)
  assert ccfg.n_local <= ccfg.max_chunks
  ccfg.validate(256, 30)
  if method == "sepllm":
    assert ccfg.n_local == ccfg.max_chunks == 64  # 256 / 3.5 rounds to 73, past the table


def test_the_vote_rule_reaches_the_adapter_methods():
  s = M.MethodSettings(separator_ids=SEPS, vote="max")
  assert M.base_config("chunkllm", s).vote == M.base_config("fixllm", s).vote == "max"
  assert M.config_summary(M.base_config("chunkllm", s))["vote"] == "max"


@pytest.mark.parametrize("recent_share, boundary_tokens", [(0.75, True), (0.5, False), (0.0, True)])
def test_recent_share_and_boundary_tokens_reach_the_densely_read_methods_only(recent_share, boundary_tokens):
  s = M.MethodSettings(separator_ids=SEPS, recent_share=recent_share, boundary_tokens=boundary_tokens)
  for method in ("hybrid", "oracle"):
    cfg = dataclasses.replace(M.base_config(method, s), kv_budget=0.5)  # as a retention target sets it
    assert (cfg.recent_share, cfg.reads_boundary_tokens) == (recent_share, boundary_tokens)
    assert M.config_summary(cfg)["recent_share"] == recent_share
    assert not M.base_config(method, s).reads_boundary_tokens  # no budget: the top chunks, and no more
  for method in ("chunkllm", "fixllm", "streamingllm", "sepllm"):  # the paper's rule and the baselines
    cfg = M.base_config(method, s)
    assert (cfg.recent_share, cfg.reads_boundary_tokens) == (0.0, False)


def test_the_per_head_selection_reaches_the_densely_read_methods_only():
  s = M.MethodSettings(separator_ids=SEPS, selection="kv_head", score_rank=16, score_estimate="lowrank",
                       score_sketch=64, sketch_estimate="qjl", head_refresh=4)
  for method in ("hybrid", "oracle"):
    cfg = M.base_config(method, s)
    assert cfg.head_refresh == M.config_summary(cfg)["head_refresh"] == 4
    assert (cfg.selection, cfg.score_rank, cfg.score_estimate, cfg.score_sketch) == ("kv_head", 16, "lowrank", 64)
    assert cfg.sketch_estimate == M.config_summary(cfg)["sketch_estimate"] == "qjl"
    assert (M.config_summary(cfg)["score_estimate"], M.config_summary(cfg)["score_sketch"]) == ("lowrank", 64)
    assert (M.config_summary(cfg)["selection"], M.config_summary(cfg)["score_rank"]) == ("kv_head", 16)
  for method in ("chunkllm", "fixllm", "streamingllm", "sepllm"):
    assert (M.base_config(method, s).selection, M.base_config(method, s).score_rank) == ("shared", None)


def test_pages_replace_the_chunks_of_the_densely_read_methods_only():
  s = M.MethodSettings(separator_ids=SEPS, page_len=16)
  for method in ("hybrid", "oracle"):
    cfg = M.base_config(method, s)
    assert (cfg.boundaries, cfg.max_chunk_len) == ("fixed", 16)
    assert M.segmentation_for(method, None, [[1, 2, 3]], s) is None  # the fixed grid needs no model
    ccfg, info = M.method_config(method, 0.5, [1000], 8, 1024, s)
    assert (ccfg.boundaries, ccfg.max_chunk_len, info["mean_chunk_len"]) == ("fixed", 16, 16.0)
  assert M.base_config("chunkllm", s).boundaries == "adapter"
  assert M.base_config("fixllm", dataclasses.replace(s, fix_chunk_len=24)).max_chunk_len == 24


def test_the_evaluated_default_is_chunk_generates_default():
  """hybrid with the eval's default settings is `ChunkConfig()` as `chunk_generate` resolves it."""
  cfg = dataclasses.replace(M.base_config("hybrid", M.MethodSettings(separator_ids=SEPS)), kv_budget=0.25)
  default = ChunkConfig(kv_budget=0.25)
  assert (cfg.recent_share, cfg.reads_boundary_tokens) == (default.recent_share, default.reads_boundary_tokens)
  assert (cfg.scorer, cfg.prefill_scorer, cfg.prefill_mode) == (default.scorer, default.prefill_scorer,
                                                                default.prefill_mode)


def test_a_budget_floor_reaches_the_densely_read_methods_only():
  s = M.MethodSettings(separator_ids=SEPS, kv_budget_min_tokens=256)
  for method in ("hybrid", "oracle"):
    assert M.base_config(method, s).kv_budget_min_tokens == 256
    full, _ = M.method_config(method, 1.0, [300], 20, 512, s)  # no budget at full retention: no floor
    assert full.kv_budget is None and full.kv_budget_min_tokens == 0
  for method in ("chunkllm", "fixllm", "streamingllm", "sepllm"):
    assert M.base_config(method, s).kv_budget_min_tokens == 0


@pytest.mark.parametrize("retention, floor, lens, n_new", [
    (0.5, 256, [256] * 3, 1792), (0.25, 128, [256, 512], 1000), (0.5, 64, [2000], 30), (0.5, 0, [300], 10),
    (0.3, 70, [200, 400], 12)])
def test_budget_share_meets_the_target_under_a_floor(retention, floor, lens, n_new):
  """The fitted share, read under the floor step by step as decode reads it, averages to the target;
  without a floor it is the target; a floor past the target leaves the smallest share."""
  share = M.budget_share(retention, floor, lens, n_new)
  seen = [T + 1 + np.arange(n_new - 1) for T in lens]  # the decode steps' context lengths, per row; the rule by hand
  budget = lambda share, n: np.ceil(np.float32(share) * n.astype(np.float32))  # in float32, as decode computes it
  read = lambda share: np.mean([np.mean(np.minimum(n, np.maximum(budget(share, n), floor)) / n) for n in seen])
  assert abs(read(share) - retention) < 1e-3 and share <= retention
  if 1e-3 < share < retention:  # the smallest share that reads the target, over the steps decode runs
    assert read(share) > retention - 1e-6 > read(share - 1e-6)  # (1e-6: the order of a float sum)
  assert (share < retention) == (floor > retention * (min(lens) + 1))
  assert M.budget_share(0.1, 256, [256], 100) == 1e-3


@pytest.mark.parametrize("method, prefill", [("hybrid", "dense"), ("oracle", "dense"), ("chunkllm", "sparse"),
                                             ("fixllm", "sparse"), ("streamingllm", "sparse"), ("sepllm", "sparse")])
def test_each_method_reads_the_prompt_by_its_own_rule(method, prefill):
  """The default (and the oracle) prefill densely after scoring the prompt by attention; the
  adapter methods and the window baselines apply their rule to the prompt too."""
  assert M.base_config(method, SETTINGS).prefill_mode == prefill


def test_batches_hold_similar_lengths():
  lengths = [1030, 4100, 1040, 2050, 1020, 4090, 2060, 1035, 1025]
  batches = M.length_batches(lengths, 4)
  assert sorted(i for b in batches for i in b) == list(range(9))
  assert [[lengths[i] for i in b] for b in batches] == [[1020, 1025, 1030, 1035], [1040], [2050, 2060], [4090, 4100]]


def test_separator_ids_from_the_vocabulary():
  class Tok:
    texts = ["a", ".", " the", ",\n", "x:", "?!", "\n", "b"]

    def batch_decode(self, ids):
      return [self.texts[i[0]] for i in ids]

    def __len__(self):
      return len(self.texts)

  assert M.separator_ids(Tok()) == (1, 3, 4, 5, 6)


@pytest.mark.parametrize("n_tokens", [200, 1100])  # one prefill block, and a full block then a partial one
def test_vanilla_logprobs_match_the_forward_pass(params, n_tokens):
  """Vanilla's log-probs (a blocked prefill with the LM head at the last layer) against the plain
  forward pass's logits at every scored position."""
  docs = rows([n_tokens, n_tokens], seed=3)
  logp, stats = P.token_logprobs("vanilla", params, docs, 48, None, SETTINGS)
  tokens = np.asarray(docs)
  ref = jax.nn.log_softmax(model.forward(params, tokens), -1)
  ref = np.take_along_axis(np.asarray(ref)[:, 47:-1], tokens[:, 48:, None], -1)[..., 0]
  assert logp.shape == (2, n_tokens - 48) and stats[0]["kv_retention"] == 1.0
  np.testing.assert_allclose(logp, ref, atol=1e-4)


def test_perplexity_is_exact_under_full_coverage(params, capfd):
  """Teacher-forced log-probs: ChunkLLM covering every chunk equals vanilla within 1e-4 (float32);
  the decode reports its progress as it runs."""
  docs = rows([200, 200], seed=7)
  van, vs = P.token_logprobs("vanilla", params, docs, 48, None, SETTINGS)
  full, fs = P.token_logprobs("chunkllm", params, docs, 48, 1.0, SETTINGS)
  reports = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[perplexity]")]
  assert len(reports) == P.PROGRESS_REPORTS and reports[0].startswith("[perplexity] 0/151 tokens decoded")
  assert reports[-1].startswith("[perplexity] 144/151 ")  # every 16th of the 151 steps
  assert van.shape == (2, 152) and np.isfinite(van).all()
  np.testing.assert_allclose(full, van, atol=1e-4)
  assert all(s["kv_retention"] == pytest.approx(1.0) for s in fs)
  edges = P.position_bins(48, 200, 4)
  sums, counts = P.binned_nll(van[0], 48, edges)
  assert counts == [38, 38, 38, 38] and sum(sums) == pytest.approx(-van[0].sum(), rel=1e-6)
