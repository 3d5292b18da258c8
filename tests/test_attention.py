"""The blocked dense attention of prefill against one masked softmax over every key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import attention as attn


@pytest.mark.parametrize("T,block_q,block_k,window,softcap,offset", [
    (37, 8, 16, attn.NO_WINDOW, None, 0),  # ragged last blocks
    (50, 16, 8, 9, None, 0),  # a sliding window shorter than a query block: early blocks skipped
    (50, 8, 8, 12, None, 7),  # positions that start past 0 (the skip reads positions)
    (64, 16, 16, attn.NO_WINDOW, 5.0, 0),  # soft-capped scores
    (20, 32, 32, 9, None, 0),  # one block
    (48, 16, 8, 9, None, 0),  # whole query blocks (so `query_loop` loops) with a window
    (64, 8, 32, attn.NO_WINDOW, None, 3),  # key tiles longer than query blocks
])
@pytest.mark.parametrize("query_loop", [False, True])
def test_causal_attention_matches_one_softmax_over_every_key(T, block_q, block_k, window, softcap, offset, query_loop):
  B, H, K, D = 2, 4, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(T * 31 + block_q + block_k + window % 97), 3)
  q = jax.random.normal(kq, (B, T, H, D))
  k = jax.random.normal(kk, (B, T, K, D))
  v = jax.random.normal(kv, (B, T, K, D))
  pos = jnp.broadcast_to(jnp.arange(T) + offset, (B, T))
  valid = jnp.arange(T) < jnp.array([T, T - 5])[:, None]  # the second row is right-padded
  got, lse = attn.causal_attention(q, k, v, pos, valid, window, scale=0.3, softcap=softcap, block_q=block_q,
                                   block_k=block_k, return_lse=True, query_loop=query_loop)
  mask = attn.visible(pos, pos, valid, window)
  want = attn.attend(q, k, v, mask, scale=0.3, softcap=softcap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-5)
  s = attn.scores(attn.split_heads(q, K), k, mask[:, None, None], scale=0.3, softcap=softcap)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(s, axis=-1)), atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("S", [1, 100, 128, 256, 512, 2048, 2304, 4096, 32768])
def test_decode_blocks_tile_the_buffer_and_are_each_shorter_than_it(S):
  blocks = attn.decode_blocks(S)
  small = blocks[-1]
  assert S % small == 0 and all(b % small == 0 for b in blocks)
  assert list(blocks) == sorted(blocks, reverse=True)
  if S > 1:  # a block as long as the buffer made XLA copy it (tests/test_decode_in_place.py)
    assert all(b < S for b in blocks), blocks
  # the library's sizes, (2048, 256): those shorter than the buffer, down to a divisor of it
  expected = {256: (128,), 2048: (256,), 2304: (2048, 256), 4096: (2048, 256), 100: (4,)}
  assert attn.DECODE_BLOCKS == (2048, 256)  # the expectations below are of these sizes
  if S in expected:
    assert blocks == expected[S]


@pytest.mark.parametrize("S,blocks", [
    (96, (16,)),  # one size
    (96, (64, 16)),  # large blocks while they fit, then small: 64 + 16 + 16 for the longest row
    (96, (64, 32, 16)),  # three sizes
    (96, attn.DECODE_BLOCKS),  # the library's sizes on a short buffer: only those that divide it
    (100, (64, 16)),  # a buffer that no size divides: blocks of gcd(16, 100) = 4
])
@pytest.mark.parametrize("window,softcap", [(attn.NO_WINDOW, None), (20, None), (attn.NO_WINDOW, 5.0)])
@pytest.mark.parametrize("H,K", [(4, 2), (3, 1), (4, 4)])
def test_decode_attention_matches_one_softmax_over_the_visible_keys(S, blocks, window, softcap, H, K,
                                                                    monkeypatch):
  monkeypatch.setattr(attn, "DECODE_BLOCKS", blocks)
  L, B, D, layer = 2, 3, 8, 1
  kq, kk, kv = jax.random.split(jax.random.key(S + 7 * H + K + len(blocks)), 3)
  q = jax.random.normal(kq, (B, 1, H, D))
  k = jax.random.normal(kk, (L, B, S, K, D))
  v = jax.random.normal(kv, (L, B, S, K, D))
  # Ragged rows: the batch reads up to the longest. With a window, keys before the first block
  # inside any row's window (if any) are NaN: a read of them would poison the output.
  pos = jnp.array([S - 1, 40, 3] if window == attn.NO_WINDOW else [S - 1, 70, 50])
  if window != attn.NO_WINDOW:
    small = attn.decode_blocks(S)[-1]
    first = (int(pos.min()) - window + 1) // small * small
    k, v = (x.at[layer, :, :first].set(jnp.nan) for x in (k, v))
  got = jax.jit(lambda q, k, v, p: attn.decode_attention(q, k, v, layer, p, window, scale=0.3, softcap=softcap))(
      q, k, v, pos)
  dist = pos[:, None] - jnp.arange(S)[None]
  mask = ((dist >= 0) & (dist < window))[:, None]
  k, v = (jnp.nan_to_num(x) for x in (k, v))
  want = attn.attend(q, k[layer], v[layer], mask, scale=0.3, softcap=softcap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-5)


def test_a_mask_per_kv_head_is_each_head_group_on_its_own_mask():
  B, T, H, K, D = 2, 6, 4, 2, 8
  kq, kk, kv, km = jax.random.split(jax.random.key(11), 4)
  q = jax.random.normal(kq, (B, T, H, D))
  k = jax.random.normal(kk, (B, T, K, D))
  v = jax.random.normal(kv, (B, T, K, D))
  causal = jnp.tril(jnp.ones((T, T), bool))
  shared = jnp.broadcast_to(causal, (B, T, T))
  same = attn.attend(q, k, v, jnp.broadcast_to(shared[:, None], (B, K, T, T)), scale=0.3)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(attn.attend(q, k, v, shared, scale=0.3)))
  per_head = causal & (jax.random.uniform(km, (B, K, T, T)) < 0.6) | jnp.eye(T, dtype=bool)  # each row sees itself
  got = attn.attend(q, k, v, per_head, scale=0.3)
  G = H // K
  for h in range(K):  # kv head h alone, with its query heads, under its own mask
    want = attn.attend(q[:, :, h * G:(h + 1) * G], k[:, :, h:h + 1], v[:, :, h:h + 1], per_head[:, h], scale=0.3)
    np.testing.assert_allclose(np.asarray(got[:, :, h * G:(h + 1) * G]), np.asarray(want), atol=1e-6)
