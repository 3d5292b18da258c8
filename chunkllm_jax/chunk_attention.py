"""Decode attention of a chunk-sparse layer, in XLA: the open chunk, then the packed working buffer.

The working buffer is read block by block, flash-decoding style, only up to the last used slot
(a dynamic trip count), so the bytes read per step follow the retained tokens. The result equals
dense masked attention over the same keys (checked in tests/test_chunk_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chunkllm_jax.attention import NEG_INF


def _scores(q_BKGD, k_BSKD, ok_BS, scale, softcap):
  s = jnp.einsum("bkgd,bskd->bkgs", q_BKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  return jnp.where(ok_BS[:, None, None], s, NEG_INF)


def packed_decode_attention(q_B1HD, work_k_LBWKD, work_v_LBWKD, layer, work_ok_BW, n_blocks, open_k_BMKD,
                            open_v_BMKD, open_ok_BM, *, scale: float, softcap: float | None, block: int):
  """One query per row over (open chunk) + (layer `layer`'s working blocks [0, n_blocks)). [B, 1, H, D].

  Blocks are sliced straight out of the stacked working buffer, so unused slots are never read.
  The open chunk always holds the query's own token, so the softmax is never empty.
  """
  B, _, H, D = q_B1HD.shape
  K = work_k_LBWKD.shape[3]
  q = q_B1HD.reshape(B, K, H // K, D)
  s = _scores(q, open_k_BMKD, open_ok_BM, scale, softcap)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("bkgs,bskd->bkgd", p.astype(open_v_BMKD.dtype), open_v_BMKD, preferred_element_type=jnp.float32)

  def body(i, carry):
    m, l, acc = carry
    start = i * block
    kb = jax.lax.dynamic_slice(work_k_LBWKD, (layer, 0, start, 0, 0), (1, B, block, K, D))[0]
    vb = jax.lax.dynamic_slice(work_v_LBWKD, (layer, 0, start, 0, 0), (1, B, block, K, D))[0]
    ok = jax.lax.dynamic_slice_in_dim(work_ok_BW, start, block, axis=1)
    s = _scores(q, kb, ok, scale, softcap)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("bkgs,bskd->bkgd", p.astype(vb.dtype), vb,
                                             preferred_element_type=jnp.float32)
    return m_new, l, acc

  m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, l, acc))
  return (acc / l[..., None]).reshape(B, 1, H, D).astype(q_B1HD.dtype)
