"""generate / stream on tiny random models: greedy equals step-by-step forward, padding is inert,
sampling is seeded, bad input is refused before compilation, and sharding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import decoding
from chunkllm_jax import model
from chunkllm_jax.sampling import Sampling, sample
from tests.tiny_models import ARCH_FLAGS, prompts, tiny_params

def greedy_by_forward(params, prompt, n):
  """The slow obvious decoder: a full forward per token (right padding is causal-inert)."""
  seq = list(prompt)
  fwd = jax.jit(cj.forward)
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
    seq.append(int(jnp.argmax(fwd(params, padded)[0, len(seq) - 1])))
  return seq


@pytest.mark.parametrize("arch", sorted(ARCH_FLAGS))
def test_output_fn_sees_each_layers_output(arch):
  """`run_layers`' `output_fn` gets layer l's output (that of a model cut after layer l) and what
  `attend_fn` returned, and what it returns is what the scan stacks."""
  params = tiny_params(arch, n_layers=3, **(dict(layer_sliding=(False, True, False)) if arch == "gemma3" else {}))
  cfg = params.config
  tokens = jnp.asarray(prompts([11, 11]))
  B, T = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  dense = model.self_attend_fn(cfg, pos, pos < T)

  def attend_fn(state, layer, q, k, v, h):
    o, state, _ = dense(state, layer, q, k, v, h)
    return o, state, layer["index"]

  def output_fn(x_LBTD, layer, x, idx):
    return x_LBTD.at[idx].set(x), idx * 10

  x, x_LBTD, ys = model.run_layers(params, model.embed(params, tokens), pos, attend_fn,
                                      jnp.zeros((3, B, T, cfg.d_model)), output_fn)
  assert ys.tolist() == [0, 10, 20]
  np.testing.assert_array_equal(x_LBTD[2], x)
  for n in (1, 2):
    cut = params.replace(backbone={**params.backbone, "layers": jax.tree.map(lambda w: w[:n], params.backbone["layers"])},
                         config=cfg.replace(n_layers=n, layer_sliding=cfg.layer_sliding[:n]))
    x_n, _, _ = model.run_layers(cut, model.embed(cut, tokens), pos, model.self_attend_fn(cut.config, pos, pos < T))
    np.testing.assert_allclose(x_LBTD[n - 1], x_n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCH_FLAGS))
def test_greedy_generate_equals_repeated_forward(arch):
  params = tiny_params(arch)
  rows = prompts([9, 23])
  out = cj.generate(params, rows, max_new_tokens=12, eos_ids=())
  for b, row in enumerate(rows):
    assert out.tokens[b, : out.lengths[b]].tolist() == greedy_by_forward(params, row, 12)


def test_padding_never_changes_a_row():
  params = tiny_params("gemma3")
  rows = prompts([3, 30, 17], seed=1)
  batched = cj.generate(params, rows, max_new_tokens=10, eos_ids=())
  for b, row in enumerate(rows):
    alone = cj.generate(params, [row], max_new_tokens=10, eos_ids=())
    assert batched.tokens[b, : batched.lengths[b]].tolist() == alone.tokens[0, : alone.lengths[0]].tolist()


def test_eos_stops_a_row_and_pads_after_it():
  params = tiny_params()
  rows = prompts([5, 8], seed=2)
  free = cj.generate(params, rows, max_new_tokens=8, eos_ids=())
  eos = int(free.new_tokens(0)[2])  # make row 0's third new token the end-of-sequence token
  first = free.new_tokens(0).tolist().index(eos)
  out = cj.generate(params, rows, max_new_tokens=8, eos_ids=(eos,), pad_id=95)
  assert out.lengths[0] == out.prompt_lengths[0] + first + 1
  assert (out.tokens[0, out.lengths[0]:] == 95).all()
  n1 = out.lengths[1] - out.prompt_lengths[1]
  assert out.new_tokens(1).tolist() == free.new_tokens(1)[:n1].tolist()


def test_a_row_that_stops_early_decoded_at_the_loops_pace():
  """decode_tok_s of a row is its tokens a second while it ran: a row that ended early was reported at its
  tokens over the whole loop's time (half the rate of a row beside it that ran twice as long)."""
  params = tiny_params()
  rows = prompts([5, 8], seed=2)
  run = lambda eos_ids: cj.generate(params, rows, max_new_tokens=12, eos_ids=eos_ids, temperature=1.0, seed=3)
  free = [run(()).new_tokens(b).tolist() for b in range(2)]  # sampled: the tiny model's greedy tokens repeat
  # an end token that row 0 meets after a few tokens and row 1 not before twice as many
  eos = next(t for j, t in enumerate(free[0]) if 2 <= j == free[0].index(t) and t not in free[1][:2 * j + 2])
  out = run((eos,))
  n_new = out.lengths - out.prompt_lengths
  assert n_new[0] < n_new[1] and out.stats["decode_tok_s"][0] == out.stats["decode_tok_s"][1] > 0


def test_stream_yields_the_same_tokens_as_generate():
  params = tiny_params("qwen3")
  rows = prompts([7, 12], seed=3)
  out = cj.generate(params, rows, max_new_tokens=6, eos_ids=())
  steps = np.stack(list(cj.stream(params, rows, max_new_tokens=6, eos_ids=())), axis=1)
  for b in range(2):
    assert steps[b].tolist() == out.new_tokens(b).tolist()


def test_bfloat16_runs_and_mostly_agrees_with_float32():
  p32 = tiny_params()
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  toks = jnp.asarray(prompts([40])[0])[None]
  l32, l16 = cj.forward(p32, toks), cj.forward(p16, toks)
  assert l16.dtype == jnp.float32  # logits are always float32
  assert float(jnp.mean(jnp.argmax(l32, -1) == jnp.argmax(l16, -1))) > 0.8


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_sampling_with_one_candidate_is_greedy(kw):
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  got = sample(logits, jax.random.split(jax.random.key(1), 4), Sampling(temperature=0.7, **kw))
  assert got.tolist() == jnp.argmax(logits, -1).tolist()


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-44])
def test_a_tiny_temperature_draws_the_greedy_token(temperature):
  """Logits divided by a tiny temperature overflow to inf where they are positive: the draw must still be
  the most likely token, not any of the positive ones."""
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 10
  got = sample(logits, jax.random.split(jax.random.key(1), 64), Sampling(temperature=temperature))
  assert got.tolist() == jnp.argmax(logits, -1).tolist()


def test_top_k_and_top_p_only_draw_allowed_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(3), 2000)
  draws = sample(logits, keys, Sampling(temperature=1.0, top_k=2))
  assert set(np.unique(draws)) == {0, 1}
  draws = sample(logits, keys, Sampling(temperature=1.0, top_p=0.9))  # 0.5 + 0.3 + 0.15 reaches 0.9
  assert set(np.unique(draws)) == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_seed_dependent():
  params = tiny_params()
  rows = prompts([6, 6], seed=4)
  a = cj.generate(params, rows, max_new_tokens=10, temperature=1.0, seed=7, eos_ids=())
  b = cj.generate(params, rows, max_new_tokens=10, temperature=1.0, seed=7, eos_ids=())
  c = cj.generate(params, rows, max_new_tokens=10, temperature=1.0, seed=8, eos_ids=())
  assert (a.tokens == b.tokens).all()
  assert (a.tokens != c.tokens).any()


@pytest.mark.parametrize("call", ["generate", "chunk_generate"])
def test_a_row_samples_what_it_samples_alone_given_its_seed(call):
  """Each row draws from a stream of its own: given its seed (one per row), a row samples alone what it samples in
  a batch, wherever it sits and whatever rows are beside it; with one int seed, row 0 draws as it would alone and
  equal prompts in other rows draw differently."""
  from tests.tiny_models import chunk_params

  params = chunk_params()
  rows = prompts([6, 23, 11], seed=7)
  kw = dict(max_new_tokens=12, eos_ids=(), temperature=1.5, max_len=64)
  run = getattr(cj, call)
  batch = run(params, rows, seed=[11, 12, 13], **kw)
  flipped = run(params, rows[::-1], seed=[13, 12, 11], **kw)
  # seeds held in arrays' scalars (as jnp.int32(12), or a row of an array, gives them) were refused
  assert run(params, rows, seed=[np.int64(11), jnp.int32(12), jnp.arange(14)[13]], **kw).tokens.tolist() == \
      batch.tokens.tolist()
  for b, (row, s) in enumerate(zip(rows, [11, 12, 13])):
    alone = run(params, [row], seed=s, **kw)
    assert list(batch.new_tokens(b)) == list(alone.new_tokens(0)) == list(flipped.new_tokens(2 - b))
  same = run(params, [rows[0]] * 3, seed=11, **kw)
  assert list(same.new_tokens(0)) == list(batch.new_tokens(0))
  assert list(same.new_tokens(1)) != list(same.new_tokens(0)) or list(same.new_tokens(2)) != list(same.new_tokens(0))


@pytest.mark.parametrize("seed, error, match", [
    ([1, 2], ValueError, "seed gives 2 seeds for 3 rows: give one int, or one per row"),
    ("7", TypeError, "seed must be an int or one int per row"),
    ([1, 2, 2.5], TypeError, "seed must be an int"),
    ([1, 2, 2**64], ValueError, "seed must fit in 64 bits"),
])
def test_bad_seeds_are_named(seed, error, match):
  with pytest.raises(error, match=match):
    cj.generate(tiny_params(), prompts([3, 4, 5], seed=1), max_new_tokens=2, temperature=1.0, seed=seed)


def test_greedy_calls_share_one_program_whatever_top_k_and_top_p():
  """temperature 0 ignores top_k and top_p: a greedy call with them set compiles nothing new."""
  params = tiny_params()
  rows = prompts([6], seed=5)
  ref = cj.generate(params, rows, max_new_tokens=3, eos_ids=())
  misses = decoding.programs.cache_info().misses
  for kw in (dict(top_k=5), dict(top_p=0.5), dict(top_k=2, top_p=0.9)):
    assert (cj.generate(params, rows, max_new_tokens=3, eos_ids=(), **kw).tokens == ref.tokens).all()
  assert decoding.programs.cache_info().misses == misses


@pytest.mark.parametrize("call", ["generate", "chunk_generate"])
def test_counts_of_new_tokens_that_share_a_loop_width_share_its_programs(call):
  """max_new_tokens is an argument of the decode loop, not part of its program: counts that round up to
  the same width compile nothing new, and each gives the first tokens of the longest (greedy)."""
  from tests.tiny_models import chunk_params

  params = chunk_params()
  rows = prompts([6, 11], seed=6)
  run = lambda n: getattr(cj, call)(params, rows, max_new_tokens=n, eos_ids=(), max_len=64)
  longest = run(16)
  misses = decoding.programs.cache_info().misses
  for n in (9, 1, 13):
    out = run(n)
    assert out.tokens.shape == (2, 11 + n)
    for b in range(2):
      assert list(out.new_tokens(b)) == list(longest.new_tokens(b)[:n])
    assert out.stats["decode_tok_s"].shape == (2,)
  assert decoding.programs.cache_info().misses == misses
  assert decoding.loop_width(17) == 32 and decoding.loop_width(1) == decoding.loop_width(16) == 16


@pytest.mark.parametrize("a, b", [(5, 2**32 + 5), (-5, 2**32 - 5), (2**31, -2**31), (0, -2**63)])
def test_seeds_equal_in_their_low_32_bits_draw_differently(a, b):
  """Every 64-bit seed is its own (jax.random.key keeps 32 bits without x64); a 32-bit seed keeps its key."""
  params = tiny_params()
  rows = prompts([6, 6], seed=4)
  kw = dict(max_new_tokens=10, temperature=1.0, eos_ids=())
  assert (cj.generate(params, rows, seed=a, **kw).tokens != cj.generate(params, rows, seed=b, **kw).tokens).any()
  for s in (7, -7, 2**31 - 1, -2**31):
    assert (jax.random.key_data(decoding.seed_key(s)) == jax.random.key_data(jax.random.key(s))).all()


@pytest.mark.parametrize("bad, match", [
    (dict(tokens=[[1, 2, 96]]), r"outside the vocabulary \[0, 96\): \[96\]"),
    (dict(tokens=[[1, -3]]), r"outside the vocabulary"),
    (dict(tokens=[[]]), r"at least one token"),
    (dict(tokens=[[1, 2, 3]], max_len=8, max_new_tokens=6), r"needs 9 positions, more than the buffer's max_len=8"),
    (dict(tokens=[[1, 2]], max_new_tokens=0), r"max_new_tokens must be >= 1"),
    (dict(tokens=np.ones((2, 3, 4), int)), r"must be \[B, T\]"),
    (dict(tokens=[[1, 2]], temperature=-1.0), r"temperature must be a finite number >= 0"),
])
def test_bad_input_is_refused_with_a_clear_error(bad, match):
  params = tiny_params()
  kw = {"max_new_tokens": 4, **bad}
  with pytest.raises(ValueError, match=match):
    cj.generate(params, kw.pop("tokens"), **kw)


@pytest.mark.multi_device
@pytest.mark.parametrize("data, model", [(8, 1), (2, 4), (4, 2)])
def test_sharded_forward_and_generate_equal_unsharded(data, model):
  params = tiny_params("qwen2", n_heads=8, n_kv_heads=4, head_dim=4)
  mesh = cj.make_mesh(data=data, model=model)
  rows = prompts([5, 11, 9, 3, 14, 2, 8, 16], seed=5)
  toks = jnp.asarray(np.stack([np.resize(r, 16) for r in rows]))
  sharded = cj.shard_params(params, mesh)
  assert sharded.backbone["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
  np.testing.assert_allclose(cj.forward(sharded, toks), cj.forward(params, toks), rtol=1e-5, atol=1e-5)
  a = cj.generate(params, rows, max_new_tokens=8, eos_ids=())
  b = cj.generate(params, rows, max_new_tokens=8, eos_ids=(), mesh=mesh)
  assert (a.tokens == b.tokens).all()
