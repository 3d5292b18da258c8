"""Chunk-sparse prefill attention on GPU: the Triton-lowered Pallas version of
`chunk_prefill_attention` (same arguments, same mask rule, same result; forward only).

Why Triton and not Mosaic GPU: see `chunk_decode_attention_gpu` (and `dispatch`). What changes
from the TPU kernel, and why:

- No scalar prefetch in Triton, so the block lists cannot drive BlockSpecs. Each program gets the
  whole K/V of its kv head and its row's chunk ids as refs, reads its query block's list
  (`kv_blocks_BQN`, `n_kv_BQ`) as ordinary int32 inputs and loads each listed block with a
  dynamic `pl.ds` slice, in a `fori_loop` whose trip count is the list's length.
- Tiles sized for registers, not for the caller's blocks. The TPU kernel keeps its tiles in VMEM;
  a Triton program keeps its accumulators and score tile in registers, and `chunk_prefill` uses
  256 x 256 blocks (a 256 x 256 f32 score tile alone is 256 KiB). So a query block of `block_q`
  rows is cut into query tiles of `tile_q` rows, one program each, and every listed key block of
  `block_k` tokens is read as `block_k / tile_k` key tiles in a row. A tile reads its whole query
  block's list: the lists are per block, and the token mask decides the rest.
- Grid (B, query tiles, K, head groups). A program serves `heads_per_program` query heads of one
  kv head in a static loop: they share each K/V tile load and the token mask, which costs
  ~N int compares per score (the selections) on the CUDA cores, more than the dots on the tensor
  cores for large N. A group, not all G heads: each head keeps a [tile_q, D] f32 accumulator in
  registers, so the default group is the largest divisor of G within a register budget (that of
  jax's flash attention kernel: 2048 accumulator elements per warp).
- The mask rule is `token_visible`'s (`visible_given_selections`), with the selections loaded
  as N columns (Triton lowers no value slicing).
- Power-of-2 tensor sizes, dots at least 16 wide (the Triton lowering's and `decode_attention`'s
  constraints): a tile size or head dim that is not a power of 2 of at least 16 is padded with
  invisible tokens (chunk id -1) / zero features. That copies Q, K, V; give such shapes only to
  small inputs.

Online softmax in f32, p cast to V's dtype for the PV dot as the reference does. A query that
sees nothing gets zeros. Only the interpret mode and the lowering to Triton IR were checked here
(no GPU): the Triton compile (registers, shared memory) and the speed are unchecked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.chunk_prefill_attention import block_selections, check_prefill_inputs, visible_given_selections
from pallas_kernels.dispatch import NEG_INF

MIN_DOT = 16  # dots at least this wide, as ops/gpu/decode_attention.py keeps them
# f32 accumulator elements per warp: jax's ops/gpu/attention.py holds a [128, 64] accumulator
# on 4 warps and a [128, 128] one on 8
ACC_PER_WARP = 2048


def triton_size(n: int) -> int:
  """The size Triton gets for a dimension of n: a power of 2, at least MIN_DOT."""
  return max(MIN_DOT, pl.next_power_of_2(n))


def pad_axis(x, axis: int, size: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def sub_tile(block: int, tile: int) -> int:
  """The tile a block of `block` tokens is cut into: `tile` where it divides the block, else the
  whole block (padded to `triton_size(block)` later)."""
  return tile if block > tile and block % tile == 0 else block


def tiled(x, axis: int, tile: int, padded: int, value=0):
  """Cuts axis into tiles of `tile` and pads each to `padded` with `value`: axis length
  T -> T / tile * padded."""
  if padded == tile:
    return x
  n = x.shape[axis] // tile
  x = x.reshape(*x.shape[:axis], n, tile, *x.shape[axis + 1:])
  x = pad_axis(x, axis + 1, padded, value)
  return x.reshape(*x.shape[:axis], n * padded, *x.shape[axis + 2:])


def untiled(x, axis: int, tile: int, padded: int):
  """Inverse of `tiled`: drops the padding of each tile."""
  if padded == tile:
    return x
  n = x.shape[axis] // padded
  x = x.reshape(*x.shape[:axis], n, padded, *x.shape[axis + 1:])
  x = lax.slice_in_dim(x, 0, tile, axis=axis + 1)
  return x.reshape(*x.shape[:axis], n * tile, *x.shape[axis + 2:])


def default_num_warps(head_dim: int) -> int:
  """As jax's ops/gpu/attention.py: 4 warps up to head dim 64, else 8."""
  return 4 if head_dim <= 64 else 8


def default_heads_per_program(G: int, tile_q: int, head_dim: int, num_warps: int) -> int:
  """The largest divisor of G whose accumulators ([tile_q, head_dim] f32 each) fit
  ACC_PER_WARP * num_warps (1 where even one does not)."""
  fits = [g for g in range(1, G + 1)
          if G % g == 0 and g * tile_q * head_dim <= ACC_PER_WARP * num_warps]
  return max(fits, default=1)


def _prefill_kernel_gpu(ids_ref, n_ref,  # [N] the query block's list, [] its length
                        q_ref,  # [tq, hg, D]: this program's query heads
                        k_ref, v_ref,  # [Sk, D]: the whole (tiled) K/V of one kv head
                        cq_ref, sel_ref,  # [tq], [tq, Ns]: the query tile's chunk ids, selections
                        ck_ref,  # [Sk]: the row's (tiled) chunk ids, key side
                        o_ref,  # [tq, hg, D]
                        *, scale: float, n_sink: int, n_local: int, tile_q: int, tile_k: int,
                        tile_k_padded: int, subtiles: int):
  f32 = jnp.float32
  tq, hg, D = q_ref.shape
  tkp = tile_k_padded
  q_pos_T1 = (pl.program_id(1) * tile_q + jnp.arange(tq, dtype=jnp.int32))[:, None]
  cq_T1 = cq_ref[...][:, None]
  sel_cols_T1 = [sel_ref[:, n][:, None] for n in range(sel_ref.shape[1])]
  q_GTD = [q_ref[:, g, :] for g in range(hg)]

  def step(j, carry):
    # key tile: sub-tile j % subtiles of listed block j // subtiles
    if subtiles == 1:
      kt = ids_ref[j]
    else:
      kt = ids_ref[lax.div(j, subtiles)] * subtiles + lax.rem(j, subtiles)
    start = kt * tkp
    k_SD = k_ref[pl.ds(start, tkp), :]
    v_SD = v_ref[pl.ds(start, tkp), :]
    ck_1S = ck_ref[pl.ds(start, tkp)][None, :]
    # padding tokens of a tile have chunk id -1: their positions do not matter
    k_pos_1S = (kt * tile_k + jnp.arange(tkp, dtype=jnp.int32))[None, :]
    vis_TS = visible_given_selections(q_pos_T1, k_pos_1S, cq_T1, ck_1S, sel_cols_T1,
                                      n_sink=n_sink, n_local=n_local)
    out = []
    for g in range(hg):  # static: the group's heads share the K/V tile and the mask
      acc_TD, m_T, l_T = carry[g]
      s_TS = lax.dot_general(q_GTD[g], k_SD, (((1,), (1,)), ((), ())),
                             preferred_element_type=f32) * scale
      s_TS = jnp.where(vis_TS, s_TS, NEG_INF)
      m_new_T = jnp.maximum(m_T, s_TS.max(-1))
      # masked entries get exactly 0, even when everything so far is masked
      p_TS = jnp.where(vis_TS, jnp.exp(s_TS - m_new_T[:, None]), 0.0)
      corr_T = jnp.exp(m_T - m_new_T)
      pv_TD = jnp.dot(p_TS.astype(v_SD.dtype), v_SD, preferred_element_type=f32)
      out.append((corr_T[:, None] * acc_TD + pv_TD, m_new_T, corr_T * l_T + p_TS.sum(-1)))
    return tuple(out)

  init = tuple((jnp.zeros((tq, D), f32), jnp.full((tq,), NEG_INF, f32), jnp.zeros((tq,), f32))
               for _ in range(hg))
  carry = lax.fori_loop(0, n_ref[...] * subtiles, step, init)
  # every program writes its whole output block, also when its list is empty
  for g in range(hg):
    acc_TD, _, l_T = carry[g]
    o_ref[:, g, :] = (acc_TD / jnp.where(l_T > 0, l_T, 1.0)[:, None]).astype(o_ref.dtype)


def chunk_prefill_attention_gpu(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT,
                                sel_BTN, *, scale: float, block_q: int, block_k: int,
                                n_sink: int, n_local: int, interpret=False, tile_q: int = 64,
                                tile_k: int = 64, heads_per_program: int | None = None,
                                num_warps: int | None = None, num_stages: int = 2):
  """The GPU path, as `chunk_prefill_attention_kernel`. Returns [B, T, H, D] in q's dtype.

  `tile_q`, `tile_k`: the query / key tiles the blocks are cut into where they divide them;
  `heads_per_program`: query heads per program (a divisor of H / K; default: as many as fit the
  register budget); `num_warps` (default by head dim), `num_stages`: Triton's launch and
  pipelining knobs.
  """
  B, T, H, D, K, _, N = check_prefill_inputs(q_BTHD, k_BTKD, v_BTKD, kv_blocks_BQN, n_kv_BQ, chunk_id_BT,
                                              sel_BTN, block_q, block_k)
  G = H // K
  tq, tk = sub_tile(block_q, tile_q), sub_tile(block_k, tile_k)
  tqp, tkp, Dp = triton_size(tq), triton_size(tk), triton_size(D)
  num_warps = num_warps or default_num_warps(Dp)
  hg = heads_per_program or default_heads_per_program(G, tqp, Dp, num_warps)
  assert G % hg == 0, (G, hg)
  nqt, per_block = T // tq, block_q // tq

  chunk_id_BT = chunk_id_BT.astype(jnp.int32)
  sel_BTN = block_selections(sel_BTN)
  # tiles padded with invisible tokens (chunk id -1), features with zeros
  feat = lambda x: pad_axis(x, x.ndim - 1, Dp)
  q_BTKGD = feat(tiled(q_BTHD, 1, tq, tqp)).reshape(B, nqt * tqp, K, G, Dp)
  k_BSKD, v_BSKD = (feat(tiled(x, 1, tk, tkp)) for x in (k_BTKD, v_BTKD))
  cq_BT = tiled(chunk_id_BT, 1, tq, tqp, -1)
  sel_BTN = tiled(sel_BTN, 1, tq, tqp, -1)
  ck_BS = tiled(chunk_id_BT, 1, tk, tkp, -1)
  Sk = ck_BS.shape[1]

  n_BQ = jnp.clip(n_kv_BQ.astype(jnp.int32), 0, N)
  # padding ids -> 0 so that no slice can point outside the buffer
  ids_BQN = jnp.where(jnp.arange(N) < n_BQ[..., None], kv_blocks_BQN.astype(jnp.int32), 0)
  ids_BQN = jnp.clip(ids_BQN, 0, T // block_k - 1)

  blk = lambda i: lax.div(i, per_block)  # the query block of query tile i
  q_spec = pl.BlockSpec((None, tqp, None, hg, Dp), lambda b, i, h, g: (b, i, h, g, 0))
  kv_spec = pl.BlockSpec((None, Sk, None, Dp), lambda b, i, h, g: (b, 0, h, 0))
  o_BTKGD = pl.pallas_call(
      functools.partial(_prefill_kernel_gpu, scale=scale, n_sink=n_sink, n_local=n_local,
                        tile_q=tq, tile_k=tk, tile_k_padded=tkp, subtiles=block_k // tk),
      grid=(B, nqt, K, G // hg),
      in_specs=[pl.BlockSpec((None, None, N), lambda b, i, h, g: (b, blk(i), 0)),
                pl.BlockSpec((None, None), lambda b, i, h, g: (b, blk(i))),
                q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, tqp), lambda b, i, h, g: (b, i)),
                pl.BlockSpec((None, tqp, sel_BTN.shape[-1]), lambda b, i, h, g: (b, i, 0)),
                pl.BlockSpec((None, Sk), lambda b, i, h, g: (b, 0))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_BTKGD.shape, q_BTHD.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="chunk_prefill_attention_gpu",
  )(ids_BQN, n_BQ, q_BTKGD, k_BSKD, v_BSKD, cq_BT, sel_BTN, ck_BS)
  o_BTHD = o_BTKGD.reshape(B, nqt * tqp, H, Dp)[..., :D]
  return untiled(o_BTHD, 1, tq, tqp)
