"""The `pallas` attention path of chunk_generate: the same computation as the XLA path, through
`pallas_kernels`, each kernel where `pallas_kernels.dispatch.implementation` says (Mosaic on TPU,
Triton on GPU where the kernel has a GPU version, interpret mode in tests, XLA elsewhere).

- Compaction: `gather_rows` copies each layer's working slots out of the KV buffer (one DMA per
  token row on TPU).
- Decode: `partials` (`decode_partials`, or its Triton version on GPU) reads the working buffer's
  blocks up to each row's last used slot (block ids, split-K), and the open chunk as one more
  block; the partial results merge by log-sum-exp.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.chunk_decode_attention import combine_splits, partials
from pallas_kernels.gather_chunks import gather_rows


def compact_kernel(work_k_LBWKD, work_v_LBWKD, k_LBSKD, v_LBSKD, work_pos_BW, work_valid_BW, *, interpret: bool):
  """As `chunk_cache.compact_into`, one gather kernel call per layer, written into the working
  buffers in place. Unused slots come out as zeros."""
  src = jnp.where(work_valid_BW, work_pos_BW, -1)
  for layer in range(k_LBSKD.shape[0]):
    k, v = gather_rows(k_LBSKD[layer], v_LBSKD[layer], src, interpret=interpret)
    work_k_LBWKD = work_k_LBWKD.at[layer].set(k.astype(work_k_LBWKD.dtype))
    work_v_LBWKD = work_v_LBWKD.at[layer].set(v.astype(work_v_LBWKD.dtype))
  return work_k_LBWKD, work_v_LBWKD


def decode_attention_kernel(q_B1HD, work_k_BWKD, work_v_BWKD, work_ok_BW, used_B, open_k_BMKD, open_v_BMKD,
                            open_ok_BM, *, scale: float, block: int, interpret: bool):
  """As `chunk_attention.packed_decode_attention`, through the decode kernel. Returns [B, 1, H, D]."""
  B, _, H, D = q_B1HD.shape
  W, M = work_k_BWKD.shape[1], open_k_BMKD.shape[1]
  q = q_B1HD[:, 0]
  n_ids = W // block
  ids = jnp.broadcast_to(jnp.arange(n_ids, dtype=jnp.int32), (B, n_ids))
  work = partials(q, work_k_BWKD, work_v_BWKD, ids, -(-used_B // block), work_ok_BW, scale=scale,
                  block_size=block, n_splits=2, interpret=interpret)
  opened = partials(q, open_k_BMKD, open_v_BMKD, jnp.zeros((B, 1), jnp.int32), jnp.ones((B,), jnp.int32),
                    open_ok_BM, scale=scale, block_size=M, n_splits=1, interpret=interpret)
  parts = [jnp.concatenate([a, b], axis=1) for a, b in zip(work, opened)]
  return combine_splits(*parts).astype(q_B1HD.dtype)[:, None]
