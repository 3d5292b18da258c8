"""Per-head selection (`ChunkConfig.selection="kv_head"`): at every decode step each KV head of each
sparse layer chooses the chunks it reads, by its own query's attention over them.

ChunkLLM's rule makes one selection where a token closes a chunk and serves every layer and head
with it until the next one. Measured with the frozen attention's own scores, that rule is what
keeps perplexity away from vanilla's on running text; a selection made by each query per KV head
over the same chunks and budget keeps most of it (`eval.selection_ceiling`, docs/results.md).

A step, per sparse layer:
  1. scores every candidate chunk per KV head: the attention mass of the query heads that read it
     (their max), exact (`selection.chunk_mass`, reading all of K) or SparQ's estimate from
     `score_rank` of K's dimensions (`selection.sparq_chunk_mass`);
  2. chooses per head with `chunk_cache.choose_at` (one row per head, as the shared rule's one row), under the budget's shape: sinks,
     local and open chunks, the recent share, boundary tokens;
  3. gathers each head's chosen positions from the stacked buffer into `head_slots` slots (sinks
     first, then newest first, so a step that would overflow drops the oldest boundary tokens)
     and attends them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from chunkllm_jax import attention as attn
from chunkllm_jax.chunk_cache import ChunkState, choose_at
from chunkllm_jax.selection import ChunkConfig, chunk_mass, sparq_chunk_mass


def head_slots(ccfg: ChunkConfig, max_len: int) -> int:
  """Static slots a head's read is gathered into: the budget at a full buffer, the sinks, and the
  local and open chunks at their longest (what can come on top of a budget the fixed part exceeds)."""
  if ccfg.budgeted:
    most = ccfg.kv_budget_tokens if ccfg.kv_budget_tokens is not None else math.ceil(ccfg.kv_budget * max_len)
    most = max(most, ccfg.kv_budget_min_tokens)
  else:
    most = ccfg.top_chunks * ccfg.max_chunk_len
  return min(most + ccfg.n_sink + (ccfg.n_local + 1) * ccfg.max_chunk_len, max_len)


def head_reads(cfg, ccfg: ChunkConfig, st: ChunkState, q_B1HD, k_LBSKD, layer, pos_B):
  """What each KV head reads at `pos_B`: [B, K, S] bool (steps 1 and 2 of the module's docstring)."""
  S, K = k_LBSKD.shape[2:4]
  C = st.chunk_end.shape[1]
  n_cand = jnp.maximum(st.n_chunks - ccfg.n_local, 0)
  last = jnp.take_along_axis(st.chunk_end, jnp.maximum(n_cand - 1, 0)[:, None], 1)[:, 0]
  hi = jnp.where(n_cand > 0, last, -1)[:, None, None, None]
  q = attn.split_heads(q_B1HD, K)  # B K G 1 D
  if ccfg.score_rank is None:
    mass = chunk_mass(q, k_LBSKD, hi, st.chunk_end, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                      softcap=cfg.attn_softcap, layer=layer)
  else:
    mass = sparq_chunk_mass(q, k_LBSKD, hi, st.chunk_end, n_sink=ccfg.n_sink, scale=cfg.attn_scale,
                            rank=ccfg.score_rank, layer=layer)
  picked_BKC = choose_at(st, mass[:, :, :, 0].max(2), pos_B, ccfg)
  t = jnp.arange(S)
  ends = jnp.where(jnp.arange(C) < st.n_chunks[:, None], st.chunk_end, S)
  chunk_of = jax.vmap(lambda e: jnp.searchsorted(e, t, side="left"))(ends)  # B S: first chunk ending at or after t
  in_chunk = (chunk_of < st.n_chunks[:, None]) & (t >= ccfg.n_sink)
  at = jnp.minimum(chunk_of, C - 1)
  base = (t < ccfg.n_sink) | ((t >= st.open_start[:, None]) & (t <= pos_B[:, None]))
  base = base | (in_chunk & (chunk_of >= (st.n_chunks - ccfg.n_local)[:, None]))
  if ccfg.reads_boundary_tokens:
    base = base | (in_chunk & (t == jnp.take_along_axis(ends, at, 1)))
  picked_BKS = jnp.take_along_axis(picked_BKC, at[:, None, :], -1) & in_chunk[:, None]
  return (base[:, None] | picked_BKS) & (t <= pos_B[:, None])[:, None]


def gather_positions(read_BKS, n_sink: int, W: int):
  """Each head's read as W slots: positions [B, K, W] and validity. The sinks take the first slots,
  the rest follow newest first, so a read longer than W loses its oldest positions."""
  S = read_BKS.shape[-1]
  n_sink = min(n_sink, W, S)
  rest = read_BKS[..., n_sink:][..., ::-1]  # newest first
  nth = lambda m: jnp.nonzero(m, size=W - n_sink, fill_value=0)[0]
  idx = jax.vmap(jax.vmap(nth))(rest)
  count = jnp.sum(rest, -1, keepdims=True)
  valid = jnp.concatenate([read_BKS[..., :n_sink], jnp.arange(W - n_sink) < count], -1)
  pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_sink), idx.shape[:-1] + (n_sink,)), S - 1 - idx], -1)
  return pos, valid


def head_attention(cfg, ccfg: ChunkConfig, st: ChunkState, q_B1HD, k_LBSKD, v_LBSKD, layer, pos_B):
  """selection="kv_head" attention of one sparse layer: (output [B, 1, H, D], tokens each head read [B, K])."""
  _, B, S, K, _ = k_LBSKD.shape
  read_BKS = head_reads(cfg, ccfg, st, q_B1HD, k_LBSKD, layer, pos_B)
  pos_BKW, ok_BKW = gather_positions(read_BKS, ccfg.n_sink, head_slots(ccfg, S))
  rows, heads = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
  gather = lambda buf: jnp.swapaxes(buf[layer, rows, pos_BKW, heads], 1, 2)  # B W K D, read from the stack
  o = attn.attend(q_B1HD, gather(k_LBSKD), gather(v_LBSKD), ok_BKW[:, :, None], scale=cfg.attn_scale,
                  softcap=cfg.attn_softcap)
  return o, jnp.sum(ok_BKW, -1).astype(jnp.float32)
