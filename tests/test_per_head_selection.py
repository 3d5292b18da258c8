"""selection="kv_head": every KV head of every sparse layer chooses its chunks at each step. A full
budget is `generate` exactly, a tight one reads about its budget, SparQ's and the low-rank estimates
are the exact chunk mass at full rank (SparQ a loop's at lower rank, the low-rank one a bound or,
with a residual sketch, QJL's unbiased estimate or SimHash's angle), and bad settings are named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import chunk_decode_step, chunk_generate, chunk_prefill
from chunkllm_jax import selection as sel
from chunkllm_jax.boundaries import chunk_ids_from_ends
from chunkllm_jax.selection import chunk_mass, sparq_chunk_mass
from tests.tiny_models import SOFTCAP, chunk_params, prompts

FULL = dict(max_chunks=128, max_chunk_len=8, n_local=1, kv_budget=1.0)
SCORES = [dict(score_estimate="exact"), dict(score_estimate="sparq", score_rank=4),  # the exact mass, SparQ's
          dict(score_sketch=0),  # low-rank keys (a quarter of the 8 dimensions) and the bound on what they miss,
          dict(score_rank=4, score_sketch=64),  # or a 64-bit sketch of it read as an angle,
          dict(score_rank=4, score_sketch=64, sketch_estimate="qjl"),  # or by QJL's estimate,
          dict()]  # the defaults: 2 coordinates and a 128-bit sketch, its angle
REFRESH = dict(score_sketch=64, head_refresh=3)  # choosing every 3rd step


@pytest.mark.parametrize("arch, score", [(a, s) for a in ("llama", "gemma3") for s in SCORES] + [("llama", REFRESH)])
def test_a_full_budget_is_generate(arch, score):
  params = chunk_params(arch)
  rows = prompts([40, 23], seed=5)
  ref = cj.generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128)
  out = chunk_generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128, selection="kv_head", **score,
                       **FULL)
  assert (out.tokens == ref.tokens).all()
  assert np.allclose(out.stats["kv_retention"], 1.0)


@pytest.mark.parametrize("budget, score", [(b, s) for s in SCORES for b in (0.5, 0.25)] + [(0.25, REFRESH)])
def test_a_tight_budget_reads_about_its_budget_and_changes_the_answer(budget, score):
  params = chunk_params()
  rows = prompts([120, 100], seed=1)
  kw = dict(max_new_tokens=30, eos_ids=(), max_len=256, max_chunks=256, max_chunk_len=8, n_local=1, kv_budget=budget,
            boundaries="fixed")  # chunks of 8 (the tiny Chunk Adapter closes one at most tokens)
  per_head = chunk_generate(params, rows, selection="kv_head", **score, **kw)
  kept = per_head.stats["kv_retention"]
  assert (kept <= budget + 8 / 100).all() and (kept >= budget - 8 / 100).all(), kept  # within a chunk
  chose = per_head.stats["n_selections"]  # in 29 decode steps (a prompt ends with no selection: the heads choose)
  if score.get("head_refresh", 1) == 1:
    assert (chose == 29).all()  # one choice a step
  else:  # every 3rd step, and the step after each of the 3 or 4 chunks either row closes in 29 steps
    assert (chose >= 10).all() and (chose <= 10 + 8).all(), chose
  # The bytes count the scores' reads of K: all of it (the tiny model's 8-dim float32 key lies in one cache
  # line), or the low-rank keys (2 or 4 of 8 coordinates a key and what the basis misses) and their sketch
  # (64 or 128 bits: 8 or 16 bytes a key, of the 64 its float32 key and value hold).
  share = per_head.stats["bytes_per_step"] / per_head.stats["dense_bytes_per_step"]
  D, n_sparse = params.config.head_dim, params.config.n_layers - 1  # layer 0 is dense
  low_rank = score.get("score_estimate", "lowrank") == "lowrank"
  scored = (score.get("score_rank", D // 4) + 1) / (2 * D) if low_rank else 0.5
  scored += score.get("score_sketch", 128) / 8 / (2 * D * 4) if low_rank else 0.0
  want = (n_sparse * (kept + scored * chose / 29) + 1) / params.config.n_layers  # the scores read where heads chose
  np.testing.assert_allclose(share, want, atol=0.03)
  assert budget > 0.4 or (share < 1).all()


def test_the_scorer_scores_a_sparse_prefill_under_the_per_head_rule():
  """The one place the per-head rule reads `scorer` (which it refuses elsewhere): a sparse prefill whose prompt rows
  `prefill_scorer` leaves to it. The two scorers choose other chunks for the prompt, so its logits differ."""
  params = chunk_params()
  qk = jax.tree.map(lambda w: 4 * w, params.adapters.params["qk"])  # sharper, so the scorers disagree
  params = params.replace(adapters=params.adapters.replace(params={**params.adapters.params, "qk": qk}))
  tokens = jnp.asarray(prompts([120, 120], seed=3), jnp.int32)
  lengths = jnp.asarray([120, 100], jnp.int32)
  logits = {}
  for scorer in ("adapter", "attention"):
    ccfg = ChunkConfig(selection="kv_head", scorer=scorer, prefill="sparse", prefill_scorer=None, top_chunks=1,
                       max_chunk_len=8, n_local=1, boundaries="fixed").validate(256, params.config.n_layers)
    logits[scorer], _, _ = chunk_prefill(params, tokens, lengths, 256, ccfg)
  assert np.abs(np.asarray(logits["adapter"]) - np.asarray(logits["attention"])).max() > 1e-3


def test_one_step_reads_less_than_everything_and_each_head_its_own_keys():
  """At a tight budget a step's logits move off the dense step's (whose equal the full budget gives)."""
  params = chunk_params()
  tokens = jnp.asarray(prompts([120, 120], seed=2), jnp.int32)
  lengths = jnp.asarray([120, 120], jnp.int32)
  logits = {}
  for budget in (1.0, 0.25):
    ccfg = ChunkConfig(selection="kv_head", kv_budget=budget, max_chunk_len=8, n_local=1, boundaries="fixed")
    ccfg = ccfg.validate(256, params.config.n_layers)
    _, cache, st = chunk_prefill(params, tokens, lengths, 256, ccfg)
    logits[budget], _, st = chunk_decode_step(params, tokens[:, -1], cache, st, ccfg)
    assert (np.asarray(st.retained) <= budget + 0.08).all()
  dense_ccfg = ChunkConfig(selection="shared", max_chunk_len=8, n_local=1, boundaries="fixed",
                           kv_budget=1.0).validate(256, 3)
  _, cache, st = chunk_prefill(params, tokens, lengths, 256, dense_ccfg)
  want, _, _ = chunk_decode_step(params, tokens[:, -1], cache, st, dense_ccfg)
  np.testing.assert_allclose(np.asarray(logits[1.0]), np.asarray(want), atol=1e-5)
  assert np.abs(np.asarray(logits[0.25]) - np.asarray(want)).max() > 1e-3


# (250, 200): the in-place read of the heads' shared tail starts past the buffer's last whole block (clamped)
@pytest.mark.parametrize("row_lengths", [(120, 97), (250, 200)])
def test_the_gathered_read_is_the_masked_read(row_lengths):
  """`head_attention` gathers each head's slots block by block, and reads the run they all end with in
  place: the same output as attending the whole buffer under each head's mask, and a head's slots are the
  sinks, its chosen and the local chunks whole, and the last tokens of the newest chunks it leaves out
  (`working_positions`)."""
  from chunkllm_jax import attention as attn
  from chunkllm_jax import chunk_generation as cg
  from chunkllm_jax import head_selection as hs
  params = chunk_params()
  cfg = params.config
  tokens = jnp.asarray(prompts([row_lengths[0]] * 2, seed=6), jnp.int32)  # the second row: shorter, and padding
  lengths = jnp.asarray(row_lengths, jnp.int32)
  for score, budget in [(SCORES[0], 0.3), (SCORES[1], 0.3), (SCORES[2], 0.3), (SCORES[1], 0.12)]:
    # 0.12: the last tokens of the chunks left out do not all fit
    ccfg = ChunkConfig(selection="kv_head", kv_budget=budget, max_chunk_len=8, n_local=1, boundaries="fixed",
                       **score).validate(256, cfg.n_layers)
    ccfg = cg.resolved(params, ccfg)
    _, cache, st = chunk_prefill(params, tokens, lengths, 256, ccfg)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, cfg.n_heads, cfg.head_dim)), jnp.float32)
    pos = cache.length - 1
    W = st.work_pos.shape[-1]
    slot = cg._layer_plan(params, ccfg).score_slot[1]  # layer 1's low-rank state
    picked = hs.head_choice(cfg, ccfg, st, q, cache.k, 1, slot, pos)
    slot_pos, slot_ok, _ = hs.head_slots(ccfg, st, picked, pos, W)
    k_open, open_at = attn.row_window(cache.k, 1, st.open_start, 8)
    v_open, _ = attn.row_window(cache.v, 1, st.open_start, 8)
    open_ok = (open_at >= st.open_start[:, None]) & (open_at <= pos[:, None])
    got, n_read, _ = hs.head_attention(cfg, ccfg, st, q, cache.k, cache.v, 1, slot, pos, (k_open, v_open, open_ok),
                                       W=W, blocks=(32, 8))
    mask = np.zeros((2, cfg.n_kv_heads, 256), bool)
    for b in range(2):
      for h in range(cfg.n_kv_heads):
        mask[b, h, np.asarray(slot_pos)[b, h][np.asarray(slot_ok)[b, h]]] = True
        mask[b, h, int(st.open_start[b]):int(pos[b]) + 1] = True
        n, ends, starts = int(st.n_chunks[b]), np.asarray(st.chunk_end)[b], np.asarray(st.chunk_start)[b]
        whole = np.asarray(picked)[b, h, :n] | (np.arange(n) >= n - ccfg.n_local)
        assert mask[b, h, :ccfg.n_sink].all()
        for c in range(n):
          if whole[c]:
            assert mask[b, h, starts[c]:ends[c] + 1].all()
          else:  # left out: at most its last token
            assert not mask[b, h, starts[c]:ends[c]].any()
        last_read = [mask[b, h, ends[c]] for c in range(n) if not whole[c]]
        assert last_read == sorted(last_read)  # the oldest give way
    want = attn.attend(q, cache.k[1], cache.v[1], jnp.asarray(mask)[:, :, None], scale=cfg.attn_scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n_read), mask.sum(-1))
    assert (np.asarray(n_read) < np.asarray(lengths)[:, None]).all()
    if budget < 0.2:
      assert not all(mask[0, 0, e] for e in np.asarray(st.chunk_end)[0, :int(st.n_chunks[0])])


@pytest.mark.parametrize("pos, used, want, last", [
    ([[[0, 1, 5, 6, 7], [0, 1, 3, 6, 7]]], [[5, 5]], [2], [7]),  # the shorter run of the two heads
    ([[[0, 1, 5, 6, 7], [0, 1, 5, 6, 7]]], [[5, 4]], [0], [7]),  # the second head's read ends at 6, not 7
    ([[[0, 1, 2, 3, 9], [0, 1, 2, 3, 9]]], [[4, 4]], [4], [3]),  # slots past those used do not count
    ([[[0, 1, 2, 3, 9]], [[0, 4, 5, 6, 7]]], [[5], [0]], [1, 0], [9, 0]),  # per row; nothing used: nothing shared
])
def test_the_shared_tail_is_the_run_every_head_ends_with(pos, used, want, last):
  """`shared_tail`: the slots at the end of every head's read that hold consecutive positions ending at
  the same one (read in place, not gathered), and where it ends."""
  from chunkllm_jax.head_selection import shared_tail
  pos = jnp.asarray(pos, jnp.int32)
  tail, end = shared_tail(pos, jnp.ones(pos.shape, bool), jnp.asarray(used, jnp.int32))
  np.testing.assert_array_equal(np.asarray(tail), want)
  np.testing.assert_array_equal(np.asarray(end), last)


@pytest.mark.parametrize("arch, model_kw, score", [("llama", dict(), dict()), ("llama", SOFTCAP, REFRESH),
                                                   ("gemma3", dict(), SCORES[1])])
def test_the_gpu_kernel_gives_the_tokens_of_the_gathered_read(arch, model_kw, score, monkeypatch):
  """With attention="pallas" the per-head rule's decode attention runs `pallas_kernels.head_decode_attention`'s
  GPU kernel (interpret mode here): the same logits as the XLA path's gathered read at each layer, and the same
  sampled tokens; a head dim the kernel cannot take as it is (8) keeps the XLA path."""
  from pallas_kernels import head_decode_attention_gpu as hdg
  calls = []  # kernel calls, counted at trace time
  kernel = hdg.head_decode_partials_gpu
  monkeypatch.setattr(hdg, "head_decode_partials_gpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  rows = prompts([70, 33], seed=4)
  kw = dict(max_new_tokens=10, eos_ids=(), max_len=128, max_chunk_len=8, n_local=1, kv_budget=0.3, temperature=1.0,
            seed=3, selection="kv_head", **score)  # sampled: tokens follow the logits closely
  params = chunk_params(arch, head_dim=16, **model_kw)
  xla = chunk_generate(params, rows, **kw)
  pallas = chunk_generate(params, rows, attention="pallas", interpret=True, **kw)
  assert calls  # the kernel ran
  assert (xla.tokens == pallas.tokens).all()
  np.testing.assert_allclose(xla.stats["kv_retention"], pallas.stats["kv_retention"], rtol=1e-6)
  assert xla.stats["kv_retention"].max() < 0.9  # the selection really was sparse

  ccfg = ChunkConfig(max_chunk_len=8, n_local=1, kv_budget=0.3, **score).validate(128, params.config.n_layers)
  tokens, lengths = jnp.asarray([rows[0]], jnp.int32), jnp.asarray([70], jnp.int32)
  _, cache, st = chunk_prefill(params, tokens, lengths, 128, ccfg)
  logits = lambda c: chunk_decode_step(params, tokens[:, -1], cache, st, c)[0]
  np.testing.assert_allclose(logits(dataclasses.replace(ccfg, attention="pallas", interpret=True)), logits(ccfg),
                             rtol=1e-5, atol=1e-5)

  calls.clear()
  small = chunk_params(arch)  # head_dim 8
  assert (chunk_generate(small, rows, attention="pallas", interpret=True, **kw).tokens ==
          chunk_generate(small, rows, **kw).tokens).all()
  assert not calls


def test_between_choices_the_heads_read_their_last_choice():
  """With head_refresh, a step that does not choose reads the slots kept in the state (the masked
  read under them, not under a fresh choice); a step that chooses returns its fresh slots."""
  from chunkllm_jax import attention as attn
  from chunkllm_jax import chunk_generation as cg
  from chunkllm_jax import head_selection as hs
  params = chunk_params()
  cfg = params.config
  tokens = jnp.asarray(prompts([120, 120], seed=6), jnp.int32)
  lengths = jnp.asarray([120, 97], jnp.int32)
  ccfg = ChunkConfig(selection="kv_head", kv_budget=0.3, max_chunk_len=8, n_local=1, boundaries="fixed",
                     head_refresh=4).validate(256, cfg.n_layers)
  ccfg = cg.resolved(params, ccfg)
  _, cache, st = chunk_prefill(params, tokens, lengths, 256, ccfg)
  W = st.work_pos.shape[-1]
  assert st.head_pos.shape == (cfg.n_layers, 2, cfg.n_kv_heads, W) and (np.asarray(st.head_age) == 4).all()
  rng = np.random.default_rng(1)
  q, q_old = (jnp.asarray(rng.normal(size=(2, 1, cfg.n_heads, cfg.head_dim)), jnp.float32) for _ in range(2))
  pos = cache.length - 1
  slot = cg._layer_plan(params, ccfg).score_slot[1]  # layer 1's low-rank state
  fresh = hs.head_slots(ccfg, st, hs.head_choice(cfg, ccfg, st, q, cache.k, 1, slot, pos), pos, W)
  old = hs.head_slots(ccfg, st, hs.head_choice(cfg, ccfg, st, q_old, cache.k, 1, slot, pos), pos, W)
  assert (np.asarray(fresh[0]) != np.asarray(old[0])).any()  # the two queries choose differently
  st = st.replace(head_pos=st.head_pos.at[1].set(old[0]), head_ok=st.head_ok.at[1].set(old[1]),
                  head_used=st.head_used.at[1].set(old[2]))
  k_open, open_at = attn.row_window(cache.k, 1, st.open_start, 8)
  v_open, _ = attn.row_window(cache.v, 1, st.open_start, 8)
  open_ok = (open_at >= st.open_start[:, None]) & (open_at <= pos[:, None])
  outs = {}
  for choose_now in (True, False):
    outs[choose_now] = hs.head_attention(cfg, ccfg, st, q, cache.k, cache.v, 1, slot, pos, (k_open, v_open, open_ok), W=W,
                                         blocks=(32, 8), choose_now=jnp.asarray(choose_now))
  for choose_now, slots in ((True, fresh), (False, old)):
    got, n_read, read = outs[choose_now]
    for a, b in zip(read, slots):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mask = np.zeros((2, cfg.n_kv_heads, 256), bool)
    for b in range(2):
      for h in range(cfg.n_kv_heads):
        mask[b, h, np.asarray(slots[0])[b, h][np.asarray(slots[1])[b, h]]] = True
        mask[b, h, int(st.open_start[b]):int(pos[b]) + 1] = True
    want = attn.attend(q, cache.k[1], cache.v[1], jnp.asarray(mask)[:, :, None], scale=cfg.attn_scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n_read), mask.sum(-1))
  assert np.abs(np.asarray(outs[True][0]) - np.asarray(outs[False][0])).max() > 1e-4


@pytest.mark.parametrize("refresh", [2, 5])
def test_the_heads_choose_every_head_refresh_steps_and_after_each_chunk_closes(refresh):
  """The decode loop's schedule against a simulation: a step chooses (batch-wide) where any row's last
  choice is `head_refresh` steps old or a chunk closed at the step before; the first step chooses."""
  params = chunk_params()
  tokens = jnp.asarray(prompts([60, 60], seed=3), jnp.int32)
  lengths = jnp.asarray([60, 53], jnp.int32)
  ccfg = ChunkConfig(selection="kv_head", kv_budget=0.5, max_chunk_len=8, n_local=1, boundaries="fixed",
                     head_refresh=refresh).validate(128, params.config.n_layers)
  logits, cache, st = chunk_prefill(params, tokens, lengths, 128, ccfg)
  age, chose = np.full(2, refresh), np.array(st.n_selections)
  assert (chose == 0).all()  # the per-head rule makes no shared selection at the prompt's end
  for _ in range(20):
    n_before = np.asarray(st.n_chunks)
    logits, cache, st = chunk_decode_step(params, jnp.argmax(logits, -1).astype(jnp.int32), cache, st, ccfg)
    now = bool((age >= refresh).any())
    chose += now
    closed = np.asarray(st.n_chunks) > n_before
    age = np.where(closed, refresh, 1 if now else age + 1)
    np.testing.assert_array_equal(np.asarray(st.head_age), age)
    np.testing.assert_array_equal(np.asarray(st.n_selections), chose)
  assert (20 / refresh <= chose).all() and (chose < 20).all()


def _loop_sparq(q, k, hi, ends, n_sink, scale, rank):
  B, K, G, Q, D = q.shape
  out = np.zeros((B, K, G, Q, ends.shape[1]), np.float32)
  for b in range(B):
    for h in range(K):
      for i in range(Q):
        dims = np.argsort(-np.abs(q[b, h, :, i]).sum(0), kind="stable")[:rank]
        for g in range(G):
          keys = np.arange(n_sink, hi[b, h, g, i] + 1)
          if not len(keys):
            continue
          kept = np.abs(q[b, h, g, i, dims]).sum() / np.abs(q[b, h, g, i]).sum()
          logit = k[b, keys][:, h][:, dims] @ q[b, h, g, i, dims] * scale / np.sqrt(kept)
          p = np.exp(logit - logit.max())
          p /= p.sum()
          start = n_sink
          for c, e in enumerate(ends[b]):
            if e < n_sink:
              continue
            out[b, h, g, i, c] = p[(keys >= start) & (keys <= e)].sum()
            start = e + 1
  return out


@pytest.mark.parametrize("by_segments", [True, False])
def test_the_mass_of_logits_is_a_loops_softmax_summed_per_chunk(by_segments):
  """Both ways of summing each chunk's keys (a segment sum over the keys' chunk ids from
  `boundaries.chunk_ids_from_ends`, the CPU's decode; a running sum read at the chunk ends) give a loop's: the softmax over [n_sink, hi] (keys past the last end
  count in it, in no chunk), 0 for an empty slot, a chunk ending before the sinks or past the keys, and a
  query with no key."""
  rng = np.random.default_rng(5)
  B, K, G, Q, T, n_sink = 2, 2, 2, 3, 30, 3
  s = rng.normal(size=(B, K, G, Q, T)).astype(np.float32) * 3
  ends = np.array([[1, 6, 10, 17, 25, -1, -1], [4, 9, 12, 20, 28, 33, -1]], np.int32)
  hi = np.broadcast_to(np.array([[17, 29, 2], [28, 14, 29]])[:, None, None, :], (B, K, G, Q))
  chunk = np.asarray(chunk_ids_from_ends(jnp.asarray(ends), T, n_sink))
  want = np.zeros((B, K, G, Q, ends.shape[1]), np.float32)
  for b in range(B):
    for t in range(T):  # the chunk a key lies in: the first whose end is at or after it, past the sinks
      in_chunk = [c for c, e in enumerate(ends[b]) if e >= t and e >= 0]
      n_chunks = int(np.sum(ends[b] >= 0))  # past the last end: the open chunk's id; sinks: none
      assert chunk[b, t] == (-1 if t < n_sink else in_chunk[0] if in_chunk else n_chunks)
    for i in np.ndindex(K, G, Q):
      keys = np.arange(n_sink, hi[(b,) + i] + 1)
      if not len(keys):
        continue
      p = np.exp(s[(b,) + i][keys] - s[(b,) + i][keys].max())
      p /= p.sum()
      start = 0
      for c, e in enumerate(ends[b]):
        if e >= n_sink and e < T:
          want[(b,) + i + (c,)] = p[(keys >= start) & (keys <= e)].sum()
        start = e + 1 if e >= 0 else start
  got = sel._mass_of_logits(jnp.asarray(s), jnp.asarray(hi), jnp.asarray(ends), n_sink,
                            jnp.asarray(chunk) if by_segments else None)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_cos_pi_is_cos_within_float32():
  u = np.linspace(0, 1, 4097, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(sel.cos_pi(jnp.asarray(u))), np.cos(np.pi * u.astype(np.float64)), atol=3e-7)


@pytest.mark.parametrize("rank", [2, 5])
def test_sparq_mass_matches_a_loop_and_is_the_exact_mass_at_full_rank(rank):
  rng = np.random.default_rng(rank)
  B, K, G, Q, T, D, n_sink = 2, 2, 3, 2, 30, 8, 3
  q = rng.normal(size=(B, K, G, Q, D)).astype(np.float32)
  k = rng.normal(size=(B, T, K, D)).astype(np.float32)
  ends = np.array([[6, 10, 17, 25, -1], [4, 9, 12, 20, 28]], np.int32)
  hi = np.broadcast_to(np.array([[17, 25], [28, 2]])[:, None, None, :], (B, K, G, Q))  # a query with no key
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(hi), jnp.asarray(ends))
  got = np.asarray(sparq_chunk_mass(*args, n_sink=n_sink, scale=0.3, rank=rank))
  np.testing.assert_allclose(got, _loop_sparq(q, k, hi, ends, n_sink, 0.3, rank), rtol=1e-4, atol=1e-6)
  for i in range(Q):  # decode's form: one query, the stacked buffer, only the chosen dimensions read
    one = sparq_chunk_mass(jnp.asarray(q[:, :, :, i:i + 1]), jnp.asarray(k)[None], jnp.asarray(hi[..., i:i + 1]),
                           jnp.asarray(ends), n_sink=n_sink, scale=0.3, rank=rank, layer=0)
    np.testing.assert_allclose(np.asarray(one)[:, :, :, 0], got[:, :, :, i], rtol=1e-4, atol=1e-6)
  full = np.asarray(sparq_chunk_mass(*args, n_sink=n_sink, scale=0.3, rank=D))
  exact = np.asarray(chunk_mass(*args, n_sink=n_sink, scale=0.3, key_block=8))
  np.testing.assert_allclose(full, np.where(ends[:, None, None, None] >= n_sink, exact, 0.0), rtol=1e-4, atol=1e-6)


def test_lowrank_mass_is_exact_at_full_rank_a_bound_below_it_and_its_basis_finds_the_keys_directions():
  rng = np.random.default_rng(3)
  B, K, G, Q, T, D, n_sink = 2, 2, 3, 2, 30, 8, 3
  q = jnp.asarray(rng.normal(size=(B, K, G, Q, D)), jnp.float32)
  k = rng.normal(size=(B, T, K, D)).astype(np.float32) * 0.1
  k[:, :, :, 5] += rng.normal(size=(B, T, K)) * 3  # most of the keys' energy lies along dims 5 and 2
  k[:, :, :, 2] += rng.normal(size=(B, T, K)) * 2
  k = jnp.asarray(k)
  valid = jnp.asarray(np.arange(T)[None] < np.array([[20], [30]]))
  ends = jnp.asarray(np.array([[6, 10, 17, 25, -1], [4, 9, 12, 20, 28]], np.int32))
  hi = jnp.asarray(np.broadcast_to(np.array([[17, 25], [28, 2]])[:, None, None, :], (B, K, G, Q)))
  basis = sel.key_basis(k, valid, D)
  np.testing.assert_allclose(np.einsum("bkdr,bkds->bkrs", basis, basis), np.broadcast_to(np.eye(D), (B, K, D, D)),
                             atol=1e-5)
  top2 = np.abs(np.asarray(sel.key_basis(k, valid, 2)))
  assert (top2.argmax(2) == [5, 2]).all()  # the planted directions, strongest first
  k_low = jnp.swapaxes(sel.lowrank_coords(jnp.swapaxes(k, 1, 2), basis), -1, -2)
  got = sel.lowrank_chunk_mass(q, k_low, basis, hi, ends, n_sink=n_sink, scale=0.3)
  exact = chunk_mass(q, k, hi, ends, n_sink=n_sink, scale=0.3, key_block=8)
  np.testing.assert_allclose(np.asarray(got), np.where(np.asarray(ends)[:, None, None, None] >= n_sink, exact, 0.0),
                             rtol=1e-4, atol=1e-6)
  stacked = sel.lowrank_chunk_mass(q, k_low[None], basis, hi, ends, n_sink=n_sink, scale=0.3, layer=0)
  np.testing.assert_allclose(np.asarray(stacked), np.asarray(got), rtol=1e-6)
  # Below full rank each logit is a bound on the exact one: the low-rank part, plus what the basis
  # misses of q times what it misses of k; exact for keys inside the basis.
  two = sel.key_basis(k, valid, 2)
  q_c = sel.lowrank_coords(q.reshape(B, K, G * Q, D), two)
  k_c = sel.lowrank_coords(jnp.swapaxes(k, 1, 2), two)
  bound = np.einsum("bknc,bktc->bknt", q_c, k_c)
  exact_logit = np.einsum("bknd,btkd->bknt", np.asarray(q).reshape(B, K, G * Q, D), np.asarray(k))
  assert (bound >= exact_logit - 1e-4).all() and (bound - exact_logit).max() > 1e-2
  inside = jnp.einsum("btkd,bkdr,bker->btke", k, two, two)  # keys projected into the basis
  np.testing.assert_allclose(np.einsum("bknc,bktc->bknt", q_c, sel.lowrank_coords(jnp.swapaxes(inside, 1, 2), two)),
                             np.einsum("bknd,btkd->bknt", np.asarray(q).reshape(B, K, G * Q, D), np.asarray(inside)),
                             atol=1e-4)


def _random_residuals(seed, B, K, N, Q, D, r):
  """A random orthonormal basis [B, K, D, r], keys [B, K, N, D] and queries [B, K, Q, D], and what the
  basis misses of each (numpy)."""
  rng = np.random.default_rng(seed)
  basis = jnp.asarray(np.linalg.qr(rng.normal(size=(B, K, D, r)))[0], jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, K, N, D)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(B, K, Q, D)), jnp.float32)
  proj = np.asarray(basis) @ np.swapaxes(np.asarray(basis), -1, -2)
  return basis, k, q, np.asarray(k) - np.asarray(k) @ proj, np.asarray(q) - np.asarray(q) @ proj


def test_the_residual_sketch_packs_its_signs_and_its_estimate_is_unbiased():
  """QJL's estimate of what the basis misses of q . k: the packed words hold the signs of the projected
  residual, bit 32 w + i of the sketch in bit i of word w; over many keys the estimate's mean error
  is near 0, its spread shrinks as 1 / sqrt(bits), and at 1024 bits it ranks keys as the exact residual does."""
  B, K, N, D, r = 1, 2, 3000, 32, 4
  basis, k, q, k_out, q_out = _random_residuals(7, B, K, N, 1, D, r)
  true = np.einsum("bknd,bktd->bknt", q_out, k_out)[:, :, 0]
  spread = {}
  for bits in (64, 1024):
    words = np.asarray(sel.residual_sketch(k, basis, bits))
    assert words.dtype == np.uint32 and words.shape == (B, K, N, bits // 32)
    signs = (k_out @ np.asarray(sel.sketch_matrix(D, bits))) > 0
    unpacked = (words[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(unpacked.reshape(B, K, N, bits).astype(bool), signs)
    k_low = jnp.swapaxes(sel.lowrank_coords(k, basis), -1, -2)
    sketch = jnp.swapaxes(jnp.asarray(words), -1, -2)
    est = np.einsum("bkm,bkmt->bkt", q_out[:, :, 0] @ np.asarray(sel.sketch_matrix(D, bits)),
                    np.asarray(sel._sketch_signs(sketch))) * np.sqrt(np.pi / 2) / bits * np.asarray(k_low)[:, :, r]
    err = est - true
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(N)  # unbiased
    spread[bits] = err.std()
    if bits == 1024:
      assert np.corrcoef(est.ravel(), true.ravel())[0, 1] > 0.95
  assert 2.5 < spread[64] / spread[1024] < 6  # sqrt(16) = 4
  # The chunk mass it gives: logits of the coordinates plus this estimate, softmax, summed per chunk.
  ends = jnp.asarray([[99, 999, 2999]], jnp.int32)
  hi = jnp.full((B, K, 1, 1), N - 1)
  got = sel.lowrank_chunk_mass(q[:, :, None], k_low, basis, hi, ends, n_sink=0, scale=0.2, k_sketch_BKwT=sketch,
                               sketch_estimate="qjl")
  logits = (np.einsum("bkd,bkdr,bkrt->bkt", np.asarray(q[:, :, 0]), np.asarray(basis), np.asarray(k_low)[:, :, :r])
            + est) * 0.2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.stack([p[..., :100].sum(-1), p[..., 100:1000].sum(-1), p[..., 1000:].sum(-1)], -1)
  np.testing.assert_allclose(np.asarray(got)[:, :, 0, 0], want, rtol=1e-4, atol=1e-6)


def test_simhash_counts_the_differing_signs_and_its_angle_estimate_tightens_with_bits():
  """sketch_estimate="simhash": `hamming` is a loop's count of differing bits; |q_out| |k_out| cos(pi h / bits)
  tracks the residual's dot product, its error shrinking with the bits; the chunk mass uses it in the logits."""
  B, K, N, D, r = 1, 2, 2000, 32, 4
  basis, k, q, k_out, q_out = _random_residuals(11, B, K, N, 2, D, r)
  true = np.einsum("bknd,bktd->bknt", q_out, k_out)
  k_low = jnp.swapaxes(sel.lowrank_coords(k, basis), -1, -2)
  err = {}
  for bits in (64, 1024):
    q_words = np.asarray(sel.residual_sketch(q, basis, bits))
    k_words = np.swapaxes(np.asarray(sel.residual_sketch(k, basis, bits)), -1, -2)  # B K w N
    h = np.asarray(sel.hamming(jnp.asarray(q_words), jnp.asarray(k_words)))
    q_bits = np.unpackbits(q_words.view(np.uint8), axis=-1, bitorder="little")  # B K 2 bits
    k_bits = np.unpackbits(np.swapaxes(k_words, -1, -2).copy().view(np.uint8), axis=-1, bitorder="little")
    np.testing.assert_array_equal(h, (q_bits[:, :, :, None] != k_bits[:, :, None]).sum(-1))
    est = (np.linalg.norm(q_out, axis=-1)[..., None] * np.asarray(k_low)[:, :, None, r] * np.cos(np.pi * h / bits))
    err[bits] = np.sqrt(np.mean((est - true) ** 2))
    if bits == 1024:
      assert np.corrcoef(est.ravel(), true.ravel())[0, 1] > 0.95
  assert 2.5 < err[64] / err[1024] < 6  # the angle's error shrinks as 1 / sqrt(bits)
  sketch = jnp.asarray(k_words)
  ends = jnp.asarray([[99, 999, 1999]], jnp.int32)
  got = sel.lowrank_chunk_mass(q[:, :, None], k_low, basis, jnp.full((B, K, 1, 2), N - 1), ends, n_sink=0, scale=0.2,
                               k_sketch_BKwT=sketch, sketch_estimate="simhash")
  logits = (np.einsum("bknd,bkdr,bkrt->bknt", np.asarray(q), np.asarray(basis), np.asarray(k_low)[:, :, :r])
            + est) * 0.2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.stack([p[..., :100].sum(-1), p[..., 100:1000].sum(-1), p[..., 1000:].sum(-1)], -1)
  np.testing.assert_allclose(np.asarray(got)[:, :, 0], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sketch_bits", [0, 64])
def test_decode_keeps_every_key_in_the_prompts_basis(sketch_bits):
  """score_estimate="lowrank": after the prompt and each decode step, the low-rank keys are the cache's
  keys in the basis fitted on the prompt's keys alone, kept for the sparse layers only (the default
  dense_layers=(0,) reads layer 0 whole: it has none)."""
  from chunkllm_jax import chunk_generation as cg
  from chunkllm_jax import head_selection as hs
  params = chunk_params()
  tokens = jnp.asarray(prompts([60, 60], seed=4), jnp.int32)
  lengths = jnp.asarray([60, 41], jnp.int32)
  ccfg = ChunkConfig(selection="kv_head", score_rank=4, score_estimate="lowrank", score_sketch=sketch_bits,
                     kv_budget=0.5, max_chunk_len=8, n_local=1, boundaries="fixed").validate(128, params.config.n_layers)
  scored = cg._layer_plan(params, ccfg).scored
  assert scored == (1, 2)
  _, cache, st = chunk_prefill(params, tokens, lengths, 128, ccfg)
  basis, _, _ = hs.low_rank_keys(cache.k, lengths, 4, sketch_bits, layers=scored)
  assert st.key_basis.shape[0] == st.key_low.shape[0] == st.key_sketch.shape[0] == 2
  np.testing.assert_allclose(np.asarray(st.key_basis), np.asarray(basis), atol=1e-6)
  for _ in range(5):
    _, cache, st = chunk_decode_step(params, tokens[:, 0], cache, st, ccfg)
  k = np.asarray(cache.k)[list(scored)]
  coords = np.einsum("lbskd,lbkdr->lbkrs", k, np.asarray(basis))
  inside = np.einsum("lbkrs,lbkdr->lbskd", coords, np.asarray(basis))
  missed = np.linalg.norm(k - inside, axis=-1).transpose(0, 1, 3, 2)  # L B K S: what the basis misses
  want = np.concatenate([coords, missed[:, :, :, None]], 3)
  for b, n in enumerate(np.asarray(cache.length)):
    np.testing.assert_allclose(np.asarray(st.key_low)[:, b, ..., :n], want[:, b, ..., :n], atol=1e-5)
  assert st.key_sketch.shape == (*st.key_low.shape[:3], sketch_bits // 32, st.key_low.shape[-1])
  if sketch_bits:  # every key's signs, the prompt's and decode's (a sign on a residual near 0 may flip)
    signs = (k - inside) @ np.asarray(sel.sketch_matrix(k.shape[-1], sketch_bits))  # L B S K m
    words = np.asarray(st.key_sketch)
    for b, n in enumerate(np.asarray(cache.length)):
      bits = ((words[:, b, :, :, None, :n] >> np.arange(32, dtype=np.uint32)[:, None]) & 1).reshape(
          *words.shape[:1], words.shape[2], sketch_bits, n)  # L K m S
      want_bits = np.moveaxis(signs[:, b, :n] > 0, 1, -1)  # L K m S
      sure = np.abs(np.moveaxis(signs[:, b, :n], 1, -1)) > 1e-4
      np.testing.assert_array_equal(bits.astype(bool)[sure], want_bits[sure])


@pytest.mark.parametrize("kw, match", [
    (dict(selection="per_query"), "selection must be one of"),
    (dict(selection="shared", score_rank=4), "needs selection='kv_head'"),
    (dict(selection="shared", score_estimate="exact"), "score_estimate='exact' sets how the per-head selection"),
    (dict(selection="shared", score_sketch=64), "needs score_estimate='lowrank' \\(with selection='kv_head'\\)"),
    (dict(selection="shared", head_refresh=4), "head_refresh sets how often each KV head chooses: it needs "
                                               "selection='kv_head'"),
    (dict(score_rank=0), "score_rank must be an int >= 1"),
    (dict(score_rank=999), "exceeds the head dimension"),
    (dict(score_estimate="pca"), "score_estimate must be one of"),
    (dict(score_estimate="exact", score_rank=4), "score_estimate='exact' reads all of K"),
    (dict(score_rank=4, score_sketch=48), "multiple of 32"),
    (dict(score_rank=4, score_estimate="sparq", score_sketch=64), "needs score_estimate='lowrank'"),
    (dict(score_rank=4, score_sketch=64, sketch_estimate="l2"), "sketch_estimate must be one of"),
    (dict(score_sketch=0, sketch_estimate="qjl"), "scores the residual sketch"),
    (dict(selection="shared", sketch_estimate="qjl"), "scores the residual sketch"),
    (dict(head_refresh=0), "head_refresh must be an int >= 1"),
    (dict(scorer="attention"), "scorer='attention' makes the shared rule's selections; it needs selection='shared'"),
    (dict(scorer="attention", prefill="sparse"), "it needs selection='shared'"),  # the prompt by prefill_scorer
    (dict(refresh_every=5), "refresh_every re-selects the shared rule's chunks inside a long chunk; it needs "
                            "selection='shared'"),
    # the vote's settings: no vote is made under the per-head rule after a dense prefill
    (dict(vote="max"), "vote='max' sets how the selection layers score chunks .* neither is made"),
    (dict(selection_layers=(1,), score_queries=2), "selection_layers=\\(1,\\), score_queries=2 set how"),
    (dict(prefill_scorer="adapter", prefill="dense"), "prefill_scorer='adapter' sets how"),
    (dict(prefill_selection="previous"), "prefill_selection='previous' says whose queries choose what a chunk-sparse"),
    (dict(selection="shared", prefill_selection="previous"), "this prefill is dense"),
])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    chunk_generate(chunk_params(), [[1, 2, 3]], max_new_tokens=4, max_len=64, **kw)


@pytest.mark.parametrize("kw", [dict(vote="max", prefill="sparse"), dict(prefill_scorer="adapter"),
                                dict(vote="max", selection_layers=(1,), selection="shared"),
                                dict(selection="shared", prefill="sparse", prefill_selection="previous")])
def test_the_vote_settings_are_taken_where_a_vote_is_made(kw):
  ChunkConfig(**kw).validate(64, 3)


def test_a_window_of_stored_queries_longer_than_the_buffer_stops_only_the_rule_that_reads_it():
  """Adapters trained to score with 40 queries, on a 32-slot buffer: the shared rule cannot fill its rings and
  says so; the per-head rule reads no ring and generates."""
  params = chunk_params()
  params = params.replace(adapters=params.adapters.replace(
      config=dataclasses.replace(params.adapters.config, score_queries=40)))
  with pytest.raises(ValueError, match="the adapters' score_queries \\(40\\) exceeds the buffer"):
    chunk_generate(params, [[1, 2, 3]], max_new_tokens=2, max_len=32, selection="shared")
  assert chunk_generate(params, [[1, 2, 3]], max_new_tokens=2, max_len=32).tokens.shape == (1, 3 + 2)


@pytest.mark.parametrize("S, length", [(2048, 1500), (2304, 2300), (300, 300)])
def test_the_low_rank_keys_are_built_a_block_at_a_time(S, length):
  """Building the per-head rule's low-rank keys and sketches needs temporaries of one block of one layer's keys,
  whatever the buffer's length (XLA's own count of the compiled program's temporaries), and gives each layer's
  keys what the whole layer read at once gives: its basis, coordinates and sketch (a last block that overlaps
  the one before counts its keys once)."""
  import jax
  from chunkllm_jax import head_selection as hs
  L, B, K, D = 3, 1, 3, 64
  # keys with a spread of energies, as real keys have (isotropic ones leave the basis to rounding)
  k = jax.random.normal(jax.random.key(S), (L, B, S, K, D), jnp.float32) * jnp.geomspace(4.0, 0.1, D)
  lengths = jnp.asarray([length], jnp.int32)
  build = jax.jit(hs.low_rank_keys, static_argnums=(2, 3))
  temps = lambda s: build.lower(jax.ShapeDtypeStruct((L, B, s, K, D), jnp.float32), lengths, 16, 128).compile(
      ).memory_analysis().temp_size_in_bytes
  one_block = hs.LOW_RANK_BLOCK * K * D * 4  # a block's keys; its transposes, residuals and projections: ~3x
  assert max(temps(S), temps(16 * S)) < 4 * one_block, (temps(S), temps(16 * S), one_block)
  basis, low, sketch = build(k, lengths, 16, 128)
  valid = jnp.arange(S)[None] < lengths[:, None]
  for layer in range(L):
    want = sel.key_basis(k[layer], valid, 16)
    np.testing.assert_allclose(basis[layer], want, atol=1e-5)
    keys = jnp.swapaxes(k[layer], 1, 2)  # B K S D
    np.testing.assert_allclose(low[layer], jnp.swapaxes(sel.lowrank_coords(keys, basis[layer]), -1, -2),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(sketch[layer], jnp.swapaxes(sel.residual_sketch(keys, basis[layer], 128), -1, -2))
  # for some layers alone (the sparse ones), stacked in the order given
  some = jax.jit(hs.low_rank_keys, static_argnums=(2, 3, 4))(k, lengths, 16, 128, (2, 0))
  for got, every in zip(some, (basis, low, sketch)):
    np.testing.assert_allclose(got, every[np.array([2, 0])], rtol=1e-6, atol=1e-6)
