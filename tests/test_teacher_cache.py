"""The head-max teacher at the selection rows, its cache, and the loss on it (train.teacher_cache)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import model
from tests.tiny_models import random_batch, tiny_params
from train import teacher_cache as tc
from train.losses import LossConfig, rows_config_of, rows_loss, training_loss


def _layers_qkh(params, tokens_T):
  """Per layer, q [T, H, D], k [T, K, D] and the attention input h [T, D], by a plain forward pass."""
  out = []

  def attend_fn(state, layer, q, k, v, h):
    o, state, _ = dense(state, layer, q, k, v, h)
    return o, state, (q[0], k[0], h[0])

  T = len(tokens_T)
  pos = jnp.arange(T)[None]
  dense = model.self_attend_fn(params.config, pos, pos < T)
  _, _, (q, k, h) = model.run_layers(params, model.embed(params, jnp.asarray(tokens_T)[None]), pos, attend_fn)
  for l in range(params.config.n_layers):
    out.append((np.asarray(q[l]), np.asarray(k[l]), np.asarray(h[l])))
  return out


def numpy_rows(params, tokens_T, labels_T, rc: tc.RowsConfig):
  """A loop: the chunk ends by the rule; row r (chunk r's boundary) ranks chunks 0 .. r - n_local by,
  per head, each of the last `score_queries` queries' softmax over those chunks' tokens summed per
  chunk; max over heads, then over the queries; renormalised."""
  ends, start = [], rc.n_sink
  for t in range(len(tokens_T)):
    if t >= rc.n_sink and (labels_T[t] > 0 or t - start + 1 >= rc.max_chunk_len):
      ends.append(t)
      start = t + 1
  qkh = _layers_qkh(params, tokens_T)
  cfg = params.config
  C = rc.max_chunks
  targets = np.zeros((len(rc.layers), C, C))
  for li, l in enumerate(rc.layers):
    q, k, _ = qkh[l]
    G = cfg.n_heads // cfg.n_kv_heads
    for r, e in enumerate(ends):
      n_cand = r + 1 - rc.n_local
      if n_cand <= 0:
        continue
      toks = np.arange(rc.n_sink, ends[n_cand - 1] + 1)
      best = np.zeros(n_cand)
      starts = [rc.n_sink] + [x + 1 for x in ends[:n_cand - 1]]
      for t in range(max(e - rc.score_queries + 1, 0), e + 1):
        seen = toks[toks <= t]  # a query reads no later key
        if not len(seen):
          continue
        s = np.einsum("hd,thd->ht", q[t], np.repeat(k[seen], G, axis=1)) * cfg.attn_scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        mass = np.stack([p[:, starts[j] - rc.n_sink:ends[j] + 1 - rc.n_sink].sum(-1) for j in range(n_cand)], -1)
        head = mass.max(0) if rc.heads == "max" else mass.mean(0)
        best = np.maximum(best, head)
      targets[li, r, :n_cand] = best / best.sum()
  return np.asarray(ends), targets, qkh


@pytest.mark.parametrize("heads", ["max", "mean"])
def test_row_targets_match_a_numpy_loop(heads):
  params = tiny_params()
  b = random_batch(1, 48, p_boundary=0.25, seed=4)
  rc = tc.RowsConfig(layers=(0, 1), n_sink=2, n_local=1, max_chunk_len=6, max_chunks=32, score_queries=3,
                     heads=heads)
  rows = jax.jit(tc.teacher_rows, static_argnums=4)(params, b["tokens"], b["labels"], b["lengths"], rc)
  ends, want, qkh = numpy_rows(params, np.asarray(b["tokens"][0]), np.asarray(b["labels"][0]), rc)
  assert len(ends) > 4
  np.testing.assert_allclose(np.asarray(rows["target_BLCC"][0]), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(rows["n_cand_BC"][0, :len(ends)]),
                                np.maximum(np.arange(1, len(ends) + 1) - rc.n_local, 0))
  np.testing.assert_array_equal(np.asarray(rows["ends_BC"][0, :len(ends)]), ends)
  for li, l in enumerate(rc.layers):  # h at every position: k~ reads the chunk ends, q~ the window before them
    np.testing.assert_allclose(np.asarray(rows["h_BLTD"][0, li]), qkh[l][2], rtol=1e-5, atol=1e-6)


def test_head_max_keeps_a_lone_retrieval_head():
  """The reason for the target: one head that looks at chunk 0, the others at the newest candidate.
  The head mean ranks chunk 0 below; the head max puts it first."""
  from chunkllm_jax.selection import attention_probs

  ends = jnp.asarray([[3, 7, 11, 15]])
  k = jnp.zeros((1, 16, 4, 2)).at[0, 0:4, 0, 0].set(1.0).at[0, 12:16, 1:, 1].set(1.0)
  q = jnp.zeros((1, 1, 4, 2)).at[0, 0, 0, 0].set(8.0).at[0, 0, 1:, 1].set(2.0)
  n = jnp.asarray([[4]])
  top = lambda heads: int(jnp.argmax(attention_probs(q, k, ends, n, n_sink=0, scale=1.0, heads=heads)[0, 0]))
  assert top("max") == 0 and top("mean") == 3


def _adapters(params, layers):
  return cj.init_adapters(jax.random.key(1), params.config, cj.AdapterConfig(d_c=8, qk_layers=layers))


@pytest.mark.parametrize("student_queries", [1, 3])
def test_cached_step_equals_the_computed_step(tmp_path, student_queries):
  """Loss and gradients from rows read back from the cache equal those computed inside the step."""
  params = tiny_params()
  cfg = LossConfig(teacher="head_max", n_sink=2, n_local=1, max_chunk_len=6, max_chunks=16, score_queries=3,
                   recall_k=2, student_queries=student_queries)
  adapters = _adapters(params, (1,))
  b = random_batch(2, 40, p_boundary=0.25, seed=6)
  rc = rows_config_of(cfg, (1,))
  fp = tc.cache_fingerprint(rc, backbone="tiny", weights="w", data="d", seq_len=40, split="train")
  source = [dict(tokens=np.asarray(b["tokens"][i]), labels=np.asarray(b["labels"][i])) for i in range(2)]
  assert tc.build_cache(params, source, tmp_path / "c", fp, rc, progress=False) == 2
  assert tc.build_cache(params, source, tmp_path / "c", fp, rc, progress=False) == 0  # resumes: nothing left
  # A process given the writer's list runs exactly those programs, whatever the folder holds by then.
  assert tc.build_cache(params, source, tmp_path / "c", fp, rc, progress=False, write=False, todo=[1]) == 1
  assert tc.missing_shards(tmp_path / "c", 3) == [2]
  cached = tc.CachedRows(tmp_path / "c", 2)
  batch = {k: jnp.stack([cached[i][k] for i in range(2)]) for k in tc.SHARD_KEYS}
  grad = jax.jit(jax.value_and_grad(training_loss, has_aux=True), static_argnums=3)
  (l1, m1), g1 = grad(adapters, params, {"tokens": b["tokens"], "labels": b["labels"]}, cfg)
  (l2, m2), g2 = grad(adapters, params, batch, cfg)
  assert float(m1["n_kl_queries"]) > 4 and float(m1["kl"]) > 0
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  # The two paths fuse the float32 sums differently (XLA's choice varies by CPU), and some leaves'
  # gradients are zero up to rounding (a shift every softmax ignores), so each entry is held to 1e-5 of
  # its own value or of the largest gradient entry, whichever is larger.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g2))
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * scale), g1, g2)


def test_a_damaged_shard_is_computed_again_or_named(tmp_path, capsys):
  """A shard the disk cut short (a power cut, a full disk) is computed again where the run can, with a warning,
  and otherwise named with what to do; never a raw zipfile error."""
  params = tiny_params()
  rc = rows_config_of(LossConfig(teacher="head_max", n_sink=2, n_local=1, max_chunk_len=6, max_chunks=16,
                                 score_queries=3), (1,))
  b = random_batch(2, 40, p_boundary=0.25, seed=6)
  source = [dict(tokens=np.asarray(b["tokens"][i]), labels=np.asarray(b["labels"][i])) for i in range(2)]
  fp = tc.cache_fingerprint(rc, backbone="tiny", weights="w", data="d", seq_len=40, split="train")
  tc.build_cache(params, source, tmp_path / "c", fp, rc, progress=False)
  shard = sorted((tmp_path / "c").glob("*.npz"))[1]
  whole = dict(np.load(shard))
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(tc.CacheError, match=f"shard {shard} cannot be read .*delete it and run again"):
    tc.CachedRows(tmp_path / "c", 2)[1]
  got = tc.CachedRows(tmp_path / "c", 2, compute=tc.teacher_of(params, source, rc))[1]
  assert "cannot be read" in capsys.readouterr().err
  for k in tc.SHARD_KEYS:
    np.testing.assert_array_equal(got[k], whole[k])
    np.testing.assert_array_equal(np.load(shard)[k], whole[k])  # and stored whole again


@pytest.mark.parametrize("student_queries", [1, 3])
def test_rows_kl_vanishes_when_the_student_is_the_teacher(student_queries):
  """With targets made from the student's own scores (as `chunk_prefill.adapter_rows`, the inference
  path, computes them), KL(P || S) is zero; with others it is not."""
  params = tiny_params()
  cfg = LossConfig(teacher="head_max", n_sink=2, n_local=1, max_chunk_len=6, max_chunks=16, score_queries=3,
                   student_queries=student_queries)
  adapters = _adapters(params, (1,))
  b = random_batch(1, 48, p_boundary=0.25, seed=2)
  rows = tc.teacher_rows(params, b["tokens"], b["labels"], b["lengths"], rows_config_of(cfg, (1,)))
  from chunkllm_jax.adapters import qk_adapter_apply
  from chunkllm_jax.chunk_prefill import adapter_rows

  p1 = jax.tree.map(lambda w: w[0], adapters.params["qk"])
  q, k = qk_adapter_apply(p1, rows["h_BLTD"][:, 0])
  ends = rows["ends_BC"]
  own = adapter_rows(q, k, ends, ends, rows["n_cand_BC"], n_queries=student_queries)
  own = own / jnp.maximum(own.sum(-1, keepdims=True), 1e-30)
  _, same = rows_loss(adapters, dict(rows, target_BLCC=own[:, None]), cfg)
  _, other = rows_loss(adapters, rows, cfg)
  assert abs(float(same["kl"])) < 1e-5 and float(other["kl"]) > 1e-3


def test_a_cache_of_other_settings_is_refused(tmp_path):
  params = tiny_params()
  rc = tc.RowsConfig(layers=(1,), n_sink=2, n_local=1, max_chunk_len=6, max_chunks=16, score_queries=3)
  b = random_batch(1, 40, seed=1)
  source = [dict(tokens=np.asarray(b["tokens"][0]), labels=np.asarray(b["labels"][0]))]
  fp = tc.cache_fingerprint(rc, backbone="tiny", weights="w", data="d", seq_len=40, split="train")
  tc.build_cache(params, source, tmp_path / "c", fp, rc, progress=False)
  before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
  for other, named in [(dict(backbone="other"), "backbone"), (dict(weights="fine-tuned"), "weights"),
                       (dict(seq_len=80), "seq_len"),
                       (dict(rows=dict(fp["rows"], heads="mean")), "rows.heads")]:
    with pytest.raises(tc.CacheError, match=named):
      tc.build_cache(params, source, tmp_path / "c", dict(fp, **other), rc, progress=False)
  assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before  # nothing touched
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  with pytest.raises(tc.CacheError, match="not empty"):
    tc.build_cache(params, source, tmp_path / "mine", fp, rc, progress=False)
  assert json.loads((tmp_path / "c" / tc.CACHE_FILE).read_text()) == fp


def test_opening_a_cache_removes_what_killed_writers_left(tmp_path):
  """A shard half-written by a process of this host that is gone is removed (it is written again when
  needed); a live writer's, another host's and names the cache never gives are left alone."""
  rc = tc.RowsConfig(layers=(1,), n_sink=2, n_local=1, max_chunk_len=6, max_chunks=16, score_queries=3)
  fp = tc.cache_fingerprint(rc, backbone="tiny", weights="w", data="d", seq_len=40, split="train")
  path = tc.open_cache(tmp_path / "c", fp)
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead, host = int(gone.stdout), socket.gethostname()
  left = [f".000003.npz.tmp-{host}-{dead}", f".cache.json.tmp-{host}-{dead}"]
  kept = [f".000004.npz.tmp-{host}-{os.getpid()}", f".000005.npz.tmp-otherhost-{dead}", f".notes.npz.tmp-{host}-{dead}",
          "000001.npz"]
  for name in left + kept:
    (path / name).write_bytes(b"partial")
  assert tc.open_cache(path, fp, write=False) == path and all((path / n).exists() for n in left)  # a reader removes nothing
  tc.open_cache(path, fp)
  assert sorted(p.name for p in path.iterdir()) == sorted(kept + [tc.CACHE_FILE])
