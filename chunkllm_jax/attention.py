"""Dense grouped-query attention in plain jnp: the reference every sparse path is checked against.

Masks are never materialised as `[T, S]` arrays in HBM for long inputs: prefill attention runs
over query blocks, and each block reads only the key prefix that causality lets it see. Decode
reads the stacked KV buffer block by block, flash-decoding style, only up to the longest row.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN
NO_WINDOW = 2**30  # "window" of a full-attention layer


def visible(q_pos_BT, k_pos_BS, k_valid_BS, window):
  """Which keys each query may read: causal, inside the sliding window, not padding. [B, T, S]."""
  dist = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  return (dist >= 0) & (dist < window) & k_valid_BS[:, None, :]


# ----------------------------------------------------------------------------------------------
# The one fold: every XLA attention path (dense prefill, decode, chunk-sparse prefill and decode,
# the teacher) scores with `scores` and folds key blocks into an online softmax with `fold`.


def scores(q_BKGQD, k_BSKD, ok, *, scale: float, softcap: float | None = None):
  """Masked attention logits with GQA (query head (k, g) reads kv head k), soft-capped where the model
  says: float32 [B, K, G, Q, S]. `ok` broadcasts to that shape; masked entries are NEG_INF."""
  s = jnp.einsum("bkgqd,bskd->bkgqs", q_BKGQD, k_BSKD, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  return jnp.where(ok, s, NEG_INF)


class Fold(NamedTuple):
  """An online softmax over the key blocks folded so far: running max, sum and unnormalised output."""

  m: jnp.ndarray  # [B, K, G, Q] float32
  l: jnp.ndarray  # [B, K, G, Q] float32
  acc: jnp.ndarray  # [B, K, G, Q, D] float32


def fold_init(B: int, K: int, G: int, Q: int, D: int) -> Fold:
  return Fold(jnp.full((B, K, G, Q), NEG_INF, jnp.float32), jnp.zeros((B, K, G, Q), jnp.float32),
              jnp.zeros((B, K, G, Q, D), jnp.float32))


def softmax_step(m, l, s, ok):
  """One key block's step of an online softmax: (the new running max, the factor that rescales
  everything summed before this block, the block's unnormalised probabilities, the new sum).
  `fold` accumulates values with it; `chunk_prefill.attention_rows` accumulates chunk mass."""
  m_new = jnp.maximum(m, s.max(-1))
  corr = jnp.exp(m - m_new)
  p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
  return m_new, corr, p, l * corr + p.sum(-1)


def fold(carry: Fold, s_BKGQS, ok, v_BSKD) -> Fold:
  """Folds one key block (its `scores`, the same `ok`, its values) into the online softmax."""
  m_new, corr, p, l_new = softmax_step(carry.m, carry.l, s_BKGQS, ok)
  acc = carry.acc * corr[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_BSKD.dtype), v_BSKD,
                                                 preferred_element_type=jnp.float32)
  return Fold(m_new, l_new, acc)


def fold_finish(carry: Fold):
  """(output [B, K, G, Q, D] float32, log-sum-exp [B, K, G, Q]); a query that saw no key gives zeros."""
  return carry.acc / jnp.where(carry.l > 0, carry.l, 1.0)[..., None], carry.m + jnp.log(carry.l)


def split_heads(q_BTHD, K: int):
  """[B, T, H, D] -> [B, K, G, T, D]: query heads grouped by the kv head they read."""
  B, T, H, D = q_BTHD.shape
  return jnp.einsum("btkgd->bkgtd", q_BTHD.reshape(B, T, K, H // K, D))


def merge_heads(o_BKGTD):
  """[B, K, G, T, D] -> [B, T, H, D]."""
  B, K, G, T, D = o_BKGTD.shape
  return jnp.einsum("bkgtd->btkgd", o_BKGTD).reshape(B, T, K * G, D)


def attend(q_BTHD, k_BSKD, v_BSKD, mask_BTS, *, scale: float, softcap: float | None = None):
  """Softmax attention with GQA over one key block: head h reads kv head h // (H / K). [B, T, H, D].
  The mask is [B, T, S], or [B, K, T, S] for a mask of its own per kv head."""
  q = split_heads(q_BTHD, k_BSKD.shape[2])
  ok = mask_BTS[:, None, None] if mask_BTS.ndim == 3 else mask_BTS[:, :, None]
  s = scores(q, k_BSKD, ok, scale=scale, softcap=softcap)
  o, _ = fold_finish(fold(fold_init(*q.shape), s, ok, v_BSKD))
  return merge_heads(o).astype(q_BTHD.dtype)


TILE = 256  # queries and keys per score tile of `causal_attention`


class Prefix(NamedTuple):
  """Keys already in the stacked KV buffer that every query of a `causal_attention` call follows: the
  earlier blocks of a prompt prefilled block by block (`kv_cache.prefill`)."""

  k: jnp.ndarray  # [L, B, S, K, D]
  v: jnp.ndarray  # [L, B, S, K, D]
  layer: jnp.ndarray  # int32: which layer of the buffer
  length: jnp.ndarray  # int32, a multiple of `block`: buffer slots [0, length) are the prefix
  valid: jnp.ndarray  # [B, S] bool: slots that hold a key (not padding)
  block: int  # slots per key tile read from the buffer; S must be a multiple of it


def _fold_tiles(carry: Fold, q, q_pos, first_visible, count, tile_pos, tile_kv, window, *, scale, softcap):
  """Folds key tiles 0..count-1 into one query block's online softmax. `tile_pos(j)` gives a tile's
  (positions, valid) and `tile_kv(j)` its (keys, values), read only when the tile is folded. A tile
  wholly before every query's sliding window is skipped by a `lax.cond` (the window may be traced,
  as it is in the scan over layers), and one that every query sees whole is folded unmasked."""

  def body(j, carry):
    k_pos, k_valid = tile_pos(j)

    def step(carry, ok):
      k, v = tile_kv(j)
      return fold(carry, scores(q, k, ok, scale=scale, softcap=softcap), ok, v)

    masked = lambda c: step(c, visible(q_pos, k_pos, k_valid, window)[:, None, None])
    # Below the diagonal and inside every window, a tile needs no mask: 18% faster at 8K.
    every_key_visible = ((jnp.max(k_pos) <= jnp.min(q_pos)) & (jnp.max(q_pos) - jnp.min(k_pos) < window)
                         & jnp.all(k_valid))
    fold_tile = lambda c: jax.lax.cond(every_key_visible, lambda c: step(c, True), masked, c)
    return jax.lax.cond(jnp.max(k_pos) >= first_visible, fold_tile, lambda c: c, carry)

  return jax.lax.fori_loop(0, count, body, carry)


def causal_attention(q_BTHD, k_BTKD, v_BTKD, positions_BT, valid_BT, window, *, scale: float,
                     softcap: float | None = None, block_q: int = TILE, block_k: int = TILE,
                     return_lse: bool = False, prefix: Prefix | None = None, query_loop: bool = False):
  """Self-attention over one sequence (prefill, the training forward, the distillation teacher).

  Query blocks are unrolled, and each folds the key blocks up to its own end into an online
  softmax: about half the work of a full T x T product, in score tiles of [block_q, block_k] that
  stay in cache (one [block_q, T] row of scores per query block measured 3x slower at 8K on the
  CPU). The loop over key blocks has a static count, so it differentiates. Keys past a query
  block's last index are never read, so positions must not run ahead of indices (right padding,
  or positions = indices).

  With `prefix`, each query block first folds the prefix's tiles of the KV buffer, in order (a
  loop with a traced count: prefill only, no gradient), then its own: a prompt prefilled block by
  block folds the same tiles in the same order as in one call, so it gets the same output while
  only one block's activations are live.

  With `query_loop` (and T a multiple of `block_q`), the query blocks run under `lax.map` instead,
  each folding a traced number of key tiles: one compiled query block instead of T / block_q, for
  the same tiles in the same order. Prefill uses it: its programs hold a quarter of the attention's
  kernels (compiled code stays resident for the whole generation), and it needs no gradient, which
  the traced count would not give.

  Returns [B, T, H, D], and with `return_lse` also the log-sum-exp [B, K, G, T] float32.
  """
  B, T = q_BTHD.shape[:2]
  K = k_BTKD.shape[2]
  block_q = min(block_q, T)
  block_k = min(block_k, T)
  pad = -T % block_k
  k_pad, v_pad = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (k_BTKD, v_BTKD))
  pos_pad = jnp.pad(positions_BT, [(0, 0), (0, pad)])
  valid_pad = jnp.pad(valid_BT, [(0, 0), (0, pad)])
  key_block = lambda x, j: jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=1)
  own_pos = lambda j: (key_block(pos_pad, j), key_block(valid_pad, j))
  own_kv = lambda j: (key_block(k_pad, j), key_block(v_pad, j))
  if prefix is not None:
    pb = prefix.block
    if prefix.k.shape[2] % pb:
      raise ValueError(f"a prefix is read in key blocks of {pb}: the buffer's {prefix.k.shape[2]} slots must "
                       "be a multiple of it")
    buffer_tile = lambda x, j: jax.lax.dynamic_slice(x, (prefix.layer, 0, j * pb, 0, 0), (1, B, pb, K, x.shape[-1]))[0]
    prefix_pos = lambda j: (jnp.broadcast_to(j * pb + jnp.arange(pb, dtype=jnp.int32), (B, pb)),
                            jax.lax.dynamic_slice_in_dim(prefix.valid, j * pb, pb, axis=1))
    prefix_kv = lambda j: (buffer_tile(prefix.k, j), buffer_tile(prefix.v, j))

  def query_block(start, size: int):
    """One query block's output [B, size, H, D] and log-sum-exp; `start` may be traced."""
    q = split_heads(jax.lax.dynamic_slice_in_dim(q_BTHD, start, size, axis=1), K)
    q_pos = jax.lax.dynamic_slice_in_dim(positions_BT, start, size, axis=1)
    first_visible = jnp.min(q_pos) - window + 1  # no key before this is inside any query's window
    tiles = functools.partial(_fold_tiles, q=q, q_pos=q_pos, first_visible=first_visible, window=window,
                              scale=scale, softcap=softcap)
    carry = fold_init(*q.shape)
    if prefix is not None:
      carry = tiles(carry, count=prefix.length // prefix.block, tile_pos=prefix_pos, tile_kv=prefix_kv)
    o, lse = fold_finish(tiles(carry, count=(start + size + block_k - 1) // block_k, tile_pos=own_pos, tile_kv=own_kv))
    return merge_heads(o).astype(q_BTHD.dtype), lse

  if query_loop and T % block_q == 0 and T > block_q:
    o_NBtHD, lse_NBKGt = jax.lax.map(lambda i: query_block(i * block_q, block_q),
                                     jnp.arange(T // block_q, dtype=jnp.int32))
    out = jnp.einsum("nbthd->bnthd", o_NBtHD).reshape(q_BTHD.shape)
    lse = jnp.einsum("nbkgt->bkgnt", lse_NBKGt).reshape(*lse_NBKGt.shape[1:4], T)
  else:
    blocks = [query_block(start, min(block_q, T - start)) for start in range(0, T, block_q)]
    out = jnp.concatenate([o for o, _ in blocks], axis=1)
    lse = jnp.concatenate([lse for _, lse in blocks], axis=3)
  return (out, lse) if return_lse else out


DECODE_BLOCKS = (2048, 256)  # keys per step of the decode loop: blocks of 2048 while that many
#   remain, then of 256, so a step reads at most 255 keys past the longest row. With the packed
#   query, against the batched fold in blocks of 256 that ran before: 1.97x faster at 8K and
#   1.83x at 32K on the CPU (1024: 1.40x / 1.65x; 4096: 1.97x / 1.72x), nothing else running
#   (bench/decode_block.py, bench/RESULTS_chunk.md). `decoding.buffer_len` allocates whole
#   blocks of the smallest size.


def decode_blocks(buffer_len: int, blocks: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """The block sizes the decode loop uses over a buffer of this length (`DECODE_BLOCKS` unless
  given): the smallest divides the buffer, every larger one is a multiple of it, and each is
  shorter than the buffer.

  A block as long as the buffer is sliced at the same place on every trip, so XLA hoists the slice
  out of the loop and fuses it with the token's write, which then needs the buffer before the write:
  it copied the whole stacked buffer twice a layer, and a decode step over a 2048-slot buffer ran
  2.9-8.2x slower (tests/test_decode_in_place.py, bench/RESULTS_generate.md)."""
  blocks = blocks or DECODE_BLOCKS
  small = math.gcd(blocks[-1], buffer_len)
  if small == buffer_len > 1:  # then buffer_len divides blocks[-1]: a power of two when that is one
    small = math.gcd(small, buffer_len // 2)
  return tuple(b for b in blocks[:-1] if b % small == 0 and b < buffer_len) + (small,)


def pack_query(q_BKG1D):
  """One query per row as a block-diagonal [B, K*D, K*G] matrix (zeros off each kv head's block).

  A key block [B, S, K*D], read as it lies in the buffer, times this gives every head's scores in
  one plain matmul. The batched form (`scores`) moves the kv-head axis in front of the keys first,
  and XLA's CPU dot then read a decode step's K/V at 2.4-2.8 GiB/s; the plain matmul does K times
  the multiply-adds but, over 2048-key blocks, reads K/V at 4.4-5.5 GiB/s (bench/decode_block.py).
  At one query per row the multiply-adds stay far below what the reads cost."""
  B, K, G, _, D = q_BKG1D.shape
  eye = jnp.eye(K, dtype=q_BKG1D.dtype)
  return jnp.einsum("bkgd,kj->bjdkg", q_BKG1D[:, :, :, 0], eye).reshape(B, K * D, K * G)


def fold_packed(carry: Fold, q_BCH, k_BSKD, v_BSKD, ok_BS, *, scale: float, softcap: float | None) -> Fold:
  """`fold` of one key block for one query per row, with the query packed by `pack_query`: the same
  online softmax (`softmax_step`), its two products as plain matmuls over the block as it lies."""
  B, S, K, D = k_BSKD.shape
  G = q_BCH.shape[-1] // K
  s_BSH = jnp.einsum("bsc,bch->bsh", k_BSKD.reshape(B, S, K * D), q_BCH,
                     preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s_BSH = jnp.tanh(s_BSH / softcap) * softcap
  ok = ok_BS[:, None, None, None]
  s = jnp.where(ok, jnp.einsum("bskg->bkgs", s_BSH.reshape(B, S, K, G))[:, :, :, None], NEG_INF)
  m_new, corr, p, l_new = softmax_step(carry.m, carry.l, s, ok)
  p_BSH = jnp.einsum("bkgs->bskg", p[:, :, :, 0]).reshape(B, S, K * G).astype(v_BSKD.dtype)
  o_BHC = jnp.einsum("bsh,bsc->bhc", p_BSH, v_BSKD.reshape(B, S, K * D), preferred_element_type=jnp.float32)
  o_BKGD = jnp.einsum("bkgjd,kj->bkgd", o_BHC.reshape(B, K, G, K, D), jnp.eye(K, dtype=jnp.float32))
  return Fold(m_new, l_new, carry.acc * corr[..., None] + o_BKGD[:, :, :, None])


def stacked_blocks(k_LBSKD, v_LBSKD, layer):
  """`decode_over_blocks`'s reader of one layer of a stacked buffer: each block is sliced straight out
  of it (no copy of the layer)."""
  _, B, _, K, D = k_LBSKD.shape

  def read(start, size):
    return tuple(jax.lax.dynamic_slice(buf, (layer, 0, start, 0, 0), (1, B, size, K, D))[0]
                 for buf in (k_LBSKD, v_LBSKD))
  return read


def window_positions(start_B, size: int, buffer_len: int):
  """The positions [B, size] that `row_window` reads for these starts: each start clamped to fit the buffer."""
  return jnp.clip(start_B, 0, buffer_len - size)[:, None] + jnp.arange(size)


def row_window(buf_LBSKD, layer, start_B, size: int):
  """Each row's window [start, start + size) of one layer of a stacked buffer (start clamped to fit):
  [B, size, K, D], and the positions it holds [B, size] (`window_positions`).

  Sliced straight out of the stacked buffer, so nothing but the window is read."""
  _, B, S, K, D = buf_LBSKD.shape
  pos = window_positions(start_B, size, S)
  win = jax.vmap(lambda b, s: jax.lax.dynamic_slice(buf_LBSKD, (layer, b, s, 0, 0), (1, 1, size, K, D))[0, 0])(
      jnp.arange(B), pos[:, 0])
  return win, pos


def decode_over_blocks(q_BKG1D, read_fn, ok_fn, first, end, carry: Fold, *,
                       blocks: tuple[int, ...], scale: float, softcap: float | None) -> Fold:
  """Folds keys [first, end) into `carry` (one query per row: Q = 1).

  `first` and `end` (traced) are multiples of `blocks[-1]`, and each size in `blocks` (largest
  first) is a multiple of the next: the loop takes the largest blocks that fit, then smaller ones.
  `read_fn(start, size) -> (keys, values) [B, size, K, D]` reads a block (`stacked_blocks`, or a
  gather), and `ok_fn(start, size) -> [B, size]` says which of its keys are visible.
  """
  assert all(b % blocks[-1] == 0 for b in blocks), blocks
  q_BCH = pack_query(q_BKG1D)
  start = first
  for size in blocks:
    def body(i, carry, size=size, base=start):
      s0 = base + i * size
      kb, vb = read_fn(s0, size)
      return fold_packed(carry, q_BCH, kb, vb, ok_fn(s0, size), scale=scale, softcap=softcap)

    n = (end - start) // size
    carry = jax.lax.fori_loop(0, n, body, carry)
    start = start + n * size
  return carry


def decode_attention(q_B1HD, k_LBSKD, v_LBSKD, layer, pos_B, window, *, scale: float,
                     softcap: float | None = None):
  """Dense decode attention of one query per row over the stacked buffer, keys [0, pos] (and the
  sliding window). Reads blocks only from the first inside any row's window to the longest row.
  Returns [B, 1, H, D]."""
  K, S = k_LBSKD.shape[3], k_LBSKD.shape[2]
  blocks = decode_blocks(S)
  small = blocks[-1]
  q = split_heads(q_B1HD, K)

  def ok_fn(start, size):
    dist = pos_B[:, None] - (start + jnp.arange(size)[None])
    return (dist >= 0) & (dist < window)

  first = jnp.maximum(jnp.min(pos_B) - window + 1, 0) // small * small
  end = (jnp.max(pos_B) // small + 1) * small
  carry = decode_over_blocks(q, stacked_blocks(k_LBSKD, v_LBSKD, layer), ok_fn, first, end, fold_init(*q.shape),
                             blocks=blocks, scale=scale, softcap=softcap)
  return merge_heads(fold_finish(carry)[0]).astype(q_B1HD.dtype)
