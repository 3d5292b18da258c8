"""The chunk vocabulary: one boundary rule and one chunk-id convention for training labels, the
teacher, inference segmentation, the chunk table, the eval and the kernels.

- The rule: `ChunkConfig.closes` says whether token t closes the open chunk (the Chunk Adapter's
  p > alpha, a separator token, or a training label; and always once the chunk holds
  `max_chunk_len` tokens; never on a sink). `segment` applies it along a sequence.
- `labels[t] = 1` where token t is the last token of a sentence: its boundary token. Training turns
  labels into chunks through the same rule (`chunks_from_labels`).
- `chunk_id[t]`: the first `n_sink` tokens are sinks and padding is no chunk; both get `NO_CHUNK`
  (-1). The other tokens are numbered 0, 1, 2, ... from the first non-sink token: chunk j is the
  j-th completed chunk, the row of the chunk table that inference keeps, and the open chunk after
  the last boundary is numbered n_chunks. Ids are contiguous and increase with position, so chunk
  j is *completed* for query t exactly when j < chunk_id[t].
- A chunk is represented by its boundary (last) token, `chunk_end[j]`. The last chunk of a
  sequence may be open; it is never a candidate for any query of that sequence.
- Kernels that need the sinks as a chunk of their own read `chunk_id + 1` (sinks 0, padding -1):
  `chunk_prefill.kernel_ids`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax.chunk_config import ChunkConfig

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


def segment(p_BT, valid_BT, tokens_BT, ccfg: ChunkConfig, *, start=0, open_start_B=None):
  """Where chunks end along right-padded rows, by the config's rule: [B, T] bool (a scan over t).

  The rule is causal, so a prompt can be segmented a block at a time: `start` is the block's first
  position and `open_start_B` where the chunk open at that point began (`open_start`)."""
  B, T = p_BT.shape

  def step(open_start, i):
    closes = valid_BT[:, i] & ccfg.closes(start + i, open_start, tokens_BT[:, i], p_BT[:, i])
    return jnp.where(closes, start + i + 1, open_start), closes

  first = jnp.full((B,), ccfg.n_sink, jnp.int32) if open_start_B is None else open_start_B
  _, closes_TB = jax.lax.scan(step, first, jnp.arange(T))
  return closes_TB.T


def open_start(closes_BT, start, n_sink: int):
  """Where the chunk open at position `start` began: just past the last close before it (else the
  first token after the sinks). [B] int32."""
  pos_T = jnp.arange(closes_BT.shape[1], dtype=jnp.int32)
  return jnp.max(jnp.where(closes_BT & (pos_T < start), pos_T + 1, n_sink), axis=1).astype(jnp.int32)


def chunk_ids(closes_BT, valid_BT, n_sink: int):
  """Chunk ids [B, T] int32 from where chunks end (the module docstring's convention)."""
  T = closes_BT.shape[1]
  before = jnp.cumsum(closes_BT.astype(jnp.int32), axis=1) - closes_BT  # chunks closed before t
  return jnp.where((jnp.arange(T) >= n_sink) & valid_BT, before, NO_CHUNK).astype(jnp.int32)


def chunk_ids_from_ends(ends_BC, n_keys: int, n_sink: int):
  """`chunk_ids` of `n_keys` positions from a chunk table's ends (-1 where empty): the keys after the
  last end are the open chunk's (id n_chunks). Decode makes it once a step for every layer's scores."""
  B = ends_BC.shape[0]
  at = jnp.where(ends_BC >= 0, ends_BC, n_keys)  # empty rows: out of range, dropped
  closes = jnp.zeros((B, n_keys), bool).at[jnp.arange(B)[:, None], at].set(True, mode="drop")
  return chunk_ids(closes, jnp.ones((B, n_keys), bool), n_sink)


def completed_chunk_ends(closes_BT, max_chunks: int):
  """Chunk j's boundary position, -1 where it does not exist: [B, C]; and the completed chunks [B]
  (at most C: a table that is full merges the later chunks into its last one, which then ends at the
  last boundary, so that no token falls out of every chunk; `ChunkState.overflow` records it)."""
  B, T = closes_BT.shape
  slot = jnp.minimum(jnp.cumsum(closes_BT.astype(jnp.int32), axis=1) - 1, max_chunks - 1)
  slot = jnp.where(closes_BT, slot, max_chunks)  # the extra column soaks up the positions that close nothing
  ends = jnp.full((B, max_chunks + 1), -1, jnp.int32)
  ends = ends.at[jnp.arange(B)[:, None], slot].max(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
  n = jnp.minimum(jnp.sum(closes_BT, axis=1), max_chunks).astype(jnp.int32)
  return ends[:, :max_chunks], n


def closes_from_labels(labels_BT, n_sink: int, max_chunk_len: int | None = None, valid_BT=None):
  """Where chunks end [B, T] bool, from boundary labels by the one rule (`ChunkConfig.closes`).

  Labels on sink tokens and on padding are ignored. `max_chunk_len=None` never force-closes.
  """
  labels_BT = jnp.asarray(labels_BT)
  B, T = labels_BT.shape
  valid_BT = jnp.ones((B, T), bool) if valid_BT is None else jnp.asarray(valid_BT, bool)
  rule = ChunkConfig(n_sink=n_sink, max_chunk_len=T + 1 if max_chunk_len is None else max_chunk_len)
  p_BT = (labels_BT > 0).astype(jnp.float32)  # 1 > alpha at a label, 0 elsewhere
  return segment(p_BT, valid_BT, jnp.zeros((B, T), jnp.int32), rule)


def chunks_from_labels(labels_BT, n_sink: int, max_chunk_len: int | None = None, valid_BT=None):
  """Chunk ids [B, T] int32 from boundary labels (`closes_from_labels`, then `chunk_ids`)."""
  labels_BT = jnp.asarray(labels_BT)
  valid_BT = jnp.ones(labels_BT.shape, bool) if valid_BT is None else jnp.asarray(valid_BT, bool)
  return chunk_ids(closes_from_labels(labels_BT, n_sink, max_chunk_len, valid_BT), valid_BT, n_sink)


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
