"""bench_kernels: the programs each case times (the kernels through their dispatchers, and the dense
baselines), their random inputs, and the constants the checks and the report share."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from chunkllm_jax import attention  # noqa: E402
from pallas_kernels import chunk_decode_attention as cda  # noqa: E402
from pallas_kernels import chunk_prefill_attention as cpa  # noqa: E402
from pallas_kernels import distill_attention as dsa  # noqa: E402
from pallas_kernels import gather_chunks as gch  # noqa: E402
from pallas_kernels import head_decode_attention as hda  # noqa: E402


TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # as the kernel tests
FLAG_BOUND = 1e-2  # default-precision f32 error up to this on an accelerator: TF32 / bf16-pass dots, flagged
TARGET_SPEEDUP, TARGET_BW = 3.0, 0.80  # the performance issue's: decode at 128K and 25% >= 3x dense, at >= 80% of a copy
TARGET_CONTEXT, TARGET_RETENTION = 131072, 0.25
KEEP = "<!-- analysis below is kept when the script rewrites this file -->"
SMOKE_DEFAULTS = dict(contexts=[256], prefill_contexts=None, retentions=[1.0, 0.25], distill_contexts=[256],
                      check_context=256, decode_block=16, n_splits=[2], prefill_block_q=32, prefill_block_k=32,
                      distill_block_q=32, distill_block_k=32, warmup=1, repeats=2, case_budget_s=2.0,
                      copy_mib=4, rotate_mib=0, min_sample_ms=0.0)


# ---------------------------------------------------------------------------------------------------------------
# What runs: the kernels through their dispatchers, and the dense baselines


def decode_inplace(q, k, v, ids, n, mask, *, scale, block_size, n_splits, interpret, backend):
  """The decode kernel over the static buffer, reading the listed blocks."""
  return cda.chunk_decode_attention(q, k, v, ids, n, mask, scale=scale, block_size=block_size, n_splits=n_splits,
                                    interpret=interpret, backend=backend)


def decode_compacted(q, work_k, work_v, work_ok, used, open_k, open_v, open_ok, *, scale, block, n_splits,
                     interpret, backend):
  """chunk_kernels.decode_attention_kernel (what chunk_generate's pallas path runs), with the backend and the
  working buffer's n_splits as arguments: the working buffer's blocks up to each row's last used slot, and the
  open chunk as one more block, merged by log-sum-exp."""
  B, W, M = q.shape[0], work_k.shape[1], open_k.shape[1]
  ids = jnp.broadcast_to(jnp.arange(W // block, dtype=jnp.int32), (B, W // block))
  work = cda.partials(q, work_k, work_v, ids, -(-used // block), work_ok, scale=scale, block_size=block,
                      n_splits=n_splits, interpret=interpret, backend=backend)
  opened = cda.partials(q, open_k, open_v, jnp.zeros((B, 1), jnp.int32), jnp.ones((B,), jnp.int32), open_ok,
                        scale=scale, block_size=M, n_splits=1, interpret=interpret, backend=backend)
  parts = [jnp.concatenate([a, b], axis=1) for a, b in zip(work, opened)]
  return cda.combine_splits(*parts).astype(q.dtype)


def decode_per_head(q, k, v, rows, ok, used, *, scale, block_size, n_splits, interpret, backend):
  """The per-head rule's decode attention (what chunk_generate's pallas path runs for selection="kv_head"): each
  KV head's slots read where they lie in the buffer, [B, S, K, D] viewed as rows of D; merged. [B, H, D]."""
  B, H, D = q.shape
  K = k.shape[2]
  flat = lambda x: x.reshape(-1, D)
  acc, m, l = hda.head_decode_partials(q.reshape(B, K, H // K, D), flat(k), flat(v), rows, ok, used, scale=scale,
                                       block_size=block_size, n_splits=n_splits, interpret=interpret,
                                       backend=backend)
  return merge_heads_partials(acc, m, l).astype(q.dtype)


def decode_per_head_gathered(q, k, v, rows, ok, used, *, scale):
  """The same attention through the kernel's jnp reference: an XLA gather of every slot, then one softmax."""
  B, H, D = q.shape
  K = k.shape[2]
  parts = hda.head_decode_partials_reference(q.reshape(B, K, H // K, D), k.reshape(-1, D), v.reshape(-1, D), rows,
                                             ok, used, scale=scale)
  return merge_heads_partials(*parts).astype(q.dtype)


def merge_heads_partials(acc, m, l):
  """Per-head partials [B, P, K, G(, D)] merged over the splits: [B, H, D] float32."""
  B, P, K, G, D = acc.shape
  return cda.combine_splits(acc.reshape(B, P, K * G, D), m.reshape(B, P, K * G, 1), l.reshape(B, P, K * G, 1))


def per_head_slots(mask, K: int, block: int):
  """Every head's slots for `decode_per_head`: here each head reads its row's visible tokens (a per-head choice
  reads as many, elsewhere). Rows of the [B * S * K, D] view [B, K, W], visible [B, K, W], used [B, K]; W is
  the most visible tokens of a row, rounded up to whole blocks."""
  mask = np.asarray(mask)
  B, S = mask.shape
  n = mask.sum(-1)
  W = max(block, -(-int(n.max()) // block) * block)
  pos = np.zeros((B, W), np.int64)
  for b in range(B):
    pos[b, :n[b]] = np.nonzero(mask[b])[0]
  rows = (np.arange(B)[:, None, None] * S + pos[:, None, :]) * K + np.arange(K)[None, :, None]
  ok = np.broadcast_to((np.arange(W)[None] < n[:, None])[:, None], (B, K, W))
  return (jnp.asarray(rows, jnp.int32), jnp.asarray(ok), jnp.asarray(np.broadcast_to(n[:, None], (B, K)), jnp.int32))


def gather(k, v, span_start, span_len, *, budget, interpret):
  """The compaction: the DMA kernel on TPU (or in interpret mode), the XLA gather elsewhere."""
  return gch.gather_chunks(k, v, span_start, span_len, budget=budget, interpret=interpret)


def open_window(k, v, start, *, size):
  """The open chunk's window [start, start + size) of each row (zeros past the buffer)."""
  S = k.shape[1]
  idx = start[:, None] + jnp.arange(size)
  ok = (idx < S)[..., None, None]
  idx = jnp.minimum(idx, S - 1)[..., None, None]
  take = lambda x: jnp.where(ok, jnp.take_along_axis(x, idx, axis=1), 0).astype(x.dtype)
  return take(k), take(v)


def prefill(q, k, v, ids, n, chunk_id, sel, *, scale, block_q, block_k, n_sink, n_local, interpret, backend):
  return cpa.chunk_prefill_attention(q, k, v, ids, n, chunk_id, sel, scale=scale, block_q=block_q,
                                     block_k=block_k, n_sink=n_sink, n_local=n_local, interpret=interpret,
                                     backend=backend)


def distill(q, k, v, chunk_id, *, scale, max_chunks, n_sink, block_q, block_k, interpret, backend):
  return dsa.distill_attention(q, k, v, chunk_id, scale=scale, max_chunks=max_chunks, n_sink=n_sink,
                               block_q=block_q, block_k=block_k, interpret=interpret, backend=backend)


def dense_decode_model(q, k, v, pos, *, scale):
  """The model's dense decode (attention.decode_attention) over a one-layer buffer. [B, H, D]."""
  return attention.decode_attention(q[:, None], k[None], v[None], 0, pos, attention.NO_WINDOW, scale=scale)[:, 0]


def dense_decode_nn(q, k, v, *, scale, implementation):
  """jax.nn.dot_product_attention of one query per row over every key. [B, H, D]."""
  return jax.nn.dot_product_attention(q[:, None], k, v, scale=scale, implementation=implementation)[:, 0]


def dense_prefill(q, k, v, *, scale, implementation):
  """Dense causal flash attention: jax.nn.dot_product_attention, or the Pallas TPU flash kernel (which takes
  [B, H, T, D] and as many kv heads as query heads, so K/V are repeated: that copy is in its time)."""
  if implementation == "pallas_tpu_flash":
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
    G = q.shape[2] // k.shape[2]
    bhtd = lambda x: jnp.swapaxes(x, 1, 2)
    out = flash_attention(bhtd(q), bhtd(jnp.repeat(k, G, axis=2)), bhtd(jnp.repeat(v, G, axis=2)), causal=True,
                          sm_scale=scale)
    return bhtd(out)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)


@jax.jit
def rel_err(out, ref):
  """max |out - ref| / (1 + |ref|) in float32; inf where either holds a NaN or an inf."""
  o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
  err = jnp.max(jnp.abs(o - r) / (1.0 + jnp.abs(r)))
  return jnp.where(jnp.isfinite(o).all() & jnp.isfinite(r).all(), err, jnp.inf)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def normal(seed: int, shape, dtype):
  """Fresh standard-normal values made on the device (no host transfer at 128K)."""
  return _normal(jax.random.key(seed), tuple(int(s) for s in shape), jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic chunkings


def chunk_lengths(rng, n_tokens: int, lo: int, hi: int):
  """Chunk lengths uniform in [lo, hi] covering n_tokens exactly (the last one cut)."""
  lens = rng.integers(lo, hi + 1, size=n_tokens // lo + 2)
  ends = np.cumsum(lens)
  n = int(np.searchsorted(ends, n_tokens)) + 1
  lens = lens[:n].copy()
  lens[-1] -= int(ends[n - 1]) - n_tokens
  return lens[lens > 0]


def decode_selection(rng, L: int, retention: float, a):
  """One row's visible tokens at a decode step at position L - 1: the sinks, randomly placed selected chunks,
  the n_local most recent complete chunks, and the open (last) chunk. Returns a dict: spans (start, len) of
  what the working buffer holds (all but the open chunk, ascending), the open chunk, the token mask."""
  lens = chunk_lengths(rng, L - a.n_sink, a.chunk_min, a.chunk_max)
  starts = a.n_sink + np.concatenate([[0], np.cumsum(lens)[:-1]])
  C = len(lens)
  local = np.arange(max(0, C - 1 - a.n_local), C - 1)
  cand = np.arange(0, max(0, C - 1 - a.n_local))
  if retention >= 1.0:
    picked = cand
  else:
    fixed = a.n_sink + lens[-1] + lens[local].sum()
    k = round((retention * L - fixed) / lens[cand].mean()) if len(cand) else 0
    picked = np.sort(rng.choice(cand, int(np.clip(k, 0, len(cand))), replace=False))
  keep = np.sort(np.concatenate([picked, local])).astype(int)
  visible = np.zeros(C, bool)
  visible[keep] = True
  visible[-1] = True
  mask = np.concatenate([np.ones(a.n_sink, bool), np.repeat(visible, lens)])
  return dict(span_start=np.concatenate([[0], starts[keep]]).astype(np.int32),
              span_len=np.concatenate([[a.n_sink], lens[keep]]).astype(np.int32),
              open_start=int(starts[-1]), open_len=int(lens[-1]), mask=mask, top_k=len(picked))


def prefill_layout(rng, T: int, retention: float, mode: str, a):
  """Chunk ids in the kernels' convention (sinks 0, chunks 1..C, consecutive), each chunk's selections
  (kernel ids, -1 = empty) as a [C + 1, N] table, the n_local to use, and the pair retention (visible (query,
  key) pairs / causal pairs). 100% retention is the kernel's dense causal mode: n_local > C, no selections."""
  lens = chunk_lengths(rng, T - a.n_sink, a.chunk_min, a.chunk_max)
  C = len(lens)
  chunk_id = np.concatenate([np.zeros(a.n_sink, np.int32), np.repeat(np.arange(1, C + 1, dtype=np.int32), lens)])
  c = np.arange(C + 1)
  if retention >= 1.0:
    n_local, sel = C + 1, np.full((C + 1, 1), -1, np.int32)
  else:
    n_local = a.n_local
    if mode == "consistent":  # chunk c selects the chosen chunks below its local ones: a prefix of them
      chosen = np.sort(rng.choice(np.arange(1, C + 1), max(1, round(retention * C)), replace=False))
      m = np.searchsorted(chosen, c - n_local, side="left")
      N = max(1, int(m.max()))
      sel = np.where(np.arange(N)[None] < m[:, None], chosen[None, :N], -1)
    else:  # each chunk picks its own
      rows = []
      for ci in c:
        elig = np.arange(1, max(1, ci - n_local))
        rows.append(np.sort(rng.choice(elig, round(retention * len(elig)), replace=False)) if len(elig) else [])
      N = max(1, max(len(r) for r in rows))
      sel = np.full((C + 1, N), -1, np.int64)
      for ci, r in enumerate(rows):
        sel[ci, :len(r)] = r
    sel = sel.astype(np.int32)
  # visible pairs: per chunk c, each of its tokens sees the sinks, its local chunks, its selections and its own
  # prefix (a selected chunk is never local: selections lie below c - n_local)
  len_id = np.concatenate([[a.n_sink], lens]).astype(np.float64)
  P = np.concatenate([[0.0], np.cumsum(lens, dtype=np.float64)])  # tokens of chunks 1..j
  cc = np.arange(1, C + 1)
  local_tok = P[cc - 1] - P[np.maximum(cc - n_local, 1) - 1]
  sel_tok = np.where(sel >= 0, len_id[np.maximum(sel, 0)], 0).sum(-1)[1:]
  lc = lens.astype(np.float64)
  pairs = a.n_sink * (a.n_sink + 1) / 2 + (lc * (a.n_sink + local_tok + sel_tok) + lc * (lc + 1) / 2).sum()
  return dict(chunk_id=chunk_id, sel=sel, n_local=int(n_local), n_chunks=C, n_sel=int(sel.shape[1]),
              retention=float(pairs / (T * (T + 1) / 2)))


def causal_block_pairs(T: int, bq: int, bk: int) -> int:
  """(query block, key block) pairs that causality leaves: what dense block-sparse attention reads."""
  return sum(((qi + 1) * bq - 1) // bk + 1 for qi in range(T // bq))
