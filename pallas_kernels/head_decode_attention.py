"""Per-head decode attention: each KV head reads its own slots, wherever they lie in the KV buffer.

The default rule (`ChunkConfig.selection="kv_head"`) has every KV head of a sparse layer choose its
own chunks at every step, so the heads' reads are W slot lists per row, not one working buffer.
`rows_BKW[b, k, w]` is the flat row of slot w of row b's head k in the KV buffer viewed as [N, D]
(the stacked [L, B, S, K, D] buffer, or one layer's [B, S, K, D]: row ((l * B + b) * S + s) * K + k),
`ok_BKW` says which slots are visible, and `used_BK` how many of the first slots any visible one lies
in (a head reads blocks of slots up to it). Query head h reads KV head h // (H / K).

Flash-decoding split: a head's blocks of slots are cut into `n_splits` parts, each giving a partial
(unnormalised acc, max, sum), merged by log-sum-exp (`chunk_decode_attention.combine_splits`); a head
with nothing visible gives zeros.

Where it runs (`pallas_kernels.dispatch`): the GPU kernel (`head_decode_attention_gpu`, Triton) on a GPU
and in interpret mode; elsewhere `head_decode_partials_reference`, the same partials by an XLA gather
(one split). A TPU kernel would fetch each slot's row (one head's D features) by a DMA of its own; XLA's gather
runs there. The library's XLA path (`head_selection.head_attention` without the kernel) folds
gathered blocks one at a time instead of this reference's whole gather.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from pallas_kernels.dispatch import NEG_INF, check_operands, implementation, require


def check_head_inputs(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK):
  """Shapes the per-head decode needs. Returns (B, K, G, D, W)."""
  B, K, G, D = q_BKGD.shape
  W = rows_BKW.shape[-1]
  chex.assert_shape([rows_BKW, ok_BKW], (B, K, W))
  chex.assert_shape(used_BK, (B, K))
  chex.assert_equal_shape([k_ND, v_ND])
  chex.assert_rank(k_ND, 2)
  require(k_ND.shape[1] == D, f"head_decode_attention: rows of {k_ND.shape[1]} features for queries of {D}")
  check_operands("head_decode_attention", floats=[("q", q_BKGD), ("k", k_ND)], same_dtype=[("k", k_ND), ("v", v_ND)],
                 masks=[("ok", ok_BKW)], ints=[("rows", rows_BKW), ("used", used_BK)])
  return B, K, G, D, W


def softcapped(s, softcap: float | None):
  return s if softcap is None else jnp.tanh(s / softcap) * softcap


def head_decode_partials_reference(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK, *, scale: float,
                                   softcap: float | None = None):
  """One split's partials by an XLA gather of every slot: acc [B, 1, K, G, D], max and sum [B, 1, K, G]."""
  B, K, G, D, W = check_head_inputs(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK)
  ok_BKW = ok_BKW & (jnp.arange(W) < used_BK[..., None])
  k_BKWD, v_BKWD = k_ND[rows_BKW], v_ND[rows_BKW]
  s_BKGW = softcapped(jnp.einsum("bkgd,bkwd->bkgw", q_BKGD, k_BKWD, preferred_element_type=jnp.float32) * scale,
                      softcap)
  s_BKGW = jnp.where(ok_BKW[:, :, None], s_BKGW, NEG_INF)
  m_BKG = s_BKGW.max(-1)
  p_BKGW = jnp.where(ok_BKW[:, :, None], jnp.exp(s_BKGW - m_BKG[..., None]), 0.0)
  acc_BKGD = jnp.einsum("bkgw,bkwd->bkgd", p_BKGW.astype(v_BKWD.dtype), v_BKWD, preferred_element_type=jnp.float32)
  return acc_BKGD[:, None], m_BKG[:, None], p_BKGW.sum(-1)[:, None]


def kernel_fits(head_dim: int) -> bool:
  """The GPU kernel gathers whole rows of the buffer, so it takes the head dim as it is: a power of 2
  of at least 16 (Triton's tensor sizes and dot widths). Other head dims run the XLA path."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def runs_kernel(head_dim: int, interpret=False, backend: str | None = None) -> bool:
  """Whether `head_decode_partials` runs the GPU kernel (interpreted where `interpret` is set) here."""
  return kernel_fits(head_dim) and implementation(interpret, backend, tpu_version=False) == "gpu"


def head_decode_partials(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK, *, scale: float,
                         softcap: float | None = None, block_size: int = 128, n_splits: int | None = None,
                         interpret=False, backend: str | None = None):
  """Dispatcher for the partials: the GPU kernel where `runs_kernel`, else the reference (one split).
  Returns acc [B, P, K, G, D], max and sum [B, P, K, G] (float32). n_splits None: the kernel's
  `split_count`."""
  if runs_kernel(q_BKGD.shape[-1], interpret, backend):
    from pallas_kernels.head_decode_attention_gpu import head_decode_partials_gpu  # it imports this module

    return head_decode_partials_gpu(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK, scale=scale, softcap=softcap,
                                    block_size=block_size, n_splits=n_splits, interpret=interpret)
  return head_decode_partials_reference(q_BKGD, k_ND, v_ND, rows_BKW, ok_BKW, used_BK, scale=scale,
                                        softcap=softcap)
