"""The decode runtime that dense and ChunkLLM generation share.

A generation is two compiled programs over a *model state* (the KV cache; for ChunkLLM the KV
cache and the chunk state): a prefill that samples the first token, then one on-device
`lax.while_loop` that calls a step function until every row has ended. The two paths differ only
in their step functions (`dense_generation.py`, `chunk_generation.py`):

    prefill_fn(params, tokens_BT, lengths_B, settings) -> (logits_BV, state)
    step_fn(params, tokens_B, state, done_B, settings) -> (logits_BV, state)

`settings` is the path's static, hashable configuration (the buffer length, the ChunkConfig).
The loop and the single step donate the model state, so XLA updates the KV buffer in place
rather than holding a second copy in the loop carry. With a mesh, both paths get the same
placements: weights by `sharding.LOGICAL_TO_MESH`, the batch over `data`, the KV buffer by
`kv_cache.KV_AXES`, anything else in the state as XLA propagates it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import math
import sys
import time
import warnings
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from chunkllm_jax import checks
from chunkllm_jax import sharding as shd
from chunkllm_jax.attention import DECODE_BLOCKS
from chunkllm_jax.kv_cache import cache_shardings
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
    """Row `row`'s generated tokens, its end-of-sequence token included where it made one."""
    return self.tokens[row, self.prompt_lengths[row]: self.lengths[row]]


# ----------------------------------------------------------------------------------------------
# Input checks: every one runs on the host, before anything is compiled.


def prepare_prompts(tokens, vocab_size: int, pad_id: int, lengths=None) -> tuple[np.ndarray, np.ndarray]:
  """Accepts a list of token lists, one list, or a [B, T] array (+ lengths). Returns padded [B, T'] and [B].

  Float ids are refused (TypeError), never truncated; ids outside [0, vocab_size) are named by row
  and position (ValueError)."""
  if isinstance(tokens, (list, tuple)) and not len(tokens):
    raise ValueError("no prompts given: pass a list of token lists or a [B, T] array")
  if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
    rows = [checks.token_array(r, vocab_size, f"prompt {b}") for b, r in enumerate(tokens)]
    for b, r in enumerate(rows):  # one row a prompt ([1, T], a tokenizer's one text, too); never several joined
      if r.ndim > 1 and math.prod(r.shape[:-1]) != 1:
        raise ValueError(f"prompt {b} has shape {r.shape}: each prompt is one list of token ids; give a "
                         "[B, T] array as tokens itself (with lengths), not inside a list")
    rows = [r.reshape(-1) for r in rows]
    if lengths is not None:
      raise ValueError("pass lengths only with a padded [B, T] array")
    lengths = np.array([len(r) for r in rows])
  else:
    arr = checks.token_array(tokens, vocab_size)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2:
      raise ValueError(f"tokens must be [B, T] or a list of token lists, got shape {arr.shape}")
    lengths = np.full(arr.shape[0], arr.shape[1]) if lengths is None else checks.check_lengths(lengths, *arr.shape)
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
    if longest >= cfg.max_position:
      raise ValueError(f"the longest prompt ({longest} tokens) does not fit the model's context of {cfg.max_position} "
                       f"positions with a new token: shorten it to at most {cfg.max_position - 1} tokens (or give "
                       "max_len=... to run past the trained context on purpose)")
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
  """The KV buffer's allocated length: whole blocks of the decode loop's smallest size
  (`attention.DECODE_BLOCKS`), so the blockwise decode attention steps through it in full-size
  blocks. Slots past `max_len` are never written and are read only masked, within the last block."""
  return -(-max_len // DECODE_BLOCKS[-1]) * DECODE_BLOCKS[-1]


def end_rules(cfg, eos_ids, pad_id) -> tuple[tuple[int, ...], int]:
  """The end-of-sequence ids and the pad id: the given ones, checked, or the model's."""
  pad_id = cfg.pad_id if pad_id is None else checks.check_count("pad_id", pad_id, minimum=0)
  if pad_id >= cfg.vocab_size:  # its embedding would be read past the table: NaN logits for every row
    raise ValueError(f"pad_id must be a token id below the vocabulary size {cfg.vocab_size}, got {pad_id}")
  if eos_ids is None:
    return tuple(int(e) for e in cfg.eos_ids), int(pad_id)
  if hasattr(eos_ids, "shape"):  # a numpy or jax array, 0-d (one id) included: its values, judged as a list's
    eos_ids = np.asarray(eos_ids).tolist()
  eos_ids = [eos_ids] if np.ndim(eos_ids) == 0 else list(eos_ids)
  for e in eos_ids:
    checks.check_count("each of eos_ids", e, minimum=0)
    if e >= cfg.vocab_size:  # never sampled: the rows would run to max_new_tokens without a word
      raise ValueError(f"eos_ids must be token ids below the vocabulary size {cfg.vocab_size}, got {e}")
  return tuple(int(e) for e in eos_ids), int(pad_id)


def check_seed(seed) -> int:
  """An int that jax.random.key takes (a signed 64-bit value)."""
  if not checks.is_int(seed):
    raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
  if not -2**63 <= seed < 2**63:
    raise ValueError(f"seed must fit in 64 bits (from -2**63 to 2**63 - 1), got {seed}")
  return int(seed)


def seed_key(seed) -> jax.Array:
  """The PRNG key of a 64-bit seed (checked). `jax.random.key` keeps only a seed's low 32 bits where x64 is off
  (the default): 5 and 2**32 + 5, or -5 and 2**32 - 5, drew the same tokens. A seed of 32 bits keeps its key."""
  seed = check_seed(seed)
  if -2**31 <= seed < 2**31:
    return jax.random.key(seed)
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), (seed >> 32) & 0xFFFFFFFF)


def _host_int(v):
  """A 0-d integer array (numpy's or jax's, as `jnp.int32(7)` or a row of an int array gives) as the int it
  holds; anything else as it is, for `check_seed` to take or name."""
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0 and np.issubdtype(v.dtype, np.integer):
    return int(v)
  return v


def row_keys(seed, batch: int) -> jax.Array:
  """One PRNG key per row, [B]: each row draws from a stream of its own, so what a row samples never depends on
  the rows beside it. `seed` is an int (or a 0-d integer array), whose stream `b` row b draws from (rows differ,
  equal prompts too), or one int per row (a sequence or a 1-d array), each row then drawing as it would alone
  (as row 0) with its seed."""
  checks.check_on_host("generate / chunk_generate", seed)
  if isinstance(seed, (np.ndarray, jax.Array)):  # a 0-d array is one seed, a 1-d one a seed per row
    arr = np.asarray(seed)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
      raise TypeError(f"seed must be an int or one int per row, got an array of {arr.dtype}, shape {arr.shape}")
    seed = int(arr) if arr.ndim == 0 else arr.tolist()
  if checks.is_int(seed):
    return jax.vmap(jax.random.fold_in, (None, 0))(seed_key(seed), jnp.arange(batch, dtype=jnp.uint32))
  if isinstance(seed, (str, bytes)) or not hasattr(seed, "__len__"):
    raise TypeError(f"seed must be an int or one int per row, got {seed!r} ({type(seed).__name__})")
  seeds = [_host_int(s) for s in seed]
  if len(seeds) != batch:
    raise ValueError(f"seed gives {len(seeds)} seeds for {batch} rows: give one int, or one per row")
  return jnp.stack([jax.random.fold_in(seed_key(s), 0) for s in seeds])


def draw_keys(keys_B, step):
  """Each row's key for one sampling step (0: the prefill's token)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)


def is_eos(tok_B, eos_ids: tuple[int, ...]):
  if not eos_ids:
    return jnp.zeros(tok_B.shape, bool)
  return jnp.any(tok_B[:, None] == jnp.asarray(eos_ids, jnp.int32)[None], axis=-1)


# ----------------------------------------------------------------------------------------------
# The device programs: prefill, the decode loop, and one step (for streaming).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
  step: jax.Array  # the column of `out` the next token goes to
  token: jax.Array  # [B] int32: the last sampled token
  model: Any  # the step function's state (KV cache, chunk state)
  out: jax.Array  # [B, max_new] int32: sampled tokens, pad_id after a row's end
  done: jax.Array  # [B] bool: the row has sampled an end-of-sequence token
  live: jax.Array  # [B] int32: decode steps the row ran before its end


def _prefill(params, tokens_BT, lengths_B, key, *, prefill_fn, settings, sampling: Sampling):
  logits, state = prefill_fn(params, tokens_BT, lengths_B, settings)
  return sample(logits, draw_keys(key, 0), sampling), state


def _step(params, tok_B, state, key, step, *, step_fn, settings, sampling: Sampling):
  """One decode step for `stream`: every row runs (the host drops ended rows' tokens)."""
  logits, state = step_fn(params, tok_B, state, jnp.zeros(tok_B.shape, bool), settings)
  return sample(logits, draw_keys(key, step), sampling), state


def _decode_loop(params, first_B, state, key, n_new, *, step_fn, enter_fn, settings, sampling: Sampling,
                 max_new: int, eos_ids: tuple[int, ...], pad_id: int):
  """Samples until every row has ended or `n_new` tokens exist (an int32 scalar, traced, at most `max_new`):
  (tokens [B, max_new], pad_id past `n_new`; steps run, the final model state, per-row live steps).
  `enter_fn` (if any) first completes the prefill's state."""
  B = first_B.shape[0]
  if enter_fn is not None:
    state = enter_fn(params, state, settings)
  limit = jnp.minimum(n_new, max_new)

  def cond(s: LoopState):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s: LoopState):
    logits, model_state = step_fn(params, s.token, s.model, s.done, settings)
    nxt = jnp.where(s.done, pad_id, sample(logits, draw_keys(key, s.step), sampling))
    return LoopState(step=s.step + 1, token=nxt, model=model_state,
                     out=jax.lax.dynamic_update_slice(s.out, nxt[:, None], (0, s.step)),
                     done=s.done | is_eos(nxt, eos_ids), live=s.live + ~s.done)

  s = LoopState(step=jnp.int32(1), token=first_B, model=state,
                out=jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(first_B),
                done=is_eos(first_B, eos_ids), live=jnp.zeros((B,), jnp.int32))
  s = jax.lax.while_loop(cond, body, s)
  return s.out, s.step, s.model, s.live


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
    return None


def release_free_heap() -> bool:
  """Returns the C heap's free pages to the OS (glibc's `malloc_trim`; elsewhere nothing); True if
  any were. XLA's compiler and the weight loader free hundreds of MiB in small blocks that glibc
  otherwise keeps mapped for reuse, and those would sit under the KV buffer (a mapping of its own)
  at generation's peak: 140 MiB of the 2.4 GiB peak of a 32K `generate` (bench/RESULTS_memory.md)."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False


def memory_maps() -> tuple[int, int]:
  """(this process's memory mappings, the kernel's limit on them); (0, 0) where /proc does not say (not Linux)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      n = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      return n, int(f.read())
  except (OSError, ValueError):
    return 0, 0


MAP_SHARE = 0.5  # past this share of the kernel's limit on memory mappings, compiled programs are dropped
_maps_after_drop = 0  # the mappings the last drop left: what it could not free is held outside the project's caches


def map_trigger(share: float, limit: int) -> float:
  """The count of memory mappings past which `drop_compiled_near_map_limit` drops: `share` of the limit, or,
  where the last drop could not get under that (executables held outside the project's caches: arrays still in
  use, functions jitted elsewhere), `share` of the headroom that drop left. Without the second, such a process
  would drop every program at every compile, recompiling what it had just compiled, until something else frees
  its mappings; with it, it drops again only once the project's programs fill half of what is left."""
  floor = _maps_after_drop
  return share * limit if floor <= share * limit else floor + share * (limit - floor)


def drop_compiled_near_map_limit(share: float | None = None) -> bool:
  """Drops the project's compiled programs (`clear_compiled`) where this process holds more mappings than
  `map_trigger` allows (`share` of the kernel's limit on memory mappings, in the common case); True if it did.
  Every loaded XLA:CPU executable holds some (about 750 for `chunk_generate`'s programs of a tiny model), and
  the process that passes the limit (vm.max_map_count, 65530 on most Linux) aborts inside XLA at its next
  compile: an evaluation that compiles a program per setting (a window fitted to each prompt) did, at the 200th
  of its 210 runs. Called before every compile (`Compiled`); what is dropped compiles again when it is next
  called."""
  global _maps_after_drop
  share = MAP_SHARE if share is None else share
  n, limit = memory_maps()
  if not limit or n <= map_trigger(share, limit):
    return False
  clear_compiled()
  gc.collect()  # the executables go with their last reference, and their mappings with them
  _maps_after_drop, _ = memory_maps()
  if _maps_after_drop > share * limit:
    warnings.warn(f"this process holds {_maps_after_drop} memory mappings after dropping every compiled program "
                  f"it can (the kernel allows {limit}: vm.max_map_count); the next drop waits until "
                  f"{map_trigger(share, limit):.0f}; raise that limit if XLA aborts", stacklevel=3)
  return True


class Compiled:
  """A jitted function compiled ahead of time per input signature, so that timings of a call
  never include compilation (which is reported separately as `compile_s`). Before each compile the
  compiled programs are dropped where the process nears the kernel's limit on memory mappings
  (`drop_compiled_near_map_limit`); after it the compiler's freed memory goes back to the OS, before the
  program allocates its buffers."""

  def __init__(self, jitted):
    self.jitted = jitted
    self.executables = {}
    self.compile_s = 0.0

  def executable(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    exe = self.executables.get(key)
    if exe is None:
      drop_compiled_near_map_limit()
      t0 = time.perf_counter()
      exe = self.executables[key] = self.jitted.lower(*args).compile()
      release_free_heap()
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


@dataclasses.dataclass(frozen=True)
class Programs:
  prefill: Compiled  # (params, tokens_BT, lengths_B, key) -> (first_B, state)
  loop: Compiled  # (params, first_B, state, key, n_new) -> (tokens_BN, steps, state, live_B); donates state
  step: Compiled | None  # (params, tok_B, state, key, step) -> (tok_B, state); donates state. None: a
  #                        path whose decode state is completed in the loop (`enter_fn`) does not stream

  def compile_ahead(self, params, tokens_BT, lengths_B, key, *, stepwise: bool = False) -> None:
    """Compiles the prefill, then the loop (`stepwise`: the single step) from the prefill's output
    signature, before either runs. A compile holds hundreds of MiB for a while (ChunkLLM's loop
    about 190 MiB at 8K); compiled after the prefill, that would come on top of the live KV buffer,
    at generation's peak. Compiles nothing a second time."""
    first, state = self.prefill.executable(params, tokens_BT, lengths_B, key).out_info
    if stepwise and self.step is None:
      raise ValueError("these programs decode only in their loop (its first step completes the prefill's state)")
    if stepwise:
      self.step.executable(params, first, state, key, jnp.int32(1))
    else:
      self.loop.executable(params, first, state, key, jnp.int32(1))  # the count's value is not compiled in


def loop_width(max_new_tokens: int) -> int:
  """The decode loop's output width for `max_new_tokens`: the next power of two (at least 16). The loop
  stops at the count it is given, so calls whose counts share a width share its compiled programs
  rather than compiling the prefill and the loop again for each count."""
  return max(16, 1 << (int(max_new_tokens) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def programs(prefill_fn: Callable, step_fn: Callable, settings: Hashable, *, sampling: Sampling, max_new: int,
             eos_ids: tuple[int, ...], pad_id: int, mesh: Mesh | None = None, cfg=None,
             shapes: tuple[int, int] = (0, 0), state_shardings: Callable = lambda cache: cache,
             enter_fn: Callable | None = None) -> Programs:
  """The compiled programs of one generation path and configuration (cached: a second call with
  the same settings compiles nothing). `max_new` is the loop's output width (`loop_width`); the loop
  is called with the count of tokens to make.

  `enter_fn(params, state, settings) -> state`, if given, runs at the start of the decode loop's
  program: what decode needs beyond the prefill's output is built there, after the prefill's
  temporaries are gone, instead of beside them (ChunkLLM's working buffer). Such programs have no
  single step (`Programs.step` is None).

  With `mesh`: the params arrive placed (`place_params`) and the programs follow them; the
  batch (`shapes` = (B, T)) goes over `data`, and the KV buffer of `cfg` and `settings.max_len`
  by `kv_cache.KV_AXES`. `state_shardings` builds the model state's placements from the KV
  cache's (a module-level function, so that it can key the cache)."""
  pre = functools.partial(_prefill, prefill_fn=prefill_fn, settings=settings, sampling=sampling)
  loop = functools.partial(_decode_loop, step_fn=step_fn, enter_fn=enter_fn, settings=settings, sampling=sampling,
                           max_new=max_new, eos_ids=eos_ids, pad_id=pad_id)
  step = functools.partial(_step, step_fn=step_fn, settings=settings, sampling=sampling)
  if mesh is None:
    return Programs(Compiled(jax.jit(pre)), Compiled(jax.jit(loop, donate_argnums=(2,))),
                    None if enter_fn else Compiled(jax.jit(step, donate_argnums=(2,))))
  B, T = shapes
  tok, row, rep = shd.batch_sharding(mesh, (B, T)), shd.batch_sharding(mesh, (B,)), shd.replicated(mesh)
  state = state_shardings(cache_shardings(cfg, mesh, B, settings.max_len))  # None: as XLA propagates it
  return Programs(
      Compiled(jax.jit(pre, in_shardings=(None, tok, row, rep), out_shardings=(row, state))),
      Compiled(jax.jit(loop, in_shardings=(None, row, state, rep, rep),
                       out_shardings=(shd.batch_sharding(mesh, (B, max_new)), rep, state, row),
                       donate_argnums=(2,))),
      None if enter_fn else Compiled(jax.jit(step, in_shardings=(None, row, state, rep, rep),
                                             out_shardings=(row, state), donate_argnums=(2,))))


def clear_compiled(packages: tuple[str, ...] = ("chunkllm_jax", "pallas_kernels", "train", "eval")) -> int:
  """Drops the compiled programs this project keeps: the generation programs above, and the caches of
  the functions jitted where they are defined, in every loaded module of `packages`. For a long-lived
  process that compiles many shapes (a test session); returns how many caches were cleared."""
  cleared = 0
  for name, module in _loaded_modules().items():
    if name.split(".")[0] not in packages or module is None:
      continue
    for obj in list(vars(module).values()):
      if isinstance(obj, type) or not callable(obj):
        continue
      clear = getattr(obj, "clear_cache", None) or getattr(obj, "cache_clear", None)
      if callable(clear):
        clear()
        cleared += 1
  return cleared


def _loaded_modules() -> dict:
  """A snapshot of `sys.modules`. Another thread may import meanwhile (orbax's checkpoint threads do),
  and a copy taken while it does fails with "dictionary changed size": take it again."""
  for _ in range(100):
    try:
      return dict(sys.modules)
    except RuntimeError:
      continue
  return dict(sys.modules)


def place_params(params: ModelParams, mesh: Mesh | None) -> ModelParams:
  return params if mesh is None else jax.device_put(params, shd.params_sharding(params, mesh))


# ----------------------------------------------------------------------------------------------
# The output


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
  # Every step of the loop gives each running row one token: a row's rate while it ran is the loop's steps
  # a second, whenever it stopped (its own tokens over the whole loop's time made an early row look slow).
  stats = dict(prefill_s=np.full(B, prefill_s),
               decode_tok_s=np.where(n_new > 1, decode_steps / max(decode_s, 1e-9), 0.0))
  stats.update(extra_stats or {})
  return GenerateOutput(tokens=out, prompt_lengths=lens, lengths=lens + n_new, stats=stats)
