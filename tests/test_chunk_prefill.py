"""Chunk-sparse prefill against the rule written the slow obvious way (Python loops over tokens).

Random segmentations, ragged rows, per-layer selections from random q~/k~, GQA, both `keep`
rules; the block-sparse XLA loop, the block lists and the Pallas kernel (interpret mode) must all
agree with the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import attention as attn
from chunkllm_jax import boundaries
from chunkllm_jax import chunk_prefill as cp
from chunkllm_jax.chunk_config import ChunkConfig


def random_segmentation(rng, B, T, lengths, n_sink, p=0.15):
  closes = (rng.rand(B, T) < p) & (np.arange(T) >= n_sink) & (np.arange(T) < np.asarray(lengths)[:, None])
  valid = np.arange(T) < np.asarray(lengths)[:, None]
  return closes, valid


def reference_mask(closes, valid, sel, ccfg, keep):
  """visible[b, t, s] from the definition: table chunks from the boundaries, then the rule."""
  B, T = closes.shape
  vis = np.zeros((B, T, T), bool)
  for b in range(B):
    ends = list(np.flatnonzero(closes[b]))
    chunk_of = np.full(T, -1)  # table chunk of each token; -1 sinks; len(ends) for the open tail
    start = ccfg.n_sink
    for j, e in enumerate(ends):
      chunk_of[start: e + 1] = j
      start = e + 1
    chunk_of[start:] = len(ends)
    for t in range(T):
      if not valid[b, t]:
        continue
      c = chunk_of[t]
      if t < ccfg.n_sink:
        vis[b, t, : t + 1] = True
        continue
      chosen = set(int(x) for x in sel[b, c] if x >= 0)  # row c serves table chunk c
      for s in range(t + 1):
        if s < ccfg.n_sink or chunk_of[s] >= c - ccfg.n_local:
          vis[b, t, s] = True
        elif chunk_of[s] in chosen and (keep == "chunk" or s == ends[chunk_of[s]]):
          vis[b, t, s] = True
  return vis


def selections_loop(q, k, closes, valid, ccfg):
  """Per prompt chunk s (the open one included): top_chunks of q~[p] . k~[end_i] over i < s - n_local, where p
  is chunk s's last token ("own") or the one before chunk s ("previous"). A loop."""
  B = q.shape[0]
  C = ccfg.max_chunks
  sel = np.full((B, C + 1, ccfg.top_chunks), -1)
  for b in range(B):
    ends = list(np.flatnonzero(closes[b]))[:C]
    last = int(np.flatnonzero(valid[b])[-1])
    for s_ in range(len(ends) + 1):
      own = ends[s_] if s_ < len(ends) else last
      p = own if ccfg.prefill_selection == "own" else (ends[s_ - 1] if s_ else ccfg.n_sink - 1)
      cands = list(range(max(s_ - ccfg.n_local, 0)))
      scores = [float(q[b, p] @ k[b, ends[i]]) for i in cands]
      best = [cands[i] for i in np.argsort(scores)[::-1][: ccfg.top_chunks]]
      sel[b, s_, : len(best)] = best
  return sel


def rows_of(ends, n, valid, ccfg):
  return cp.selection_rows(ends, n, jnp.asarray(valid).sum(1) - 1, ccfg)


def chosen(qt, kt, ends, n, valid, ccfg):
  """The chunks kept for each prompt chunk by one layer's QK-Adapter scores: [B, C + 1, C] bool."""
  rows = rows_of(ends, n, valid, ccfg)
  return cp.prompt_selection(cp.adapter_rows(qt, kt, rows[0], ends, rows[1]), ends, n, rows, ccfg)


def as_lists(chosen_BCC):
  """[B, C, C] ids (or -1), the layout `reference_mask` reads."""
  chosen_BCC = np.asarray(chosen_BCC)
  return np.where(chosen_BCC, np.arange(chosen_BCC.shape[-1]), -1)


def case(seed, B=2, T=96, H=4, K=2, D=8, d_c=4, top_chunks=3, n_local=1, lengths=(96, 61), mode="own"):
  rng = np.random.RandomState(seed)
  ccfg = ChunkConfig(n_sink=4, top_chunks=top_chunks, n_local=n_local, max_chunks=40, max_chunk_len=64,
                     prefill="sparse", prefill_selection=mode).validate(T, 2)
  closes, valid = random_segmentation(rng, B, T, lengths, ccfg.n_sink)
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(ks[i], (B, T, n, D)) for i, n in enumerate((H, K, K)))
  qt, kt = jax.random.normal(ks[3], (B, T, d_c)), jax.random.normal(ks[4], (B, T, d_c))
  return ccfg, jnp.asarray(closes), jnp.asarray(valid), q, k, v, qt, kt


def tables(seed):
  """A random case's chunk ids, selection table and [B, T, T] token mask (keep="chunk")."""
  ccfg, closes, valid, *_, qt, kt = case(seed, top_chunks=2)
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  ids = cp.kernel_ids(boundaries.chunk_ids(closes, valid, ccfg.n_sink), valid, ccfg.max_chunks)
  vis = cp.selection_table(chosen(qt, kt, ends, n, valid, ccfg), ccfg.max_chunks + 2)
  mask = np.asarray(cp.token_mask(ids, ids, jnp.arange(96)[None], jnp.arange(96)[None], vis,
                                  jnp.ones_like(closes), ccfg.n_local))
  return ccfg, ids, vis, mask


def test_chunk_ids_and_ends_by_hand():
  closes = jnp.asarray([[0, 0, 0, 0, 0, 1, 0, 1, 0, 0]], bool)
  valid = jnp.asarray([[1] * 9 + [0]], bool)
  ids = boundaries.chunk_ids(closes, valid, 2)
  assert ids.tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 2, -1]]
  assert cp.kernel_ids(ids, valid, 8).tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 3, -1]]
  ends, n = boundaries.completed_chunk_ends(closes, 8)
  assert ends.tolist() == [[5, 7, -1, -1, -1, -1, -1, -1]] and n.tolist() == [2]
  # a full table merges the later chunks into its last one: it ends at the last boundary
  closes = jnp.asarray([[0, 1, 0, 1, 1, 0, 1, 0, 1, 0]], bool)
  ends, n = boundaries.completed_chunk_ends(closes, 2)
  assert ends.tolist() == [[1, 8]] and n.tolist() == [2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["own", "previous"])
def test_prompt_selections_match_a_loop(seed, mode):
  ccfg, closes, valid, _, _, _, qt, kt = case(seed, mode=mode)
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  got = as_lists(chosen(qt, kt, ends, n, valid, ccfg))
  want = selections_loop(np.asarray(qt), np.asarray(kt), np.asarray(closes), np.asarray(valid), ccfg)
  for b in range(got.shape[0]):
    for j in range(int(n[b]) + 1):
      assert set(got[b, j][got[b, j] >= 0]) == set(want[b, j][want[b, j] >= 0]), (b, j)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep", ["chunk", "boundary"])
@pytest.mark.parametrize("H, K, top_chunks, n_local, block", [(4, 2, 3, 1, 16), (2, 2, 0, 2, 32), (8, 2, 40, 0, 16)])
def test_sparse_prefill_reads_exactly_the_rule(seed, keep, H, K, top_chunks, n_local, block):
  ccfg, closes, valid, q, k, v, qt, kt = case(seed, H=H, K=K, top_chunks=top_chunks, n_local=n_local)
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  ids = cp.kernel_ids(boundaries.chunk_ids(closes, valid, ccfg.n_sink), valid, ccfg.max_chunks)
  sel = chosen(qt, kt, ends, n, valid, ccfg)
  vis = cp.selection_table(sel, ccfg.max_chunks + 2)
  sel = as_lists(sel)
  end_ok = closes if keep == "boundary" else jnp.ones_like(closes)
  want_mask = reference_mask(np.asarray(closes), np.asarray(valid), np.asarray(sel), ccfg, keep)
  got_mask = cp.token_mask(ids, ids, jnp.arange(96)[None], jnp.arange(96)[None], vis, end_ok, n_local)
  np.testing.assert_array_equal(got_mask, want_mask)
  got = cp.sparse_prefill_attention(q, k, v, ids, vis, end_ok, n_local=n_local, scale=0.3, block=block)
  want = attn.attend(q, k, v, jnp.asarray(want_mask), scale=0.3)
  live = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[~live] == 0)  # padding queries see nothing


@pytest.mark.parametrize("seed", [0, 1])
def test_block_lists_cover_every_visible_pair_and_no_future(seed):
  ccfg, ids, vis, mask = tables(seed)
  blocks, counts = map(np.asarray, cp.block_lists(ids, vis, ccfg.n_local, 16))
  needed = mask.reshape(2, 6, 16, 6, 16).any(axis=(2, 4))
  for b in range(2):
    for qb in range(6):
      listed = blocks[b, qb, : counts[b, qb]]
      assert set(np.flatnonzero(needed[b, qb])) <= set(listed.tolist())
      assert list(listed) == sorted(listed) and all(listed <= qb)
  assert counts.sum() < 2 * 21  # sparser than all causal block pairs


@pytest.mark.parametrize("seed, budget", [(0, None), (1, 0.4)])
def test_pallas_prefill_kernel_path_matches_the_xla_path(seed, budget):
  ccfg, closes, valid, q, k, v, qt, kt = case(seed, T=128, lengths=(128, 77))
  ccfg = ccfg.__class__(**{**ccfg.__dict__, "interpret": True, "kv_budget": budget})
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  ids = cp.kernel_ids(boundaries.chunk_ids(closes, valid, ccfg.n_sink), valid, ccfg.max_chunks)
  vis = cp.selection_table(chosen(qt, kt, ends, n, valid, ccfg), ccfg.max_chunks + 2)
  kw = dict(scale=0.3, softcap=None, block=32)
  xla = cp.prefill_attention(q, k, v, ids, vis, jnp.ones_like(closes), ccfg, use_kernel=False, **kw)
  ker = cp.prefill_attention(q, k, v, ids, vis, jnp.ones_like(closes), ccfg, use_kernel=True, **kw)
  live = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(ker)[live], np.asarray(xla)[live], rtol=1e-5, atol=1e-5)



def test_pallas_prefill_kernel_path_refuses_softcap():
  """The kernels have no soft-capping: the kernel path refuses it (it ran without, 1.3 off the XLA path at 1.0)."""
  ccfg, closes, valid, q, k, v, qt, kt = case(0, T=64, lengths=(64, 40))
  ccfg = ccfg.__class__(**{**ccfg.__dict__, "interpret": True})
  ids = cp.kernel_ids(boundaries.chunk_ids(closes, valid, ccfg.n_sink), valid, ccfg.max_chunks)
  vis = jnp.ones((2, ccfg.max_chunks + 2, ccfg.max_chunks + 2), bool)
  with pytest.raises(ValueError, match="soft-capping"):
    cp.prefill_attention(q, k, v, ids, vis, jnp.ones_like(closes), ccfg, use_kernel=True, scale=0.3, softcap=1.0,
                         block=32)

@pytest.mark.parametrize("seed", [0, 1])
def test_packed_positions_hold_every_visible_key_once_in_order(seed):
  ccfg, ids, vis, mask = tables(seed)
  pos, used = map(np.asarray, cp.packed_key_positions(ids, vis, ccfg.n_local, 16))
  for b in range(2):
    for qb in range(6):
      packed = pos[b, qb, : used[b, qb]].tolist()
      needed = set(np.flatnonzero(mask[b, qb * 16:(qb + 1) * 16].any(0)))
      assert packed == sorted(set(packed)) and needed <= set(packed)
      assert all(p < (qb + 1) * 16 for p in packed)  # nothing from the future
  assert used.sum() < 2 * sum(16 * (qb + 1) for qb in range(6))  # fewer slots than causal reads


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_queries,key_block", [(1, 512), (3, 512), (1, 16), (3, 7)])
def test_attention_rows_match_a_dense_loop(seed, n_queries, key_block):
  """Every boundary row of the frozen-attention scorer against numpy: for each of the last
  `n_queries` queries up to the boundary and each head, the softmax over the candidates' tokens (none
  after the query), summed per chunk; then the max over queries and heads."""
  ccfg, closes, valid, q, k, _, _, _ = case(seed, H=4, K=2)
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  row_end, n_cand, _, _ = rows_of(ends, n, valid, ccfg)
  got = np.asarray(cp.attention_rows(q, k, row_end, ends, n_cand, n_sink=ccfg.n_sink, scale=0.3,
                                     n_queries=n_queries, rows_at_once=8, key_block=key_block))
  q, k, ends, n_cand, row_end = map(np.asarray, (q, k, ends, n_cand, row_end))
  for b in range(q.shape[0]):
    for j in range(int(n[b]) + 1):  # every prompt chunk, the open one included
      c = int(n_cand[b, j])
      want = np.zeros(c)
      for qp in range(row_end[b, j], max(row_end[b, j] - n_queries, -1), -1):
        lo, hi = ccfg.n_sink, min(ends[b, c - 1], qp) if c else -1
        if hi < lo:
          continue
        s = np.einsum("hd,thd->ht", q[b, qp], np.repeat(k[b, lo:hi + 1], 2, axis=1)) * 0.3
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        bounds = np.concatenate([[lo - 1], ends[b, :c]]) - lo + 1
        mass = np.stack([p[:, bounds[i]:bounds[i + 1]].sum(-1) for i in range(c)], -1)
        want = np.maximum(want, mass.max(0))
      np.testing.assert_allclose(got[b, j, :c], want, rtol=1e-4, atol=1e-6)
      assert not got[b, j, c:].any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.8])
def test_prompt_budget_is_met_within_one_chunk(seed, budget):
  """At every boundary the kept tokens (sinks, local and chosen chunks) are at most the budget,
  and within one chunk of it unless every candidate is kept."""
  ccfg, closes, valid, _, _, _, qt, kt = case(seed, n_local=2)
  ccfg = ccfg.__class__(**{**ccfg.__dict__, "kv_budget": budget})
  ends, n = boundaries.completed_chunk_ends(closes, ccfg.max_chunks)
  kept = np.asarray(chosen(qt, kt, ends, n, valid, ccfg))
  _, n_cand, fixed, seen = map(np.asarray, rows_of(ends, n, valid, ccfg))
  ends = np.asarray(ends)
  lengths = np.diff(np.concatenate([np.full((ends.shape[0], 1), ccfg.n_sink - 1), ends], 1), axis=1)
  for b in range(ends.shape[0]):
    for j in range(int(n[b]) + 1):
      c = int(n_cand[b, j])
      assert not kept[b, j, c:].any()
      tokens = fixed[b, j] + lengths[b, :c][kept[b, j, :c]].sum()
      target = np.ceil(budget * seen[b, j])
      if fixed[b, j] <= target:
        assert tokens <= target
      if not kept[b, j, :c].all():
        assert tokens > target - ccfg.max_chunk_len
