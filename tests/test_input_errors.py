"""Every user error is caught at the door (issue 11): the public API, the CLIs, model folders and
adapter exports each refuse a bad input with a named error that says what is wrong and how to fix it,
before anything is allocated or compiled, and without touching a file that was there before."""

import dataclasses
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import checks
from chunkllm_jax.chunk_config import ChunkConfig, check_chunk_config
from tests.tiny_models import chunk_params, tiny_config, tiny_params

REPO = Path(__file__).resolve().parents[1]


def _tree(d: Path) -> dict[str, str]:
  """Every file under `d` with the hash of its bytes."""
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _cli(*argv, cwd=REPO) -> subprocess.CompletedProcess:
  """A CLI in a fresh python (a process per call: used only where the exit code itself is the point)."""
  # The 8 test devices, so no persistent cache (conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", JAX_ENABLE_COMPILATION_CACHE="false")
  return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("WARNING")]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


@pytest.fixture(scope="module")
def params():
  return tiny_params()  # vocab 96, max_position 512


# 1. The public API.

@pytest.mark.parametrize("call, kind, match", [
    ("forward", ValueError, r"prompt 1 .* outside the vocabulary \[0, 96\): \[96\] \(first at position 2\)"),
    ("generate", ValueError, r"prompt 1 .* outside the vocabulary \[0, 96\): \[96\] \(first at position 2\)"),
    ("stream", ValueError, r"prompt 1 .* outside the vocabulary \[0, 96\)"),
])
def test_ids_past_the_vocabulary_are_named_by_row_and_position(params, call, kind, match):
  with pytest.raises(kind, match=match):
    getattr(cj, call)(params, [[1, 2, 3], [4, 5, 96]])


@pytest.mark.parametrize("tokens", [[[1, -2, 3]], jnp.asarray([[1, -2, 3]])])
def test_negative_ids_are_refused_by_forward(params, tokens):
  with pytest.raises(ValueError, match=r"\[-2\] \(first at position 1\)"):
    cj.forward(params, tokens)


@pytest.mark.parametrize("call", ["forward", "generate", "stream"])
@pytest.mark.parametrize("tokens", [[[1.0, 2.0, 3.7]], [1.0, 2.0], np.array([[1.5, 2.0]])])
def test_float_ids_are_refused_not_truncated(params, call, tokens):
  with pytest.raises(TypeError, match="integer token ids, got dtype float64"):
    getattr(cj, call)(params, tokens)


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize("tokens", [[[[1, 2], [3, 4]]], [np.ones((2, 3), np.int64), np.ones((1, 3), np.int64)]])
def test_a_batch_inside_the_list_of_prompts_is_refused_not_joined(params, call, tokens):
  """A [2, T] array as one prompt was flattened into one prompt of 2T tokens."""
  with pytest.raises(ValueError, match=r"prompt 0 has shape \(2, \d\): each prompt is one list of token ids"):
    getattr(cj, call)(params, tokens)


def test_a_prompt_of_shape_one_by_t_is_one_prompt(params):
  ids = np.asarray([[3, 1, 4, 1, 5]])  # a tokenizer's return_tensors="np" for one text
  np.testing.assert_array_equal(cj.generate(params, [ids], max_new_tokens=2).tokens,
                                cj.generate(params, [ids[0]], max_new_tokens=2).tokens)


@pytest.mark.parametrize("eos", [np.array(69), jnp.int32(69), np.array([69, 3])], ids=["np_0d", "jax_0d", "np_1d"])
def test_eos_ids_as_arrays_are_ids(params, eos):
  """A 0-d array (np.array(69), a jax scalar) failed with numpy's 'iteration over a 0-d array'."""
  want = cj.generate(params, [[1, 2]], max_new_tokens=4, eos_ids=[69, 3])
  np.testing.assert_array_equal(cj.generate(params, [[1, 2]], max_new_tokens=4, eos_ids=eos).tokens, want.tokens)


@pytest.mark.parametrize("seed, same_as", [(np.array(5), 5), (jnp.int32(5), 5), (jnp.array([5, 6]), [5, 6])],
                         ids=["np_0d", "jax_0d", "jax_1d"])
def test_seeds_as_arrays_are_seeds(params, seed, same_as):
  """A 0-d array failed with 'iteration over a 0-d array' or 'has no len()', a jax array of per-row seeds
  with 'seed must be an int, got Array(5)' (numpy's was taken)."""
  run = lambda s: cj.generate(params, [[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=1.0, seed=s).tokens
  np.testing.assert_array_equal(run(seed), run(same_as))


@pytest.mark.parametrize("seed", [np.array([[5, 6]]), np.array(5.0)])
def test_a_seed_array_of_another_shape_or_kind_is_named(params, seed):
  with pytest.raises(TypeError, match="seed must be an int or one int per row, got an array of"):
    cj.generate(params, [[1, 2]], max_new_tokens=2, temperature=1.0, seed=seed)


@pytest.mark.parametrize("call", ["generate", "stream", "chunk_generate"])
def test_a_host_loop_under_jit_says_so(call):
  """Under the caller's jit the loops failed deep inside jax ('Cannot apply JAX transformations ...')."""
  p = chunk_params()
  fn = lambda pp: getattr(cj, call)(pp, [[1, 2, 3]], max_new_tokens=4)
  with pytest.raises(TypeError, match=f"{call} runs its own compiled programs from the host and cannot be traced"):
    jax.jit(fn)(p)
  with pytest.raises(TypeError, match="cannot be traced"):  # a traced seed alone
    jax.jit(lambda s: cj.generate(p, [[1, 2, 3]], max_new_tokens=4, temperature=1.0, seed=s))(jnp.int32(3))


def test_ragged_rows_to_forward_name_its_lengths_argument(params):
  """forward's message said 'pass the lengths', and forward(..., lengths=...) is a TypeError: it takes lengths_B."""
  with pytest.raises(ValueError, match="pass each row's length as lengths_B="):
    cj.forward(params, [[1, 2, 3], [4, 5]])
  assert cj.forward(params, [[1, 2, 3], [4, 5, 0]], lengths_B=[3, 2]).shape == (2, 3, 96)


def test_a_uint64_id_past_int64_is_named_as_given(params):
  """It wrapped to -1 in the int64 copy and was named as [-1]."""
  with pytest.raises(ValueError, match=f"token id {2**64 - 1}, outside the vocabulary"):
    cj.generate(params, np.array([[1, 2**64 - 1]], np.uint64), max_new_tokens=2)


@pytest.mark.parametrize("eos", [96, [1, 1000]])
def test_eos_ids_past_the_vocabulary_are_refused_not_ignored(params, eos):
  """An id the model cannot sample never ends a row: the run went on to max_new_tokens without a word."""
  with pytest.raises(ValueError, match="eos_ids must be token ids below the vocabulary size 96"):
    cj.generate(params, [[1, 2]], max_new_tokens=4, eos_ids=eos)


def test_forward_takes_a_list_like_generate_does(params):
  ids = [3, 1, 4, 1, 5]
  np.testing.assert_array_equal(cj.forward(params, [ids]), cj.forward(params, jnp.asarray([ids], jnp.int32)))
  assert jax.jit(cj.forward)(params, jnp.asarray([ids])).shape == (1, 5, 96)  # traced ids still pass


@pytest.mark.parametrize("call", ["forward", "generate", "stream"])
def test_a_model_instead_of_its_params_says_pass_model_params(params, call):
  model = cj.Model(params.config, params, None)
  with pytest.raises(TypeError, match="pass model.params"):
    getattr(cj, call)(model, [[1, 2]])


@pytest.mark.parametrize("kw, kind, match", [
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    (dict(temperature="0.7"), TypeError, "temperature must be a number"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_k="16"), TypeError, "top_k must be an int, got '16'"),
    (dict(top_k=2.5), TypeError, "top_k must be an int, got 2.5"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int, got 2.5"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens must be an int, got '3'"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=2**64), ValueError, "seed must fit in 64 bits"),
    (dict(pad_id=-1), ValueError, "pad_id must be >= 0"),
    (dict(pad_id=10**6), ValueError, "pad_id must be a token id below the vocabulary size"),  # NaN rows before
])
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_bad_sampling_and_counts_are_refused_at_the_call(params, call, kw, kind, match):
  with pytest.raises(kind, match=match):
    getattr(cj, call)(params, [[1, 2, 3]], **kw)  # stream: at the call, not at the first next()


def test_with_adapters_given_the_model_says_pass_model_params(params):
  adapters = cj.init_adapters(jax.random.key(0), params.config)
  with pytest.raises(TypeError, match="pass model.params"):
    cj.with_adapters(cj.Model(params.config, params, None), adapters)


@pytest.mark.parametrize("tokens", [[], ()])
def test_no_prompts_at_all_is_named(params, tokens):
  with pytest.raises(ValueError, match="no prompts given"):
    cj.generate(params, tokens)


@pytest.mark.parametrize("kw, kind, match", [
    (dict(data=0), ValueError, r"data must be >= 1, got 0"),
    (dict(model=0), ValueError, r"model must be >= 1, got 0"),
    (dict(data=-1, model=-1), ValueError, r"model must be >= 1, got -1"),
    (dict(data=1.0), TypeError, r"data must be an int, got 1.0"),
])
def test_mesh_sizes_that_are_no_device_counts_are_refused(kw, kind, match):
  with pytest.raises(kind, match=match):
    cj.make_mesh(**kw)


@pytest.mark.parametrize("entry", ["generate", "stream", "chunk_generate"])
def test_a_mesh_that_is_no_mesh_is_refused_at_the_door(entry):
  params = chunk_params() if entry == "chunk_generate" else tiny_params()
  run = lambda: getattr(cj, entry)(params, [[1, 2, 3]], max_new_tokens=2, mesh="data")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh .* got str"):
    list(run()) if entry == "stream" else run()


@pytest.mark.multi_device
@pytest.mark.parametrize("entry", ["generate", "chunk_generate", "shard_params", "train_step"])
@pytest.mark.parametrize("axes", [("x",), ("data",)])
def test_a_mesh_without_the_tables_axes_is_refused_at_the_door(entry, axes):
  """A Mesh that lacks `data` or `model` failed inside the placement code with a bare KeyError."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), axes)
  params = chunk_params() if entry == "chunk_generate" else tiny_params()
  with pytest.raises(ValueError, match=r"mesh has axes .*missing \(.*'model'"):
    if entry == "shard_params":
      cj.shard_params(params, mesh)
    elif entry == "train_step":
      from train import step as step_lib
      from train.losses import LossConfig

      optimizer = step_lib.make_optimizer(step_lib.make_schedule(1e-2, 1, 10, 0.1), 0.01, 1.0)
      state = step_lib.init_state(cj.init_adapters(jax.random.key(1), params.config, cj.AdapterConfig(d_c=16)),
                                  optimizer)
      step_lib.compile_steps(mesh, state, params, {"tokens": (4, 32), "labels": (4, 32)}, optimizer=optimizer,
                             schedule=None, loss_config=LossConfig())
    else:
      getattr(cj, entry)(params, [[1, 2, 3]], max_new_tokens=2, mesh=mesh)


@pytest.mark.multi_device
def test_a_mesh_that_repeats_a_device_is_refused():
  """jax builds a Mesh that lists a device twice; placing on it failed with a bare AssertionError (or a
  safe_zip length error)."""
  d = jax.devices()
  with pytest.raises(ValueError, match="mesh lists a device more than once"):
    cj.make_mesh(data=2, model=2, devices=[d[0], d[1], d[0], d[1]])
  mesh = jax.sharding.Mesh(np.asarray([[d[0], d[0]]]), ("data", "model"))
  with pytest.raises(ValueError, match="mesh lists a device more than once"):
    cj.generate(tiny_params(), [[1, 2, 3]], max_new_tokens=2, mesh=mesh)


@pytest.mark.parametrize("source", [None, 3, ["smollm2-135m"]])
def test_load_names_what_it_takes(source):
  with pytest.raises(TypeError, match="load takes a registered name .* got " + type(source).__name__):
    cj.load(source)


def test_float64_weights_without_x64_are_refused_not_made_float32():
  from chunkllm_jax import weights
  with pytest.raises(ValueError, match="64-bit mode"):
    weights.assemble(tiny_params().config, {}, "float64", "here")


@pytest.mark.parametrize("kw", [dict(kv_budget=0.25, top_chunks=4), dict(kv_budget_tokens=64, top_chunks=4),
                                dict(chunk_config=ChunkConfig(kv_budget=0.5), top_chunks=4)])
def test_a_chunk_count_beside_a_kv_budget_is_refused_not_dropped(kw):
  with pytest.raises(ValueError, match="top_chunks=4 is how many chunks are chosen where no KV budget is set"):
    cj.chunk_generate(chunk_params(), [[1, 2, 3]], max_new_tokens=1, **kw)


@pytest.mark.parametrize("max_len", [8, 31])
def test_a_short_buffer_fits_the_default_local_chunks(max_len):
  """max_len=8 made a default table of one chunk and refused the default n_local=4, which the user never gave
  ('n_local=4 / top_chunks=16 cannot exceed the chunk table (max_chunks=1)'); generate took the same call."""
  p = chunk_params()
  full = cj.chunk_generate(p, [[1, 2, 3]], max_new_tokens=5, max_len=max_len, kv_budget=1.0)
  np.testing.assert_array_equal(full.tokens, cj.generate(p, [[1, 2, 3]], max_new_tokens=5, max_len=max_len).tokens)
  with pytest.raises(ValueError, match=r"n_local=5 .* \(max_chunks=4\); there"):  # a table the user sized
    cj.chunk_generate(p, [[1, 2, 3]], max_new_tokens=5, max_len=max_len, n_local=5, max_chunks=4)
  with pytest.raises(ValueError, match=r"n_local=9.*from the buffer: max_len=8\)"):
    cj.chunk_generate(p, [[1, 2, 3]], max_new_tokens=5, max_len=8, n_local=9)


def test_temperature_nan_is_refused_by_chunk_generate_too():
  from chunkllm_jax.sampling import Sampling
  with pytest.raises(ValueError, match="temperature must be a finite number"):
    Sampling(float("nan"))


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=1, prompt_len=512), r"the longest prompt \(512 tokens\) does not fit the model's context of "
                                             r"512 positions with a new token: shorten it to at most 511 tokens"),
    (dict(max_new_tokens=10**9), r"needs 1000000003 positions, more than the model's context of 512: "
                                 r"give max_new_tokens <= 509"),
    (dict(max_new_tokens=510), r"needs 513 positions, more than the model's context of 512"),
    (dict(max_new_tokens=10**9, max_len=10**9 + 3), r"KV buffer for 1 row\(s\) x \d+ positions needs [\d.]+ GiB, "
                                                   r"more than the [\d.]+ GiB of"),
])
def test_sizes_that_cannot_fit_are_refused_before_allocation(params, monkeypatch, kw, match):
  def no_compile(*a, **k):
    raise AssertionError("compiled a program for a size that cannot fit")
  monkeypatch.setattr(importlib.import_module("chunkllm_jax.decoding").Compiled, "executable", no_compile)
  prompt_len = kw.pop("prompt_len", 3)
  with pytest.raises(ValueError, match=match):
    cj.generate(params, [[1, 2, 3] * (prompt_len // 3) + [1] * (prompt_len % 3)], **kw)


def test_forward_past_the_context_runs_with_a_warning(params):
  with pytest.warns(UserWarning, match="513 positions exceed the model's trained context \\(512\\)"):
    logits = cj.forward(params, [[1] * 513])
  assert logits.shape[:2] == (1, 513)


def test_an_explicit_max_len_may_run_past_the_context_with_a_warning(params):
  with pytest.warns(UserWarning, match="exceed the model's trained context"):
    out = cj.generate(params, [[1, 2, 3] * 170], max_new_tokens=3, max_len=640, eos_ids=())
  assert out.tokens.shape == (1, 513)


@pytest.mark.parametrize("lengths, kind, match", [
    ([3, 2], ValueError, r"lengths_B must be one length per row: shape \(1,\) for tokens of shape \(1, 3\), "
                         r"got shape \(2,\)"),
    (np.array([3, 4, 5]), ValueError, r"for tokens of shape \(1, 3\), got shape \(3,\)"),  # was lax.cond's error
    (3, ValueError, r"lengths_B must be one length per row: .* got shape \(\)"),
    ([[3]], ValueError, r"got shape \(1, 1\)"),
    (np.array([2.7]), TypeError, r"lengths_B must be integer row lengths, got dtype float64"),  # truncated before
    (["3"], TypeError, r"lengths_B must be integer row lengths, got dtype <U1"),
    ([True], TypeError, r"lengths_B must be integer row lengths, got dtype bool"),
    ([0], ValueError, r"lengths_B\[0\] is 0: each row's length \(its real tokens\) must be in \[1, 3\]"),
    (jnp.asarray([4]), ValueError, r"lengths_B\[0\] is 4: .* must be in \[1, 3\]"),  # past T: padding read as tokens
])
def test_forward_checks_lengths_as_generate_does(params, lengths, kind, match):
  with pytest.raises(kind, match=match):
    cj.forward(params, [[1, 2, 3]], lengths)


def test_forward_takes_lengths_as_a_list_an_array_or_traced(params):
  tokens = [[1, 2, 3], [4, 5, 6]]
  want = cj.forward(params, jnp.asarray(tokens), jnp.asarray([3, 2], jnp.int32))
  for lengths in ([3, 2], np.array([3, 2], np.int64), (np.int64(3), 2)):  # a list gave a raw indexing error
    np.testing.assert_array_equal(cj.forward(params, tokens, lengths), want)
  np.testing.assert_allclose(jax.jit(cj.forward)(params, jnp.asarray(tokens), jnp.asarray([3, 2])), want, atol=1e-6)
  with pytest.raises(TypeError, match="lengths_B must be integer row lengths, got dtype float32"):
    jax.jit(cj.forward)(params, jnp.asarray(tokens), jnp.asarray([3.0, 2.0]))  # traced: dtype and shape alone


# ChunkConfig's fields, given to chunk_generate by keyword (chunk_params: 3 layers, vocabulary 96).
CHUNK_BAD = {
    "kv_budget_bool": (dict(kv_budget=True), TypeError,
                       r"kv_budget must be a number \(a fraction of the tokens seen, in \(0, 1\]\), got True \(bool\)"),
    "kv_budget_str": (dict(kv_budget="0.5"), TypeError, r"kv_budget must be a number .* got '0.5' \(str\)"),
    "recent_share_str": (dict(kv_budget=0.5, recent_share="0.5"), TypeError, r"recent_share must be a number"),
    "boundary_share_str": (dict(kv_budget=0.5, boundary_share="0.25"), TypeError, r"boundary_share must be a number"),
    "alpha_str": (dict(alpha="0.5"), TypeError, r"alpha must be a number \(the Chunk Adapter's boundary threshold, "
                                                r"in \(0, 1\)\), got '0.5' \(str\)"),
    "kv_budget_tokens_float": (dict(kv_budget_tokens=np.float64(4)), TypeError, r"kv_budget_tokens must be an int"),
    "max_chunks_float": (dict(max_chunks=2.5), TypeError, r"max_chunks must be an int, got 2.5"),
    "max_chunks_negative": (dict(max_chunks=-1), ValueError, r"max_chunks must be >= 1 \(None or 0: max_len // 8\)"),
    "dense_layers_int": (dict(dense_layers=0), TypeError,
                         r"dense_layers must be a tuple of layer indices, got 0 \(int\)"),
    "selection_layers_int": (dict(selection_layers=2), TypeError,
                             r"selection_layers must be a tuple of layer indices, got 2 \(int\)"),
    "selection_layers_float": (dict(selection_layers=(2.9,)), TypeError,  # was truncated to layer 2
                               r"selection_layers must hold ints \(layer indices\), got 2.9 \(float\) in \(2.9,\)"),
    "dense_layers_float": (dict(dense_layers=(0.5,)), TypeError, r"dense_layers must hold ints .* got 0.5 \(float\)"),
    "dense_layers_bool": (dict(dense_layers=(True,)), TypeError, r"dense_layers must hold ints .* got True \(bool\)"),
    "separator_ids_str": (dict(boundaries="separators", separator_ids="."), TypeError,
                          r"separator_ids must be a tuple of token ids, got '.' \(str\)"),
    "separator_ids_float": (dict(boundaries="separators", separator_ids=(13.0,)), TypeError,
                            r"separator_ids must hold ints \(token ids\), got 13.0"),
    "separator_ids_negative": (dict(boundaries="separators", separator_ids=(5, -1)), ValueError,
                               r"separator_ids \[-1\] are outside the vocabulary .* no chunk would close at them"),
    "separator_ids_past_vocab": (dict(boundaries="separators", separator_ids=(5, 96)), ValueError,
                                 r"separator_ids \[96\] are outside the vocabulary \[0, 96\)"),
    "chunk_config_dict": (dict(chunk_config={"kv_budget": 0.5}), TypeError,
                          r"chunk_config must be a cj.ChunkConfig, got a dict"),
    # sizes past what they can mean: the sketch aborted the process inside XLA, the query window unrolled into a
    # compile that never ended, the chunk table sat in the compiler
    "score_sketch_past_a_key": (dict(score_sketch=2**30), ValueError,
                                r"score_sketch=1073741824 bits is more than a float32 key holds \(256 bits at head_dim 8\)"),
    "score_queries_past_the_buffer": (dict(selection="shared", scorer="attention", score_queries=10**9), ValueError,
                                      r"score_queries is a count of recent queries, in \[1, max_len=64\]; got 1000000000"),
    "max_chunks_past_the_buffer": (dict(max_chunks=10**9), ValueError,
                                   r"max_chunks=1000000000 exceeds the buffer \(max_len=64\)"),
}


@pytest.mark.parametrize("case", list(CHUNK_BAD))
def test_chunk_settings_of_a_wrong_type_are_named_before_compiling(monkeypatch, case):
  def no_compile(*a, **k):
    raise AssertionError("compiled a program for a bad setting")
  monkeypatch.setattr(importlib.import_module("chunkllm_jax.decoding").Compiled, "executable", no_compile)
  kw, kind, match = CHUNK_BAD[case]
  with pytest.raises(kind, match=match):
    cj.chunk_generate(chunk_params(), [[1, 2, 3]], max_new_tokens=2, max_len=64, **kw)


# numpy's scalars pass wherever Python's numbers do (as for max_new_tokens), and make the same static config.
CHUNK_NUMPY = {
    "kv_budget_float32": (dict(kv_budget=np.float32(0.25)), dict(kv_budget=0.25)),
    "kv_budget_float64": (dict(kv_budget=np.float64(0.25)), dict(kv_budget=0.25)),
    "kv_budget_tokens": (dict(kv_budget_tokens=np.int64(16)), dict(kv_budget_tokens=16)),
    "recent_share": (dict(kv_budget=0.5, recent_share=np.float32(0.5)), dict(kv_budget=0.5, recent_share=0.5)),
    "alpha": (dict(alpha=np.float32(0.5)), dict(alpha=0.5)),
    "counts": (dict(top_chunks=np.int32(2), n_local=np.int64(1), max_chunks=np.int64(16)),
               dict(top_chunks=2, n_local=1, max_chunks=16)),
    "layers": (dict(selection="shared", dense_layers=np.array([0]), selection_layers=[np.int64(2)]),
               dict(selection="shared", dense_layers=(0,), selection_layers=(2,))),
    "separators": (dict(boundaries="separators", separator_ids=np.array([5, 7])),
                   dict(boundaries="separators", separator_ids=(5, 7))),
}


@pytest.mark.parametrize("case", list(CHUNK_NUMPY))
def test_numpy_scalars_are_chunk_settings_like_python_numbers(case):
  given, same = CHUNK_NUMPY[case]
  got = ChunkConfig(**given).validate(64, 3, vocab_size=96)
  assert got == ChunkConfig(**same).validate(64, 3, vocab_size=96) and hash(got) is not None
  assert all(type(getattr(got, k)) is type(v) for k, v in same.items())  # Python's own, for the static config


def test_chunk_generate_runs_with_numpy_settings():
  params, prompt = chunk_params(), [[1, 2, 3, 4, 5]]
  out = cj.chunk_generate(params, prompt, max_new_tokens=2, max_len=64, kv_budget_tokens=np.int64(48),
                          recent_share=np.float32(0.5), alpha=np.float32(0.5), dense_layers=[np.int64(0)])
  want = cj.chunk_generate(params, prompt, max_new_tokens=2, max_len=64, kv_budget_tokens=48, recent_share=0.5,
                           alpha=0.5, dense_layers=(0,))
  np.testing.assert_array_equal(out.tokens, want.tokens)


def test_separators_outside_the_vocabulary_are_refused():
  """No token has such an id, so no chunk would ever close at one (the run went on with forced closes alone)."""
  with pytest.raises(ValueError, match=r"separator_ids \[96, 101\] are outside the vocabulary \[0, 96\): "
                                       r"no chunk would close at them; give ids from this model's tokenizer"):
    ChunkConfig(boundaries="separators", separator_ids=(5, 96, 101)).validate(64, 3, vocab_size=96)
  ChunkConfig(boundaries="separators", separator_ids=(5, 95)).validate(64, 3, vocab_size=96)  # inside: no error


@pytest.mark.parametrize("chunk_config, match", [
    ({"kv_budget": 0.5}, r"chunk_config must be a cj.ChunkConfig, got a dict: pass cj.ChunkConfig\(\*\*\{'kv_budget': "
                         r"0.5\}\), or give the fields by keyword"),
    (0.5, r"chunk_config must be a cj.ChunkConfig \(or None: the defaults\), got float"),
])
def test_a_chunk_config_that_is_no_chunk_config_is_named(chunk_config, match):
  with pytest.raises(TypeError, match=match):
    check_chunk_config(chunk_config)
  assert check_chunk_config(None) == ChunkConfig() and check_chunk_config(ChunkConfig(top_chunks=3)).top_chunks == 3


def test_kv_memory_check_names_size_and_limit(params):
  with pytest.raises(ValueError, match=r"needs [\d.]+ GiB, more than the [\d.]+ GiB of host RAM"):
    checks.check_kv_memory(params.config, 1 << 20, 1 << 20, 4)
  checks.check_kv_memory(params.config, 2, 1024, 4)  # small: no error


# 2. Malformed model folders: the file and the field are named, and nothing there is changed.

TINY_HF = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _hf_dir(tmp_path, config=None, raw: bytes | None = None) -> Path:
  d = tmp_path / "model"
  d.mkdir()
  (d / "config.json").write_bytes(raw if raw is not None else json.dumps({**TINY_HF, **(config or {})}).encode())
  return d


@pytest.mark.parametrize("config, raw, kind, match", [
    (None, b'{"model_type": "llama", "vocab_size": 64,', ValueError,
     r"model/config.json is not valid JSON \(Expecting .* at line 1, column \d+\)"),
    (None, b"\xff\xfe", ValueError, r"model/config.json is not (valid|UTF-8) JSON"),
    (None, b"[1, 2]", cj.ConfigError, r"model/config.json holds a JSON list, not an object"),
    (dict(num_attention_heads=0), None, cj.ConfigError,
     r"model/config.json: config.json field 'num_attention_heads' must be an int >= 1, got 0"),
    (dict(hidden_size="32"), None, cj.ConfigError, r"field 'hidden_size' must be an int >= 1, got '32'"),
    (dict(num_hidden_layers=2.5), None, cj.ConfigError, r"field 'num_hidden_layers' must be an int >= 1, got 2.5"),
    (dict(rms_norm_eps="tiny"), None, cj.ConfigError, r"model/config.json: .* wrong type: .*'tiny'"),
    (dict(vocab_size=None), None, cj.ConfigError, r"lacks the field 'vocab_size'"),
])
def test_a_bad_config_json_names_the_file_and_the_field(tmp_path, config, raw, kind, match):
  from chunkllm_jax import weights
  d = _hf_dir(tmp_path, config, raw)
  before = _tree(d)
  for load in (weights.load_config, weights.load_backbone):
    with pytest.raises(kind, match=match):
      load(str(d))
  assert _tree(d) == before


def test_zero_heads_in_code_is_a_config_error_not_a_division_by_zero():
  with pytest.raises(cj.ConfigError, match="n_kv_heads must be a positive int, got 0"):
    cj.ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=0, head_dim=8, d_ff=64)


@pytest.mark.parametrize("header, match", [
    (b"not json at all!", r"the header of .*model.safetensors is not valid JSON"),
    (b'["a list"]', r"model.safetensors: the safetensors header is not a JSON object"),
    (b'{"model.embed_tokens.weight": {"dtype": "F32"}}', r"tensor model.embed_tokens.weight lacks dtype, shape"),
])
def test_a_damaged_safetensors_header_names_the_file(tmp_path, header, match):
  from chunkllm_jax import weights
  d = _hf_dir(tmp_path)
  (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
  before = _tree(d)
  with pytest.raises(ValueError, match=match):
    weights.load_backbone(str(d))
  assert _tree(d) == before


def test_two_gguf_files_in_one_folder_ask_which(tmp_path):
  from chunkllm_jax import weights
  d = tmp_path / "ggufs"
  d.mkdir()
  for name in ("a.gguf", "b.gguf"):
    (d / name).write_bytes(b"GGUF")
  with pytest.raises(ValueError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\): give the one to load, e.g. .*a.gguf"):
    weights.load_backbone(str(d))


def test_a_folder_without_tokenizer_files_says_which_files(tmp_path):
  from chunkllm_jax import weights
  d = _hf_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"has no tokenizer: expected one of tokenizer.json, .* tokenizer=False"):
    weights.load_tokenizer((str(d), None))


# 3. A damaged adapter export: one error, without the storage library's traceback chain.

@pytest.fixture
def export(tmp_path):
  from train import backbone
  cfg = cj.ModelConfig(arch="llama", vocab_size=64, eos_ids=(0,), **backbone.TINY_SIZES)
  out = tmp_path / "export"
  cj.save_adapters(cj.init_adapters(jax.random.key(0), cfg), out, model_config=cfg, backbone="tiny")
  return out, cfg


def test_damaged_adapter_weights_are_one_error_without_a_chain(export):
  out, cfg = export
  for p in (out / "params").rglob("*"):
    if p.is_file() and p.stat().st_size > 100:
      p.write_bytes(b"garbage")
  before = _tree(out)
  with pytest.raises(cj.adapter_io.AdapterLoadError, match="cannot be read .* the export is damaged") as e:
    cj.load_adapters(out, cfg)
  assert e.value.__cause__ is None and e.value.__suppress_context__
  assert _tree(out) == before


def test_weights_changed_on_disk_are_refused(export, tmp_path):
  """Bytes the storage library reads back without an error (another export's weights under this config, here)
  are refused by the digest the export recorded; NaN weights by their values, whatever the digest."""
  import shutil
  out, cfg = export
  other = tmp_path / "other"
  cj.save_adapters(cj.init_adapters(jax.random.key(1), cfg), other, model_config=cfg, backbone="tiny")
  shutil.rmtree(out / "params")
  shutil.copytree(other / "params", out / "params")
  with pytest.raises(cj.adapter_io.AdapterLoadError, match=r"not the ones exported \(their SHA-256 differs"):
    cj.load_adapters(out, cfg)
  a = cj.init_adapters(jax.random.key(2), cfg)
  a = a.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), a.params))
  cj.save_adapters(a, tmp_path / "nan", model_config=cfg, backbone="tiny")
  with pytest.raises(cj.adapter_io.AdapterLoadError, match=r"hold NaN or infinite values \(\['chunk'\]"):
    cj.load_adapters(tmp_path / "nan", cfg)
  for name in ("smollm2-135m", "gemma3-270m"):  # the shipped exports record their digest too, and match it
    assert "weights_sha256" in cj.adapter_io.read_export_config(name)


@pytest.mark.parametrize("other, kind, match", [
    (dict(d_model=48), ValueError, r"save_adapters: these adapters do not fit model_config, so the export would claim "
                                   r"the wrong backbone; .*shape \(32, 8\), but model_config \(d_model=48\)"),
    (dict(n_layers=1), ValueError, r"save_adapters: these adapters do not fit model_config, .*\(QK-adapter layer 1 is "
                                   r"out of range for a 1-layer model\)"),
    ("model", TypeError, r"save_adapters: model_config takes the backbone's ModelConfig, not the Model: pass "
                         r"model.config"),
    ("a string", TypeError, r"save_adapters: model_config must be a ModelConfig \(model.config\), got str"),
])
def test_save_adapters_refuses_a_config_the_adapters_do_not_fit(tmp_path, other, kind, match):
  """`with_adapters`' check at export: a written export that names another backbone would be loaded for it."""
  from train import backbone
  cfg = cj.ModelConfig(arch="llama", vocab_size=64, eos_ids=(0,), **backbone.TINY_SIZES)
  adapters = cj.init_adapters(jax.random.key(0), cfg)
  model_config = {"model": cj.Model(cfg, None, None), "a string": "tiny"}.get(other) if isinstance(other, str) else \
      dataclasses.replace(cfg, **other)
  with pytest.raises(kind, match=match):
    cj.save_adapters(adapters, tmp_path / "x", model_config=model_config, backbone="tiny")
  assert not tmp_path.joinpath("x").exists() and not list(tmp_path.iterdir())
  with pytest.raises(TypeError, match="save_adapters: expected an Adapters"):
    cj.save_adapters(adapters.params, tmp_path / "x", model_config=cfg, backbone="tiny")


@pytest.mark.parametrize("kw, match", [
    (dict(d_c=0), r"AdapterConfig.d_c must be an int >= 1, got 0"),  # a ZeroDivisionError in Flax
    (dict(d_c=2.5), r"AdapterConfig.d_c must be an int >= 1, got 2.5"),
    (dict(chunk_hidden=-1), r"AdapterConfig.chunk_hidden must be an int >= 1, got -1"),
    (dict(score_queries=0), r"AdapterConfig.score_queries must be an int >= 1, got 0"),  # a modulo by zero in jax
    (dict(qk_layers=3), r"AdapterConfig.qk_layers must be a tuple of layer indices \(or None\), got 3"),
    (dict(qk_layers=(1.0,)), r"AdapterConfig.qk_layers must be a tuple of layer indices"),
    (dict(selection_layers=(9,)), r"selection_layers \[9\] have no QK Adapter \(qk_layers \(0, 1\)\)"),
])
def test_adapter_configs_out_of_range_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    cj.init_adapters(jax.random.key(0), tiny_config(), cj.AdapterConfig(**kw))


def test_adapters_built_by_hand_are_checked_where_they_attach():
  """`with_adapters` (and so chunk_generate) checks the config of adapters not made by init_adapters or
  load_adapters: a window of 0 failed with a modulo by zero inside jax."""
  params = chunk_params()
  bad = params.adapters.replace(config=dataclasses.replace(params.adapters.config, score_queries=0))
  with pytest.raises(ValueError, match=r"AdapterConfig.score_queries must be an int >= 1, got 0"):
    cj.with_adapters(params, bad)


@pytest.mark.parametrize("call, kind, match", [
    (lambda c: cj.init_adapters(0, c), TypeError, r"init_adapters takes a PRNG key, e.g. jax.random.key\(0\), got int"),
    (lambda c: cj.init_adapters(jax.random.key(0), c, {"d_c": 8}), TypeError,
     r"adapter_config must be an AdapterConfig, got dict"),
    (lambda c: cj.init_backbone(0, c), TypeError, r"init_backbone takes a PRNG key"),
    (lambda c: cj.init_backbone(jax.random.key(0), c, dtype=jnp.int32), ValueError,
     r"init_backbone: dtype must be a floating type such as float32 or bfloat16, not <class"),  # int weights failed later, in forward
    (lambda c: cj.init_cache(c, 1, -1, jnp.float32), ValueError, r"init_cache: max_len must be an int >= 1, got -1"),
    (lambda c: cj.init_cache(c, 1, 2.5, jnp.float32), ValueError, r"init_cache: max_len must be an int >= 1, got 2.5"),
    (lambda c: cj.init_cache(c, 0, 16, jnp.float32), ValueError, r"init_cache: batch must be an int >= 1, got 0"),
    (lambda c: cj.init_cache(c, 1, 16, "bogus"), ValueError, r"init_cache: dtype must be a floating type .* 'bogus'"),
    (lambda c: cj.init_cache(c, 1, 16, "float64"), ValueError, r"init_cache: dtype 'float64' needs jax's 64-bit mode"),
    (lambda c: cj.init_cache(c.__dict__, 1, 16, jnp.float32), TypeError, r"init_cache takes a ModelConfig"),
    (lambda c: cj.make_mesh(devices=[]), ValueError, r"devices is empty: give at least one device"),  # a 0x1 mesh
    (lambda c: cj.make_mesh(devices="cpu"), TypeError, r"devices must be a list of jax devices"),
    (lambda c: cj.shard_params(c, cj.make_mesh()), TypeError, r"shard_params takes a ModelParams"),
    (lambda c: cj.shard_params(tiny_params(), "mesh"), TypeError, r"mesh must be a jax.sharding.Mesh"),
])
def test_the_constructors_name_a_bad_argument(call, kind, match):
  """The public constructors (weights, adapters, cache, mesh) refuse what failed deep in jax, numpy or Flax."""
  with pytest.raises(kind, match=match):
    call(tiny_config())


def test_the_constructors_take_what_jax_gives():
  cfg = tiny_config()
  assert cj.init_backbone(jax.random.PRNGKey(0), cfg, dtype="bfloat16").backbone["embed"].dtype == jnp.bfloat16
  assert cj.init_cache(cfg, 2, 16, np.dtype("float32")).k.shape[1:3] == (2, 16)
  assert cj.make_mesh(devices=np.array(jax.devices()[:2])).devices.size == 2


def test_load_adapters_given_the_model_says_pass_model_config():
  model = cj.Model(tiny_config(), None, None)
  with pytest.raises(TypeError, match=r"load_adapters: expected_config takes the backbone's ModelConfig, not the "
                                      r"Model: pass model.config"):
    cj.load_adapters("smollm2-135m", model)


@pytest.mark.parametrize("edit", [lambda m: m.pop("adapter_config"), lambda m: m["adapter_config"].pop("d_c"),
                                  lambda m: m.update(model_config="oops"),
                                  lambda m: m["adapter_config"].update(d_c="8"),
                                  lambda m: m["adapter_config"].update(d_c=-8),
                                  lambda m: m["adapter_config"].update(score_queries=0)])
def test_a_damaged_export_config_is_named(export, edit):
  out, cfg = export
  meta = json.loads((out / "config.json").read_text())
  edit(meta)
  (out / "config.json").write_text(json.dumps(meta))
  with pytest.raises(cj.adapter_io.AdapterLoadError, match=r"config.json is damaged .* export the adapters again"):
    cj.load_adapters(out)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_model_folder_given_as_adapters_says_so(tmp_path, arch):
  """`--adapters` defaults to `--model`: a model of one's own has no adapters there, and the error said only
  that its config.json had format None."""
  d = _hf_dir(tmp_path, dict(model_type=arch))
  with pytest.raises(cj.adapter_io.AdapterLoadError, match=r"model is a model folder, not an adapter export: "
                                                           r"adapters ship only for .*smollm2-135m.*train.run"):
    cj.load_adapters(d)


# 4. The CLIs: one `error:` line, exit code 2, before any work.

@pytest.mark.parametrize("flags, match", [
    (["--max-new-tokens", "1000000000"], r"--max-new-tokens 1000000000 leaves no room for the prompt in .*'s "
                                         r"context of 256 positions: give at most 255"),
    (["--temperature", "nan"], r"temperature must be a finite number >= 0"),
    (["--chunk", "--score-rank", "1000"], r"--score-rank=1000 exceeds the head dimension \(\d+\)"),
])
def test_cli_generate_refuses_sizes_and_settings_before_loading(tmp_path, flags, match):
  d = _hf_dir(tmp_path)  # a config alone: the refusal must come before the weights are read
  before = _tree(d)
  line = _one_error_line(_cli("chunkllm_jax", "generate", "--model", str(d), "--prompt", "hi", *flags))
  assert re.search(match, line), line
  assert _tree(d) == before


@pytest.mark.parametrize("flags, match", [
    (["--depth", "5"], r"--depth is where the fact sits, from 0 \(start\) to 1 \(end\); got 5.0"),
    (["--depth", "nan"], r"--depth is where the fact sits"),
    (["--context", "-100"], r"--context must be at least 256 tokens, got -100"),
    (["--context", "100000000"], r"--context 100000000 does not fit .*'s 256 positions"),
])
def test_cli_demo_refuses_sizes_before_loading(tmp_path, flags, match):
  d = _hf_dir(tmp_path)  # a config alone: the refusal must come before the weights are read
  before = _tree(d)
  line = _one_error_line(_cli("chunkllm_jax", "demo", "--model", str(d), *flags))
  assert re.search(match, line), line
  assert _tree(d) == before


# 5. train.run and train.evaluate: every flag is checked before any work (no data build, no model load).

@pytest.fixture
def run_dir(tmp_path):
  from tests import train_run_fixtures as fx
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  (tmp_path / "a_file").write_text("mine\n")
  (tmp_path / "folder").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "folder")
  (tmp_path / "mine" / "train").mkdir(parents=True)  # a folder of the user's where a cache would go
  (tmp_path / "mine" / "train" / "notes.txt").write_text("mine\n")
  (tmp_path / "fake.gguf").write_text("precious\n")  # a user's file named like a model
  (tmp_path / "bad_hf").mkdir()
  (tmp_path / "bad_hf" / "config.json").write_text("garbage{")
  (tmp_path / "wd_ckpt" / "checkpoints").parent.mkdir()  # workdirs holding the run's names as the wrong kind
  (tmp_path / "wd_ckpt" / "checkpoints").write_text("mine\n")
  (tmp_path / "wd_metrics" / "metrics.jsonl").mkdir(parents=True)
  return tmp_path, corpus


def _train_refused(capsys, module, argv) -> str:
  capsys.readouterr()
  assert module.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


TRAIN_BAD = {
    "export_dtype": (["--export_dtype", "float16"], r"--export_dtype float16 is not supported: give one of float32, bfloat16"),
    "seq_len": (["--seq_len", "0"], r"--seq_len 0 is too small: give 2 or more"),
    "batch_size": (["--batch_size", "0"], r"--batch_size 0 is too small: give 1 or more"),
    "lr": (["--lr", "nan"], r"--lr nan is out of range"),
    "workdir": (["--workdir", "{tmp}/a_file/run"], r"--workdir .*a_file/run cannot be written .*a_file does not let"),
    "workdir_file": (["--workdir", "{tmp}/a_file"], r"--workdir .*a_file is a file; give a folder"),
    "data_folder": (["--data", "{tmp}/folder"], r"--data .*folder is a folder: give the text files in it"),
    "data_missing": (["--data", "{tmp}/nope.txt"], r"--data .*nope.txt does not exist"),
    "data_twice": (["--data", "{tmp}/corpus.txt", "{tmp}/corpus.txt"], r"--data .*corpus.txt is given twice: its text "
                                                                        r"would count twice; give each file once"),
    "data_twice_by_two_names": (["--data", "{tmp}/corpus.txt", "{tmp}/folder/../corpus.txt"],
                                r"--data .*folder/\.\./corpus.txt is given twice \(also as .*/corpus.txt\)"),
    "model": (["--model", "{tmp}/folder", "--tokenizer", ""], r"no config.json"),
    "retrieval_mix": (["--retrieval_mix", "1.5"], r"--retrieval_mix 1.5 is not a fraction: give a value in \[0, 1\]"),
    "retrieval_mix_nan": (["--retrieval_mix", "nan"], r"--retrieval_mix nan is not a fraction"),
    "teacher": (["--teacher", "head_sum"], r"--teacher head_sum is not a teacher target: give one of head_max, "),
    "score_queries": (["--score_queries", "0"], r"--score_queries 0 is too small: give 1 or more"),
    "student_queries": (["--student_queries", "0"], r"--student_queries 0 is too small: give 1 or more"),
    "student_queries_token_mean": (["--student_queries", "4", "--teacher", "token_mean"],
                                   r"--student_queries 4 scores the selection rows: give --teacher head_max"),
    "cache_dir": (["--cache_dir", "{tmp}/a_file"], r"--cache_dir .*a_file is a file; give a folder"),
    "cache_dir_not_a_cache": (["--cache_dir", "{tmp}/mine"], r"--cache_dir .*mine: .*mine/train is not empty and holds "
                                                             r"no cache.json \(it is not a teacher cache\)"),
    "seed": (["--seed", str(2**64)], r"--seed 18446744073709551616 does not fit in 64 bits"),
    # an export the end of the run could not write: refused now, not after the whole training
    "export_link": (["--export", "{tmp}/link"], r"cannot export to .*link: it is not a folder \(a file or a link\)"),
    "export_lock": (["--export", "{tmp}/work/.train.lock"], r"--export .*\.train\.lock would replace .*work/\.train\.lock, "
                                                            r"which the run keeps"),
    "export_in_a_file": (["--export", "{tmp}/a_file/export"], r"--export .*a_file/export: the folder .*a_file is a file; "
                                                              r"give a folder"),
    "max_sequences": (["--max_sequences", "1", "--batch_size", "2"],
                      r"--max_sequences 1 is fewer than one batch \(--batch_size 2\)"),
    "score_queries_past_seq_len": (["--score_queries", "100", "--seq_len", "64"],
                                   r"--score_queries 100 / --student_queries \d+: a sequence has 64 tokens"),
    "mesh": (["--mesh_model", "3"], r"--mesh_data \d+ / --mesh_model 3: "),
    "tokenizer": (["--tokenizer", "{tmp}/no_tokenizer"], r"--tokenizer: no model at .*no_tokenizer"),
    "selection_layers": (["--model", "smollm2-135m", "--tokenizer", "", "--selection_layers", "99"],
                         r"--selection_layers \[99\] are out of range or not full-attention layers of smollm2-135m"),
    "process_group": (["--num_processes", "2"], r"--num_processes: a process group needs --coordinator HOST:PORT, "
                                                r"--num_processes N and --process_id I together"),
    "process_id": (["--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "5"],
                   r"--process_id 5 is not one of the --num_processes 2 \(0 to 1\)"),
    "kl_weight": (["--kl_weight", "-1"], r"--kl_weight -1.0 is out of range .*kl_weight >= 0"),
    "kl_weight_nan": (["--kl_weight", "nan"], r"--kl_weight nan is out of range"),
    "n_sink": (["--n_sink", "1000"], r"--n_sink 1000 leaves no tokens to chunk in a sequence of --seq_len \d+"),
    "seq_len_past_context": (["--model", "smollm2-135m", "--tokenizer", "", "--seq_len", "12288"],
                             r"--seq_len 12288 is past smollm2-135m's context \(8192 positions\): give at most 8192"),
    "model_not_gguf": (["--model", "{tmp}/fake.gguf", "--tokenizer", ""], r"--model .*fake.gguf: .*not a readable GGUF"),
    "model_bad_config": (["--model", "{tmp}/bad_hf", "--tokenizer", ""], r"--model .*bad_hf: .*not valid JSON"),
    "checkpoints_a_file": (["--workdir", "{tmp}/wd_ckpt"], r"--workdir .*wd_ckpt: .*wd_ckpt/checkpoints is a file, where "
                                                            r"a run keeps its checkpoints"),
    "metrics_a_folder": (["--workdir", "{tmp}/wd_metrics"], r"--workdir .*wd_metrics: .*metrics.jsonl is a folder"),
    "untrained": (["--steps", "0", "--export", "{tmp}/export"],
                  r"--steps 0 --export .* would export untrained \(random\) adapters: .*--allow_untrained_export true"),
}


@pytest.mark.parametrize("case", list(TRAIN_BAD))
def test_train_run_checks_every_flag_before_any_work(run_dir, capsys, monkeypatch, case):
  from tests import train_run_fixtures as fx
  from train import backbone, run
  tmp, corpus = run_dir
  monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  flags, match = TRAIN_BAD[case]
  argv = fx.command(tmp / "work", corpus, tmp / "data", *[f.format(tmp=tmp) for f in flags])[4:]
  before = _tree(tmp)
  assert re.search(match, _train_refused(capsys, run, argv))
  assert _tree(tmp) == before and not (tmp / "work").exists() and not (tmp / "data").exists()


@pytest.mark.parametrize("module", ["train.run", "train.evaluate"])
@pytest.mark.parametrize("flag, match", [("--gpu", r"--gpu: jax cannot use a CUDA GPU on this machine"),
                                         ("--tpu", r"--tpu: (this machine is not a TPU host|jax cannot use a TPU)")])
def test_a_platform_this_machine_lacks_is_a_flag_error(run_dir, module, flag, match):
  """--gpu / --tpu on a machine without one: a traceback from deep in jax (a bare AssertionError, or
  jax.distributed's "coordinator_address should be defined"), now one line naming the flag. CI has no GPU or TPU."""
  tmp, corpus = run_dir
  extra = ["--adapters", "smollm2-135m"] if module == "train.evaluate" else []
  proc = _cli(module, flag, "--preset", "tiny", "--data", corpus, "--workdir", str(tmp / "work"), *extra)
  assert re.search(match, _one_error_line(proc))
  assert not (tmp / "work").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_an_interrupted_start_says_whether_there_is_a_checkpoint_to_resume(run_dir, capsys, monkeypatch, checkpointed):
  from tests import train_run_fixtures as fx
  from train import run
  tmp, corpus = run_dir
  if checkpointed:
    (tmp / "work" / "checkpoints" / "6").mkdir(parents=True)
  monkeypatch.setattr(run, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))
  assert run.main(fx.command(tmp / "work", corpus, tmp / "data")[4:]) == 130
  said = capsys.readouterr().err.strip()
  assert said == "interrupted: " + ("the same command resumes from the last checkpoint" if checkpointed else
                                    "nothing was checkpointed yet: the same command starts from step 0")


def test_a_prompt_that_is_not_utf8_is_named_at_the_door():
  proc = _cli("chunkllm_jax", "generate", "--prompt", "caf\udce9")  # the byte 0xe9 alone, as a shell passes it
  assert re.search(r"--prompt is not valid UTF-8 text \(at character 3\)", _one_error_line(proc))


def test_train_run_refuses_to_start_over_beside_checkpoints(run_dir, capsys, monkeypatch):
  """--checkpoint_every 0 skipped the restore: a run beside checkpoints trained from step 0 again (and its
  export would have replaced the trained one). It is refused, naming the way to resume."""
  from tests import train_run_fixtures as fx
  from train import backbone, run
  tmp, corpus = run_dir
  (tmp / "work" / "checkpoints" / "6").mkdir(parents=True)
  monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  argv = fx.command(tmp / "work", corpus, tmp / "data", "--checkpoint_every", "0")[4:]
  line = _train_refused(capsys, run, argv)
  assert re.search(r"--checkpoint_every 0 would train from step 0 beside the checkpoints in .*work: leave it out",
                   line), line


def test_train_evaluate_takes_the_platform_flags():
  """The README: train.evaluate takes train.run's flags; --cpu was refused as unrecognized."""
  from train import evaluate
  cfg, args = evaluate.parse_args(["--cpu", "--preset", "tiny", "--adapters", "x"])
  assert args.cpu and cfg.model == "random-tiny"


def test_untrained_export_is_allowed_when_asked(run_dir):
  from tests import train_run_fixtures as fx
  from train import config, run
  tmp, corpus = run_dir
  argv = fx.command(tmp / "work", corpus, tmp / "data", "--steps", "0", "--export", str(tmp / "export"),
                    "--allow_untrained_export", "true")[4:]
  run.check_flags(config.from_args(run.parse_args(argv)))  # no error


def test_unknown_preset_is_one_error_line(capsys):
  from train import config, run
  with pytest.raises(SystemExit) as e:
    config.from_args(run.parse_args(["--preset", "huge"]))
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unknown preset 'huge'")


@pytest.mark.parametrize("extra, match", [
    (["--adapters", "{tmp}/nowhere"], r"no adapter export at"),
    (["--adapters", "{tmp}/folder"], r"not a readable adapter export"),
    (["--adapters", "smollm2-135m", "--out", "{tmp}/folder"], r"--out .*folder is a folder"),
    # a file of the user's is never replaced: the training text itself, any other file, a link
    (["--adapters", "smollm2-135m", "--out", "{tmp}/corpus.txt"],
     r"--out .*corpus.txt is a file that train.evaluate did not write, and train.evaluate would replace it"),
    (["--adapters", "smollm2-135m", "--out", "{tmp}/a_file"], r"--out .*a_file is a file that train.evaluate did not"),
    (["--adapters", "smollm2-135m", "--out", "{tmp}/link"], r"--out .*link is a link; give the path of a new file"),
    (["--adapters", "smollm2-135m", "--seq_len", "0"], r"--seq_len 0 is too small"),
])
def test_train_evaluate_checks_its_flags_first(run_dir, capsys, monkeypatch, extra, match):
  from train import backbone, evaluate
  tmp, corpus = run_dir
  monkeypatch.setattr(backbone, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  argv = ["--preset", "tiny", "--data", corpus, "--workdir", str(tmp / "work"), *[f.format(tmp=tmp) for f in extra]]
  before = _tree(tmp)
  assert re.search(match, _train_refused(capsys, evaluate, argv))
  assert _tree(tmp) == before


def test_a_tilde_the_shell_left_is_the_home_folder(monkeypatch, tmp_path):
  """--workdir=~/run reaches the program as "~/run" (no shell expands after "="): every path flag reads it as the
  home folder, as the shell would, not as a folder named "~" beside the current one."""
  from train import config, run
  monkeypatch.setenv("HOME", str(tmp_path))
  cfg = config.from_args(run.parse_args(["--workdir=~/run", "--data", "~/a.txt", "~/b.txt", "--export=~/ex",
                                         "--cache_dir=~/cache", "--data_dir=~/data"]))
  assert (cfg.workdir, cfg.export, cfg.cache_dir, cfg.data_dir) == tuple(
      str(tmp_path / n) for n in ("run", "ex", "cache", "data"))
  assert cfg.data == (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))


def test_train_evaluate_replaces_only_its_own_rows(tmp_path):
  """Its own earlier rows are replaced, as strict JSON (a metric that is not a number is null), whole."""
  import json
  from train import evaluate
  out = tmp_path / "rows.json"
  evaluate.write_rows([dict(adapters="a", n_local=4, kl=float("nan"), recall=0.5)], out)
  assert json.loads(out.read_text()) == [dict(adapters="a", n_local=4, kl=None, recall=0.5)]
  assert evaluate.checks.check_out_file(out, "--out", "train.evaluate", evaluate.is_rows_file, "its rows") == out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # no temporary left behind


# 6. eval.run: flags, tasks and LongBench files first; its run fingerprint only once all is checked.

@pytest.mark.parametrize("extra, match", [
    (["--tasks", "nope"], r"unknown task 'nope'; known:"),
    (["--tasks", "narrativeqa", "--longbench_dir", "{tmp}/lb"], r"task 'narrativeqa' has no file .*lb/narrativeqa.jsonl"),
    (["--tasks", "narrativeqa", "--longbench_dir", "{tmp}/a_file"], r"--longbench_dir .*a_file is not a folder"),
    (["--out", "{tmp}/a_file"], r"--out .*a_file is a file; give a folder"),
    (["--out", "{tmp}/a_file/results"], r"--out .*a_file/results cannot be made: .*a_file is a file; give a folder"),
    (["--tasks", "qasper", "--longbench_dir", "{tmp}/lb_bad"],
     r"task 'qasper': .*qasper.jsonl holds no readable record \(2 malformed line\(s\); the first, line 1: "),
    (["--tasks", "hotpotqa", "--longbench_dir", "{tmp}/lb_bad"], r"task 'hotpotqa': .*holds no readable record \(it is empty\)"),
    (["--methods", "magic"], r"unknown methods \['magic'\]"),
    (["--methods", "vanilla", "oracle"], r"oracle is the shared rule scored by the frozen attention"),
    (["--ppl_prefix", "96"], r"--ppl_prefix 96 leaves nothing to score in --ppl_tokens 96"),
    (["--batch_size", "0"], r"--batch_size 0 is too small"),
    (["--recent_share", "1.5"], r"--recent_share is a share of the KV budget, in \[0, 1\]; got 1.5"),
    (["--boundary_share", "0"], r"--boundary_share is a share of what the budget leaves, in \(0, 1\]; got 0.0"),
    (["--kv_budget_min_tokens", "-1"], r"--kv_budget_min_tokens is a token count, >= 0; got -1"),
    # decode's selection rule: ChunkConfig's own checks, named by the flags
    (["--selection", "shared", "--score_rank", "16"],
     r"--selection / --score_\* / --head_refresh: score_rank sets how the per-head selection scores; it needs "
     r"selection='kv_head'"),
    (["--score_rank", "0"], r"score_rank must be an int >= 1"),
    (["--page_len", "0"], r"--page_len 0 is too small: give 1 or more"),
    (["--selection", "shared", "--score_estimate", "sparq"], r"score_estimate='sparq' sets how the per-head"),
    (["--score_estimate", "exact", "--score_rank", "16"], r"score_estimate='exact' reads all of K"),
    (["--score_estimate", "sparq", "--score_sketch", "64"],
     r"score_sketch sketches what the low-rank keys miss: it needs score_estimate='lowrank'"),
    (["--score_sketch", "40"], r"score_sketch must be a multiple of 32 bits"),
    (["--score_sketch", "0", "--sketch_estimate", "qjl"], r"sketch_estimate='qjl' scores the residual sketch"),
    (["--selection", "shared", "--head_refresh", "4"], r"head_refresh sets how often each KV head chooses"),
    (["--head_refresh", "0"], r"head_refresh must be an int >= 1"),
    (["--max_examples", "0"], r"--max_examples 0 is too small: give 1 or more"),  # not "unset": all of them
    (["--quick", "--max_prompt_tokens", "0"], r"--max_prompt_tokens 0 is too small"),
    # past the model's context (smollm2-135m's 8192), which the runs' max_len would not stop
    (["--niah_lengths", "8180"], r"--niah_lengths 8180 and --niah_max_new 32 do not fit smollm2-135m's 8192 "
                                 r"positions; give --past_context to run past it on purpose"),
    (["--ppl_tokens", "9000"], r"--ppl_tokens 9000 does not fit smollm2-135m's 8192 positions"),
    (["--chunk_len", "0"], r"--chunk_len 0.0 is not a mean chunk length: give 1 or more"),  # not "unset"
    (["--chunk_len", "nan"], r"--chunk_len nan is not a mean chunk length"),
    # the selection rule against the model's config (smollm2-135m: 30 full-attention layers, head_dim 64)
    (["--selection_layers", "99"], r"--selection_layers / --score_\*: selection_layers \[99\] are not full-attention"),
    (["--score_sketch", str(2**30)], r"score_sketch=1073741824 bits is more than a float32 key holds \(2048 bits"),
    (["--max_prompt_tokens", "8180"], r"--max_prompt_tokens 8180 and the tasks' 32 new tokens do not fit"),
])
def test_eval_run_refuses_bad_flags_before_loading(tmp_path, monkeypatch, extra, match):
  from eval import run as eval_run
  from tests.eval_fixtures import FLAGS
  (tmp_path / "a_file").write_text("mine\n")
  (tmp_path / "lb").mkdir()
  (tmp_path / "lb_bad").mkdir()
  (tmp_path / "lb_bad" / "qasper.jsonl").write_text('{"input": "q"}\nnot json\n')  # no readable record
  (tmp_path / "lb_bad" / "hotpotqa.jsonl").write_text("")
  monkeypatch.setattr(cj, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  before = _tree(tmp_path)
  with pytest.raises(eval_run.UsageError, match=match):
    eval_run.main([*FLAGS, "--out", str(tmp_path / "ev"), *[f.format(tmp=tmp_path) for f in extra]])
  assert _tree(tmp_path) == before and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("adapters", [None, "smollm2-135m"])
def test_eval_run_refuses_adapters_before_loading(tmp_path, monkeypatch, adapters):
  """A model folder with no adapters (--adapters left to --model) or another model's adapters: refused
  before the weights load (they were read after them)."""
  from eval import run as eval_run
  model = _hf_dir(tmp_path)
  monkeypatch.setattr(cj, "load", lambda *a, **k: pytest.fail("loaded the model before refusing its adapters"))
  with pytest.raises(cj.adapter_io.AdapterLoadError, match="model folder" if adapters is None else "trained for"):
    eval_run.main(["--quick", "--model", str(model), "--out", str(tmp_path / "ev"),
                   *(["--adapters", adapters] if adapters else [])])
  assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("flag", ["--tasks", "--niah_kinds"])
def test_eval_run_refuses_a_list_flag_given_nothing(flag, capsys):
  """`--tasks` with no names ran no task and wrote an empty report; argparse now refuses it."""
  from eval import run as eval_run
  with pytest.raises(SystemExit) as e:
    eval_run._parser().parse_args([flag])
  assert e.value.code == 2 and f"{flag}: expected at least one argument" in capsys.readouterr().err


def test_eval_run_longbench_dir_defaults_to_its_datasets(tmp_path):
  """With --longbench_dir and no --tasks, the tasks are the LongBench datasets the folder has (the mini set
  was looked for there, and the README's command refused); the mini tasks are read from the project's set."""
  from eval import run as eval_run
  (tmp_path / "narrativeqa.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n')
  (tmp_path / "notes.jsonl").write_text("")
  assert eval_run._default_tasks(tmp_path) == ["narrativeqa"]
  assert eval_run._default_tasks(None) == list(eval_run.longbench.MINI_TASKS)
  (tmp_path / "empty").mkdir()
  with pytest.raises(eval_run.UsageError, match=r"has no file of a known LongBench dataset"):
    eval_run._default_tasks(tmp_path / "empty")
  args = eval_run._parser().parse_args(["--longbench_dir", str(tmp_path), "--out", str(tmp_path / "ev")])
  assert eval_run._resolve(args).tasks == ["narrativeqa"]
  assert eval_run._task_dir(args, "mini_kv_qa") == eval_run.MINI_DIR
  assert eval_run._task_dir(args, "narrativeqa") == tmp_path


def test_eval_run_refuses_a_tokenized_prompt_past_the_context():
  """A haystack comes out longer than its nominal length: the prompts as tokenized are checked before any run."""
  from eval import run as eval_run
  args = eval_run._parser().parse_args(["--model", "m", "--tasks", "mini_kv_qa"])
  ex = lambda n: eval_run.Example("e", [0] * n, lambda text: {}, {})
  eval_run._check_prompts_fit(args, [("niah_single", [ex(100), ex(480)], 32, [0.5])], 512)  # 512: fits
  with pytest.raises(eval_run.UsageError, match=r"niah_single: a prompt of 481 tokens and 32 new tokens do not fit "
                                                r"m's 512 positions; give a smaller --niah_lengths"):
    eval_run._check_prompts_fit(args, [("niah_single", [ex(100), ex(481)], 32, [0.5])], 512)
  with pytest.raises(eval_run.UsageError, match=r"give a smaller --max_prompt_tokens"):
    eval_run._check_prompts_fit(args, [("mini_kv_qa", [ex(500)], 32, [0.5])], 512)
  args = eval_run._parser().parse_args(["--model", "m", "--past_context"])  # on purpose: let through
  eval_run._check_prompts_fit(args, [("niah_single", [ex(9000)], 32, [0.5])], 512)
  eval_run._check_context(eval_run._resolve(args), 512)


def test_eval_run_records_its_settings_only_after_the_adapters_load(tmp_path, monkeypatch):
  """A run refused for its adapters leaves no run_config.json, so the corrected run (other settings) starts."""
  from eval import run as eval_run
  from tests.eval_fixtures import FLAGS, Stubs, WordTokenizer, run_stubbed
  out = tmp_path / "ev"
  config = types.SimpleNamespace(vocab_size=64, max_position=512, full_attention_layers=(0, 1, 2), head_dim=8)
  model = types.SimpleNamespace(config=config, tokenizer=WordTokenizer(), params=None)
  with pytest.raises(FileNotFoundError, match="no adapter export"):
    eval_run.main([*FLAGS, "--out", str(out), "--adapters", str(tmp_path / "nowhere")], model=model)
  assert not (out / "run_config.json").exists()
  run_stubbed(monkeypatch, out, Stubs(), extra=["--window", "128"])
  assert json.loads((out / "run_config.json").read_text())["window"] == 128


def test_eval_run_cli_is_one_error_line(tmp_path):
  (tmp_path / "a_file").write_text("mine\n")
  line = _one_error_line(_cli("eval.run", "--tasks", "nope", "--out", str(tmp_path / "ev")))
  assert "unknown task 'nope'" in line
  line = _one_error_line(_cli("eval.run", "--out", str(tmp_path / "a_file")))
  assert "is a file; give a folder" in line
  assert (tmp_path / "a_file").read_text() == "mine\n" and not (tmp_path / "ev").exists()


# 7. eval.needle_ranks: one error line, exit 2, before the model is loaded.

@pytest.mark.parametrize("argv, match", [
    (["--depths", "5"], r"--depths \[5.0\]: each is where the needle sits, from 0 \(start\) to 1 \(end\)"),
    (["--tokens", "10"], r"--tokens \[10\]: each prompt needs at least 256 tokens"),
    (["--model", "{tmp}/nowhere"], r"no model at"),
    (["--model", "{tmp}/model", "--tokens", "5000"], r"--tokens 5000 does not fit .* 4096 positions"),
    (["--model", "{tmp}/model", "--tokens", "256", "--adapters", "{tmp}/nowhere"], r"no adapter export at"),
])
def test_needle_ranks_refuses_bad_flags_before_loading(tmp_path, capsys, monkeypatch, argv, match):
  from eval import needle_ranks
  _hf_dir(tmp_path, dict(max_position_embeddings=4096))
  monkeypatch.setattr(needle_ranks.cj, "load", lambda *a, **k: pytest.fail("loaded the model before refusing a flag"))
  before = _tree(tmp_path)
  line = _train_refused(capsys, needle_ranks, [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o")])
  assert re.search(match, line), line
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("lengths, kind, match", [
    ([4, 5], ValueError, r"lengths\[1\] is 5: each row's length .* must be in \[1, 4\]"),
    ([4], ValueError, r"lengths must be one length per row: shape \(2,\)"),
    ([4.0, 2.0], TypeError, r"lengths must be integer row lengths"),
    ([0, 2], ValueError, r"lengths\[0\] is 0"),
])
def test_generate_checks_lengths_as_forward_does(params, lengths, kind, match):
  """A padded [B, T] array's `lengths`: the one check `forward` uses too (`checks.check_lengths`)."""
  with pytest.raises(kind, match=match):
    cj.generate(params, np.ones((2, 4), np.int32), lengths=lengths, max_new_tokens=1)
