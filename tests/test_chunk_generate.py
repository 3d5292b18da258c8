"""chunk_generate on tiny random models under the shared rule (`selection="shared"`, one selection a
chunk boundary; the default per-head rule has tests/test_per_head_selection.py): full coverage equals
`generate` exactly, selection changes only at boundaries, retention falls with top_chunks, and bad
settings fail before compiling."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import adapters as adp
from chunkllm_jax import chunk_generation as cg
from chunkllm_jax.chunk_generation import chunk_decode_step, chunk_prefill
from tests.tiny_models import SOFTCAP, chunk_params, prompts, tiny_params

# The shared rule's machinery is what this file tests: its working buffer, kernels, boundaries and votes.
chunk_generate = functools.partial(cg.chunk_generate, selection="shared")
ChunkConfig = functools.partial(cj.ChunkConfig, selection="shared")

FULL = dict(top_chunks=128, max_chunks=128, max_chunk_len=8, n_local=2)  # every chunk fits the selection


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_full_coverage_equals_generate(arch, sampling, prefill):
  params = chunk_params(arch)
  rows = prompts([40, 23, 1], seed=3)
  ref = cj.generate(params, rows, max_new_tokens=30, eos_ids=(), max_len=128, **sampling)
  out = chunk_generate(params, rows, max_new_tokens=30, eos_ids=(), max_len=128, prefill=prefill, **FULL,
                       **sampling)
  assert (out.tokens == ref.tokens).all()
  assert np.allclose(out.stats["kv_retention"], 1.0)
  assert not out.stats["chunk_overflow"].any()


@pytest.mark.parametrize("arch, scorer, vote, layers, budget", [
    ("llama", "adapter", "max", (2,), None), ("llama", "attention", "max", None, 1.0),
    ("gemma3", "attention", "sum", (2,), None), ("gemma3", "adapter", "sum", (0, 2), 1.0),
    ("llama", "adapter-window", "sum", None, None), ("gemma3", "hybrid", "max", None, 1.0)])
def test_full_coverage_equals_generate_for_every_scorer_vote_and_layers(arch, scorer, vote, layers, budget):
  params = chunk_params(arch)
  rows = prompts([40, 23], seed=4)
  ref = cj.generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128)
  # a budget replaces the chunk count (the two together are refused)
  budget_or_count = FULL if budget is None else {**{k: v for k, v in FULL.items() if k != "top_chunks"},
                                                 "kv_budget": budget}
  window = {"adapter-window": dict(scorer="adapter", score_queries=3),
            "hybrid": dict(scorer="adapter", prefill_scorer="attention")}.get(scorer, dict(scorer=scorer))
  out = chunk_generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128, vote=vote,
                       selection_layers=layers, **budget_or_count, **window)
  assert (out.tokens == ref.tokens).all()
  assert np.allclose(out.stats["kv_retention"], 1.0)


@pytest.mark.parametrize("scorer, budget, boundary_tokens, boundary_share", [
    ("adapter", 0.5, False, 1.0), ("attention", 0.25, False, 1.0), ("adapter", 0.25, True, 1.0),
    ("adapter", 0.25, True, 0.25)])
def test_measured_retention_meets_the_token_budget(scorer, budget, boundary_tokens, boundary_share):
  """What decode really reads, averaged over its steps, is within one chunk of the budget (the
  last tokens of the chunks left out included, all of them or their share)."""
  params = chunk_params()
  rows = prompts([120, 100, 90], seed=1)
  out = chunk_generate(params, rows, max_new_tokens=30, eos_ids=(), max_len=256, max_chunks=256, max_chunk_len=8,
                       n_local=1, kv_budget=budget, scorer=scorer, boundary_tokens=boundary_tokens,
                       boundary_share=boundary_share)
  # (The tiny model's Chunk Adapter closes a chunk at most tokens: with boundary_tokens the budget
  # then holds only the newest of the last tokens, which `working_positions` keeps.)
  seen = np.asarray([120, 100, 90]) + 15  # mid-decode
  assert np.all(np.abs(out.stats["kv_retention"] - budget) <= 8 / seen), out.stats["kv_retention"]


@pytest.mark.parametrize("budget", [dict(kv_budget=0.25), dict(kv_budget_tokens=20)])
def test_a_budget_floor_above_the_context_reads_everything(budget):
  """`kv_budget_min_tokens` at least the whole context: every step reads every token, so the tokens are
  `generate`'s; a floor under it leaves the budget in charge."""
  params = chunk_params()
  rows = prompts([40, 23], seed=5)
  ref = cj.generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128)
  run = lambda floor: chunk_generate(params, rows, max_new_tokens=20, eos_ids=(), max_len=128, max_chunks=128,
                                     max_chunk_len=8, n_local=1, kv_budget_min_tokens=floor, **budget)
  out = run(64)
  assert (out.tokens == ref.tokens).all()
  assert np.allclose(out.stats["kv_retention"], 1.0)
  assert (run(8).stats["kv_retention"] < 0.9).all()


def test_sparse_prefill_really_drops_chunks():
  """With a small selection, sparse prefill changes the prompt's last logits; dense does not."""
  params = chunk_params()
  rows = prompts([120], seed=9)
  ccfg = ChunkConfig(top_chunks=1, n_local=1, max_chunk_len=8, max_chunks=64, prefill="sparse").validate(128, 3)
  run = lambda c: chunk_prefill(params, jnp.asarray(rows, jnp.int32),
                                                                  jnp.asarray([120]), 128, c)[0]
  dense = run(dataclasses.replace(ccfg, prefill="dense"))
  np.testing.assert_allclose(dense, cj.forward(params, jnp.asarray(rows, jnp.int32))[:, -1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(ccfg), dense, atol=1e-3)


@pytest.mark.parametrize("keep", ["chunk", "boundary"])
def test_sparse_prefill_tables_are_sized_by_the_prompt_not_the_chunk_table(keep):
  """A chunk table sized for a long decode (4096 chunks) gives the prompt's state of a smaller table
  (128 chunks), and its prefill holds temporaries of about the same size: the
  per-chunk selection tables are the prompt's, not [max_chunks, max_chunks] (SepLLM at 8K x 8 rows
  held 19 GiB of them for a 256-token prompt)."""
  params = chunk_params()
  rows = np.zeros((2, 64), np.int32)
  for b, row in enumerate(prompts([64, 50], seed=11)):
    rows[b, :len(row)] = row
  rows, lens = jnp.asarray(rows), jnp.asarray([64, 50])
  base = ChunkConfig(top_chunks=2, n_local=1, max_chunk_len=4, prefill="sparse", boundaries="separators",
                     separator_ids=(7, 11, 13), keep=keep)
  runs, temps = [], []
  for max_chunks in (128, 4096):
    # (validated for a buffer that could hold that many chunks: chunk_generate refuses a table past its buffer)
    ccfg = dataclasses.replace(base, max_chunks=max_chunks).validate(max(512, max_chunks), 3)
    prefill = jax.jit(lambda p, t, n, c=ccfg: chunk_prefill(p, t, n, 512, c, working_buffer=False))
    temps.append(prefill.lower(params, rows, lens).compile().memory_analysis().temp_size_in_bytes)
    runs.append(prefill(params, rows, lens))
  (logits_s, _, st_s), (logits_l, _, st_l) = runs
  np.testing.assert_allclose(logits_l, logits_s, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(st_l.n_chunks, st_s.n_chunks)
  for name in ("chunk_end", "chunk_start", "selected"):
    small, large = np.asarray(getattr(st_s, name)), np.asarray(getattr(st_l, name))
    np.testing.assert_array_equal(large[..., :128], small, err_msg=name)
    rest = large[..., 128:]
    assert (rest == -1).all() if name == "chunk_end" else not rest.any(), name
  assert temps[1] < 2 * temps[0], temps  # [4096, 4096] tables would be 64 MiB a row


@pytest.mark.parametrize("rule, extra", [("fixed", dict()), ("separators", dict(separator_ids=(7, 11, 13)))])
def test_fixed_and_separator_boundary_rules(rule, extra):
  """The baselines' boundary rules: every max_chunk_len tokens, or at separator tokens."""
  params = chunk_params()
  rows = np.asarray(prompts([100], seed=10), np.int32)
  ccfg = ChunkConfig(boundaries=rule, max_chunk_len=8, max_chunks=64, **extra).validate(128, 3)
  _, _, st = chunk_prefill(params, jnp.asarray(rows), jnp.asarray([100]), 128, ccfg)
  n = int(st.n_chunks[0])
  ends = np.asarray(st.chunk_end[0, :n])
  starts = np.asarray(st.chunk_start[0, :n])
  if rule == "fixed":
    assert (ends - starts + 1 == 8).all() and n == (100 - 4) // 8
  else:  # a chunk ends at a separator, or at its length limit
    sep = np.isin(rows[0, ends], (7, 11, 13))
    assert ((ends - starts + 1 == 8) | sep).all() and sep.sum() >= 1
    inner = [t for a, e in zip(starts, ends) for t in range(a, e)]
    assert not np.isin(rows[0, inner], (7, 11, 13)).any()


def test_keep_boundary_reads_one_token_per_selected_chunk():
  params = chunk_params()
  rows = prompts([400], seed=4)
  kw = dict(max_new_tokens=12, eos_ids=(), max_len=512, max_chunks=64, max_chunk_len=16, n_local=1,
            boundaries="fixed", top_chunks=64)
  whole = chunk_generate(params, rows, **kw)
  ends = chunk_generate(params, rows, keep="boundary", **kw)
  # 400 tokens in chunks of 16: about 24 chunks -> 24 slots instead of 24 * 16
  assert ends.stats["kv_retention"][0] < 0.2 < 0.95 < whole.stats["kv_retention"][0]


@pytest.mark.parametrize("selection", ["kv_head", "shared"])
def test_every_layer_dense_reads_the_whole_cache(selection):
  """With dense_layers covering every layer nothing reads by the selection: the retention is 1 (it was 0 for the
  per-head rule and the working buffer's share for the shared one), and no budget warning is given."""
  params = chunk_params()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the budget warning would be an error here
    out = cj.chunk_generate(params, prompts([40, 25]), max_new_tokens=4, eos_ids=(), selection=selection, kv_budget=0.3,
                            dense_layers=tuple(range(params.config.n_layers)))
  np.testing.assert_allclose(out.stats["kv_retention"], 1.0)
  np.testing.assert_array_equal(out.tokens, cj.generate(params, prompts([40, 25]), max_new_tokens=4, eos_ids=()).tokens)


@pytest.mark.parametrize("budget", [dict(kv_budget=0.25, kv_budget_min_tokens=700), dict(kv_budget_tokens=1000)])
def test_a_budget_past_a_short_prompts_buffer_reads_it_whole(budget):
  """The buffer is sized to the prompt, so the same budget settings that bind on long prompts pass a short one's
  buffer (they were refused there): its context is read whole, as `generate` reads it."""
  params, rows = chunk_params(), prompts([50, 37], seed=2)
  out = cj.chunk_generate(params, rows, max_new_tokens=6, eos_ids=(), **budget)
  np.testing.assert_allclose(out.stats["kv_retention"], 1.0)
  np.testing.assert_array_equal(out.tokens, cj.generate(params, rows, max_new_tokens=6, eos_ids=()).tokens)


def test_no_chunk_slots_and_finished_rows_count_only_their_own_steps():
  """top_chunks = n_local = 0 reads the sinks and the open chunk only; a row that ends early (EOS)
  averages its stats over its own decode steps, not its batch-mates'."""
  params = chunk_params()
  rows = prompts([60], seed=11)
  kw = dict(max_new_tokens=10, max_len=128, max_chunk_len=8, max_chunks=64, boundaries="fixed")
  none = chunk_generate(params, rows, top_chunks=0, n_local=0, eos_ids=(), **kw)
  assert 0 < none.stats["kv_retention"][0] < 0.3
  free = chunk_generate(params, rows, eos_ids=(), **kw)
  eos = int(free.new_tokens(0)[3])  # the 4th new token ends the row when it is the EOS id
  both = chunk_generate(params, [rows[0], rows[0][:50]], eos_ids=(eos,), **kw)
  alone = chunk_generate(params, rows, eos_ids=(eos,), **kw)
  np.testing.assert_allclose(both.stats["kv_retention"][0], alone.stats["kv_retention"][0], rtol=1e-6)
  one = chunk_generate(params, rows, max_new_tokens=1, eos_ids=(), max_len=128)
  for name in ("kv_retention", "bytes_per_step", "dense_bytes_per_step"):  # means over no decode step
    assert np.isnan(one.stats[name][0]), name


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_a_finished_row_counts_its_chunks_and_selections_up_to_its_end(selection):
  """A row that has ended runs on with its batch, and its pad tokens close chunks by max_chunk_len: its
  n_chunks, n_selections and chunk_overflow are those of its own run, as if it had run alone."""
  params = chunk_params("gemma3")
  rows = prompts([5, 60], seed=9)
  kw = dict(max_new_tokens=12, max_len=128, max_chunk_len=4, selection=selection)
  free = cg.chunk_generate(params, rows, eos_ids=(), **kw)
  eos = int(free.new_tokens(0)[0])  # row 0 ends at its first token; row 1 never makes it
  assert eos not in free.new_tokens(1)
  both = cg.chunk_generate(params, rows, eos_ids=(eos,), **kw)
  alone = cg.chunk_generate(params, rows[:1], eos_ids=(eos,), **kw)
  assert both.lengths[1] - both.prompt_lengths[1] == 12
  for name in ("n_chunks", "n_selections", "chunk_overflow"):
    assert both.stats[name][0] == alone.stats[name][0], name


@pytest.mark.parametrize("lengths, seed, budget", [((90, 93), 90, 0.3), ((50, 61, 77), 3, 0.3), ((40, 500), 3, 0.5)])
def test_a_row_reads_the_same_whatever_rows_share_its_batch(lengths, seed, budget):
  """Rows close their chunks at different steps. A boundary in one row must not re-pack another's working
  buffer: the budget's room there (after its open chunk, which has grown since its own selection) is no
  longer what it chose by, and its boundary tokens would then depend on its batch-mates. Its bytes are its
  own working buffer's blocks too (40 tokens at 50% fill one, 500 two)."""
  params = chunk_params()
  rows = prompts(lengths, seed=seed)
  kw = dict(max_new_tokens=12, eos_ids=(), boundaries="fixed", max_chunk_len=8, n_local=1, kv_budget=budget)
  batch = chunk_generate(params, rows, **kw)
  for b, row in enumerate(rows):
    alone = chunk_generate(params, [row], **kw)
    np.testing.assert_array_equal(batch.new_tokens(b), alone.new_tokens(0))
    for name in ("kv_retention", "bytes_per_step"):
      np.testing.assert_allclose(batch.stats[name][b], alone.stats[name][0], rtol=1e-6, err_msg=name)


def test_retention_and_bytes_fall_with_top_chunks():
  params = chunk_params()
  rows = prompts([400], seed=4)
  # Near-certain forced closes only: chunks of 32 tokens, so the selection size sets the bytes.
  kw = dict(max_new_tokens=12, eos_ids=(), max_len=512, max_chunks=64, max_chunk_len=32, n_local=1,
            alpha=0.999999)
  wide = chunk_generate(params, rows, top_chunks=8, **kw)
  narrow = chunk_generate(params, rows, top_chunks=2, **kw)
  assert narrow.stats["kv_retention"][0] < wide.stats["kv_retention"][0] < 1.0
  assert narrow.stats["bytes_per_step"][0] < wide.stats["bytes_per_step"][0]
  assert narrow.stats["bytes_per_step"][0] < narrow.stats["dense_bytes_per_step"][0]


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_a_sliding_layer_counts_its_window_alone(selection):
  """A sliding layer reads its last `sliding_window` keys in both designs (`attention.decode_attention`), so the
  bytes of a step count that many there, not every token seen (which made Gemma 3's share of dense bytes
  look near 1 at any budget)."""
  params = chunk_params("gemma3")  # layers 0 and 2 full, layer 1 sliding
  cfg = params.config
  assert cfg.sliding_window < 60
  out = chunk_generate(params, prompts([60], seed=2), max_new_tokens=6, eos_ids=(), selection=selection,
                       kv_budget=0.5, boundaries="fixed", max_chunk_len=8)
  seen = 60 + 1 + (6 - 1 - 1) / 2  # tokens seen at the row's middle decode step (5 steps after the prompt)
  per_token = 2 * cfg.n_kv_heads * cfg.head_dim * 4
  np.testing.assert_allclose(out.stats["dense_bytes_per_step"][0], per_token * (2 * seen + cfg.sliding_window))
  # layer 0 (dense) reads every token, layer 1 its window, layer 2 (sparse) the slots it read
  ccfg = cg.resolved(params, ChunkConfig(selection=selection).validate(128, cfg.n_layers))
  nbytes = cg.bytes_per_decode_step(params, ccfg, 4, np.array([10.0]), np.array([seen]))
  np.testing.assert_allclose(nbytes["chunk"], per_token * (seen + cfg.sliding_window + 10))
  np.testing.assert_allclose(nbytes["dense"], per_token * (2 * seen + cfg.sliding_window))


@pytest.mark.parametrize("vote, scorer, budget, window", [
    ("sum", "adapter", None, None), ("max", "adapter", 0.3, None), ("sum", "adapter", 0.3, 4),
    ("max", "attention", None, None), ("sum", "attention", 0.3, None)])
def test_selection_changes_only_at_boundaries(vote, scorer, budget, window):
  params = chunk_params()
  # Sharper random QK Adapters, so that chunk rankings depend on the query (and change).
  qk = jax.tree.map(lambda w: 4 * w, params.adapters.params["qk"])
  params = params.replace(adapters=params.adapters.replace(params={**params.adapters.params, "qk": qk}))
  ccfg = ChunkConfig(top_chunks=2, n_local=1, max_chunk_len=6, max_chunks=128, alpha=0.9, vote=vote, scorer=scorer,
                     kv_budget=budget, score_queries=window,
                     recent_share=0.0, boundary_tokens=False).validate(128, 3)  # the budget by score alone
  toks, lens = np.asarray([prompts([30], seed=5)[0]], np.int32), jnp.asarray([30])
  _, cache, st = chunk_prefill(params, jnp.asarray(toks), lens, 128, ccfg)
  step = jax.jit(chunk_decode_step, static_argnums=(4,))
  feed = np.random.RandomState(6).randint(0, 96, 40)  # varied input, so chunk keys differ
  boundaries, changes = 0, 0
  for i in range(40):
    tok = jnp.asarray(feed[i: i + 1], jnp.int32)
    before_n, before_sel, before_sels = int(st.n_chunks[0]), np.asarray(st.selected), int(st.n_selections[0])
    _, cache, st = step(params, tok, cache, st, ccfg)
    closed = int(st.n_chunks[0]) > before_n
    boundaries += closed
    changed = not np.array_equal(before_sel, np.asarray(st.selected))
    changes += changed
    assert closed or not changed, f"selection changed at step {i} without a boundary"
    assert int(st.n_selections[0]) - before_sels == int(closed)
  assert boundaries >= 40 // 6  # forced closes at max_chunk_len at least
  assert changes >= 1


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("cover", [dict(), dict(kv_budget=1.0, prefill="sparse")], ids=["all_chunks", "full_budget"])
def test_full_coverage_after_prompts_shorter_than_the_sinks_gives_generates_logits(selection, arch, cover):
  """Step by step, the logits of a full-coverage decode equal the dense decode's, after prompts of 1 and 3 tokens
  (shorter than the 4 sinks) beside a longer one. Under the shared rule the tokens written into sink positions
  were read from working-buffer slots filled before they existed, until the next selection: the tokens differed
  from `generate`'s on the real model, and a row's tokens from its tokens alone. (The tiny models' greedy tokens
  repeat whatever they read, so their logits are compared, not their tokens.)"""
  from chunkllm_jax import kv_cache

  params = chunk_params(arch)
  every = {**FULL, "max_chunks": 64, "top_chunks": 0 if cover else 64, "prefill": "dense", **cover}
  ccfg = ChunkConfig(selection=selection, **every).validate(64, params.config.n_layers)
  rows = prompts([1, 3, 13], seed=4)
  toks = np.zeros((3, 13), np.int32)
  for b, r in enumerate(rows):
    toks[b, :len(r)] = r
  lens = jnp.asarray([len(r) for r in rows])
  empty = kv_cache.init_cache(params.config, 3, 64, jnp.float32)
  want, dense = kv_cache.prefill(params, jnp.asarray(toks), lens, empty)
  got, cache, st = chunk_prefill(params, jnp.asarray(toks), lens, 64, ccfg)
  step, dense_step = jax.jit(chunk_decode_step, static_argnums=(4,)), jax.jit(kv_cache.decode_step)
  feed = np.random.RandomState(7).randint(1, 96, (20, 3)).astype(np.int32)  # past two chunk closes of each row
  for i in range(20):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")
    got, cache, st = step(params, jnp.asarray(feed[i]), cache, st, ccfg)
    want, dense = dense_step(params, jnp.asarray(feed[i]), dense)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_rows_logits_under_a_budget_do_not_depend_on_its_batch(selection, arch):
  """Under a 50% budget, each row's logits at the prompt and at 16 decode steps are those of the row run alone,
  beside a 2-token row (in its sinks) and rows of other lengths. Logits, not tokens: the tiny models' greedy
  tokens barely depend on what they read, so a token check passed the shared rule's stale sinks."""
  params = chunk_params(arch)
  ccfg = ChunkConfig(selection=selection, kv_budget=0.5, max_chunk_len=6, max_chunks=64, n_local=1,
                     prefill="dense").validate(96, params.config.n_layers)
  rows = prompts([2, 40, 17], seed=5)
  step = jax.jit(chunk_decode_step, static_argnums=(4,))
  feed = np.random.RandomState(8).randint(1, 96, (16, 3)).astype(np.int32)

  def run(which):  # [rows, 17, V]: the prompt's logits and 16 steps'
    toks = np.zeros((len(which), max(len(rows[i]) for i in which)), np.int32)
    for j, i in enumerate(which):
      toks[j, :len(rows[i])] = rows[i]
    logits, cache, st = chunk_prefill(params, jnp.asarray(toks), jnp.asarray([len(rows[i]) for i in which]), 96, ccfg)
    out = [logits]
    for t in range(16):
      logits, cache, st = step(params, jnp.asarray(feed[t, which]), cache, st, ccfg)
      out.append(logits)
    return np.stack(out, 1)

  batch = run([0, 1, 2])
  for i in range(3):
    np.testing.assert_allclose(run([i])[0], batch[i], rtol=1e-5, atol=2e-5, err_msg=f"row {i}")


def test_prompts_of_one_token_and_with_no_boundary_work():
  params = chunk_params()
  one = chunk_generate(params, [[5]], max_new_tokens=5, eos_ids=(), max_len=64)
  assert one.lengths[0] == 6
  never = chunk_generate(params, prompts([50])[:1], max_new_tokens=5, eos_ids=(), max_len=128,
                         alpha=0.999999, max_chunk_len=128, max_chunks=16)
  assert never.stats["n_chunks"][0] == 0


@pytest.mark.parametrize("kw, match", [
    (dict(top_chunks=-1), "top_chunks and n_local must be >= 0"),
    (dict(n_local=-2), "top_chunks and n_local must be >= 0"),
    (dict(n_sink=-1), "n_sink must be >= 0"),
    (dict(n_sink=64), "n_sink=64 must be smaller than the buffer"),
    (dict(max_chunks=2, max_chunk_len=8), "max_chunks=2 cannot hold 64 tokens"),
    (dict(vote="mean"), "vote must be"),
    (dict(alpha=1.5), "alpha must be in"),
    (dict(prefill="none"), "prefill must be"),
    (dict(boundaries="separators"), "needs separator_ids"),
    (dict(keep="boundary", attention="pallas"), "reads selected chunks whole"),
    (dict(boundary_tokens=True, keep="boundary"), "use one or the other"),
    (dict(boundary_tokens=True, prefill="sparse"), "set prefill='dense'"),
    (dict(boundary_tokens=True, prefill_scorer="adapter"), "set prefill='dense'"),
    (dict(boundary_tokens=1), "boundary_tokens must be a bool"),
    (dict(bogus=1), "unknown chunk-config fields"),
    (dict(config=ChunkConfig()), r"a whole ChunkConfig goes in chunk_config= \(not config=\)"),
    (dict(kv_budjet=0.5), "kv_budjet: did you mean kv_budget"),
    (dict(kv_budget=1.5), "kv_budget is a fraction"),
    (dict(kv_budget=0.0), "kv_budget is a fraction"),
    (dict(kv_budget_tokens=0), "kv_budget_tokens=0 must be >= 1"),
    (dict(scorer="oracle"), "scorer must be"),
    (dict(selection_layers=(3,)), "not full-attention layers"),
    (dict(selection_layers=(-1,)), "not full-attention layers"),
    (dict(top_chunks=2.5), "top_chunks must be an int"),
    (dict(n_local=10**9), "cannot exceed the chunk table"),
])
def test_bad_settings_fail_before_compiling(kw, match):
  params = chunk_params()
  with pytest.raises((ValueError, TypeError), match=match):
    chunk_generate(params, [[1, 2, 3]], max_new_tokens=4, max_len=64, **kw)


def test_missing_or_foreign_adapters_are_refused():
  params = chunk_params()
  with pytest.raises(ValueError, match="needs adapters"):
    chunk_generate(params.replace(adapters=None), [[1, 2]], max_new_tokens=2)
  other = tiny_params(d_model=48, n_layers=3)
  foreign = adp.init_adapters(jax.random.key(0), other.config)
  with pytest.raises(ValueError, match="do not fit this backbone"):
    chunk_generate(params.replace(adapters=foreign), [[1, 2]], max_new_tokens=2)
  with pytest.raises(ValueError, match="buffer's max_len=8"):
    chunk_generate(params, [[1] * 6], max_new_tokens=4, max_len=8)
  partial = adp.init_adapters(jax.random.key(0), params.config, adp.AdapterConfig(d_c=8, qk_layers=(0, 1)))
  with pytest.raises(ValueError, match="have no QK Adapter"):
    chunk_generate(params.replace(adapters=partial), [[1, 2]], max_new_tokens=2, selection_layers=(2,))


def test_pallas_path_gives_the_tokens_of_the_xla_path():
  """The kernels (interpret mode) inside chunk_generate: compaction gather and decode attention."""
  params = chunk_params()
  rows = prompts([45, 20], seed=7)
  kw = dict(max_new_tokens=8, eos_ids=(), max_len=128, top_chunks=2, n_local=1, max_chunk_len=8, max_chunks=64,
            alpha=0.9, temperature=1.0, seed=5)  # sampled: tokens follow the logits closely
  xla = chunk_generate(params, rows, **kw)
  kernel = chunk_generate(params, rows, attention="pallas", interpret=True, **kw)
  assert (xla.tokens == kernel.tokens).all()
  np.testing.assert_allclose(xla.stats["kv_retention"], kernel.stats["kv_retention"])
  assert xla.stats["kv_retention"][0] < 1.0  # the selection really was sparse


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_a_full_chunk_table_merges_chunks_and_a_full_budget_still_reads_everything(selection):
  """A table too small for the text (20 chunks, and every token closes one: alpha near 0) fills in the prompt and
  again in decode: the later chunks join its last one instead of leaving every chunk, so a full budget is still
  `generate`, reported in the stats; a smaller budget, whose choice the merge takes away, warns."""
  params = chunk_params()
  rows = prompts([60, 45], seed=11)
  ref = cj.generate(params, rows, max_new_tokens=12, eos_ids=(), max_len=128)
  kw = dict(max_new_tokens=12, eos_ids=(), max_len=128, max_chunks=20, max_chunk_len=8, n_local=1, alpha=1e-6,
            selection=selection)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # everything is read: nothing to warn about
    out = cg.chunk_generate(params, rows, kv_budget=1.0, **kw)
  assert (out.tokens == ref.tokens).all()
  assert out.stats["chunk_overflow"].all() and (out.stats["n_chunks"] == 20).all()
  np.testing.assert_allclose(out.stats["kv_retention"], 1.0)
  with pytest.warns(UserWarning, match="chunk table \\(max_chunks=20\\) filled .* no longer chooses"):
    cg.chunk_generate(params, rows, kv_budget=0.5, **kw)


@pytest.mark.parametrize("recent_share, local", [(0.0, "the 2 most recent chunks"), (0.75, "the most recent chunk")])
def test_a_budget_below_what_is_always_read_warns(recent_share, local):
  """The sinks, the local chunks and the open chunk are always read: a budget they pass is exceeded, with a warning
  that names the read and the budget; a budget they fit in is not. Under a recent share only the newest local chunk
  is always read (`selection.local_count`), and the warning says so."""
  params = chunk_params()
  rows = prompts([40, 23], seed=2)
  kw = dict(max_new_tokens=6, eos_ids=(), max_len=128, max_chunk_len=8, n_local=2, max_chunks=64,
            recent_share=recent_share)
  says = (r"read .* of the KV against a budget of [\d.]+% \(row \d's, in whole tokens of the \d+ seen at its middle "
          rf"step\): the sinks, {local} and the open chunk .*always read")
  with pytest.warns(UserWarning, match=says):
    tight = cg.chunk_generate(params, rows, kv_budget_tokens=1, **kw)
  assert (tight.stats["kv_retention"] > 0.1).all()  # against a budget of one token: 2-4% of the tokens seen
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cg.chunk_generate(params, rows, kv_budget=1.0, **kw)


def test_the_shared_rules_kernels_refuse_soft_capped_logits():
  """The shared rule's kernels compute plain softmax logits: a soft-capping model is refused before compiling
  (the per-head rule's kernel caps them: tests/test_per_head_selection.py)."""
  params = chunk_params(**SOFTCAP)
  with pytest.raises(ValueError, match="do not support attention logit soft-capping"):
    chunk_generate(params, [[1, 2, 3]], max_new_tokens=2, max_len=64, attention="pallas", interpret=True)


@pytest.mark.multi_device
@pytest.mark.parametrize("data, model", [(8, 1), (2, 4)])
@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_sharded_equals_unsharded(data, model, selection):
  params = chunk_params(n_heads=8, n_kv_heads=4, head_dim=4)
  rows = prompts([30, 12, 25, 7, 19, 3, 28, 16], seed=8)
  kw = dict(max_new_tokens=10, eos_ids=(), max_len=128, top_chunks=3, n_local=1, max_chunk_len=8, max_chunks=64,
            temperature=1.0, seed=2, selection=selection)
  a = cg.chunk_generate(params, rows, **kw)
  b = cg.chunk_generate(params, rows, mesh=cj.make_mesh(data=data, model=model), **kw)
  assert (a.tokens == b.tokens).all()
  np.testing.assert_allclose(a.stats["kv_retention"], b.stats["kv_retention"], rtol=1e-6)


@pytest.mark.multi_device
@pytest.mark.parametrize("data, model", [(1, 8), (2, 4)])
def test_sharded_per_head_over_eight_devices(data, model):
  """The default rule over eight devices with smollm2-135m's head layout (9 query / 3 KV heads of 64, replicated
  on the model axis): the per-head rule's low-rank keys eigendecompose 64 x 64 Gram matrices, which deadlocked
  XLA's CPU collectives when LAPACK split the batch over the thread pool (the process aborted)."""
  params = chunk_params(n_heads=9, n_kv_heads=3, head_dim=64)
  rows = prompts([30, 12], seed=8)
  kw = dict(max_new_tokens=4, eos_ids=(), max_len=64, max_chunk_len=8, max_chunks=32, selection="kv_head")
  a = cg.chunk_generate(params, rows, **kw)
  b = cg.chunk_generate(params, rows, mesh=cj.make_mesh(data=data, model=model), **kw)
  assert (a.tokens == b.tokens).all()


def test_refresh_every_reselects_inside_long_chunks():
  params = chunk_params()
  rows = prompts([40], seed=9)
  kw = dict(max_new_tokens=24, eos_ids=(), max_len=128, top_chunks=2, n_local=1, max_chunk_len=64, max_chunks=64,
            alpha=0.999999)  # no boundary at all: only refreshes can re-select
  plain = chunk_generate(params, rows, **kw)
  refreshed = chunk_generate(params, rows, refresh_every=5, **kw)
  assert plain.stats["n_selections"][0] == 1  # the prompt's last token only
  assert refreshed.stats["n_selections"][0] > 1 + 24 // 5 - 2


def test_prefill_scorer_makes_the_prompts_selections():
  """With prefill_scorer="attention" (the default) the prompt's selections and the first decode selection are the
  attention scorer's, and decode then re-selects with the adapters at each boundary."""
  params = chunk_params()
  qk = jax.tree.map(lambda w: 4 * w, params.adapters.params["qk"])  # sharper, so the scorers disagree
  params = params.replace(adapters=params.adapters.replace(params={**params.adapters.params, "qk": qk}))
  toks, lens = jnp.asarray([prompts([60], seed=8)[0]], jnp.int32), jnp.asarray([60])
  common = dict(top_chunks=2, n_local=1, max_chunk_len=6, max_chunks=128, alpha=0.9)
  first = {}
  for name, fields in [("attention", dict(scorer="attention")), ("adapter", dict(scorer="adapter", prefill_scorer="adapter")),
                       ("hybrid", dict(scorer="adapter", prefill_scorer="attention"))]:
    ccfg = ChunkConfig(**common, **fields).validate(128, 3)
    _, cache, st = chunk_prefill(params, toks, lens, 128, ccfg)
    first[name] = np.asarray(st.selected)
    if name == "hybrid":  # decode goes on with the adapters: their rings and chunk keys are filled
      assert st.recent_qt.shape[2] == 1 and st.recent_q.shape[2] == 0 and float(jnp.abs(st.chunk_key).sum()) > 0
  assert np.array_equal(first["hybrid"], first["attention"])
  assert not np.array_equal(first["attention"], first["adapter"])  # else the test shows nothing


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_working_buffer_is_built_after_the_prefill(prefill):
  """chunk_generate's prefill program returns no working buffer (it would be live beside the
  prefill's temporaries); its decode program builds the one `chunk_prefill` would have built."""
  from chunkllm_jax import decoding

  params = chunk_params()
  ccfg = cg.resolved(params, ChunkConfig(kv_budget=0.5, max_chunk_len=8, prefill=prefill).validate(128, 3))
  rows = prompts([60, 45], seed=8)
  toks = jnp.asarray([np.pad(np.asarray(r), (0, 60 - len(r))) for r in rows], jnp.int32)
  lens = jnp.asarray([60, 45])
  _, cache, st = chunk_prefill(params, toks, lens, 128, ccfg)
  _, lean_cache, lean = chunk_prefill(params, toks, lens, 128, ccfg, working_buffer=False)
  assert lean.work_k is None and lean.work_v is None
  built = cg._enter_state(params, (lean_cache, lean), cg.ChunkSettings(128, ccfg))[1]
  for name in ("work_k", "work_v", "work_pos", "work_valid", "work_used", "selected"):
    np.testing.assert_array_equal(np.asarray(getattr(built, name)), np.asarray(getattr(st, name)), err_msg=name)
  assert np.asarray(st.work_used).min() > 0  # the check above compared a filled buffer
  progs = decoding.programs(cg._prefill_state, cg._step_state, cg.ChunkSettings(128, ccfg), enter_fn=cg._enter_state,
                            sampling=decoding.Sampling(0.0, 0, 1.0), max_new=4, eos_ids=(), pad_id=0)
  key = decoding.row_keys(0, toks.shape[0])
  _, state = progs.prefill.executable(params, toks, lens, key).out_info
  assert state[1].work_k is None
  with pytest.raises(ValueError, match="only in their loop"):
    progs.compile_ahead(params, toks, lens, key, stepwise=True)
