"""The static-shape KV buffer, and the prefill / decode steps that fill and read it.

Shapes are fixed when the buffer is made (`max_len`), so one compiled program serves every
decode step. Rows have their own lengths: row b's next token is written at `length[b]`, and
keys at or beyond a row's length are never visible to it, so right padding cannot leak.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from chunkllm_jax import attention as attn
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
  shape = kv_shape(cfg, batch, max_len)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 length=jnp.zeros((batch,), jnp.int32))


def cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int) -> KVCache:
  """A KVCache of NamedShardings: the buffers by `KV_AXES`, the lengths by batch."""
  kv = shd.logical_to_sharding(mesh, KV_AXES, kv_shape(cfg, batch, max_len))
  return KVCache(k=kv, v=kv, length=shd.batch_sharding(mesh, (batch,)))


def write_prefix(buf_LBSKD, layer_idx, x_BTKD):
  """Writes positions [0, T) of one layer."""
  return jax.lax.dynamic_update_slice(buf_LBSKD, x_BTKD[None].astype(buf_LBSKD.dtype),
                                      (layer_idx, 0, 0, 0, 0))


def write_token(buf_LBSKD, layer_idx, pos_B, x_BKD):
  """Writes one token per row, each at its own position."""
  rows = jnp.arange(pos_B.shape[0])
  return buf_LBSKD.at[layer_idx, rows, pos_B].set(x_BKD.astype(buf_LBSKD.dtype))


def prefill(params: ModelParams, tokens_BT, lengths_B, cache: KVCache):
  """Runs the (right-padded) prompts, fills the buffer. Returns last-token logits [B, V] and the cache."""
  cfg = params.config
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  self_attend = model.self_attend_fn(cfg, positions, valid)

  def attend_fn(kv, layer, q, k, v, h):
    kv = (write_prefix(kv[0], layer["index"], k), write_prefix(kv[1], layer["index"], v))
    o, _, _ = self_attend(None, layer, q, k, v, h)
    return o, kv, None

  x, (k, v), _ = model.run_layers(params, model.embed(params, tokens_BT), positions, attend_fn,
                                  (cache.k, cache.v))
  last_BD = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)
  logits = model.unembed(params, last_BD)[:, 0]
  return logits, KVCache(k=k, v=v, length=lengths_B.astype(jnp.int32))


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
