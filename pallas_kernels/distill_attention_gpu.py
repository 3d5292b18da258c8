"""Distillation attention on GPU: the Triton-lowered Pallas version of `distill_attention`
(same arguments, same (o, P); forward only). Memory O(T * max_chunks), never T x T.

Why Triton and not Mosaic GPU: see `chunk_decode_attention_gpu` (and `dispatch`).

Structure, and why not the TPU kernel's. The TPU kernel keeps, per query block, the output of all
H heads [H, block_q, D] and the chunk bins [block_q, max_chunks] in VMEM scratch across its key
steps. A Triton program keeps its state in registers and has no scratch across grid steps, so
all heads' outputs plus a max_chunks-wide bin row per query would spill. Two kernels instead:

1. Flash attention, grid (B, query tiles, H): one query head per program, as jax's
   `ops/gpu/attention.py`, causal key tiles in a `fori_loop`. It writes the output (normalised at
   the end, as flash attention does; the TPU kernel normalises p first, which differs only in
   rounding) and the row max m and sum l per (head, query).
2. Chunk bins, grid (B, query tiles, chunk tiles): a program owns `chunk_tile` columns of P for
   its query tile. Chunk ids are non-decreasing along the row, so the keys of those chunks are a
   run of key tiles, [lo, hi), computed beforehand from the chunk ids and passed as ordinary
   int32 inputs (no scalar prefetch in Triton). Over that run it recomputes the scores of every
   head (a `fori_loop` over kv heads, a static loop over their G query heads), normalises them
   with pass 1's m and l, sums them over heads and bins them into its columns with a
   one-hot [tile_k, chunk_tile] dot. State: one [tile_q, tile_k] sum and one [tile_q, chunk_tile]
   bin tile. Summed over chunk tiles the runs cover the causal key tiles about once (a key tile
   that straddles two chunk tiles is read by both), so pass 2 costs about one QK pass over all
   heads, as the TPU kernel's second pass; chunk tiles past the query tile's last chunk read
   nothing (causality) and write zeros.
The binning dot runs at `Precision.HIGHEST` (IEEE f32 in Triton, no tensor cores): at the
default precision Triton rounds the f32 probabilities to TF32 (~1e-3 relative). Its cost is
tile_q * tile_k * chunk_tile FMAs per key tile, against H * tile_q * tile_k * D for the scores.

Tiles sized for registers, not the caller's blocks (the teacher uses 256 x 512): a block of
`block_q` / `block_k` tokens is cut into tiles of `tile_q` / `tile_k` where they divide it. The
Triton lowering wants power-of-2 tensors and dots at least 16 wide: a tile or head dim that is
not a power of 2 of at least 16 is padded (tokens with chunk id -1, zero features; a copy of
Q, K, V), and max_chunks is padded to whole chunk tiles.

Only the interpret mode and the lowering to Triton IR were checked here (no GPU): the Triton
compile (registers, shared memory) and the speed are unchecked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_prefill_attention_gpu import (default_num_warps, pad_axis, sub_tile,
                                                        tiled, triton_size, untiled)
from pallas_kernels.dispatch import NEG_INF, require
from pallas_kernels.distill_attention import check_distill_inputs, renormalise


def _causal_tiles(i, tile_q: int, tile_k: int):
  """Key tiles [0, hi) that hold a key at or before the last query of query tile i."""
  return lax.div(i * tile_q + tile_q - 1, tile_k) + 1  # lax.div: program ids are int32


def _masked_scores(q_TD, k_SD, vis_TS, *, scale: float, softcap: float | None):
  s_TS = lax.dot_general(q_TD, k_SD, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s_TS = jnp.tanh(s_TS / softcap) * softcap
  return jnp.where(vis_TS, s_TS, NEG_INF)


def _visible(q_pos_T1, ck_ref, start, kt, *, tile_k: int, tile_k_padded: int):
  """Causal and not padding, on key tile kt: ([tq, tkp] mask, [tkp] chunk ids, [tkp] positions)."""
  ck_S = ck_ref[pl.ds(start, tile_k_padded)]
  # padding tokens of a tile have chunk id -1: their positions do not matter
  k_pos_S = kt * tile_k + jnp.arange(tile_k_padded, dtype=jnp.int32)
  return (k_pos_S[None, :] <= q_pos_T1) & (ck_S[None, :] >= 0), ck_S, k_pos_S


def _flash_kernel(q_ref, k_ref, v_ref, ck_ref,  # [tq, D], [Sk, D] x2 (one kv head), [Sk]
                  o_ref, m_ref, l_ref,  # [tq, D], [tq], [tq]
                  *, scale: float, softcap: float | None, tile_q: int, tile_k: int,
                  tile_k_padded: int, n_key_tiles: int):
  """Pass 1: causal flash attention of one query head on one query tile, and its m, l."""
  f32 = jnp.float32
  tq, D = q_ref.shape
  i = pl.program_id(1)
  q_pos_T1 = (i * tile_q + jnp.arange(tq, dtype=jnp.int32))[:, None]
  q_TD = q_ref[...]

  def step(kt, carry):
    acc_TD, m_T, l_T = carry
    start = kt * tile_k_padded
    vis_TS, _, _ = _visible(q_pos_T1, ck_ref, start, kt, tile_k=tile_k,
                            tile_k_padded=tile_k_padded)
    s_TS = _masked_scores(q_TD, k_ref[pl.ds(start, tile_k_padded), :], vis_TS, scale=scale,
                          softcap=softcap)
    m_new_T = jnp.maximum(m_T, s_TS.max(-1))
    p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_new_T[:, None]), 0.0)
    corr_T = jnp.exp(m_T - m_new_T)
    v_SD = v_ref[pl.ds(start, tile_k_padded), :]
    pv_TD = jnp.dot(p_TS.astype(v_SD.dtype), v_SD, preferred_element_type=f32)
    return corr_T[:, None] * acc_TD + pv_TD, m_new_T, corr_T * l_T + p_TS.sum(-1)

  init = (jnp.zeros((tq, D), f32), jnp.full((tq,), NEG_INF, f32), jnp.zeros((tq,), f32))
  hi = jnp.minimum(_causal_tiles(i, tile_q, tile_k), n_key_tiles)
  acc_TD, m_T, l_T = lax.fori_loop(0, hi, step, init)
  o_ref[...] = (acc_TD / jnp.where(l_T > 0, l_T, 1.0)[:, None]).astype(o_ref.dtype)
  m_ref[...] = m_T
  l_ref[...] = l_T


def _bins_kernel(lo_ref, hi_ref,  # [], []: this chunk tile's run of key tiles
                 q_ref, k_ref, ck_ref,  # [tq, K, G, D], [Sk, K, D], [Sk]
                 m_ref, l_ref,  # [K, G, tq]: pass 1's statistics
                 mass_ref,  # [tq, Ct]: this chunk tile's columns
                 *, scale: float, softcap: float | None, n_sink: int, tile_q: int, tile_k: int,
                 tile_k_padded: int, n_key_tiles: int):
  """Pass 2: head-averaged probabilities of one query tile, binned into one chunk tile."""
  f32 = jnp.float32
  tq, K, G, _ = q_ref.shape
  Ct = mass_ref.shape[1]
  i = pl.program_id(1)
  c0 = pl.program_id(2) * Ct
  q_pos_T1 = (i * tile_q + jnp.arange(tq, dtype=jnp.int32))[:, None]

  def step(kt, bins_TC):
    start = kt * tile_k_padded
    vis_TS, ck_S, k_pos_S = _visible(q_pos_T1, ck_ref, start, kt, tile_k=tile_k,
                                     tile_k_padded=tile_k_padded)

    def kv_head(kh, p_sum_TS):
      k_SD = k_ref[pl.ds(start, tile_k_padded), kh, :]
      for g in range(G):  # static: the kv head's query heads share its K tile
        s_TS = _masked_scores(q_ref[:, kh, g, :], k_SD, vis_TS, scale=scale, softcap=softcap)
        l_T = l_ref[kh, g, :]
        inv_l_T = jnp.where(l_T > 0, 1.0 / l_T, 0.0)  # a query with no key: all zeros
        p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_ref[kh, g, :][:, None]), 0.0)
        p_sum_TS += p_TS * inv_l_T[:, None]
      return p_sum_TS

    p_sum_TS = lax.fori_loop(0, K, kv_head, jnp.zeros(vis_TS.shape, f32))
    # key s -> its column of this tile; sinks and padding (-1) match no column
    col_C = c0 + jnp.arange(Ct, dtype=jnp.int32)
    onehot_SC = (ck_S[:, None] == col_C[None, :]) & (k_pos_S >= n_sink)[:, None]
    return bins_TC + jnp.dot(p_sum_TS, onehot_SC.astype(f32), precision=lax.Precision.HIGHEST,
                             preferred_element_type=f32)

  hi = jnp.minimum(hi_ref[...], jnp.minimum(_causal_tiles(i, tile_q, tile_k), n_key_tiles))
  bins_TC = lax.fori_loop(lo_ref[...], hi, step, jnp.zeros((tq, Ct), f32))
  mass_ref[...] = bins_TC * (1.0 / (K * G))


def chunk_tile_runs(chunk_id_BT, *, tile_k: int, chunk_tile: int, n_chunk_tiles: int,
                    n_sink: int, max_chunks: int):
  """Per chunk tile, the key tiles [lo, hi) that hold a binned key of its chunks: ([B, nct] x2).

  A binned key is a token (id >= 0), not a sink, with id < max_chunks. With non-decreasing chunk
  ids those tiles are a run; otherwise [lo, hi) spans all of them (more reads, same result).
  """
  B, T = chunk_id_BT.shape
  nkt = T // tile_k
  binned_BT = (chunk_id_BT >= 0) & (chunk_id_BT < max_chunks) & (jnp.arange(T) >= n_sink)
  ck_BKt = jnp.where(binned_BT, chunk_id_BT, -1).reshape(B, nkt, tile_k)
  k_lo_BK = jnp.where(ck_BKt >= 0, ck_BKt, max_chunks).min(-1)
  k_hi_BK = ck_BKt.max(-1)
  c0_C = jnp.arange(n_chunk_tiles) * chunk_tile
  hit_BKC = (k_lo_BK[..., None] < c0_C + chunk_tile) & (k_hi_BK[..., None] >= c0_C)
  any_BC = hit_BKC.any(1)
  lo_BC = jnp.argmax(hit_BKC, axis=1)
  hi_BC = nkt - jnp.argmax(hit_BKC[:, ::-1], axis=1)
  return (jnp.where(any_BC, lo_BC, 0).astype(jnp.int32),
          jnp.where(any_BC, hi_BC, 0).astype(jnp.int32))


def distill_attention_raw_gpu(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float,
                              max_chunks: int, n_sink: int, block_q: int, block_k: int,
                              softcap: float | None = None, interpret=False, tile_q: int = 64,
                              tile_k: int = 64, chunk_tile: int = 32,
                              num_warps: int | None = None, num_stages: int = 2):
  """The two Triton passes, as `distill_attention_raw`: (o_BTHD, mass_BTC), the chunk mass
  before renormalising.

  `tile_q`, `tile_k`: the tiles the blocks are cut into where they divide them; `chunk_tile`:
  P columns per pass-2 program (a power of 2 of at least 16); `num_warps` (default by head dim),
  `num_stages`: Triton's launch and pipelining knobs.
  """
  B, T, H, D, K = check_distill_inputs(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, block_q, block_k)
  G = H // K
  require(chunk_tile >= 16 and chunk_tile == triton_size(chunk_tile),
          f"distill_attention_gpu: chunk_tile must be a power of 2 of at least 16, not {chunk_tile}")
  tq, tk = sub_tile(block_q, tile_q), sub_tile(block_k, tile_k)
  tqp, tkp, Dp = triton_size(tq), triton_size(tk), triton_size(D)
  nqt, nkt = T // tq, T // tk
  nct = pl.cdiv(max_chunks, chunk_tile)
  f32 = jnp.float32

  chunk_id_BT = chunk_id_BT.astype(jnp.int32)
  # tiles padded with invisible tokens (chunk id -1), features with zeros
  feat = lambda x: pad_axis(x, x.ndim - 1, Dp)
  q_BTHD_p = feat(tiled(q_BTHD, 1, tq, tqp))
  k_BSKD, v_BSKD = (feat(tiled(x, 1, tk, tkp)) for x in (k_BTKD, v_BTKD))
  ck_BS = tiled(chunk_id_BT, 1, tk, tkp, -1)
  Tq, Sk = q_BTHD_p.shape[1], ck_BS.shape[1]
  static = dict(scale=scale, softcap=softcap, tile_q=tq, tile_k=tk, tile_k_padded=tkp,
                n_key_tiles=nkt)
  params = pltriton.CompilerParams(num_warps=num_warps or default_num_warps(Dp),
                                   num_stages=num_stages)

  head_spec = pl.BlockSpec((None, tqp, None, Dp), lambda b, i, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, Sk, None, Dp), lambda b, i, h: (b, 0, lax.div(h, G), 0))
  stat_spec = pl.BlockSpec((None, None, tqp), lambda b, i, h: (b, h, i))
  o_BTHD, m_BHT, l_BHT = pl.pallas_call(
      functools.partial(_flash_kernel, **static),
      grid=(B, nqt, H),
      in_specs=[head_spec, kv_spec, kv_spec, pl.BlockSpec((None, Sk), lambda b, i, h: (b, 0))],
      out_specs=[head_spec, stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct(q_BTHD_p.shape, q_BTHD.dtype),
                 jax.ShapeDtypeStruct((B, H, Tq), f32), jax.ShapeDtypeStruct((B, H, Tq), f32)],
      compiler_params=params,
      interpret=interpret,
      name="distill_attention_gpu_flash",
  )(q_BTHD_p, k_BSKD, v_BSKD, ck_BS)

  lo_BC, hi_BC = chunk_tile_runs(chunk_id_BT, tile_k=tk, chunk_tile=chunk_tile,
                                 n_chunk_tiles=nct, n_sink=n_sink, max_chunks=max_chunks)
  run_spec = pl.BlockSpec((None, None), lambda b, i, c: (b, c))
  stat_spec = pl.BlockSpec((None, K, G, tqp), lambda b, i, c: (b, 0, 0, i))
  mass_BTC = pl.pallas_call(
      functools.partial(_bins_kernel, n_sink=n_sink, **static),
      grid=(B, nqt, nct),
      in_specs=[run_spec, run_spec,
                pl.BlockSpec((None, tqp, K, G, Dp), lambda b, i, c: (b, i, 0, 0, 0)),
                pl.BlockSpec((None, Sk, K, Dp), lambda b, i, c: (b, 0, 0, 0)),
                pl.BlockSpec((None, Sk), lambda b, i, c: (b, 0)),
                stat_spec, stat_spec],
      out_specs=pl.BlockSpec((None, tqp, chunk_tile), lambda b, i, c: (b, i, c)),
      out_shape=jax.ShapeDtypeStruct((B, Tq, nct * chunk_tile), f32),
      compiler_params=params,
      interpret=interpret,
      name="distill_attention_gpu_bins",
  )(lo_BC, hi_BC, q_BTHD_p.reshape(B, Tq, K, G, Dp), k_BSKD, ck_BS,
    m_BHT.reshape(B, K, G, Tq), l_BHT.reshape(B, K, G, Tq))
  o_BTHD = untiled(o_BTHD[..., :D], 1, tq, tqp)
  mass_BTC = untiled(mass_BTC[..., :max_chunks], 1, tq, tqp)
  return o_BTHD, mass_BTC


def distill_attention_gpu(q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, *, scale: float, max_chunks: int,
                          n_sink: int, block_q: int, block_k: int, softcap: float | None = None,
                          interpret=False):
  """The GPU path. Returns (o_BTHD, p_BTC float32), as `distill_attention_kernel`."""
  o_BTHD, mass_BTC = distill_attention_raw_gpu(
      q_BTHD, k_BTKD, v_BTKD, chunk_id_BT, scale=scale, max_chunks=max_chunks, n_sink=n_sink,
      block_q=block_q, block_k=block_k, softcap=softcap, interpret=interpret)
  return o_BTHD, renormalise(mass_BTC, chunk_id_BT)
