"""The ChunkLLM loss: gradients reach the adapters only, training lowers it, the terms are right."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chunkllm_jax import adapters as ad
from chunkllm_jax import boundaries
from train.teacher import TeacherOutputs
from tests.tiny_models import SOFTCAP, random_batch, tiny_params
from train import losses

CFG = losses.LossConfig(n_sink=2, max_chunk_len=5, max_chunks=16, recall_k=2, block_q=8, block_k=16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradients_reach_the_adapters_only(arch):
  params = tiny_params(arch, **(SOFTCAP if arch == "gemma3" else {}))
  adapters = ad.init_adapters(jax.random.key(1), params.config, ad.AdapterConfig(d_c=16))
  batch = random_batch(2, 30, lengths=[30, 22], seed=3)
  loss_fn = functools.partial(losses.chunkllm_loss, config=CFG)

  grads, metrics = jax.jit(jax.grad(loss_fn, has_aux=True))(adapters, params, batch)
  assert isinstance(grads, ad.Adapters) and grads.config == adapters.config
  for path, g in jax.tree_util.tree_flatten_with_path(grads.params)[0]:
    name = jax.tree_util.keystr(path)
    assert np.isfinite(g).all(), name
    if name != "['qk']['k']['outer']['bias']":  # adds q~ . b to a whole row: softmax ignores it
      assert np.abs(g).max() > 1e-6, name
  assert metrics["n_kl_queries"] > 0 and np.isfinite(metrics["loss"])
  # Differentiating in the backbone instead gives exactly nothing: the teacher is a constant.
  backbone_grads = jax.jit(jax.grad(lambda p: loss_fn(adapters, p, batch)[0]))(params)
  assert all((g == 0).all() for g in jax.tree.leaves(backbone_grads))


def test_training_lowers_the_loss():
  params = tiny_params("llama")
  adapters = ad.init_adapters(jax.random.key(2), params.config, ad.AdapterConfig(d_c=16))
  batch = random_batch(2, 32, seed=4)
  opt = optax.adamw(1e-2)

  @jax.jit
  def step(adapters, opt_state):
    (loss, metrics), grads = jax.value_and_grad(losses.chunkllm_loss, has_aux=True)(adapters, params, batch, CFG)
    updates, opt_state = opt.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, metrics

  opt_state = opt.init(adapters)
  history = []
  for _ in range(20):
    adapters, opt_state, metrics = step(adapters, opt_state)
    history.append(metrics)
  first, last = history[0], history[-1]
  assert last["loss"] < 0.7 * first["loss"]
  assert last["bce"] < first["bce"] and last["kl"] < first["kl"]


@pytest.mark.parametrize("n_local", [0, 2])
def test_kl_vanishes_when_the_student_is_the_teacher(n_local):
  """A teacher made from the student's own scores: KL = 0, recall = 1; the BCE is its formula.

  The teacher is normalised over every completed chunk; with n_local > 0 the loss renormalises it
  over the older ones, which is again the student's softmax over those."""
  rng = np.random.RandomState(5)
  B, T, D, C = 2, 24, 32, 8
  a = ad.init_adapters(jax.random.key(3), tiny_params().config, ad.AdapterConfig(d_c=16))
  h_LBTD = jnp.asarray(rng.randn(2, B, T, D), jnp.float32)
  h0_BTD = jnp.asarray(rng.randn(B, T, D), jnp.float32)
  labels = jnp.asarray(rng.rand(B, T) < 0.3, jnp.int8)
  valid = jnp.arange(T)[None] < jnp.asarray([[T], [15]])
  chunk_id = boundaries.chunks_from_labels(labels, 1, 4, valid)
  cand = boundaries.candidate_mask(chunk_id, C) & valid[..., None]
  ends = boundaries.chunk_ends(chunk_id, C)

  def student_P(p_layer, h):
    q, k = ad.qk_adapter_apply(p_layer, h)
    S = jax.nn.softmax(ad.chunk_scores(q, ad.chunk_keys(k, ends), cand), -1)
    return jnp.where(cand.any(-1, keepdims=True), S, 0.0)

  P = jax.vmap(student_P)(a.params["qk"], h_LBTD)
  teacher = TeacherOutputs(P_LBTC=P, h_LBTD=h_LBTD, h0_BTD=h0_BTD, hidden_BTD=h0_BTD)
  config = losses.LossConfig(max_chunks=C, recall_k=2, n_local=n_local)
  loss, m = jax.jit(losses.student_loss)(a, teacher, chunk_id, labels, valid, config)
  assert abs(float(m["kl"])) < 1e-5 and float(m["chunk_recall"]) == pytest.approx(1.0)
  far = boundaries.candidate_mask(chunk_id - n_local, C) & valid[..., None]
  assert m["n_kl_queries"] == int(far.any(-1).sum()) > 0 and m["n_recall_queries"] > 0
  if n_local == 0:
    assert float(m["teacher_far_mass"]) == pytest.approx(1.0, abs=1e-6)
  else:
    assert 0.0 < float(m["teacher_far_mass"]) < 0.99
  p = jax.nn.sigmoid(ad.chunk_adapter_logits(a.params["chunk"], h0_BTD))
  y = np.asarray(labels, np.float64)
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert float(m["bce"]) == pytest.approx(bce[np.asarray(valid)].mean(), rel=1e-5)
  assert float(loss) == pytest.approx(float(m["bce"] + m["kl"]), rel=1e-6)


def test_kl_over_older_chunks_equals_a_loop():
  """The KL with the `n_local` most recent chunks left out, against a loop over queries in numpy."""
  rng = np.random.RandomState(7)
  B, T, D, C, n_local = 2, 28, 32, 10, 2
  a = ad.init_adapters(jax.random.key(4), tiny_params().config, ad.AdapterConfig(d_c=16))
  h_LBTD = jnp.asarray(rng.randn(2, B, T, D), jnp.float32)
  labels = jnp.asarray(rng.rand(B, T) < 0.3, jnp.int8)
  valid = jnp.arange(T)[None] < jnp.asarray([[T], [19]])
  chunk_id = boundaries.chunks_from_labels(labels, 1, 4, valid)
  completed = np.asarray(boundaries.candidate_mask(chunk_id, C) & valid[..., None])
  P = rng.rand(2, B, T, C) * completed  # any teacher over the completed chunks
  P = P / np.maximum(P.sum(-1, keepdims=True), 1e-30)
  teacher = TeacherOutputs(P_LBTC=jnp.asarray(P, jnp.float32), h_LBTD=h_LBTD, h0_BTD=h_LBTD[0], hidden_BTD=h_LBTD[0])
  config = losses.LossConfig(max_chunks=C, recall_k=2, n_local=n_local)
  _, m = jax.jit(losses.student_loss)(a, teacher, chunk_id, labels, valid, config)

  cid, ends = np.asarray(chunk_id), np.asarray(boundaries.chunk_ends(chunk_id, C))
  kls, far = [], []
  for l in range(2):
    q, k = (np.asarray(x, np.float64) for x in ad.qk_adapter_apply(jax.tree.map(lambda x: x[l], a.params["qk"]), h_LBTD[l]))
    for b in range(B):
      for t in range(T):
        n_cand = cid[b, t] - n_local if valid[b, t] else 0
        if n_cand <= 0:
          continue
        js = np.arange(n_cand)
        p = P[l, b, t, js] / P[l, b, t, js].sum()
        s = q[b, t] @ k[b, ends[b, js]].T / np.sqrt(16)
        log_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
        kls.append(np.sum(p * (np.log(p) - log_s)))
        far.append(P[l, b, t, js].sum())
  assert m["n_kl_queries"] * 2 == len(kls) > 10
  assert float(m["kl"]) == pytest.approx(np.mean(kls), rel=1e-4)
  assert float(m["teacher_far_mass"]) == pytest.approx(np.mean(far), rel=1e-4)


def test_boundary_metrics_by_hand():
  logit = jnp.asarray([[3.0, -3.0, 3.0, 3.0, -3.0, 3.0]])  # predicted: 0, 2, 3, (5 is padding)
  labels = jnp.asarray([[1, 1, 0, 1, 0, 1]])  # true: 0, 1, 3
  valid = jnp.asarray([[True] * 5 + [False]])
  m = losses.boundary_metrics(logit, labels, valid, 0.5)
  assert float(m["boundary_precision"]) == pytest.approx(2 / 3)
  assert float(m["boundary_recall"]) == pytest.approx(2 / 3)
  assert float(m["boundary_f1"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("max_chunks", [1, 3, 6, 40])
def test_chunks_past_the_table_counted_by_hand(max_chunks):
  """The share of a batch's chunks past `max_chunks`, which no KL row serves, against a count by hand."""
  labels = np.zeros((2, 40), np.int32)
  labels[0, [6, 9, 15, 20, 33]] = 1  # 5 chunks after 4 sinks
  labels[1, [10, 30]] = 1  # 2 chunks, and a third closed by force at 16 tokens (positions 11-26)
  valid = np.ones((2, 40), bool)
  valid[1, 35:] = False
  config = losses.LossConfig(n_sink=4, max_chunk_len=16, max_chunks=max_chunks)
  counts = np.array([5, 3])
  want = np.maximum(counts - max_chunks, 0).sum() / counts.sum()
  got = losses.chunks_past_table(jnp.asarray(labels), jnp.asarray(valid), config)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
