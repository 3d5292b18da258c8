"""The blockwise teacher against the dense T x T reference, and its hidden states against forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import attention as attn
from chunkllm_jax import boundaries, model
from train import teacher
from tests.tiny_models import SOFTCAP, random_batch, tiny_params


def candidates_ref(chunk_id_T, valid_T, C):
  """The slow obvious candidate rule: chunks whose last token comes before t's own chunk starts."""
  T = len(chunk_id_T)
  cand = np.zeros((T, C), bool)
  last = {j: max(np.flatnonzero(chunk_id_T == j)) for j in set(chunk_id_T.tolist()) if j >= 0}
  for t in range(T):
    c = chunk_id_T[t]
    if c < 0 or not valid_T[t]:
      continue
    start = np.flatnonzero(chunk_id_T == c).min()
    for j, e in last.items():
      if j < C and e < start:
        cand[t, j] = True
  return cand


def dense_teacher(params, tokens, chunk_id, lengths, C, qk_layers):
  """T x T attention per layer, averaged over heads, summed per chunk, renormalised over candidates."""
  cfg = params.config
  B, T = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  valid = pos < lengths[:, None]

  def attend_fn(state, layer, q, k, v, h):
    mask = attn.visible(pos, pos, valid, layer["window"])
    o = attn.attend(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
    q5 = q.reshape(B, T, cfg.n_kv_heads, -1, cfg.head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", q5, k) * cfg.attn_scale
    if cfg.attn_softcap is not None:
      s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
    a = jax.nn.softmax(jnp.where(mask[:, None, None], s, attn.NEG_INF), -1).mean((1, 2))
    return o, state, (a, h)

  _, _, (a_LBTS, h_LBTD) = model.run_layers(params, model.embed(params, tokens), pos, attend_fn)
  a_LBTS, chunk_id, valid = np.asarray(a_LBTS, np.float64), np.asarray(chunk_id), np.asarray(valid)
  P = np.zeros((len(qk_layers), B, T, C))
  for i, l in enumerate(qk_layers):
    for b in range(B):
      cand = candidates_ref(chunk_id[b], valid[b], C)
      for t in range(T):
        mass = np.array([a_LBTS[l, b, t, chunk_id[b] == j].sum() for j in range(C)]) * cand[t]
        if mass.sum() > 0:
          P[i, b, t] = mass / mass.sum()
  return P, np.asarray(h_LBTD)[list(qk_layers)]


LENGTHS = (29, 17, 3)  # a full row, a padded row, and a row too short for any candidate


@functools.lru_cache(maxsize=None)
def run_teacher(arch, block_q, block_k, max_chunks):
  """(params, batch, chunk_id, teacher outputs), cached: each case compiles once per session."""
  params = tiny_params(arch, **(SOFTCAP if arch == "gemma3" else {}))  # the reference honours soft-capping
  batch = random_batch(3, 29, lengths=LENGTHS, seed=1)
  chunk_id = boundaries.chunks_from_labels(batch["labels"], 3, 5, jnp.arange(29) < batch["lengths"][:, None])
  fn = jax.jit(teacher.teacher_chunk_attention, static_argnames=("max_chunks", "block_q", "block_k"))
  out = fn(params, batch["tokens"], chunk_id, max_chunks=max_chunks, lengths_B=batch["lengths"],
           block_q=block_q, block_k=block_k)
  return params, batch, chunk_id, out


@pytest.mark.parametrize("arch,block_q,block_k,max_chunks", [
    ("llama", 4, 4, 16), ("llama", 4, 8, 16), ("llama", 16, 8, 5), ("gemma3", 4, 8, 16), ("gemma3", 64, 64, 16)])
def test_blockwise_teacher_equals_dense_reference(arch, block_q, block_k, max_chunks):
  params, batch, chunk_id, out = run_teacher(arch, block_q, block_k, max_chunks)
  qk_layers = params.config.full_attention_layers
  P_ref, h_ref = dense_teacher(params, batch["tokens"], chunk_id, batch["lengths"], max_chunks, qk_layers)
  assert out.P_LBTC.shape == (len(qk_layers), 3, 29, max_chunks)
  np.testing.assert_allclose(out.P_LBTC, P_ref, atol=2e-6)
  for b, n in enumerate(LENGTHS):  # padding may differ: fully masked sliding-window rows
    np.testing.assert_allclose(out.h_LBTD[:, b, :n], h_ref[:, b, :n], rtol=1e-5, atol=1e-5)
  # Rows sum to 1 exactly where a candidate exists; rows without one (sinks, first chunk,
  # padding, the 3-token row) are all zero.
  has = P_ref.sum(-1) > 0
  assert has.any() and (~has).any() and not has[:, 2].any()
  np.testing.assert_allclose(np.asarray(out.P_LBTC).sum(-1)[has], 1.0, atol=1e-5)
  assert (np.asarray(out.P_LBTC)[~has] == 0).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_teacher_hidden_states_equal_forward(arch):
  params, batch, _, out = run_teacher(arch, 4, 8, 16)
  want = cj.forward(params, batch["tokens"], batch["lengths"])
  got = model.unembed(params, out.hidden_BTD)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-5, atol=1e-5)
  # h0 is layer 0's output: the final hidden state of the same model cut to one layer.
  cfg = params.config
  one = cj.ModelParams(backbone={**params.backbone, "layers": jax.tree.map(lambda w: w[:1], params.backbone["layers"])},
                       config=cfg.replace(n_layers=1, layer_sliding=cfg.layer_sliding[:1]))
  pos = jnp.broadcast_to(jnp.arange(29), (3, 29))
  valid = pos < batch["lengths"][:, None]
  h0, _, _ = model.run_layers(one, model.embed(one, batch["tokens"]), pos, model.self_attend_fn(one.config, pos, valid))
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(out.h0_BTD[b, :n], h0[b, :n], rtol=1e-5, atol=1e-5)


def test_teacher_never_builds_a_T_by_T_buffer():
  """An 8K sequence compiles to a program whose scratch memory is far below one T x T float32 array."""
  params = tiny_params("llama")
  T = 8192
  tokens, chunk_id = jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T), jnp.int32)
  fn = jax.jit(lambda p, t, c: teacher.teacher_chunk_attention(p, t, c, max_chunks=512))
  mem = fn.lower(params, tokens, chunk_id).compile().memory_analysis()
  assert mem.temp_size_in_bytes < T * T * 4 / 2


def test_teacher_refuses_sliding_layers():
  params = tiny_params("gemma3")
  with pytest.raises(ValueError, match="sliding"):
    teacher.teacher_chunk_attention(params, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32),
                                    max_chunks=4, qk_layers=(0, 1))


def test_pallas_teacher_equals_xla_teacher():
  """The distillation kernel (interpret mode) in place of the XLA teacher on the QK layers."""
  import chunkllm_jax as cj
  from chunkllm_jax import boundaries
  from train import teacher

  cfg = cj.ModelConfig(arch="gemma3", vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                       d_ff=64, qk_norm=True, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                       sandwich_norm=True, sliding_window=16, layer_sliding=(True, False, False),
                       local_rope_theta=10000.0, tie_embeddings=True)
  params = cj.init_backbone(jax.random.key(0), cfg)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 96, (2, 256))
  labels = (rng.rand(2, 256) < 0.1).astype(np.int8)
  chunk_id = boundaries.chunks_from_labels(labels, n_sink=4, max_chunk_len=32)
  kw = dict(max_chunks=48, lengths_B=np.array([256, 200]), block_q=128, block_k=128)
  ref = teacher.teacher_chunk_attention(params, tokens, chunk_id, **kw)
  got = teacher.teacher_chunk_attention(params, tokens, chunk_id, attention="pallas", interpret=True, **kw)
  np.testing.assert_allclose(got.P_LBTC, ref.P_LBTC, atol=1e-5)
  np.testing.assert_allclose(got.hidden_BTD[0], ref.hidden_BTD[0], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(ref.P_LBTC).sum()) > 0
