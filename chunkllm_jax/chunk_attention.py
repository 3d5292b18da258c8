"""Decode attention of a chunk-sparse layer, in XLA: the open chunk, then the packed working buffer.

The working buffer is read block by block, flash-decoding style, only up to the last used slot
(a dynamic trip count), so the bytes read per step follow the retained tokens. The result equals
dense masked attention over the same keys (checked in tests/test_chunk_attention.py).
"""

from __future__ import annotations

import jax

from chunkllm_jax import attention as attn


def packed_decode_attention(q_B1HD, work_k_LBWKD, work_v_LBWKD, layer, work_ok_BW, n_slots, open_k_BMKD,
                            open_v_BMKD, open_ok_BM, *, scale: float, softcap: float | None,
                            blocks: tuple[int, ...]):
  """One query per row over (open chunk) + (layer `layer`'s working slots [0, n_slots)). [B, 1, H, D].

  `n_slots` (traced) is a multiple of `blocks[-1]`; the slots are read in blocks of those sizes
  (`attention.decode_over_blocks`), sliced straight out of the stacked working buffer, so unused
  slots are never read.
  The open chunk always holds the query's own token, so the softmax is never empty.
  """
  q = attn.split_heads(q_B1HD, work_k_LBWKD.shape[3])
  ok = open_ok_BM[:, None, None, None]
  carry = attn.fold(attn.fold_init(*q.shape), attn.scores(q, open_k_BMKD, ok, scale=scale, softcap=softcap), ok,
                    open_v_BMKD)
  ok_fn = lambda start, size: jax.lax.dynamic_slice_in_dim(work_ok_BW, start, size, axis=1)
  carry = attn.decode_over_blocks(q, attn.stacked_blocks(work_k_LBWKD, work_v_LBWKD, layer), ok_fn, 0, n_slots, carry,
                                  blocks=blocks, scale=scale, softcap=softcap)
  return attn.merge_heads(attn.fold_finish(carry)[0]).astype(q_B1HD.dtype)
