"""Chunk selection: which completed chunks each layer reads, chosen only at chunk boundaries.

At a boundary every QK-adapter layer scores the completed chunks with its q~ (the boundary token's
query), the scores are softmaxed per layer, and by default the layers *vote*: the softmaxes are
summed and the global top-k is shared by all layers. `vote="max"` scores a chunk by its highest
probability in any layer instead, so a few sharply retrieving layers are not outvoted by many
diffuse ones (eval/needle_ranks.py measures both). The `n_local` most recent chunks are always
visible, so they are not candidates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from chunkllm_jax.attention import NEG_INF


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """ChunkLLM inference settings (DESIGN.md defaults)."""

  n_sink: int = 4  # first tokens, always visible
  top_k: int = 16  # selected chunks per layer
  n_local: int = 4  # most recent completed chunks, always visible
  alpha: float = 0.5  # the Chunk Adapter's boundary threshold
  max_chunk_len: int = 64  # a chunk this long is closed by force
  max_chunks: int | None = None  # chunk-table size; None: max_len // 8
  vote: str = "sum"  # "sum" or "max" over layers: one selection for all; "per_layer": each its own
  dense_layers: tuple[int, ...] = (0,)  # layers that keep full attention
  refresh_every: int = 0  # also re-select every N tokens inside a chunk (0: only at boundaries)
  attention: str = "xla"  # "xla", or "pallas": the kernels of pallas_kernels/ where they compile
  interpret: bool = False  # run the Pallas kernels in interpret mode (tests, on CPU)
  prefill: str = "sparse"  # "sparse": chunk-sparse prefill (per-layer top-k); "dense": full attention
  # The rules below make the eval baselines selections over the same buffer (eval/methods.py):
  boundaries: str = "adapter"  # "adapter": p > alpha; "fixed": every max_chunk_len tokens;
  #                              "separators": at the tokens in `separator_ids` (SepLLM)
  separator_ids: tuple[int, ...] = ()
  keep: str = "chunk"  # "chunk": a selected chunk is read whole; "boundary": only its last token (SepLLM)

  def validate(self, max_len: int, n_layers: int) -> "ChunkConfig":
    """Checks ranges on the host (before anything compiles); fills `max_chunks`."""
    max_chunks = self.max_chunks or max(max_len // 8, 1)
    if self.n_sink < 0:
      raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
    if self.top_k < 0 or self.n_local < 0:
      raise ValueError(f"top_k and n_local must be >= 0, got top_k={self.top_k}, n_local={self.n_local}")
    if self.n_sink >= max_len:
      raise ValueError(f"n_sink={self.n_sink} must be smaller than the buffer (max_len={max_len})")
    if self.max_chunk_len < 1:
      raise ValueError(f"max_chunk_len must be >= 1, got {self.max_chunk_len}")
    if -(-(max_len - self.n_sink) // self.max_chunk_len) > max_chunks and self.max_chunks:
      raise ValueError(f"max_chunks={max_chunks} cannot hold {max_len} tokens in chunks of at most "
                       f"{self.max_chunk_len}; raise max_chunks to {-(-max_len // self.max_chunk_len)}")
    if self.vote not in ("sum", "max", "per_layer"):
      raise ValueError(f"vote must be 'sum', 'max' or 'per_layer', got {self.vote!r}")
    if self.refresh_every < 0:
      raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
    if self.attention not in ("xla", "pallas"):
      raise ValueError(f"attention must be 'xla' or 'pallas', got {self.attention!r}")
    if self.prefill not in ("sparse", "dense"):
      raise ValueError(f"prefill must be 'sparse' or 'dense', got {self.prefill!r}")
    if self.boundaries not in ("adapter", "fixed", "separators"):
      raise ValueError(f"boundaries must be 'adapter', 'fixed' or 'separators', got {self.boundaries!r}")
    if self.boundaries == "separators" and not self.separator_ids:
      raise ValueError("boundaries='separators' needs separator_ids (the token ids that close a chunk)")
    if self.keep not in ("chunk", "boundary"):
      raise ValueError(f"keep must be 'chunk' or 'boundary', got {self.keep!r}")
    if self.attention == "pallas" and self.keep != "chunk":
      raise ValueError("attention='pallas' reads selected chunks whole; use keep='chunk' or attention='xla'")
    if not 0.0 < self.alpha < 1.0:
      raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
    if any(not 0 <= i < n_layers for i in self.dense_layers):
      raise ValueError(f"dense_layers {self.dense_layers} out of range for {n_layers} layers")
    return dataclasses.replace(self, max_chunks=max_chunks)

  @property
  def shared(self) -> bool:
    """Whether one selection serves every layer (a vote), rather than one per layer."""
    return self.vote != "per_layer"

  @property
  def budget(self) -> int:
    """Tokens in the compacted working buffer: sinks, then top_k + n_local chunk slots."""
    per_selected = 1 if self.keep == "boundary" else self.max_chunk_len
    return self.n_sink + self.top_k * per_selected + self.n_local * self.max_chunk_len

  def closes(self, t_B, open_start_B, token_B, p_B):
    """Whether the token at position t closes the open chunk, by this config's boundary rule."""
    forced = t_B - open_start_B + 1 >= self.max_chunk_len
    if self.boundaries == "adapter":
      rule = p_B > self.alpha
    elif self.boundaries == "separators":
      rule = jnp.isin(token_B, jnp.asarray(self.separator_ids, jnp.int32))
    else:
      rule = jnp.zeros_like(forced)
    return (t_B >= self.n_sink) & (rule | forced)


def candidates(n_chunks_B, max_chunks: int, n_local: int):
  """Completed chunks that may be selected: all but the `n_local` most recent. [B, C] bool."""
  c = jnp.arange(max_chunks)
  return c[None] < (n_chunks_B - n_local)[:, None]


def layer_chunk_probs(q_LBd, chunk_key_LBCd, cand_BC):
  """Each QK layer's softmax over candidate chunks: S = softmax_j(q~ . k~_j / sqrt(d_c)). [L, B, C]."""
  d_c = q_LBd.shape[-1]
  s = jnp.einsum("lbd,lbcd->lbc", q_LBd, chunk_key_LBCd, preferred_element_type=jnp.float32) * d_c**-0.5
  s = jnp.where(cand_BC[None], s, NEG_INF)
  return jnp.where(cand_BC[None], jax.nn.softmax(s, axis=-1), 0.0)


def vote_scores(probs_L, vote: str):
  """One score per chunk from the layers' probabilities (leading axis): "sum" or "max" over layers."""
  return {"sum": jnp.sum, "max": jnp.max}[vote](probs_L, axis=0)


def select(q_LBd, chunk_key_LBCd, n_chunks_B, cfg: ChunkConfig):
  """The new selection: [B, top_k] (vote) or [L, B, top_k] (per layer), ascending chunk ids, -1 empty."""
  cand = candidates(n_chunks_B, cfg.max_chunks, cfg.n_local)
  probs = layer_chunk_probs(q_LBd, chunk_key_LBCd, cand)
  if cfg.shared:
    probs = vote_scores(probs, cfg.vote)
  k = min(cfg.top_k, cfg.max_chunks)
  score = jnp.where(cand if cfg.shared else cand[None], probs, -1.0)
  top_val, top_idx = jax.lax.top_k(score, k)
  chosen = jnp.where(top_val >= 0.0, top_idx, cfg.max_chunks)  # empty slots sort last
  chosen = jnp.sort(chosen, axis=-1)  # in position order, so compacted keys stay in order
  chosen = jnp.where(chosen == cfg.max_chunks, -1, chosen).astype(jnp.int32)
  if k < cfg.top_k:  # more slots than chunks can exist: the rest stay empty
    pad = [(0, 0)] * (chosen.ndim - 1) + [(0, cfg.top_k - k)]
    chosen = jnp.pad(chosen, pad, constant_values=-1)
  return chosen
