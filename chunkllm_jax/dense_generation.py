"""Generation with full attention over the static KV buffer: `generate` and `stream`.

Both run the shared decode runtime (`decoding.py`) with the dense step below: a jit-compiled
prefill, then `generate` runs the decode loop on device as one `lax.while_loop`, and `stream`
runs the same step one token at a time from Python, for a command line that prints text as it
comes.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from chunkllm_jax import checks
from chunkllm_jax import decoding
from chunkllm_jax.decoding import GenerateOutput
from chunkllm_jax.kv_cache import KVCache, decode_step, init_cache, prefill
from chunkllm_jax.params import ModelParams
from chunkllm_jax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class DenseSettings:
  max_len: int  # the KV buffer's slots


def dense_prefill(params: ModelParams, tokens_BT, lengths_B, settings: DenseSettings):
  """The prompt into a new KV buffer: (last-token logits [B, V], the cache)."""
  cache = init_cache(params.config, tokens_BT.shape[0], settings.max_len, params.backbone["embed"].dtype)
  return prefill(params, tokens_BT, lengths_B, cache)


def dense_step(params: ModelParams, tokens_B, cache: KVCache, done_B, settings: DenseSettings):
  """One token per row, every layer reading the whole buffer (ended rows run with their batch)."""
  del done_B, settings
  return decode_step(params, tokens_B, cache)


def _setup(params: ModelParams, tokens, max_new_tokens, lengths, max_len, temperature, top_k, top_p,
           eos_ids, pad_id, mesh, where="generate"):
  checks.check_params(params, where)
  checks.check_on_host(where, params, tokens, lengths)
  checks.check_sampling(temperature, top_k, top_p)
  checks.check_mesh(mesh)
  cfg = params.config
  eos_ids, pad_id = decoding.end_rules(cfg, eos_ids, pad_id)
  prompts, lens = decoding.prepare_prompts(tokens, cfg.vocab_size, pad_id, lengths)
  max_len = decoding.resolve_max_len(cfg, lens, max_new_tokens, max_len, params.backbone["embed"].dtype.itemsize)
  params = decoding.place_params(params.replace(adapters=None), mesh)  # vanilla decoding never reads adapters
  sampling = Sampling.of(temperature, top_k, top_p)
  progs = decoding.programs(dense_prefill, dense_step, DenseSettings(decoding.buffer_len(max_len)),
                            sampling=sampling, max_new=decoding.loop_width(max_new_tokens), eos_ids=eos_ids,
                            pad_id=pad_id, mesh=mesh, cfg=cfg, shapes=prompts.shape if mesh is not None else (0, 0))
  return params, prompts, lens, eos_ids, pad_id, progs


def generate(params: ModelParams, tokens, max_new_tokens: int = 64, *, lengths=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
             eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
             max_len: int | None = None, mesh: Mesh | None = None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per prompt with full attention.

  tokens: a list of token-id lists (any lengths), or a [B, T] array with optional `lengths`.
  temperature 0 is greedy. `seed`: an int, or one per row; each row draws from a stream of its own
  (`decoding.row_keys`), so a row given its seed samples what it samples alone, whatever the batch.
  Rows stop at any of `eos_ids` (default: the model's) and are padded with `pad_id` after it.
  `max_len` fixes the KV buffer size (default: just enough).
  With `mesh`, weights, KV buffer and batch are sharded by `sharding.LOGICAL_TO_MESH`.
  """
  params, prompts, lens, eos_ids, pad_id, progs = _setup(
      params, tokens, max_new_tokens, lengths, max_len, temperature, top_k, top_p, eos_ids, pad_id, mesh)
  key = decoding.row_keys(seed, len(prompts))
  tokens_BT, lengths_B = jnp.asarray(prompts), jnp.asarray(lens)
  progs.compile_ahead(params, tokens_BT, lengths_B, key)
  (first, cache), prefill_s = progs.prefill.timed(params, tokens_BT, lengths_B, key)
  (new, steps, _, _), decode_s = progs.loop.timed(params, first, cache, key, jnp.int32(max_new_tokens))
  return decoding.assemble_output(prompts, lens, np.asarray(new)[:, :max_new_tokens], eos_ids, pad_id,
                                  prefill_s=prefill_s, decode_s=decode_s, decode_steps=int(steps) - 1)


def stream(params: ModelParams, tokens, max_new_tokens: int = 64, **kw) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's new tokens [B] as soon as they exist.

  Rows that have ended yield `pad_id`; the iterator stops when every row has ended. Arguments are
  checked at the call, not at the first `next`.
  """
  seed = kw.pop("seed", 0)
  sampling_kw = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p") if k in kw}
  if kw.keys() - {"lengths", "max_len", "eos_ids", "pad_id", "mesh"}:
    raise TypeError(f"unexpected arguments: {sorted(kw.keys() - {'lengths', 'max_len', 'eos_ids', 'pad_id', 'mesh'})}")
  params, prompts, lens, eos_ids, pad_id, progs = _setup(
      params, tokens, max_new_tokens, kw.pop("lengths", None), kw.pop("max_len", None),
      sampling_kw.get("temperature", 0.0), sampling_kw.get("top_k", 0), sampling_kw.get("top_p", 1.0),
      kw.pop("eos_ids", None), kw.pop("pad_id", None), kw.pop("mesh", None), where="stream")
  key = decoding.row_keys(seed, len(prompts))
  return _stream_steps(params, prompts, lens, eos_ids, pad_id, progs, key, int(max_new_tokens))


def _stream_steps(params, prompts, lens, eos_ids, pad_id, progs, key, max_new_tokens):
  tokens_BT, lengths_B = jnp.asarray(prompts), jnp.asarray(lens)
  if max_new_tokens > 1:  # one token needs no step
    progs.compile_ahead(params, tokens_BT, lengths_B, key, stepwise=True)
  tok, cache = progs.prefill(params, tokens_BT, lengths_B, key)
  done = np.zeros(len(lens), bool)
  for i in range(max_new_tokens):
    if i:
      tok, cache = progs.step(params, tok, cache, key, jnp.int32(i))
    host = np.where(done, pad_id, np.asarray(tok))
    yield host
    done |= np.isin(host, eos_ids)
    if done.all():
      return
