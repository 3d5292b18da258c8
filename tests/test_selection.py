"""Chunk selection: every vote rule against the same rule written with numpy, one row at a time."""

import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax.selection import ChunkConfig, select


def _numpy_select(q_LBd, key_LBCd, n_chunks_B, cfg: ChunkConfig):
  L, B, d = q_LBd.shape
  out = np.full((L, B, cfg.top_k) if not cfg.shared else (B, cfg.top_k), -1)
  for b in range(B):
    n_cand = max(n_chunks_B[b] - cfg.n_local, 0)
    if n_cand == 0:
      continue
    s = np.einsum("ld,lcd->lc", q_LBd[:, b], key_LBCd[:, b, :n_cand]) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rows = {"sum": [p.sum(0)], "max": [p.max(0)], "per_layer": list(p)}[cfg.vote]
    for l, score in enumerate(rows):
      chosen = np.sort(np.argsort(-score, kind="stable")[:cfg.top_k])
      (out[b] if cfg.shared else out[l, b])[:len(chosen)] = chosen
  return out


@pytest.mark.parametrize("vote", ["sum", "max", "per_layer"])
@pytest.mark.parametrize("top_k, n_local", [(3, 1), (5, 0), (8, 2)])
def test_select_matches_numpy(vote, top_k, n_local):
  rng = np.random.RandomState(top_k * 10 + n_local)
  L, B, C, d = 4, 3, 12, 8
  q = rng.randn(L, B, d).astype(np.float32) * 2
  keys = rng.randn(L, B, C, d).astype(np.float32) * 2
  n_chunks = np.asarray([C, 7, n_local + 1])  # full table, partly full, one candidate (or none)
  cfg = ChunkConfig(top_k=top_k, n_local=n_local, max_chunks=C, vote=vote)
  got = np.asarray(select(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(n_chunks), cfg))
  np.testing.assert_array_equal(got, _numpy_select(q, keys, n_chunks, cfg))


def test_max_vote_keeps_a_chunk_one_sharp_layer_wants():
  """Three layers prefer chunk 0; one layer is sure of chunk 5. The sum keeps 0 (2.2 against 1.1),
  the max keeps 5."""
  L, C, d = 4, 8, 2
  q = np.zeros((L, 1, d), np.float32)
  keys = np.zeros((L, 1, C, d), np.float32)
  q[:, 0, 0] = 1.0
  keys[:3, 0, 0, 0] = 3.0  # three layers: chunk 0 (p = 0.74 each)
  keys[3, 0, 5, 0] = 40.0  # one layer: chunk 5 (p = 1), which the others give 0.04 each
  n = jnp.asarray([C])
  for vote, want in [("sum", 0), ("max", 5)]:
    sel = np.asarray(select(jnp.asarray(q), jnp.asarray(keys), n, ChunkConfig(top_k=1, n_local=0, max_chunks=C, vote=vote)))
    assert sel.tolist() == [[want]], vote
