"""Dense grouped-query attention in plain jnp: the reference every sparse path is checked against.

Masks are never materialised as `[T, S]` arrays in HBM for long inputs: prefill attention runs
over query blocks, and each block reads only the key prefix that causality lets it see.
"""

from __future__ import annotations

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
