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
])
def test_causal_attention_matches_one_softmax_over_every_key(T, block_q, block_k, window, softcap, offset):
  B, H, K, D = 2, 4, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(T * 31 + block_q + block_k + window % 97), 3)
  q = jax.random.normal(kq, (B, T, H, D))
  k = jax.random.normal(kk, (B, T, K, D))
  v = jax.random.normal(kv, (B, T, K, D))
  pos = jnp.broadcast_to(jnp.arange(T) + offset, (B, T))
  valid = jnp.arange(T) < jnp.array([T, T - 5])[:, None]  # the second row is right-padded
  got, lse = attn.causal_attention(q, k, v, pos, valid, window, scale=0.3, softcap=softcap, block_q=block_q,
                                   block_k=block_k, return_lse=True)
  mask = attn.visible(pos, pos, valid, window)
  want = attn.attend(q, k, v, mask, scale=0.3, softcap=softcap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-5)
  s = attn.scores(attn.split_heads(q, K), k, mask[:, None, None], scale=0.3, softcap=softcap)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(s, axis=-1)), atol=2e-5, rtol=2e-6)
