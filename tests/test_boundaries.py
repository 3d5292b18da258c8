"""Sentence-end labels from pySBD + the real SmolLM2 tokenizer, and chunk ids from labels."""

import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import boundaries


def boundary_tokens(text, tokenizer):
  ids, labels = boundaries.sentence_end_labels(text, tokenizer)
  assert ids.dtype == np.int32 and labels.dtype == np.int8 and ids.shape == labels.shape
  return [tokenizer.decode([i]) for i in ids[labels == 1]]


@pytest.mark.parametrize("text,want", [
    ("Hello there. How are you? I am fine.", [".", "?", "."]),
    ('She asked, "Why?" He shrugged.', ['?"', "."]),  # the closing quote rides on the boundary token
    ("It ended.\nThe next one began.\n", [".", "."]),  # a trailing newline token is not the boundary
    ("Done.)  Next one!\n\nFinal words", [".)", "!", " words"]),  # spaces between sentences; an unterminated end
    ("Mr. Smith arrived at 3 p.m. sharp. He sat.", [".", "."]),  # abbreviations are not sentence ends
])
def test_sentence_end_labels_with_the_real_tokenizer(tokenizer, text, want):
  assert boundary_tokens(text, tokenizer) == want


@pytest.mark.parametrize("offsets,ends,want", [
    ([(0, 2), (2, 4), (4, 6), (6, 7)], [3, 7], [0, 1, 0, 1]),  # 'Hi', '.\n' spans the end at 3
    ([(0, 2), (2, 3), (3, 4), (4, 6)], [3, 6], [0, 1, 0, 1]),  # a whitespace token after the '.'
    ([(0, 0), (0, 3), (3, 4), (4, 4)], [4], [0, 0, 1, 0]),  # zero-width BOS / EOS never marked
    ([(0, 3), (3, 5), (3, 5), (5, 6)], [5], [0, 0, 1, 0]),  # one character, two byte tokens: the last
])
def test_labels_from_offsets(offsets, ends, want):
  assert boundaries.labels_from_offsets(ends, offsets).tolist() == want


def chunks_ref(labels_T, n_sink, max_len, valid_T):
  out, cid, n = np.full(len(labels_T), -1), 0, 0
  for t, (y, ok) in enumerate(zip(labels_T, valid_T)):
    if t < n_sink or not ok:
      continue
    out[t], n = cid, n + 1
    if y or (max_len is not None and n >= max_len):
      cid, n = cid + 1, 0
  return out


def test_chunks_from_labels_by_hand():
  labels = jnp.asarray([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0]])
  got = boundaries.chunks_from_labels(labels, n_sink=2, max_chunk_len=3)
  # sinks; [2, 3] closed by the label at 3; [4, 5, 6] and [7, 8, 9] force-closed; [10] by its label
  assert got.tolist() == [[-1, -1, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4]]
  ends = boundaries.chunk_ends(got, 6)
  assert ends.tolist() == [[3, 6, 9, 10, 11, -1]]


@pytest.mark.parametrize("n_sink,max_len", [(0, None), (4, 3), (1, 1), (3, 7)])
def test_chunks_from_labels_equals_loop(n_sink, max_len):
  rng = np.random.RandomState(n_sink)
  labels = rng.rand(3, 40) < 0.15
  valid = np.arange(40)[None] < np.array([[40], [23], [2]])
  got = np.asarray(boundaries.chunks_from_labels(labels, n_sink, max_len, valid))
  for b in range(3):
    assert got[b].tolist() == chunks_ref(labels[b], n_sink, max_len, valid[b]).tolist()
  # every chunk is contiguous and at most max_len long
  for row in got:
    ids = row[row >= 0]
    assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
    if max_len is not None and len(ids):
      assert np.bincount(ids).max() <= max_len


def test_candidate_mask_and_chunk_ends():
  chunk_id = jnp.asarray([[-1, 0, 0, 1, 2, 2, 2, 3, -1]])  # last position is padding
  cand = np.asarray(boundaries.candidate_mask(chunk_id, 3))[0]
  assert cand.sum(-1).tolist() == [0, 0, 0, 1, 2, 2, 2, 3, 0]
  assert not cand[:, 2][:7].any()  # chunk 2 is no candidate for its own tokens
  assert boundaries.chunk_ends(chunk_id, 3).tolist() == [[2, 3, 6]]  # chunk 3 exceeds max_chunks: dropped


@pytest.mark.parametrize("seed, n_sink, max_chunk_len", [(0, 4, 6), (1, 0, 64), (2, 2, 3)])
def test_training_chunks_equal_inference_chunks(seed, n_sink, max_chunk_len):
  """For the same boundaries, training's chunk ids (from labels) and the chunk table chunk_prefill
  builds (from the same tokens marked as separators) hold the same tokens, chunk for chunk."""
  from chunkllm_jax.chunk_config import ChunkConfig
  from chunkllm_jax.chunk_generation import chunk_prefill
  from tests.tiny_models import chunk_params

  rng = np.random.RandomState(seed)
  B, T, SEP = 2, 60, 7
  lengths = np.asarray([T, 41])
  labels = rng.rand(B, T) < 0.2
  tokens = np.where(labels, SEP, rng.randint(8, 90, (B, T)))  # a label is a separator token
  valid = np.arange(T) < lengths[:, None]
  train_ids = np.asarray(boundaries.chunks_from_labels(jnp.asarray(labels), n_sink, max_chunk_len, jnp.asarray(valid)))
  ccfg = ChunkConfig(n_sink=n_sink, max_chunk_len=max_chunk_len, max_chunks=64, boundaries="separators",
                     separator_ids=(SEP,), prefill="dense").validate(64, 3)
  _, _, st = chunk_prefill(chunk_params(), jnp.asarray(tokens * valid, jnp.int32),
                                                           jnp.asarray(lengths), 64, ccfg)
  for b in range(B):
    inference_ids = np.full(T, -1)
    for j in range(int(st.n_chunks[b])):
      inference_ids[int(st.chunk_start[b, j]): int(st.chunk_end[b, j]) + 1] = j
    inference_ids[int(st.open_start[b]): lengths[b]] = int(st.n_chunks[b])  # the open chunk
    np.testing.assert_array_equal(inference_ids, train_ids[b])
