"""Vanilla generation over the static KV buffer: jit-compiled prefill, then a decode loop on device.

`generate` runs the whole decode loop as one `lax.while_loop`; `stream` runs the same steps one
at a time from Python, for a command line that prints text as it comes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from chunkllm_jax import checks
from chunkllm_jax import sharding as shd
from chunkllm_jax.attention import DECODE_BLOCK
from chunkllm_jax.kv_cache import KVCache, decode_step, init_cache, prefill
from chunkllm_jax.params import ModelParams
from chunkllm_jax.sampling import Sampling, sample

PAD_MULTIPLE = 16  # prompts are padded to a multiple of this, so nearby lengths share a compile


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """tokens: [B, max_prompt + max_new] int32; row b is its prompt, its new tokens, then pad_id.

  lengths: valid tokens per row (prompt + generated, through the end-of-sequence token).
  stats: per-row numpy arrays (`prefill_s`, `decode_tok_s`, and more for chunk_generate).
  """

  tokens: np.ndarray
  prompt_lengths: np.ndarray
  lengths: np.ndarray
  stats: dict[str, np.ndarray]

  def new_tokens(self, row: int) -> np.ndarray:
    return self.tokens[row, self.prompt_lengths[row]: self.lengths[row]]


# ----------------------------------------------------------------------------------------------
# Input checks: every one runs on the host, before anything is compiled.


def prepare_prompts(tokens, vocab_size: int, pad_id: int, lengths=None) -> tuple[np.ndarray, np.ndarray]:
  """Accepts a list of token lists, one list, or a [B, T] array (+ lengths). Returns padded [B, T'] and [B].

  Float ids are refused (TypeError), never truncated; ids outside [0, vocab_size) are named by row
  and position (ValueError)."""
  if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
    rows = [checks.token_array(r, vocab_size, f"prompt {b}").reshape(-1) for b, r in enumerate(tokens)]
    if lengths is not None:
      raise ValueError("pass lengths only with a padded [B, T] array")
    lengths = np.array([len(r) for r in rows])
  else:
    arr = checks.token_array(tokens, vocab_size)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2:
      raise ValueError(f"tokens must be [B, T] or a list of token lists, got shape {arr.shape}")
    if lengths is not None and not np.issubdtype(np.asarray(lengths).dtype, np.integer):
      raise TypeError(f"lengths must be integers, got {np.asarray(lengths).dtype}")
    lengths = np.full(arr.shape[0], arr.shape[1]) if lengths is None else np.asarray(lengths).reshape(-1)
    if lengths.shape[0] != arr.shape[0] or lengths.max(initial=0) > arr.shape[1]:
      raise ValueError(f"lengths {lengths.tolist()} do not fit tokens of shape {arr.shape}")
    rows = [arr[b, : lengths[b]] for b in range(arr.shape[0])]
  if not rows:
    raise ValueError("no prompts given")
  if lengths.min() < 1:
    raise ValueError(f"every prompt needs at least one token; lengths are {lengths.tolist()}")
  width = -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE
  out = np.full((len(rows), width), pad_id, dtype=np.int64)  # int64 until checked: no wrap-around
  for b, r in enumerate(rows):
    out[b, : len(r)] = r
  checks.check_token_range(out, vocab_size, lengths)
  return out.astype(np.int32), lengths.astype(np.int32)


def resolve_max_len(cfg, lengths: np.ndarray, max_new_tokens: int, max_len: int | None, itemsize: int = 4) -> int:
  """The KV buffer's length; refuses sizes the model or the memory cannot hold, before any allocation.

  Without `max_len`, prompt + max_new_tokens must fit the model's context (`cfg.max_position`); an
  explicit `max_len` may go past it on purpose (with a warning)."""
  max_new_tokens = checks.check_count("max_new_tokens", max_new_tokens)
  longest = int(lengths.max())
  need = longest + max_new_tokens
  if max_len is None:
    if need > cfg.max_position:
      raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                       f"{need} positions, more than the model's context of {cfg.max_position}: give "
                       f"max_new_tokens <= {max(cfg.max_position - longest, 0)} (or max_len=... to run past "
                       "the trained context on purpose)")
    max_len = -(-need // 128) * 128
  else:
    max_len = checks.check_count("max_len", max_len)
    if need > max_len:
      raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens "
                       f"({max_new_tokens}) needs {need} positions, more than the buffer's max_len={max_len}")
    if need > cfg.max_position:
      warnings.warn(f"{need} positions exceed the model's trained context ({cfg.max_position}); "
                    "quality may degrade", stacklevel=3)
  checks.check_kv_memory(cfg, len(lengths), buffer_len(max_len), itemsize)
  return max_len


def buffer_len(max_len: int) -> int:
  """The KV buffer's allocated length: whole decode blocks (`attention.DECODE_BLOCK`), so the
  blockwise decode attention steps through it in full-size blocks. Slots past `max_len` are never
  written or read."""
  return -(-max_len // DECODE_BLOCK) * DECODE_BLOCK


def is_eos(tok_B, eos_ids: tuple[int, ...]):
  if not eos_ids:
    return jnp.zeros(tok_B.shape, bool)
  return jnp.any(tok_B[:, None] == jnp.asarray(eos_ids, jnp.int32)[None], axis=-1)


# ----------------------------------------------------------------------------------------------
# Device programs


def _prefill_sample(params: ModelParams, tokens_BT, lengths_B, key, *, max_len: int, sampling: Sampling):
  cache = init_cache(params.config, tokens_BT.shape[0], max_len, params.backbone["embed"].dtype)
  logits, cache = prefill(params, tokens_BT, lengths_B, cache)
  return sample(logits, jax.random.fold_in(key, 0), sampling), cache


def _step_sample(params: ModelParams, tok_B, cache: KVCache, key, step, *, sampling: Sampling):
  logits, cache = decode_step(params, tok_B, cache)
  return sample(logits, jax.random.fold_in(key, step), sampling), cache


def _decode_loop(params: ModelParams, first_B, cache: KVCache, key, *, max_new: int,
                 sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int):
  B = first_B.shape[0]
  out = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(first_B)

  def cond(s):
    step, _, _, _, done = s
    return (step < max_new) & ~jnp.all(done)

  def body(s):
    step, tok, cache, out, done = s
    nxt, cache = _step_sample(params, tok, cache, key, step, sampling=sampling)
    nxt = jnp.where(done, pad_id, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    return step + 1, nxt, cache, out, done | is_eos(nxt, eos_ids)

  state = (jnp.int32(1), first_B, cache, out, is_eos(first_B, eos_ids))
  step, _, _, out, _ = jax.lax.while_loop(cond, body, state)
  return out, step


class Compiled:
  """A jitted function compiled ahead of time per input signature, so that timings of a call
  never include compilation (which is reported separately as `compile_s`)."""

  def __init__(self, jitted):
    self.jitted = jitted
    self.executables = {}
    self.compile_s = 0.0

  def executable(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    exe = self.executables.get(key)
    if exe is None:
      t0 = time.perf_counter()
      exe = self.executables[key] = self.jitted.lower(*args).compile()
      self.compile_s += time.perf_counter() - t0
    return exe

  def __call__(self, *args):
    return self.executable(*args)(*args)

  def timed(self, *args):
    """(outputs, seconds): compiles first if needed, then times the run alone."""
    exe = self.executable(*args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - t0


@functools.lru_cache(maxsize=64)
def _programs(cfg, mesh: Mesh | None, max_len: int, max_new: int, sampling: Sampling,
              eos_ids: tuple[int, ...], pad_id: int, shapes: tuple):
  """jit-compiled prefill and decode for one configuration (sharded when a mesh is given)."""
  pre = functools.partial(_prefill_sample, max_len=max_len, sampling=sampling)
  loop = functools.partial(_decode_loop, max_new=max_new, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)
  step = functools.partial(_step_sample, sampling=sampling)
  if mesh is None:
    return Compiled(jax.jit(pre)), Compiled(jax.jit(loop)), Compiled(jax.jit(step, donate_argnums=(2,)))
  B, T = shapes
  param_shd = shd.params_sharding(ModelParams(backbone={}, config=cfg), mesh)
  tok = shd.batch_sharding(mesh, (B, T))
  row = shd.batch_sharding(mesh, (B,))
  kv = shd.kv_sharding(mesh, (cfg.n_layers, B, max_len, cfg.n_kv_heads, cfg.head_dim))
  cache_shd = KVCache(k=kv, v=kv, length=row)
  rep = shd.replicated(mesh)
  return (
      Compiled(jax.jit(pre, in_shardings=(param_shd, tok, row, rep), out_shardings=(row, cache_shd))),
      Compiled(jax.jit(loop, in_shardings=(param_shd, row, cache_shd, rep),
                       out_shardings=(shd.batch_sharding(mesh, (B, max_new)), rep))),
      Compiled(jax.jit(step, in_shardings=(param_shd, row, cache_shd, rep, rep),
                       out_shardings=(row, cache_shd), donate_argnums=(2,))),
  )


# ----------------------------------------------------------------------------------------------
# Public API


def _setup(params: ModelParams, tokens, max_new_tokens, lengths, max_len, temperature, top_k, top_p,
           eos_ids, pad_id, mesh, where="generate"):
  checks.check_params(params, where)
  checks.check_sampling(temperature, top_k, top_p)
  cfg = params.config
  pad_id = cfg.pad_id if pad_id is None else checks.check_count("pad_id", pad_id, minimum=0)
  eos_ids = tuple(cfg.eos_ids if eos_ids is None else ([eos_ids] if np.isscalar(eos_ids) else eos_ids))
  for e in eos_ids:
    checks.check_count("each of eos_ids", e, minimum=0)
  prompts, lens = prepare_prompts(tokens, cfg.vocab_size, pad_id, lengths)
  max_len = resolve_max_len(cfg, lens, max_new_tokens, max_len, params.backbone["embed"].dtype.itemsize)
  max_new_tokens = int(max_new_tokens)
  sampling = Sampling(float(temperature), int(top_k or 0), float(top_p))
  params = params.replace(adapters=None)  # vanilla decoding never reads them
  if mesh is not None:
    params = jax.device_put(params, shd.params_sharding(params, mesh))
  progs = _programs(cfg, mesh, buffer_len(max_len), max_new_tokens, sampling, eos_ids, pad_id, prompts.shape)
  return params, prompts, lens, eos_ids, pad_id, progs


def generate(params: ModelParams, tokens, max_new_tokens: int = 64, *, lengths=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids: int | Sequence[int] | None = None, pad_id: int | None = None,
             max_len: int | None = None, mesh: Mesh | None = None) -> GenerateOutput:
  """Generates up to `max_new_tokens` per prompt with full attention.

  tokens: a list of token-id lists (any lengths), or a [B, T] array with optional `lengths`.
  temperature 0 is greedy. Rows stop at any of `eos_ids` (default: the model's) and are padded
  with `pad_id` after it. `max_len` fixes the KV buffer size (default: just enough).
  With `mesh`, weights, KV buffer and batch are sharded by `sharding.LOGICAL_TO_MESH`.
  """
  params, prompts, lens, eos_ids, pad_id, (pre, loop, _) = _setup(
      params, tokens, max_new_tokens, lengths, max_len, temperature, top_k, top_p, eos_ids, pad_id, mesh)
  key = jax.random.key(_check_seed(seed))
  (first, cache), prefill_s = pre.timed(params, jnp.asarray(prompts), jnp.asarray(lens), key)
  (new, steps), decode_s = loop.timed(params, first, cache, key)
  return assemble_output(prompts, lens, np.asarray(new), eos_ids, pad_id,
                         prefill_s=prefill_s, decode_s=decode_s, decode_steps=int(steps) - 1)


def assemble_output(prompts, lens, new_BN, eos_ids, pad_id, *, prefill_s, decode_s, decode_steps,
                    extra_stats=None) -> GenerateOutput:
  B, N = new_BN.shape
  width = int(lens.max()) + N
  out = np.full((B, width), pad_id, np.int32)
  n_new = np.full(B, N)
  for b in range(B):
    hits = np.flatnonzero(np.isin(new_BN[b], eos_ids)) if eos_ids else []
    n_new[b] = hits[0] + 1 if len(hits) else N
    out[b, : lens[b]] = prompts[b, : lens[b]]
    out[b, lens[b]: lens[b] + n_new[b]] = new_BN[b, : n_new[b]]
  stats = dict(prefill_s=np.full(B, prefill_s),
               decode_tok_s=(n_new - 1) / max(decode_s, 1e-9) if decode_steps else np.zeros(B))
  stats.update(extra_stats or {})
  return GenerateOutput(tokens=out, prompt_lengths=lens, lengths=lens + n_new, stats=stats)


def stream(params: ModelParams, tokens, max_new_tokens: int = 64, **kw) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's new tokens [B] as soon as they exist.

  Rows that have ended yield `pad_id`; the iterator stops when every row has ended. Arguments are
  checked at the call, not at the first `next`.
  """
  seed = kw.pop("seed", 0)
  sampling_kw = {k: kw.pop(k) for k in ("temperature", "top_k", "top_p") if k in kw}
  if kw.keys() - {"lengths", "max_len", "eos_ids", "pad_id", "mesh"}:
    raise TypeError(f"unexpected arguments: {sorted(kw.keys() - {'lengths', 'max_len', 'eos_ids', 'pad_id', 'mesh'})}")
  params, prompts, lens, eos_ids, pad_id, (pre, _, step) = _setup(
      params, tokens, max_new_tokens, kw.pop("lengths", None), kw.pop("max_len", None),
      sampling_kw.get("temperature", 0.0), sampling_kw.get("top_k", 0), sampling_kw.get("top_p", 1.0),
      kw.pop("eos_ids", None), kw.pop("pad_id", None), kw.pop("mesh", None), where="stream")
  key = jax.random.key(_check_seed(seed))
  return _stream_steps(params, prompts, lens, eos_ids, pad_id, pre, step, key, int(max_new_tokens))


def _stream_steps(params, prompts, lens, eos_ids, pad_id, pre, step, key, max_new_tokens):
  tok, cache = pre(params, jnp.asarray(prompts), jnp.asarray(lens), key)
  done = np.zeros(len(lens), bool)
  for i in range(max_new_tokens):
    if i:
      tok, cache = step(params, tok, cache, key, jnp.int32(i))
    host = np.where(done, pad_id, np.asarray(tok))
    yield host
    done |= np.isin(host, eos_ids)
    if done.all():
      return


def _check_seed(seed) -> int:
  if not checks.is_int(seed):
    raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
  return int(seed)
