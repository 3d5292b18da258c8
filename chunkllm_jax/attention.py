"""Dense grouped-query attention in plain jnp: the reference every sparse path is checked against.

Masks are never materialised as `[T, S]` arrays in HBM for long inputs: prefill attention runs
over query blocks, and each block reads only the key prefix that causality lets it see. Decode
reads the stacked KV buffer block by block, flash-decoding style, only up to the longest row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN
NO_WINDOW = 2**30  # "window" of a full-attention layer


def visible(q_pos_BT, k_pos_BS, k_valid_BS, window):
  """Which keys each query may read: causal, inside the sliding window, not padding. [B, T, S]."""
  dist = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  return (dist >= 0) & (dist < window) & k_valid_BS[:, None, :]


def attend(q_BTHD, k_BSKD, v_BSKD, mask_BTS, *, scale: float, softcap: float | None = None):
  """Softmax attention with GQA: head h reads kv head h // (H / K). Returns [B, T, H, D]."""
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                       preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
  o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                       preferred_element_type=jnp.float32)
  return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)


def causal_attention(q_BTHD, k_BTKD, v_BTKD, positions_BT, valid_BT, window, *, scale: float,
                     softcap: float | None = None, block_q: int = 512):
  """Self-attention over one sequence (prefill / training forward).

  For T > block_q, query blocks are unrolled with static key prefixes, so block i reads only
  keys [0, (i+1) * block_q): half the work of a full T x T product, and no T x T buffer.
  """
  T = q_BTHD.shape[1]
  if T <= block_q:
    mask = visible(positions_BT, positions_BT, valid_BT, window)
    return attend(q_BTHD, k_BTKD, v_BTKD, mask, scale=scale, softcap=softcap)
  outs = []
  for start in range(0, T, block_q):
    end = min(start + block_q, T)
    mask = visible(positions_BT[:, start:end], positions_BT[:, :end], valid_BT[:, :end], window)
    outs.append(attend(q_BTHD[:, start:end], k_BTKD[:, :end], v_BTKD[:, :end], mask,
                       scale=scale, softcap=softcap))
  return jnp.concatenate(outs, axis=1)


DECODE_BLOCK = 512  # keys per step of the decode loop; `generate.buffer_len` allocates whole blocks


def decode_block_size(buffer_len: int) -> int:
  return math.gcd(DECODE_BLOCK, buffer_len)


def decode_scores(q_BKGD, k_BSKD, ok_BS, scale: float, softcap: float | None):
  s = jnp.einsum("bkgd,bskd->bkgs", q_BKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  return jnp.where(ok_BS[:, None, None], s, NEG_INF)


def online_softmax_init(q_BKGD, k_BSKD, v_BSKD, ok_BS, scale, softcap):
  """(max, sum, unnormalised output) of one dense segment: the start of an online softmax."""
  s = decode_scores(q_BKGD, k_BSKD, ok_BS, scale, softcap)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  acc = jnp.einsum("bkgs,bskd->bkgd", p.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32)
  return m, jnp.sum(p, axis=-1), acc


def decode_over_blocks(q_BKGD, k_LBSKD, v_LBSKD, layer, ok_fn, n_blocks, block: int, carry, *, scale: float,
                       softcap: float | None):
  """Folds key blocks [0, n_blocks) of one layer into an online softmax `carry` = (max, sum, acc).

  Each block is sliced straight out of the stacked buffer (no copy of the layer), and
  `ok_fn(start) -> [B, block]` says which of its keys are visible.
  """
  B, K, D = k_LBSKD.shape[1], k_LBSKD.shape[3], k_LBSKD.shape[4]

  def body(i, carry):
    m, l, acc = carry
    start = i * block
    kb = jax.lax.dynamic_slice(k_LBSKD, (layer, 0, start, 0, 0), (1, B, block, K, D))[0]
    vb = jax.lax.dynamic_slice(v_LBSKD, (layer, 0, start, 0, 0), (1, B, block, K, D))[0]
    s = decode_scores(q_BKGD, kb, ok_fn(start), scale, softcap)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    acc = acc * corr[..., None] + jnp.einsum("bkgs,bskd->bkgd", p.astype(vb.dtype), vb,
                                             preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc

  return jax.lax.fori_loop(0, n_blocks, body, carry)


def decode_attention(q_B1HD, k_LBSKD, v_LBSKD, layer, pos_B, window, *, scale: float,
                     softcap: float | None = None):
  """Dense decode attention of one query per row over the stacked buffer, keys [0, pos] (and the
  sliding window). Reads blocks only up to the longest row. Returns [B, 1, H, D]."""
  B, _, H, D = q_B1HD.shape
  K, S = k_LBSKD.shape[3], k_LBSKD.shape[2]
  block = decode_block_size(S)
  q = q_B1HD.reshape(B, K, H // K, D)

  def ok_fn(start):
    kpos = start + jnp.arange(block)[None]
    dist = pos_B[:, None] - kpos
    return (dist >= 0) & (dist < window)

  init = (jnp.full((B, K, H // K), NEG_INF, jnp.float32), jnp.zeros((B, K, H // K), jnp.float32),
          jnp.zeros((B, K, H // K, D), jnp.float32))
  n_blocks = jnp.max(pos_B) // block + 1
  m, l, acc = decode_over_blocks(q, k_LBSKD, v_LBSKD, layer, ok_fn, n_blocks, block, init, scale=scale,
                                 softcap=softcap)
  return (acc / l[..., None]).reshape(B, 1, H, D).astype(q_B1HD.dtype)
