"""The static-shape KV buffer, and the prefill / decode steps that fill and read it.

Shapes are fixed when the buffer is made (`max_len`), so one compiled program serves every
decode step. Rows have their own lengths: row b's next token is written at `length[b]`, and
keys at or beyond a row's length are never visible to it, so right padding cannot leak.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from chunkllm_jax import attention as attn
from chunkllm_jax import checks
from chunkllm_jax import model
from chunkllm_jax import sharding as shd
from chunkllm_jax.config import ModelConfig
from chunkllm_jax.params import ModelParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: jnp.ndarray  # [L, B, max_len, H_kv, D]
  v: jnp.ndarray  # [L, B, max_len, H_kv, D]
  length: jnp.ndarray  # [B] int32: tokens written so far per row

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def replace(self, **kw) -> "KVCache":
    return dataclasses.replace(self, **kw)


# The one description of the buffer's layout: every K/V buffer (the main one, the working buffer
# of chunk_cache.py) is [layers, batch, positions, kv heads, head dim], placed by these axes.
KV_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def kv_shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, int, int, int, int]:
  return (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
  """An empty cache of `batch` rows and `max_len` positions, K and V in `dtype` (a floating dtype)."""
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"init_cache takes a ModelConfig (model.config), got {type(cfg).__name__}")
  for name, n in (("batch", batch), ("max_len", max_len)):
    if not checks.is_int(n) or n < 1:
      raise ValueError(f"init_cache: {name} must be an int >= 1, got {n!r}")
  dtype = checks.check_float_dtype(dtype, "init_cache")
  shape = kv_shape(cfg, batch, max_len)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 length=jnp.zeros((batch,), jnp.int32))


def cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int) -> KVCache:
  """A KVCache of NamedShardings: the buffers by `KV_AXES`, the lengths by batch."""
  kv = shd.logical_to_sharding(mesh, KV_AXES, kv_shape(cfg, batch, max_len))
  return KVCache(k=kv, v=kv, length=shd.batch_sharding(mesh, (batch,)))


def write_block(buf_LBSKD, layer_idx, start, x_BTKD):
  """Writes positions [start, start + T) of one layer."""
  return jax.lax.dynamic_update_slice(buf_LBSKD, x_BTKD[None].astype(buf_LBSKD.dtype),
                                      (layer_idx, 0, start, 0, 0))


def write_prefix(buf_LBSKD, layer_idx, x_BTKD):
  """Writes positions [0, T) of one layer."""
  return write_block(buf_LBSKD, layer_idx, 0, x_BTKD)


def write_token(buf_LBSKD, layer_idx, pos_B, x_BKD):
  """Writes one token per row, each at its own position."""
  rows = jnp.arange(pos_B.shape[0])
  return buf_LBSKD.at[layer_idx, rows, pos_B].set(x_BKD.astype(buf_LBSKD.dtype))


PREFILL_BLOCK = 1024  # prompt tokens per prefill block (a multiple of the attention's key tile); 2048 held
# 15 MiB more of temporaries in the dense prefill and 29 MiB in ChunkLLM's at 32K, at the same speed at 2K


def prefill(params: ModelParams, tokens_BT, lengths_B, cache: KVCache, block: int = PREFILL_BLOCK):
  """Runs the (right-padded) prompts, fills the buffer. Returns last-token logits [B, V] and the cache.

  A prompt longer than `block` runs in blocks of `block` tokens through every layer, one block after
  another, each attending over the buffer's keys of the blocks before it (`attention.Prefix`) and
  its own: only one block's activations are live (a whole 32K prompt's were about 0.7x the KV
  buffer, bench/RESULTS_memory.md), and the attention folds the same key tiles in the same order as
  a one-call prefill. The blocks run under one `lax.fori_loop`, so one compiled block serves any
  prompt length, plus one for a shorter last block."""
  logits, cache, _ = observed_prefill(params, tokens_BT, lengths_B, cache, block)
  return logits, cache


def observed_prefill(params: ModelParams, tokens_BT, lengths_B, cache: KVCache, block: int = PREFILL_BLOCK,
                     observe=None, observe_output=None, observed=None):
  """`prefill` that also hands each layer of each block to `observe(observed, layer, start, tokens_Bt, q,
  h) -> (observed, handed)` after its attention (q and the normed input h of the block's tokens;
  `start` its first position), then to `observe_output(observed, layer, start, tokens_Bt, x, handed) ->
  observed` with the layer's output x, and returns what they gathered as a third output. ChunkLLM's
  dense prefill collects its segmentation (from layer 0's output) and its selection layers' queries
  and chunk keys this way, so it runs in the same blocks."""
  cfg = params.config
  B, T = tokens_BT.shape
  S = cache.k.shape[2]
  lengths_B = lengths_B.astype(jnp.int32)
  buffer_valid = jnp.arange(S, dtype=jnp.int32)[None, :] < lengths_B[:, None]
  if S % math.gcd(block, attn.TILE):
    # A buffer not in whole key tiles (a caller's own length; `decoding.buffer_len` always gives
    # whole ones) cannot be read back as a prefix: the prompt runs in one call, as a short one does.
    block = max(block, T)
  n_full = T // block if T > block else 0
  prefix_block = math.gcd(block, attn.TILE)  # earlier blocks are read in the key tiles one call would use

  def run_block(start, tokens_Bt, state, last_BD):
    t = tokens_Bt.shape[1]
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    valid = positions < lengths_B[:, None]

    def attend_fn(state, layer, q, k, v, h):
      kv, obs = state
      idx = layer["index"]
      kv = (write_block(kv[0], idx, start, k), write_block(kv[1], idx, start, v))
      prefix = None if isinstance(start, int) and start == 0 else attn.Prefix(kv[0], kv[1], idx, start, buffer_valid,
                                                                              prefix_block)
      o = attn.causal_attention(q, k, v, positions, valid, layer["window"], scale=cfg.attn_scale,
                                softcap=cfg.attn_softcap, prefix=prefix, query_loop=True)
      handed = None
      if observe is not None:
        obs, handed = observe(obs, layer, start, tokens_Bt, q, h)
      return o, (kv, obs), handed

    def output_fn(state, layer, x, handed):
      kv, obs = state
      return (kv, observe_output(obs, layer, start, tokens_Bt, x, handed)), None

    x, state, _ = model.run_layers(params, model.embed(params, tokens_Bt), positions, attend_fn, state,
                                   None if observe_output is None else output_fn)
    at = lengths_B - 1 - start  # each row's last prompt token, if it lies in this block
    x_last = jnp.take_along_axis(x, jnp.clip(at, 0, t - 1)[:, None, None], axis=1)[:, 0]
    return state, jnp.where(((at >= 0) & (at < t))[:, None], x_last, last_BD)

  carry = (((cache.k, cache.v), observed), jnp.zeros((B, cfg.d_model), params.backbone["embed"].dtype))
  if n_full:
    carry = jax.lax.fori_loop(0, n_full, lambda i, c: run_block(
        i * block, jax.lax.dynamic_slice_in_dim(tokens_BT, i * block, block, axis=1), *c), carry)
  if T > n_full * block:
    carry = run_block(n_full * block, tokens_BT[:, n_full * block:], *carry)
  ((k, v), observed), last_BD = carry
  logits = model.unembed(params, last_BD[:, None])[:, 0]
  return logits, KVCache(k=k, v=v, length=lengths_B), observed


def decode_step(params: ModelParams, tokens_B, cache: KVCache):
  """One token per row at position `cache.length`. Returns logits [B, V] and the cache."""
  cfg = params.config
  pos_B = cache.length

  def attend_fn(kv, layer, q, k, v, h):
    del h
    idx = layer["index"]
    kbuf, vbuf = write_token(kv[0], idx, pos_B, k[:, 0]), write_token(kv[1], idx, pos_B, v[:, 0])
    o = attn.decode_attention(q, kbuf, vbuf, idx, pos_B, layer["window"], scale=cfg.attn_scale,
                              softcap=cfg.attn_softcap)
    return o, (kbuf, vbuf), None

  x, (k, v), _ = model.run_layers(params, model.embed(params, tokens_BT=tokens_B[:, None]),
                                  pos_B[:, None], attend_fn, (cache.k, cache.v))
  logits = model.unembed(params, x)[:, 0]
  return logits, KVCache(k=k, v=v, length=pos_B + 1)
