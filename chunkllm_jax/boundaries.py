"""Chunk boundaries: sentence-end labels from text (pySBD), and chunk ids from labels.

Conventions, shared by the teacher, the losses and (later) the KV buffer:
- `labels[t] = 1` where token t is the last token of a sentence: its boundary token.
- `chunk_id[t]`: the first `n_sink` tokens are sinks and padding is no chunk; both get `NO_CHUNK`
  (-1). The other tokens are numbered 0, 1, 2, ... from the first non-sink token; a chunk ends at
  a labelled token, or is force-closed once it holds `max_chunk_len` tokens. Ids are contiguous
  and increase with position, so chunk j is *completed* for query t exactly when j < chunk_id[t].
- A chunk is represented by its boundary (last) token, `chunk_end[j]`. The last chunk of a
  sequence may be open; it is never a candidate for any query of that sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NO_CHUNK = -1  # chunk id of sink tokens and padding


@functools.lru_cache(maxsize=None)
def _segmenter():
  import pysbd  # rule-based sentence splitter; only needed for labelling text

  return pysbd.Segmenter(language="en", clean=False, char_span=True)


def sentence_ends(text: str) -> list[int]:
  """Character offset just after the last non-space character of each pySBD sentence."""
  ends = []
  for span in _segmenter().segment(text):
    stripped = text[span.start:span.end].rstrip()
    if stripped:
      ends.append(span.start + len(stripped))
  return ends


def labels_from_offsets(ends: list[int], offsets_T2) -> np.ndarray:
  """Marks, for each sentence end, the last token whose span starts before it. int8 [T].

  A token that spans the end ('."', '.\\n') is the boundary token; whitespace after the end
  belongs to the next sentence. Zero-width tokens (BOS and other special tokens) are never marked.
  """
  offsets_T2 = np.asarray(offsets_T2, np.int64).reshape(-1, 2)
  labels_T = np.zeros(len(offsets_T2), np.int8)
  real = np.flatnonzero(offsets_T2[:, 1] > offsets_T2[:, 0])
  starts = np.maximum.accumulate(offsets_T2[real, 0]) if len(real) else offsets_T2[real, 0]
  for e in ends:
    i = np.searchsorted(starts, e, side="left") - 1
    if i >= 0:
      labels_T[real[i]] = 1
  return labels_T


def sentence_end_labels(text: str, tokenizer, *, add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes `text` and labels each sentence's last token. Returns (ids int32 [T], labels int8 [T]).

  Needs a fast tokenizer (for `return_offsets_mapping`). The end of the text counts as a sentence
  end when pySBD says so, which it does for any trailing text.
  """
  enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
  ids_T = np.asarray(enc["input_ids"], np.int32)
  return ids_T, labels_from_offsets(sentence_ends(text), enc["offset_mapping"])


def chunks_from_labels(labels_BT, n_sink: int, max_chunk_len: int | None = None, valid_BT=None):
  """Chunk ids [B, T] int32 from boundary labels (see the module docstring for the convention).

  Labels on sink tokens and on padding are ignored. `max_chunk_len=None` never force-closes.
  """
  labels_BT = jnp.asarray(labels_BT)
  B, T = labels_BT.shape
  valid_BT = jnp.ones((B, T), bool) if valid_BT is None else jnp.asarray(valid_BT, bool)
  limit = T + 1 if max_chunk_len is None else max_chunk_len

  def step(carry, xs):
    cid_B, length_B = carry  # current chunk, and how many tokens it holds so far
    y_B, ok_B, t = xs
    counts_B = ok_B & (t >= n_sink)
    length_B = length_B + counts_B
    out_B = jnp.where(counts_B, cid_B, NO_CHUNK)
    close_B = counts_B & ((y_B > 0) | (length_B >= limit))
    return (cid_B + close_B, jnp.where(close_B, 0, length_B)), out_B

  zeros = jnp.zeros((B,), jnp.int32)
  _, ids_TB = jax.lax.scan(step, (zeros, zeros), (labels_BT.T, valid_BT.T, jnp.arange(T)))
  return ids_TB.T


def chunk_ends(chunk_id_BT, max_chunks: int):
  """Position of each chunk's last token, int32 [B, max_chunks]; -1 where a chunk does not exist.

  Chunks with id >= max_chunks are dropped (size `max_chunks` to cover the longest sequence).
  """
  B, T = chunk_id_BT.shape
  idx_BT = jnp.where(chunk_id_BT < 0, max_chunks, chunk_id_BT)  # out of range: dropped
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return jnp.full((B, max_chunks), -1, jnp.int32).at[jnp.arange(B)[:, None], idx_BT].max(pos_BT, mode="drop")


def candidate_mask(chunk_id_BT, max_chunks: int):
  """[B, T, C] bool: chunk j is a candidate for query t iff it is completed before t's own chunk."""
  return jnp.arange(max_chunks, dtype=jnp.int32) < chunk_id_BT[..., None]
