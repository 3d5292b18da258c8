"""A long prompt prefilled block by block (`kv_cache.prefill`'s `block`) gives what one call gives: the
same last-token logits and the same KV buffer, for right-padded rows of different lengths, sliding
and full layers and soft-capped logits; and its compiled program never copies the KV buffer. The same
for ChunkLLM's dense prefill, and its chunk state: segmentation, chunk keys, rings, first selection."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import _layer_plan, _qk, chunk_prefill, resolved, segment_prompts
from chunkllm_jax.kv_cache import init_cache, observed_prefill, prefill
from tests.tiny_models import SOFTCAP, chunk_params, tiny_params


def _prompts(lengths, T, seed=0):
  rng = np.random.RandomState(seed)
  tokens = np.zeros((len(lengths), T), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.randint(0, 96, n)
  return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("arch, extra, T, block, lengths", [
    ("llama", {}, 100, 32, [100, 61]),  # three whole blocks and a shorter last one; a row ending in the second
    ("llama", {}, 96, 32, [96, 33]),  # whole blocks only; a row ending just past the first block
    ("llama", {}, 70, 64, [70, 5]),  # a row that ends in the first block
    ("gemma3", {}, 100, 32, [100, 61]),  # a sliding layer: earlier blocks partly outside its window
    ("qwen3", SOFTCAP, 96, 32, [96, 33]),  # qk-norm and soft-capped logits
])
def test_blocks_give_what_one_call_gives(arch, extra, T, block, lengths):
  kw = dict(n_layers=3, **extra, **({"layer_sliding": (False, True, False)} if arch == "gemma3" else {}))
  params = tiny_params(arch, **kw)
  tokens, lens = _prompts(lengths, T)
  S = 128  # a multiple of every key block used here
  fresh = lambda: init_cache(params.config, len(lengths), S, jnp.float32)
  whole_logits, whole = jax.jit(prefill)(params, tokens, lens, fresh())
  blocked = jax.jit(prefill, static_argnames="block")
  logits, cache = blocked(params, tokens, lens, fresh(), block=block)
  np.testing.assert_allclose(logits, whole_logits, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(cache.length, whole.length)
  for b, n in enumerate(lengths):  # slots past a row's length hold padding's K/V, never read
    np.testing.assert_allclose(cache.k[:, b, :n], whole.k[:, b, :n], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(cache.v[:, b, :n], whole.v[:, b, :n], atol=2e-5, rtol=2e-5)


SHARED = dict(selection="shared")


@pytest.mark.parametrize("arch, scorers, alpha", [
    ("llama", SHARED, 0.87),  # the shared rule: the prompt's selection by the frozen attention, decode's by the adapters
    ("llama", dict(SHARED, prefill_scorer="adapter", prefill="dense"), 0.87),  # the adapters throughout, from their rings
    ("gemma3", dict(SHARED, scorer="attention"), 0.99),  # the attention scorer throughout; a sliding layer
    ("llama", {}, 0.87),  # the default per-head rule: the chunk table alone
])
def test_chunk_prefill_in_blocks_gives_what_one_block_gives(arch, scorers, alpha):
  """(alpha: about the 80th percentile of the random Chunk Adapter's probabilities on these prompts)"""
  params = chunk_params(arch)
  tokens, lens = _prompts([100, 61], 100, seed=3)
  ccfg = ChunkConfig(kv_budget=0.5, max_chunk_len=8, n_local=1, alpha=alpha, max_chunks=64,
                     **scorers).validate(128, 3)
  assert resolved(params, ccfg).prefill == "dense"
  whole_logits, whole, whole_st = chunk_prefill(params, tokens, lens, 128, ccfg, block=128)
  logits, cache, st = chunk_prefill(params, tokens, lens, 128, ccfg, block=32)
  np.testing.assert_allclose(logits, whole_logits, atol=2e-5, rtol=2e-5)
  for b, n in enumerate([100, 61]):
    np.testing.assert_allclose(cache.k[:, b, :n], whole.k[:, b, :n], atol=2e-5, rtol=2e-5)
  for name, value in vars(st).items():
    want = getattr(whole_st, name)
    if jnp.issubdtype(value.dtype, jnp.floating):
      np.testing.assert_allclose(value, want, atol=2e-5, rtol=2e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(value, want, err_msg=name)
  assert int(st.n_chunks.min()) >= 3
  if ccfg.shares_selection:
    assert st.selected.any() and not st.selected.all()
  else:  # the heads choose at each decode step from the cache: no first selection, no rings, no chunk keys
    assert not st.selected.any() and not st.n_selections.any()
    assert st.recent_q.size == st.recent_qt.size == st.chunk_key.size == 0
  # the segmentation is the one layer 0 alone gives (`segment_prompts`, another path)
  closes = np.asarray(segment_prompts(params, tokens, lens, ccfg))
  for b in range(2):
    n = int(st.n_chunks[b])
    np.testing.assert_array_equal(st.chunk_end[b, :n], np.flatnonzero(closes[b])[:n])


@pytest.mark.parametrize("block", [32, 128])
def test_chunk_keys_are_k_tilde_at_each_chunk_end(block):
  """The chunk-key table, filled block by block at each boundary token, against k~ of every prompt
  token at every selection layer (from the same blocked prefill) read at the chunk ends."""
  params = chunk_params("llama")
  tokens, lens = _prompts([100, 61], 100, seed=5)
  ccfg = resolved(params, ChunkConfig(kv_budget=0.5, max_chunk_len=8, n_local=1, alpha=0.87, max_chunks=64,
                                      prefill_scorer="adapter", prefill="dense", **SHARED).validate(128, 3))
  _, _, st = chunk_prefill(params, tokens, lens, 128, ccfg, block=block)

  def keep_h(h_LBTD, layer, start, tokens_Bt, q, h):
    return jax.lax.dynamic_update_slice(h_LBTD, h[None], (layer["index"], 0, start, 0)), None

  h_LBTD = observed_prefill(params, tokens, lens, init_cache(params.config, 2, 128, jnp.float32), block, keep_h,
                            observed=jnp.zeros((3, 2, 100, params.config.d_model)))[2]
  plan = _layer_plan(params, ccfg)
  assert len(plan.selection_layers) >= 1
  for s, layer in enumerate(plan.selection_layers):
    kt = _qk(params, plan.qk_slot[layer], h_LBTD[layer])[1]
    for b in range(2):
      n = int(st.n_chunks[b])
      assert n >= 3
      ends = np.asarray(st.chunk_end[b, :n])
      np.testing.assert_allclose(st.chunk_key[s, b, :n], kt[b, ends], atol=1e-5, rtol=1e-5)


def test_a_buffer_not_in_whole_key_blocks_runs_the_prompt_in_one_call():
  """A caller's own buffer length that no key block divides cannot be read back as a prefix; the
  prompt then runs in one call (as the notebooks' 1707-slot buffer does), with the same logits."""
  params = tiny_params("llama")
  tokens, lens = _prompts([60], 60)
  odd_logits, odd = prefill(params, tokens, lens, init_cache(params.config, 1, 100, jnp.float32), block=32)
  logits, cache = prefill(params, tokens, lens, init_cache(params.config, 1, 128, jnp.float32), block=32)
  np.testing.assert_allclose(odd_logits, logits, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(odd.k[:, :, :60], cache.k[:, :, :60], atol=2e-5, rtol=2e-5)


def test_blocked_prefill_never_copies_the_kv_buffer():
  params = tiny_params("llama", n_layers=3)
  cfg = params.config
  tokens, lens = _prompts([300], 300)
  S = 512
  exe = jax.jit(prefill, static_argnames="block", donate_argnums=3).lower(
      params, tokens, lens, init_cache(cfg, 1, S, jnp.float32), block=64).compile()
  assert _buffer_copies(exe, cfg, S) == []


def _buffer_copies(exe, cfg, S: int) -> list[str]:
  """The compiled program's copies of a whole [L, 1, S, K, D] float32 buffer."""
  shape = ",".join(map(str, (cfg.n_layers, 1, S, cfg.n_kv_heads, cfg.head_dim)))
  return [line for line in exe.as_text().splitlines() if re.search(r"= f32\[" + shape + r"\]\S* copy\(", line)]


def test_chunk_prefill_in_blocks_never_copies_the_kv_buffer():
  """Its buffer is made inside (not donated). XLA makes the zeros of K and V as one broadcast and
  copies it once for the second buffer (both are needed); a copy of anything else would be a
  second buffer at the peak."""
  params = chunk_params()
  cfg = params.config
  tokens, lens = _prompts([300], 300)
  S = 512
  ccfg = ChunkConfig(kv_budget=0.5, max_chunk_len=8, alpha=0.87, max_chunks=64).validate(S, 3)
  copies = _buffer_copies(chunk_prefill.lower(params, tokens, lens, S, ccfg, block=64).compile(), cfg, S)
  assert len([c for c in copies if "copy(%wrapped_broadcast" in c]) <= 1
  assert [c for c in copies if "copy(%wrapped_broadcast" not in c] == []
