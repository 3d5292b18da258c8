"""Chunk-sparse decode attention against a dense masked reference, with forced selections.

The reference builds the visible set the slow obvious way (a Python loop over the chunk table),
then runs dense attention with that mask; the fast path packs the working buffer and reads it
block by block. They must agree for any selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import attention as attn
from chunkllm_jax.chunk_attention import packed_decode_attention
from chunkllm_jax.chunk_cache import (append_chunks, choose_at, compact, init_chunk_state, working_positions,
                                     working_room as working_room_of, working_size)
from chunkllm_jax.chunk_config import ChunkConfig

BLOCK = 16


def make_table(rng, B, S, ccfg, lengths):
  """Random chunk boundaries per row, appended the way decode appends them."""
  ccfg = ccfg.resolve((0,), (0,))  # the adapters' window: the boundary query
  st = init_chunk_state(1, 1, B, 4, 1, 1, 8, jnp.float32, ccfg, working_size(ccfg, S, BLOCK))
  ends = []
  for b in range(B):
    e, t = [], ccfg.n_sink - 1
    while True:
      t += int(rng.randint(1, ccfg.max_chunk_len + 1))
      if t >= lengths[b] - 3:  # leave an open chunk at the end
        break
      e.append(t)
    ends.append(e)
  for step in range(max(len(e) for e in ends)):
    closes = np.array([step < len(e) for e in ends])
    pos = np.array([e[step] if step < len(e) else 0 for e in ends])
    st = append_chunks(st, jnp.asarray(closes), jnp.asarray(pos, jnp.int32), jnp.zeros((1, B, 4)))
  return st


def reference_visible(st, selected, ccfg, pos):
  """The visible positions of row b, from the definition: sinks, chosen, local, open chunk.
  keep="boundary": a selected, non-local chunk shows its last token only; boundary_tokens: every
  other completed chunk shows its last token."""
  B = len(pos)
  mask = np.zeros((B, int(pos.max()) + 1), bool)
  for b in range(B):
    n = int(st.n_chunks[b])
    mask[b, : ccfg.n_sink] = True
    local = set(range(max(n - ccfg.n_local, 0), n))
    read = {int(c) for c in selected[b] if c >= 0} | local
    for c in read:
      first = int(st.chunk_end[b, c]) if ccfg.keep == "boundary" and c not in local else int(st.chunk_start[b, c])
      mask[b, first: int(st.chunk_end[b, c]) + 1] = True
    for c in set(range(n)) - read if ccfg.boundary_tokens else ():
      mask[b, int(st.chunk_end[b, c])] = True
    mask[b, int(st.open_start[b]): int(pos[b]) + 1] = True
    mask[b, int(pos[b]) + 1:] = False
  return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_chunks, n_local, H, K", [(3, 1, 4, 2), (0, 2, 4, 4), (6, 0, 8, 2), (40, 2, 2, 1)])
@pytest.mark.parametrize("keep, boundary_tokens", [("chunk", False), ("boundary", False), ("chunk", True)])
@pytest.mark.parametrize("blocks", [(BLOCK,), (4 * BLOCK, BLOCK)])
def test_forced_selection_reads_exactly_sinks_chosen_local_and_open(seed, top_chunks, n_local, H, K, keep,
                                                                    boundary_tokens, blocks):
  rng = np.random.RandomState(seed)
  B, S, D = 3, 160, 8
  ccfg = ChunkConfig(n_sink=4, top_chunks=top_chunks, n_local=n_local, max_chunk_len=12, max_chunks=40,
                     keep=keep, boundary_tokens=boundary_tokens, prefill="dense").validate(S, 1)
  lengths = np.array([150, 90, 20])
  st = make_table(rng, B, S, ccfg, lengths)
  pos = lengths - 1
  # A forced selection: random candidates (all but the local chunks), -1 padded.
  sel = np.full((B, top_chunks), -1, np.int32)
  chosen = np.zeros((B, ccfg.max_chunks), bool)
  for b in range(B):
    cands = np.arange(max(int(st.n_chunks[b]) - n_local, 0))
    pick = np.sort(rng.permutation(cands)[: rng.randint(0, min(top_chunks, len(cands)) + 1)])
    sel[b, : len(pick)] = pick
    chosen[b, pick] = True
  k = jax.random.normal(jax.random.key(seed), (1, B, S, K, D))
  v = jax.random.normal(jax.random.key(seed + 1), (1, B, S, K, D))
  q = jax.random.normal(jax.random.key(seed + 2), (B, 1, H, D))
  wpos, wvalid, used = working_positions(st, jnp.asarray(chosen), ccfg, st.work_pos.shape[-1], jnp.asarray(pos))
  wk, wv = compact(k, v, wpos)
  M = ccfg.max_chunk_len
  start = jnp.clip(st.open_start, 0, S - M)
  open_pos = start[:, None] + jnp.arange(M)
  take = lambda x: jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, M, 0))(x[0], start)
  open_ok = (open_pos >= st.open_start[:, None]) & (open_pos <= jnp.asarray(pos)[:, None])
  work_ok = wvalid & (wpos <= jnp.asarray(pos)[:, None])
  n_slots = -(-int(used.max()) // BLOCK) * BLOCK
  got = packed_decode_attention(q, wk, wv, 0, work_ok, n_slots, take(k), take(v), open_ok,
                                scale=D**-0.5, softcap=None, blocks=attn.decode_blocks(wk.shape[2], blocks))
  vis = reference_visible(st, sel, ccfg, pos)
  # Every visible token is in exactly one working or open slot.
  for b in range(B):
    slots = np.concatenate([np.asarray(wpos[b])[np.asarray(work_ok[b])], np.asarray(open_pos[b])[np.asarray(open_ok[b])]])
    assert sorted(slots.tolist()) == np.flatnonzero(vis[b]).tolist()
  mask = np.zeros((B, 1, S), bool)
  mask[:, 0, : vis.shape[1]] = vis
  want = attn.attend(q, k[0], v[0], jnp.asarray(mask), scale=D**-0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep, boundary_tokens", [("chunk", False), ("chunk", True), ("boundary", False)])
@pytest.mark.parametrize("W", [40, 64, 131])
def test_chunks_past_the_working_slots_give_way_oldest_first(keep, boundary_tokens, W):
  """A full chunk table merges every later chunk into its last one, which can outgrow the W slots: its newest
  tokens are kept and the oldest read give way (they were cut off at the end, so the question after a long
  text was never read and chunk_generate answered with garbage)."""
  ccfg = ChunkConfig(n_sink=4, top_chunks=2, n_local=1, max_chunk_len=12, max_chunks=17, keep=keep,
                     boundary_tokens=boundary_tokens, prefill="dense").validate(200, 1)
  n, ends = 4, np.array([9, 20, 30, 180])  # the last chunk holds the merged rest of the text
  st = init_chunk_state(1, 1, 1, 0, 2, 1, 8, jnp.float32, ccfg.resolve((0,), (0,), (0,), 1, head_dim=8), W)
  st = st.replace(chunk_start=st.chunk_start.at[0, :n].set(np.r_[4, ends[:-1] + 1]),
                  chunk_end=st.chunk_end.at[0, :n].set(ends), n_chunks=jnp.asarray([n], jnp.int32))
  chosen = jnp.zeros((1, ccfg.max_chunks), bool).at[0, 1].set(True)
  wpos, wvalid, used = working_positions(st, chosen, ccfg, W, jnp.asarray([180]))
  got = np.asarray(wpos[0])[np.asarray(wvalid[0])].tolist()
  chunk_1 = [20] if keep == "boundary" else list(range(10, 21))
  read = chunk_1 + ([9, 30] if boundary_tokens else []) + list(range(31, 181))  # in position order, sorted below
  assert got == list(range(4)) + sorted(read)[len(read) - min(len(read), W - 4):]
  assert int(used[0]) == min(4 + len(read), W) and got[-1] == 180


@pytest.mark.parametrize("selection", ["kv_head", "shared"])
@pytest.mark.parametrize("budget", [0.25, 0.3])
def test_long_local_chunks_leave_room_for_the_chosen_ones(selection, budget):
  """Text closed by force every 64 tokens (a table, a list, code): four local chunks alone fill a quarter of
  800 tokens, and nothing was chosen by score, so a needle's chunk was never read (0 of 8 number-table
  needles that vanilla found). The local chunks now take the recent share of the budget as far as they fit it,
  and the best-scored chunk is read."""
  ccfg = ChunkConfig(n_sink=4, n_local=4, max_chunk_len=64, max_chunks=32, kv_budget=budget, selection=selection,
                     prefill="dense").validate(1024, 1)
  n, W = 12, 512
  ends = 3 + 64 * np.arange(1, n + 1)
  st = init_chunk_state(1, 1, 1, 0, 2, 1, 8, jnp.float32, ccfg.resolve((0,), (0,), (0,), 1, head_dim=8), W)
  st = st.replace(chunk_start=st.chunk_start.at[0, :n].set(ends - 63), chunk_end=st.chunk_end.at[0, :n].set(ends),
                  n_chunks=jnp.asarray([n], jnp.int32), open_start=jnp.asarray([ends[-1] + 1], jnp.int32))
  pos = jnp.asarray([ends[-1] + 20], jnp.int32)  # 20 tokens into the open chunk: 792 seen
  score = jnp.zeros((1, 1, ccfg.max_chunks)).at[0, 0, 2].set(1.0)  # the needle's chunk, far from the end
  chosen = choose_at(st, score, pos, ccfg)[:, 0]
  assert bool(chosen[0, 2])
  wpos, wvalid, used = working_positions(st, chosen, ccfg, W, pos)
  read = set(np.asarray(wpos[0])[np.asarray(wvalid[0])].tolist())
  assert set(range(int(ends[1]) + 1, int(ends[2]) + 1)) <= read  # the chunk read whole
  assert set(range(int(ends[-2]) + 1, int(ends[-1]) + 1)) <= read  # and the newest chunk, always
  seen = int(pos[0]) + 1
  assert len(read) + 20 <= np.ceil(budget * seen) + 64  # within a chunk of the budget, the open chunk counted


@pytest.mark.parametrize("spare", [0, 3])
@pytest.mark.parametrize("limited_by", ["slots", "budget"])
def test_boundary_tokens_past_the_working_slots_give_way_oldest_first(spare, limited_by):
  """When the working buffer or the budget cannot hold every left-out chunk's last token, the
  oldest are dropped, never a chunk read whole."""
  ccfg = ChunkConfig(n_sink=4, top_chunks=1, n_local=1, max_chunk_len=12, max_chunks=40, boundary_tokens=True,
                     boundary_share=1.0, prefill="dense").validate(160, 1)
  st = make_table(np.random.RandomState(0), 1, 160, ccfg, np.array([150]))
  n = int(st.n_chunks[0])
  start, end = np.asarray(st.chunk_start[0]), np.asarray(st.chunk_end[0])
  chosen = np.zeros((1, ccfg.max_chunks), bool)
  chosen[0, 0] = True
  whole = [*range(start[0], end[0] + 1), *range(start[n - 1], end[n - 1] + 1)]
  fit = ccfg.n_sink + len(whole) + spare
  W, room = (fit, None) if limited_by == "slots" else (st.work_pos.shape[-1], jnp.asarray([fit - ccfg.n_sink]))
  wpos, wvalid, used = working_positions(st, jnp.asarray(chosen), ccfg, W, jnp.asarray([149]), room)
  want = sorted([*range(ccfg.n_sink), *whole, *end[1:n - 1][len(end[1:n - 1]) - spare:]])
  assert np.asarray(wpos[0])[np.asarray(wvalid[0])].tolist() == want
  assert int(used[0]) == fit


@pytest.mark.parametrize("chunk_len, budget", [(27, 0.04), (27, 0.05), (1, 0.25), (1, 0.5)])
@pytest.mark.parametrize("recent_share", [0.0, 0.75])
def test_last_tokens_that_fill_the_budget_give_way_to_the_best_chunk(chunk_len, budget, recent_share):
  """Under a budget of a few tokens a chunk, the last tokens of the chunks left out filled what the sinks, the
  local and the open chunk left, and nothing was read by score (0 of 25 passkeys that vanilla found at 6.25% of
  2K). The best-scored chunk is now read whole in place of the oldest of them, and only it: with one-token
  chunks every candidate costs nothing past its last token, and the read still keeps to the budget."""
  ccfg = ChunkConfig(n_sink=4, n_local=1, max_chunk_len=64, max_chunks=128, kv_budget=budget,
                     boundary_tokens=True, boundary_share=1.0, recent_share=recent_share,
                     prefill="dense").validate(4096, 1)
  n, W, opened = 100, 1024, 5
  ends = 3 + chunk_len * np.arange(1, n + 1)
  st = init_chunk_state(1, 1, 1, 0, 2, 1, 8, jnp.float32, ccfg.resolve((0,), (0,), (0,), 1, head_dim=8), W)
  st = st.replace(chunk_start=st.chunk_start.at[0, :n].set(ends - chunk_len + 1), chunk_end=st.chunk_end.at[0, :n].set(ends),
                  n_chunks=jnp.asarray([n], jnp.int32), open_start=jnp.asarray([ends[-1] + 1], jnp.int32))
  pos = jnp.asarray([ends[-1] + opened], jnp.int32)
  best = 7  # far from the end, outside any recent share
  score = jnp.asarray(np.random.RandomState(0).rand(1, 1, ccfg.max_chunks) * 0.5).at[0, 0, best].set(1.0)
  chosen = choose_at(st, score, pos, ccfg)[:, 0]
  seen, n_budget = int(pos[0]) + 1, int(ccfg.budget_tokens(pos + 1)[0])
  # Beside the sinks, the newest and the open chunk and the other last tokens, no chunk fits.
  assert ccfg.n_sink + chunk_len + opened + (n - 1) + (chunk_len - 1) > n_budget
  assert np.flatnonzero(np.asarray(chosen[0])).tolist() == [best]
  wpos, wvalid, used = working_positions(st, chosen, ccfg, W, pos, working_room_of(st, pos, ccfg))
  read = set(np.asarray(wpos[0])[np.asarray(wvalid[0])].tolist())
  assert set(range(int(ends[best - 1]) + 1, int(ends[best]) + 1)) <= read  # the best chunk, whole
  assert set(range(int(ends[-2]) + 1, int(ends[-1]) + 1)) <= read  # the newest chunk, always
  assert len(read) + opened <= n_budget < seen  # the open chunk's tokens counted


@pytest.mark.parametrize("recent_share", [0.0, 0.75])
@pytest.mark.parametrize("seed", range(3))
def test_the_last_tokens_take_at_most_their_share_of_the_budget(recent_share, seed):
  """With `boundary_share` the last tokens of the chunks left out take at most that share of what the budget
  leaves after the sinks, the local and the open chunk: the newest of them, as many as `choose` paid for, and
  the chunks chosen by score get the rest, read whole, within the budget. At 12.5% of 2.7K tokens in chunks of
  27, every last token would take a third of that room."""
  n, chunk_len, W, opened = 100, 27, 1024, 5
  kw = dict(n_sink=4, n_local=1, max_chunk_len=64, max_chunks=128, kv_budget=0.125, boundary_tokens=True,
            recent_share=recent_share, prefill="dense")
  ends = 3 + chunk_len * np.arange(1, n + 1)
  score = jnp.asarray(np.random.RandomState(seed).rand(1, 1, 128))
  chosen_counts = {}
  for share in (1.0, 0.25):
    ccfg = ChunkConfig(**kw, boundary_share=share).validate(4096, 1)
    st = init_chunk_state(1, 1, 1, 0, 2, 1, 8, jnp.float32, ccfg.resolve((0,), (0,), (0,), 1, head_dim=8), W)
    st = st.replace(chunk_start=st.chunk_start.at[0, :n].set(ends - chunk_len + 1),
                    chunk_end=st.chunk_end.at[0, :n].set(ends), n_chunks=jnp.asarray([n], jnp.int32),
                    open_start=jnp.asarray([ends[-1] + 1], jnp.int32))
    pos = jnp.asarray([ends[-1] + opened], jnp.int32)
    chosen = choose_at(st, score, pos, ccfg)[:, 0]
    n_budget = int(ccfg.budget_tokens(pos + 1)[0])
    wpos, wvalid, _ = working_positions(st, chosen, ccfg, W, pos, working_room_of(st, pos, ccfg))
    read = set(np.asarray(wpos[0])[np.asarray(wvalid[0])].tolist())
    picked = np.flatnonzero(np.asarray(chosen[0]))
    chosen_counts[share] = len(picked)
    for c in picked:  # read whole
      assert set(range(int(ends[c]) - chunk_len + 1, int(ends[c]) + 1)) <= read
    left_out = [c for c in range(n - 1) if c not in picked]  # the newest chunk is the local one
    last_read = [c for c in left_out if int(ends[c]) in read]
    room = n_budget - (4 + chunk_len + opened)
    want = len(left_out) if share == 1.0 else min(len(left_out), int(np.floor(share * room)))
    assert last_read == left_out[len(left_out) - want:]  # the newest of them, as many as paid for
    assert len(read) + opened <= n_budget
    if share < 1.0:
      assert want < n - 1  # the share binds here
  assert chosen_counts[0.25] > chosen_counts[1.0]  # the room the last tokens leave goes to chunks by score
