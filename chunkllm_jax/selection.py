"""Chunk selection: which completed chunks the sparse layers read.

Two rules (`ChunkConfig.selection`). The default, "kv_head", has each KV head of each sparse layer choose
at every decode step from an estimate of its own query's attention over the chunks (`chunk_mass`,
`sparq_chunk_mass`, `lowrank_chunk_mass` here; the decode side in `head_selection.py`). The paper's
rule, "shared", chooses only at chunk boundaries, as follows. At a boundary the *selection layers*
score the candidate chunks (every completed chunk but the `n_local` most recent, which are always
read), each layer gives a distribution over the candidates, the layers vote (`vote="sum"` or
`"max"`), and one selection serves every sparse layer. Two scorers give the per-layer distributions:

- `scorer="adapter"`: the QK Adapters, softmax_j(q~ . k~_j / sqrt(d_c)) over the candidates, for the
  q~ of each of the last `score_queries` tokens (as the adapters were trained: 1, the boundary token
  alone, unless their export says more); then the max over those queries;
- `scorer="attention"`: the frozen model's own attention, with no training: for each of the last
  `score_queries` tokens' queries and each head, the softmax over the candidates' tokens, summed
  within each chunk; then the max over queries and heads. The max over heads keeps the few
  retrieval heads from being drowned by the many that look at sinks and recent text; the max over
  the recent queries lets the tokens that ask (a question, a name) choose, not only the boundary
  token, whose own attention is mostly local (docs/selection.md has the measurements). It reads
  the selection layers' K once per boundary.

What is kept is set either by a chunk count (`top_chunks`, the paper's rule) or by a KV budget
(`kv_budget`, a fraction of the tokens seen, or `kv_budget_tokens`): chunks are taken in score
order while the sinks, the local chunks, the open chunk and the taken chunks fit the budget (then a
few passes over the chunks left out fill what remains), so the measured retention lands within a
chunk under the target instead of following chunk lengths.

Rows of scores are "boundary rows": decode has one per sequence (the boundary token's query), the
prefill one per chunk of the prompt. Both go through the same functions below.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import attention as attn
from chunkllm_jax import checks
from chunkllm_jax.adapters import chunk_scores

SCORERS = ("adapter", "attention")
ATTENTION_QUERIES = 16  # the attention scorer's default window (docs/selection.md, section 1)
VOTES = ("sum", "max")
# In each tuple below the first is the default.
SELECTIONS = ("kv_head", "shared")
SCORE_ESTIMATES = ("lowrank", "sparq", "exact")
SKETCH_ESTIMATES = ("simhash", "qjl")
SCORE_SKETCH_BITS = 128  # score_estimate="lowrank"'s sketch when score_sketch is None
# The settings of the selection layers' vote, at their defaults: read by the shared rule and a chunk-sparse prefill.
VOTE_DEFAULTS = (("selection_layers", None), ("vote", "sum"), ("score_queries", None), ("prefill_scorer", "attention"))
# ChunkConfig's fields that set how the per-head rule (selection="kv_head") scores and how often it chooses.
PER_HEAD_FIELDS = ("score_rank", "score_estimate", "score_sketch", "sketch_estimate", "head_refresh")
SKETCH_WORD = 32  # bits of `residual_sketch` a uint32 holds


@dataclasses.dataclass(frozen=True)
class ChunkRules:
  """The chunk rules that inference (`ChunkConfig`), training (`LossConfig`, `TrainConfig`) and the
  evaluation share, defined once so their defaults cannot drift apart."""

  n_sink: int = 4  # first tokens, always visible; they belong to no chunk
  n_local: int = 4  # most recent completed chunks, always visible (so never selection candidates; under a budget
  #                   with a recent share, as many as fit that share: `selection.local_count`)
  max_chunk_len: int = 64  # a chunk this long is closed by force


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChunkConfig(ChunkRules):
  """ChunkLLM inference settings: the chunk rules, and how the selection is made and read."""

  top_chunks: int = 16  # selected chunks, when no KV budget is set
  kv_budget: float | None = None  # fraction of the tokens seen that a sparse layer reads (0, 1]
  kv_budget_tokens: int | None = None  # or a token count; either one replaces top_chunks
  # With a budget: the fewest tokens a step may read, so a context shorter than this is read whole
  # (a sparse read saves nothing there); 0: the budget alone.
  kv_budget_min_tokens: int = 0
  # With a budget: the share of it that the most recent tokens get first (sinks, local and open chunk
  # included; recent candidates fill the rest of the share), the remainder going by score. 0.75 is the
  # measured default: it keeps every needle of the NIAH sets and cuts the perplexity loss at every
  # length measured (docs/results.md, "Default settings").
  recent_share: float = 0.75
  # The shared rule's scorer (selection="shared"): "adapter", the QK Adapters; "attention", the frozen attention
  # (no training). The per-head rule refuses "attention" unless a sparse prefill's prompt rows read it.
  scorer: str = "adapter"
  # Who scores the prompt's selections and the first decode one: "attention" (default; the frozen
  # attention of the selection layers, computed where the prompt's K is at hand, docs/results.md
  # measures why), "adapter", or None: `scorer`. Decode's later selections are always `scorer`'s.
  prefill_scorer: str | None = "attention"
  selection_layers: tuple[int, ...] | None = None  # None: the adapters' stored choice, else all QK layers
  vote: str = "sum"  # how the selection layers' distributions make one score per chunk: "sum" or "max"
  score_queries: int | None = None  # score with the queries of the last this many tokens (max over them);
  #                                   None: 16 for scorer="attention", the adapters' own for "adapter"
  alpha: float = 0.5  # the Chunk Adapter's boundary threshold
  # chunk-table size; None: max_len // 8 (at least n_local; `table_size`), the buffer's (the batch's longest row
  # and max_new_tokens), so where the table fills (chunks shorter than 8 tokens on average: lists, code,
  # separators) a row reads as its batch allows
  max_chunks: int | None = None
  dense_layers: tuple[int, ...] = (0,)  # layers that keep full attention
  refresh_every: int = 0  # the shared rule's: also re-select every N tokens inside a chunk (0: only at boundaries)
  # Who makes decode's selections: "kv_head" (the default): each KV head of each sparse layer chooses
  # the chunks it reads at every step, by an estimate of its own query's attention over them (Quest's
  # rule on ChunkLLM's chunks), or "shared" (the paper's rule: one selection, made by `scorer` where a
  # token closes a chunk, serves every sparse layer and head). The
  # per-head rule is the one that meets every quality target measured (the shared rule's 2K perplexity is
  # +4.86% at 50% KV against +1.33%), at a lower decode speed on the CPU (slower than dense at a 50% budget;
  # docs/results.md, "Default settings"; bench/RESULTS_chunk_defaults.md against bench/RESULTS_chunk.md).
  selection: str = SELECTIONS[0]
  # With selection="kv_head", how each step estimates a head's attention mass over the chunks:
  # "lowrank" (default), each key's `score_rank` coordinates in a basis of its KV head's prompt keys and
  # the length of what the basis misses, kept beside the cache (`lowrank_chunk_mass`; (score_rank + 1) /
  # head_dim of K's bytes, read and held); "sparq", the query's `score_rank` largest dimensions of K
  # (`sparq_chunk_mass`; on this cache's layout they touch every cache line of K); or "exact", the mass
  # itself (`chunk_mass`, reading all of K). score_rank None: a quarter of the head dimension (the size
  # measured on both models: 16 of smollm2-135m's 64, 64 of gemma3-270m's 256).
  score_rank: int | None = None
  score_estimate: str = SCORE_ESTIMATES[0]
  # With score_estimate="lowrank": bits of a 1-bit random sketch of what each key's basis misses
  # (`residual_sketch`, read as `sketch_estimate` says), kept beside the low-rank keys, in place of the
  # bound on that part; 0: the bound; None: SCORE_SKETCH_BITS. A multiple of 32 (one uint32 word holds
  # 32); bits / 8 bytes a key.
  score_sketch: int | None = None
  # How the sketch estimates that part of the logit: "simhash", |q_out| |k_out| cos(pi h / bits), h the
  # Hamming distance between the query's signs and the key's (Charikar's angle estimate: xor and
  # popcount on the packed words, nothing unpacked), or "qjl", QJL's unbiased |k_out| sqrt(pi/2)/bits
  # (S q_out) . sign(S k_out) (the key's signs unpacked against the query's projection). SimHash is the
  # default: the same needles as QJL on both models, perplexity 0.06 and 0.18 points above QJL's (smollm2,
  # gemma3), its score several times cheaper (docs/results.md, twenty-fourth session).
  sketch_estimate: str = SKETCH_ESTIMATES[0]
  # With selection="kv_head": the heads choose every `head_refresh` steps, and at the step after a chunk
  # closes (the chunk table changed); the steps between read the slots chosen last (the open chunk is
  # read fresh at every step). 1: every step. Fewer choices make fewer scores and layouts of the read.
  head_refresh: int = 1
  # "xla", or "pallas": the kernels of pallas_kernels/ where they compile (`dispatch.implementation`): the
  # shared rule's on TPU and GPU, the per-head rule's on GPU (`head_decode_attention`; XLA elsewhere).
  attention: str = "xla"
  interpret: bool = False  # run the Pallas kernels in interpret mode (tests, on CPU)
  # "sparse": chunk-sparse prefill after the first selection layer; "dense"; None: dense where the
  # prompt is scored by attention (its per-chunk selections differ from chunk to chunk, so sparse
  # query blocks read wide unions: 0.72x vanilla's prefill against 0.96x dense at 17.7K tokens,
  # bench/RESULTS_prefill_scorer.md), sparse where the adapters score it (1.31x).
  prefill: str | None = None
  prefill_selection: str = "own"  # whose queries choose what a prompt chunk reads: its "own" last
  #                                 queries, or the "previous" ones at the boundary that opened it
  # The rules below make the eval baselines selections over the same buffer (eval/methods.py):
  boundaries: str = "adapter"  # "adapter": p > alpha; "fixed": every max_chunk_len tokens;
  #                              "separators": at the tokens in `separator_ids` (SepLLM)
  separator_ids: tuple[int, ...] = ()
  keep: str = "chunk"  # "chunk": a selected chunk is read whole; "boundary": only its last token (SepLLM)
  # Also read the last token of every completed chunk the selection leaves out: one token a chunk,
  # paid from the budget, where the chunk's content gathers (SepLLM's separators; the chunk's key).
  # None: on where a KV budget pays for them and chunks are read whole after a dense prefill (the
  # chunk-sparse prefill reads chunks whole; without a budget, `top_chunks` is the paper's count and
  # the last tokens would add one read a chunk), as measured with `recent_share` (docs/results.md).
  boundary_tokens: bool | None = None
  # With boundary_tokens under a budget: the most of what the budget leaves after the sinks, local and open
  # chunk that the last tokens may take. Where they would take more (short chunks, budgets of 12.5% and
  # under, the first positions after a short prompt), only the newest chunks left out give theirs
  # (`last_token_count`), and the chunks chosen by score keep the rest: there the chunks are worth more.
  # 1.0: every one, paid for first (the default until the forty-sixth session). 0.25 reads the same tokens
  # at 25% and 50% budgets on the NIAH sets and lowers the perplexity loss at 12.5% (+25.4% -> +20.0%) and
  # 6.25% (+41.4% -> +38.1%), with more passkeys at 6.25% (docs/results.md, forty-sixth session).
  boundary_share: float = 0.25

  def validate(self, max_len: int, n_layers: int, vocab_size: int | None = None) -> "ChunkConfig":
    """Checks types and ranges on the host (before anything compiles); fills `max_chunks`. Returns the config
    with numpy scalars as Python numbers and the layer and separator lists as tuples of ints (the config is a
    static argument of the compiled programs: it must hash). With `vocab_size`, the separators are checked
    against the vocabulary too."""
    for name in ("n_sink", "top_chunks", "n_local", "max_chunk_len", "refresh_every", "score_queries", "max_chunks"):
      v = getattr(self, name)
      if name in ("score_queries", "max_chunks") and v is None:
        continue
      if not checks.is_int(v):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    # A string would fail at the first comparison with a raw TypeError; True would be read as 1.0.
    for name, what in (("kv_budget", "a fraction of the tokens seen, in (0, 1]"),
                       ("recent_share", "a share of the KV budget, in [0, 1]"),
                       ("boundary_share", "a share of what the budget leaves, in (0, 1]"),
                       ("alpha", "the Chunk Adapter's boundary threshold, in (0, 1)")):
      v = getattr(self, name)
      if not (v is None and name == "kv_budget") and not checks.is_number(v):
        raise TypeError(f"{name} must be a number ({what}), got {v!r} ({type(v).__name__})")
    dense_layers = _int_tuple("dense_layers", self.dense_layers, "layer indices")
    selection_layers = None if self.selection_layers is None else \
        _int_tuple("selection_layers", self.selection_layers, "layer indices")
    separator_ids = _int_tuple("separator_ids", self.separator_ids, "token ids")
    if self.max_chunks is not None and self.max_chunks < 0:
      raise ValueError(f"max_chunks must be >= 1 (None or 0: max_len // 8), got {self.max_chunks}")
    if self.max_chunks is not None and self.max_chunks > max_len:  # a table that size only slows the compile
      raise ValueError(f"max_chunks={self.max_chunks} exceeds the buffer (max_len={max_len}): a chunk holds at "
                       "least one token, so there are never more chunks than positions")
    max_chunks = self.table_size(max_len)
    if self.n_sink < 0:
      raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
    if self.top_chunks < 0 or self.n_local < 0:
      raise ValueError(f"top_chunks and n_local must be >= 0, got top_chunks={self.top_chunks}, "
                       f"n_local={self.n_local}")
    if self.n_sink >= max_len:
      raise ValueError(f"n_sink={self.n_sink} must be smaller than the buffer (max_len={max_len})")
    if self.max_chunk_len < 1:
      raise ValueError(f"max_chunk_len must be >= 1, got {self.max_chunk_len}")
    if -(-(max_len - self.n_sink) // self.max_chunk_len) > max_chunks and self.max_chunks:
      raise ValueError(f"max_chunks={max_chunks} cannot hold {max_len} tokens in chunks of at most "
                       f"{self.max_chunk_len}; raise max_chunks to {-(-max_len // self.max_chunk_len)}")
    if self.n_local > max_chunks or self.top_chunks > max(max_chunks, 1 << 16):
      raise ValueError(f"n_local={self.n_local} / top_chunks={self.top_chunks} cannot exceed the chunk table "
                       f"(max_chunks={max_chunks}" + ("" if self.max_chunks else f", from the buffer: max_len={max_len}")
                       + "); there are never more chunks than that")
    if self.kv_budget is not None and self.kv_budget_tokens is not None:
      raise ValueError("give kv_budget (a fraction) or kv_budget_tokens (a count), not both")
    if self.kv_budget is not None and not 0.0 < self.kv_budget <= 1.0:  # also false for NaN
      raise ValueError(f"kv_budget is a fraction of the tokens seen, in (0, 1]; got {self.kv_budget!r}")
    if self.kv_budget_tokens is not None:
      if not checks.is_int(self.kv_budget_tokens):
        raise TypeError(f"kv_budget_tokens must be an int, got {self.kv_budget_tokens!r}")
      # Past the buffer is allowed: both counts are capped by the tokens seen (`budget_tokens`), so the same
      # settings serve a short prompt, whose buffer is sized to it, and a long one (the short one is read whole).
      if self.kv_budget_tokens < 1:
        raise ValueError(f"kv_budget_tokens={self.kv_budget_tokens} must be >= 1")
    if not checks.is_int(self.kv_budget_min_tokens):
      raise TypeError(f"kv_budget_min_tokens must be an int, got {self.kv_budget_min_tokens!r}")
    if self.kv_budget_min_tokens < 0:
      raise ValueError(f"kv_budget_min_tokens={self.kv_budget_min_tokens} must be >= 0")
    if self.kv_budget_min_tokens and not self.budgeted:
      raise ValueError("kv_budget_min_tokens is a floor under a KV budget: give kv_budget or kv_budget_tokens too")
    if not 0.0 <= self.recent_share <= 1.0:  # also false for NaN
      raise ValueError(f"recent_share is a share of the KV budget, in [0, 1]; got {self.recent_share!r}")
    if not 0.0 < self.boundary_share <= 1.0:  # also false for NaN
      raise ValueError(f"boundary_share is a share of what the budget leaves after the sinks, local and open chunk, "
                       f"in (0, 1] (boundary_tokens=False reads no last token); got {self.boundary_share!r}")
    if self.scorer not in SCORERS:
      raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
    if self.prefill_scorer not in (None, *SCORERS):
      raise ValueError(f"prefill_scorer must be None or one of {SCORERS}, got {self.prefill_scorer!r}")
    if self.score_queries is not None and not 1 <= self.score_queries <= max_len:
      raise ValueError(f"score_queries is a count of recent queries, in [1, max_len={max_len}]; got {self.score_queries}")
    if self.vote not in VOTES:
      raise ValueError(f"vote must be one of {VOTES}, got {self.vote!r}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
    # The per-head fields are set for selection="kv_head" alone: the shared rule refuses them unless left
    # at their defaults, so that no one believes they change it.
    per_head = self.selection == "kv_head"
    if self.score_rank is not None:
      if not per_head:
        raise ValueError("score_rank sets how the per-head selection scores; it needs selection='kv_head'")
      if not checks.is_int(self.score_rank) or self.score_rank < 1:
        raise ValueError(f"score_rank must be an int >= 1 (dimensions or coordinates of K), got {self.score_rank!r}")
    if self.score_estimate not in SCORE_ESTIMATES:
      raise ValueError(f"score_estimate must be one of {SCORE_ESTIMATES}, got {self.score_estimate!r}")
    if self.score_estimate != SCORE_ESTIMATES[0] and not per_head:
      raise ValueError(f"score_estimate={self.score_estimate!r} sets how the per-head selection scores; it needs "
                       "selection='kv_head'")
    if self.score_estimate == "exact" and self.score_rank is not None:
      raise ValueError("score_estimate='exact' reads all of K; score_rank sizes an estimate ('lowrank' or 'sparq')")
    if self.score_sketch is not None:
      if not checks.is_int(self.score_sketch) or self.score_sketch < 0 or self.score_sketch % SKETCH_WORD:
        raise ValueError(f"score_sketch must be a multiple of {SKETCH_WORD} bits (0: none), got {self.score_sketch!r}")
      if self.score_sketch and (self.score_estimate != "lowrank" or not per_head):
        raise ValueError("score_sketch sketches what the low-rank keys miss: it needs score_estimate='lowrank' "
                         "(with selection='kv_head')")
    if self.sketch_estimate not in SKETCH_ESTIMATES:
      raise ValueError(f"sketch_estimate must be one of {SKETCH_ESTIMATES}, got {self.sketch_estimate!r}")
    if self.sketch_estimate != SKETCH_ESTIMATES[0] and not self.sketch_bits:
      raise ValueError(f"sketch_estimate={self.sketch_estimate!r} scores the residual sketch: it needs "
                       "score_estimate='lowrank' with a score_sketch (selection='kv_head')")
    if not checks.is_int(self.head_refresh) or self.head_refresh < 1:
      raise ValueError(f"head_refresh must be an int >= 1 (steps between the heads' choices), "
                       f"got {self.head_refresh!r}")
    if self.head_refresh != 1 and self.selection != "kv_head":
      raise ValueError("head_refresh sets how often each KV head chooses: it needs selection='kv_head'")
    if self.refresh_every < 0:
      raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
    # The shared rule's fields are refused with the per-head rule where it never reads them, as the per-head
    # fields are with the shared rule: each KV head chooses by its own query at every step, so `scorer` reaches
    # only a sparse prefill's prompt rows, and only where `prefill_scorer` leaves them to it.
    if not self.shares_selection:
      if self.refresh_every:
        raise ValueError("refresh_every re-selects the shared rule's chunks inside a long chunk; it needs "
                         "selection='shared' (with selection='kv_head' the heads choose at every step, or every "
                         "head_refresh steps)")
      if self.scorer != SCORERS[0] and not (self.prefill == "sparse" and self.prefill_scorer is None):
        raise ValueError(f"scorer={self.scorer!r} makes the shared rule's selections; it needs selection='shared' "
                         "(with selection='kv_head' each KV head chooses by its own query, and the prompt's chunks "
                         "are scored by prefill_scorer)")
    if self.attention not in ("xla", "pallas"):
      raise ValueError(f"attention must be 'xla' or 'pallas', got {self.attention!r}")
    if self.prefill not in ("sparse", "dense", None):
      raise ValueError(f"prefill must be 'sparse', 'dense' or None, got {self.prefill!r}")
    if self.prefill_selection not in ("own", "previous"):
      raise ValueError(f"prefill_selection must be 'own' or 'previous', got {self.prefill_selection!r}")
    # The selection layers' vote chooses the shared rule's chunks and a chunk-sparse prefill's; with the per-head
    # rule and a dense prefill no vote is made, so its settings would change nothing.
    given = dict(selection_layers=selection_layers)  # (as tuples of ints: numpy values read as Python's)
    voted = [f"{name}={given.get(name, getattr(self, name))!r}" for name, default in VOTE_DEFAULTS
             if getattr(self, name) != default]
    if voted and not self.votes:
      raise ValueError(f"{', '.join(voted)} set{'s' if len(voted) == 1 else ''} how the selection layers score "
                       "chunks for the shared rule's selections and a chunk-sparse prefill's; with "
                       "selection='kv_head' and a dense prefill neither is made: each KV head chooses by its own "
                       "query. Give selection='shared' (or prefill='sparse'), or leave them out")
    if self.prefill_selection != "own" and self.prefill_mode != "sparse":
      raise ValueError(f"prefill_selection={self.prefill_selection!r} says whose queries choose what a chunk-sparse "
                       "prefill's prompt chunks read; this prefill is dense (prefill='dense', or the prompt scored "
                       "by attention): give prefill='sparse', or leave prefill_selection out")
    if self.boundaries not in ("adapter", "fixed", "separators"):
      raise ValueError(f"boundaries must be 'adapter', 'fixed' or 'separators', got {self.boundaries!r}")
    if self.boundaries == "separators" and not separator_ids:
      raise ValueError("boundaries='separators' needs separator_ids (the token ids that close a chunk)")
    # An id outside the vocabulary never closes a chunk: the run would go on silently, closing by force alone.
    outside = [i for i in separator_ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if outside:
      raise ValueError(f"separator_ids {outside} are outside the vocabulary "
                       f"[0, {vocab_size if vocab_size is not None else 'vocab_size'}): no chunk would close at them; "
                       "give ids from this model's tokenizer")
    if self.keep not in ("chunk", "boundary"):
      raise ValueError(f"keep must be 'chunk' or 'boundary', got {self.keep!r}")
    if self.boundary_tokens is not None and not isinstance(self.boundary_tokens, bool):
      raise TypeError(f"boundary_tokens must be a bool or None (on where a budget pays for them), got "
                      f"{self.boundary_tokens!r}")
    if self.boundary_tokens and self.keep != "chunk":
      raise ValueError("boundary_tokens reads the last token of the chunks left out; with keep='boundary' "
                       "every chunk read is one already: use one or the other")
    if self.boundary_tokens and self.prefill_mode == "sparse":
      raise ValueError("boundary_tokens is read in decode and after a dense prefill; the chunk-sparse "
                       "prefill reads chunks whole: set prefill='dense', or leave boundary_tokens None "
                       "(on where it applies)")
    if self.attention == "pallas" and self.keep != "chunk":
      raise ValueError("attention='pallas' reads selected chunks whole; use keep='chunk' or attention='xla'")
    if not 0.0 < self.alpha < 1.0:
      raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
    if any(not 0 <= i < n_layers for i in dense_layers):
      raise ValueError(f"dense_layers {dense_layers} out of range for {n_layers} layers")
    # numpy scalars as Python numbers (np.float32(0.25) -> 0.25), so that equal settings make one static config.
    numbers = {f.name: getattr(self, f.name).item() for f in dataclasses.fields(self)
               if isinstance(getattr(self, f.name), np.generic)}
    return dataclasses.replace(self, **{**numbers, "max_chunks": int(max_chunks), "dense_layers": dense_layers,
                                        "selection_layers": selection_layers, "separator_ids": separator_ids})

  def resolve(self, full_attention_layers, qk_layers, stored_layers=None, stored_queries: int = 1,
              head_dim: int | None = None) -> "ChunkConfig":
    """Fills what the adapters decide unless given: `selection_layers` (`stored_layers`, the adapters'
    choice, else every QK layer) and `score_queries` (`ATTENTION_QUERIES` for the attention scorer,
    `stored_queries`, the adapters' own window, for theirs). Checks the layers against the model:
    full-attention layers, with a QK Adapter for `scorer="adapter"`. With `head_dim`, also the per-head
    score's size: `score_rank` (None where the mass is exact, or the shared rule) and `score_sketch`."""
    layers = _int_tuple("selection_layers", self.selection_layers, "layer indices") \
        if self.selection_layers is not None else (stored_layers or tuple(qk_layers))
    layers = tuple(sorted(set(int(i) for i in layers)))
    if not layers:
      raise ValueError("selection_layers is empty: name at least one full-attention layer")
    bad = [i for i in layers if i not in full_attention_layers]
    if bad:
      raise ValueError(f"selection_layers {bad} are not full-attention layers of this model; "
                       f"choose among {tuple(full_attention_layers)}")
    if "adapter" in (self.scorer, self.prefill_scorer):
      missing = [i for i in layers if i not in qk_layers]
      if missing:
        raise ValueError(f"selection_layers {missing} have no QK Adapter (the adapters cover {tuple(qk_layers)}); "
                         "train adapters for them, pick other layers, or use scorer='attention'")
    queries = self.score_queries
    if queries is None:
      queries = ATTENTION_QUERIES if self.scorer == "attention" else int(stored_queries)
    sizes = {}
    if head_dim is not None:
      rank = self.score_rank_for(head_dim)
      if rank is not None and rank > head_dim:
        raise ValueError(f"score_rank={rank} exceeds the head dimension ({head_dim})")
      if self.sketch_bits > 32 * head_dim:  # kept for every key beside the cache
        raise ValueError(f"score_sketch={self.sketch_bits} bits is more than a float32 key holds ({32 * head_dim} bits "
                         f"at head_dim {head_dim}); score_estimate='exact' reads less")
      sizes = dict(score_rank=rank, score_sketch=self.sketch_bits)
    return dataclasses.replace(self, selection_layers=layers, score_queries=queries, prefill=self.prefill_mode,
                               boundary_tokens=self.reads_boundary_tokens, **sizes)

  def table_size(self, max_len: int) -> int:
    """`max_chunks`, or by default max_len // 8, at least the local chunks (a short buffer, max_len=8 holding one
    chunk, refused the default n_local=4 that the user never gave) and at most a chunk a position."""
    return self.max_chunks or min(max(max_len // 8, self.n_local, 1), max_len)

  def score_rank_for(self, head_dim: int) -> int | None:
    """The per-head score's coordinates (or SparQ's dimensions) for keys of `head_dim`: `score_rank`, or a
    quarter of `head_dim` where it is None; None where nothing is estimated (the exact mass, the shared rule)."""
    if self.selection != "kv_head" or self.score_estimate == "exact":
      return None
    return self.score_rank if self.score_rank is not None else max(head_dim // 4, 1)

  @property
  def sketch_bits(self) -> int:
    """Bits of the residual sketch each key keeps: `score_sketch`, or where it is None SCORE_SKETCH_BITS with
    the low-rank score of the per-head rule; 0 where no sketch is kept."""
    if self.selection != "kv_head" or self.score_estimate != "lowrank":
      return 0
    return SCORE_SKETCH_BITS if self.score_sketch is None else self.score_sketch

  @property
  def prefill_mode(self) -> str:
    """`prefill`, or where it is None, what the prompt's scorer makes it ("dense" for attention)."""
    if self.prefill is not None:
      return self.prefill
    return "dense" if (self.prefill_scorer or self.scorer) == "attention" else "sparse"

  @property
  def reads_boundary_tokens(self) -> bool:
    """`boundary_tokens`, or where it is None, whether a budget pays for them and chunks are read
    whole (keep="chunk") after a dense prefill."""
    if self.boundary_tokens is not None:
      return self.boundary_tokens
    return self.budgeted and self.keep == "chunk" and self.prefill_mode == "dense"

  @property
  def shares_selection(self) -> bool:
    """Whether one selection serves every sparse layer and head (the shared rule). Only then does the
    state keep what that selection's vote reads (the chunks' k~, the selection layers' rings of recent
    queries), and a prompt end with a selection: the per-head rule chooses at each decode step from the
    cache itself, so decode runs no QK Adapter and keeps no ring."""
    return self.selection == "shared"

  @property
  def votes(self) -> bool:
    """Whether the selection layers' vote chooses anything (`VOTE_DEFAULTS`' settings are read): the shared rule's
    selections, or a chunk-sparse prefill's prompt rows under either rule."""
    return self.shares_selection or self.prefill_mode == "sparse"

  @property
  def keeps_head_choice(self) -> bool:
    """Whether decode keeps each KV head's last choice in the state (the per-head rule with head_refresh > 1)."""
    return self.selection == "kv_head" and self.head_refresh > 1

  @property
  def keeps_low_rank_keys(self) -> bool:
    """Whether decode keeps every key's low-rank coordinates beside the cache (the per-head rule's
    score_estimate="lowrank")."""
    return self.selection == "kv_head" and self.score_estimate == "lowrank"

  @property
  def budgeted(self) -> bool:
    return self.kv_budget is not None or self.kv_budget_tokens is not None

  def budget_tokens(self, seen):
    """The KV budget in tokens when `seen` tokens exist (an array or an int)."""
    if self.kv_budget_tokens is not None:
      budget = jnp.minimum(self.kv_budget_tokens, seen)
    else:
      budget = jnp.ceil(self.kv_budget * seen).astype(jnp.int32)
    return jnp.maximum(budget, jnp.minimum(self.kv_budget_min_tokens, seen))

  def work_slots(self, max_len: int) -> int:
    """The most tokens a selection can keep (sinks, chosen and local chunks), capped by the buffer."""
    fixed = self.n_sink + self.n_local * self.max_chunk_len
    if self.budgeted:
      most = self.kv_budget_tokens if self.kv_budget_tokens is not None else math.ceil(self.kv_budget * max_len)
      most = max(most, self.kv_budget_min_tokens)
      return min(max(most, fixed), max_len)
    per_selected = 1 if self.keep == "boundary" else self.max_chunk_len
    boundaries = self.table_size(max_len) if self.reads_boundary_tokens else 0
    return min(fixed + self.top_chunks * per_selected + boundaries, max_len)

  def closes(self, t_B, open_start_B, token_B, p_B):
    """Whether the token at position t closes the open chunk, by this config's boundary rule.

    The one boundary rule: inference segments prompts and decodes with it, and training labels
    pass through the same rule (`boundaries.chunk_closes`)."""
    forced = t_B - open_start_B + 1 >= self.max_chunk_len
    if self.boundaries == "adapter":
      rule = p_B > self.alpha
    elif self.boundaries == "separators":
      rule = jnp.isin(token_B, jnp.asarray(self.separator_ids, jnp.int32))
    else:
      rule = jnp.zeros_like(forced)
    return (t_B >= self.n_sink) & (rule | forced)


def _int_tuple(name: str, v, what: str) -> tuple[int, ...]:
  """A tuple, list or 1-D integer array of ints as a tuple of Python ints. A bare int or a string is refused (not
  iterated), and so are floats (not truncated: 7.9 is no layer) and bools (not read as 0 and 1)."""
  if isinstance(v, np.ndarray) and v.ndim == 1:
    v = v.tolist()  # numpy's own ints, floats or bools, judged below like a list's
  if not isinstance(v, (tuple, list)):
    raise TypeError(f"{name} must be a tuple of {what}, got {v!r} ({type(v).__name__})")
  bad = [x for x in v if not checks.is_int(x)]
  if bad:
    raise TypeError(f"{name} must hold ints ({what}), got {bad[0]!r} ({type(bad[0]).__name__}) in {tuple(v)!r}")
  return tuple(int(x) for x in v)


def check_chunk_config(chunk_config) -> "ChunkConfig":
  """`chunk_generate`'s `chunk_config`: a ChunkConfig, or None for the defaults. A dict of fields is the common
  mix-up (it would fail deep in `dataclasses.replace`): it is refused with the two ways to give them."""
  if chunk_config is None:
    return ChunkConfig()
  if isinstance(chunk_config, ChunkConfig):
    return chunk_config
  if isinstance(chunk_config, dict):
    raise TypeError(f"chunk_config must be a cj.ChunkConfig, got a dict: pass cj.ChunkConfig(**{chunk_config!r}), "
                    f"or give the fields by keyword (chunk_generate(params, tokens, kv_budget=0.5, ...))")
  raise TypeError(f"chunk_config must be a cj.ChunkConfig (or None: the defaults), got {type(chunk_config).__name__}")


# ----------------------------------------------------------------------------------------------
# Per-layer distributions over the candidates, for rows of boundary queries


def adapter_probs(q_BRd, chunk_key_BCd, n_cand_BR, *, chunk_end_BC=None, q_pos_BR=None):
  """QK-Adapter distribution: softmax_j(q~ . k~_j / sqrt(d_c)) over chunks j < n_cand. [B, R, C].
  With `q_pos_BR`, a query scores only the chunks that end at or before it (a row with a negative
  position, no such query, scores 0), as the attention scorer's queries read no later key."""
  cand = jnp.arange(chunk_key_BCd.shape[1]) < n_cand_BR[..., None]
  if q_pos_BR is not None:
    cand = cand & (chunk_end_BC[:, None, :] <= q_pos_BR[..., None])
  return jnp.where(cand, jax.nn.softmax(chunk_scores(q_BRd, chunk_key_BCd, cand), axis=-1), 0.0)


def adapter_window_probs(q_BRQd, chunk_key_BCd, chunk_end_BC, n_cand_BR, q_pos_BRQ):
  """The adapter scorer over a window of queries: per row, `adapter_probs` of each of its Q queries
  (at positions `q_pos_BRQ`, < 0 where there is none), then the max over them. [B, R, C].
  With one query at the row's boundary this is `adapter_probs`."""
  B, R, Q, d = q_BRQd.shape
  p = adapter_probs(q_BRQd.reshape(B, R * Q, d), chunk_key_BCd, jnp.repeat(n_cand_BR, Q, axis=1),
                    chunk_end_BC=chunk_end_BC, q_pos_BR=q_pos_BRQ.reshape(B, R * Q))
  return p.reshape(B, R, Q, -1).max(2)


HEAD_REDUCTIONS = ("max", "mean")


KEY_BLOCK = 512  # keys per step of the chunk-mass fold: one block's scores are live, not the whole buffer's


def chunk_mass(q_BKGQD, k_BTKD, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, softcap: float | None = None,
               key_block: int = KEY_BLOCK, layer=None):
  """Per query head, each query's softmax over the keys [n_sink, hi] summed within each chunk (the
  chunks ending at `ends_BC`, contiguous from `n_sink`): float32 [B, K, G, Q, C]; a query with no key
  (hi < n_sink) gives zeros. `hi_BKGQ` broadcasts to [B, K, G, Q].

  An online softmax over key blocks, as `attention.fold`: a chunk's mass is a difference of the
  running prefix sum of the probabilities, taken at the chunk ends inside each block and rescaled
  with the softmax as it goes. Only the blocks up to the largest `hi` are read, and only one block's
  scores are live (the whole buffer's, at 32K tokens and 16 queries, were 19 MiB a copy). The last
  block is clamped inside the buffer, its already folded keys masked, so the keys are never padded
  (a copy of a layer's K). With `layer`, `k_BTKD` is the stacked buffer [L, B, T, K, D] and the
  blocks are sliced straight out of it: `buf[layer]` would be a copy of the layer (25 MiB at 32K)."""
  if layer is None:
    k_BTKD, layer = k_BTKD[None], 0
  B, K, G, Q, D = q_BKGQD.shape
  T, C = k_BTKD.shape[2], ends_BC.shape[1]
  kb = min(key_block, T)
  hi = jnp.broadcast_to(hi_BKGQ, (B, K, G, Q))
  top = hi.max()
  n_blocks = jnp.where(top >= n_sink, top // kb + 1, 0)

  def fold_keys(j, carry):
    m, l, run, at_end = carry
    start = jnp.minimum(j * kb, T - kb)
    t = start + jnp.arange(kb)
    ok = (t >= j * kb) & (t >= n_sink) & (t <= hi[..., None])
    k_blk = jax.lax.dynamic_slice(k_BTKD, (layer, 0, start, 0, 0), (1, B, kb, K, D))[0]
    s = attn.scores(q_BKGQD, k_blk, ok, scale=scale, softcap=softcap)
    m, corr, p, l = attn.softmax_step(m, l, s, ok)
    cum = run[..., None] * corr[..., None] + jnp.cumsum(p, axis=-1)  # prefix sums from position 0
    e = ends_BC - start  # [B, C]: chunk ends, relative to this block
    here = ((ends_BC >= j * kb) & (e < kb))[:, None, None, None, :]
    got = jnp.take_along_axis(cum, jnp.clip(e, 0, kb - 1)[:, None, None, None, :], axis=-1)
    return m, l, cum[..., -1], at_end * corr[..., None] + jnp.where(here, got, 0.0)

  zeros = jnp.zeros((B, K, G, Q), jnp.float32)
  _, l, _, at_end = jax.lax.fori_loop(0, n_blocks, fold_keys, (jnp.full((B, K, G, Q), attn.NEG_INF, jnp.float32),
                                                               zeros, zeros, jnp.zeros((B, K, G, Q, C), jnp.float32)))
  at_end = at_end / jnp.where(l > 0, l, 1.0)[..., None]
  return at_end - jnp.pad(at_end[..., :-1], [(0, 0)] * 4 + [(1, 0)])


CACHE_LINE = 64  # bytes: what memory moves at a time, on CPUs and (as 32-byte sectors, pairs of them) GPUs


def key_read_share(head_dim: int, itemsize: int, rank: int | None = None) -> float:
  """The share of K's bytes that a score reading `rank` of each key's dimensions (None: all) moves
  from memory. Keys lie [S, K, D], a key's dimensions in a few cache lines, and SparQ's dimensions
  (chosen by |q|, anywhere in the row) touch up to `rank` of them: counted as min(rank, lines) of
  the lines. At 64-dimension float32 keys (4 lines) 16 dimensions read every line, so on this
  layout SparQ saves the multiply-adds, not the reads (SparQ keeps a second, dimension-major copy of
  K for that)."""
  lines = max(head_dim * itemsize // CACHE_LINE, 1)
  return 1.0 if rank is None else min(rank, lines) / lines


def score_read_share(head_dim: int, itemsize: int, rank: int | None, estimate: str = "sparq",
                     sketch_bits: int = 0) -> float:
  """What a per-head step reads to score, as a share of the KV of the tokens it scores: all of K
  (exact), the cache lines of K that SparQ's dimensions touch (`key_read_share`), or the low-rank
  keys (rank + 1 of D coordinates a key, contiguous) and their `sketch_bits` of residual sketch."""
  if rank is not None and estimate == "lowrank":
    return (rank + 1) / (2 * head_dim) + sketch_bits / 8 / (2 * head_dim * itemsize)
  return 0.5 * key_read_share(head_dim, itemsize, rank)


def sparq_chunk_mass(q_BKGQD, k_BTKD, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, rank: int, layer=None,
                     key_chunk_BT=None):
  """SparQ's estimate of `chunk_mass` from `rank` of K's dimensions: per KV head and query, the
  dimensions where the query heads that read it are largest in |q| summed (one slice of K serves the
  group); each head's logits over those dimensions at SparQ's temperature (`scale` over the square
  root of the share of its |q|_1 they keep); the softmax over the keys [n_sink, hi], summed within
  each chunk (0 for chunks ending before n_sink or past the keys). float32 [B, K, G, Q, C].
  With one query and `layer` (decode: `k_BTKD` is the stacked buffer) only those dimensions of K are
  read; otherwise the others are zeroed in q. The soft cap is not applied: the estimate ranks chunks,
  and the cap keeps the order of logits. `key_chunk_BT`: as `_mass_of_logits`'s."""
  q = q_BKGQD.astype(jnp.float32)
  B, K, G, Q, D = q.shape
  T = k_BTKD.shape[-3]
  strength_BKQD = jnp.abs(q).sum(2)
  total = jnp.maximum(jnp.abs(q).sum(-1), 1e-30)  # B K G Q
  if Q == 1 and layer is not None:
    dims_BKr = jax.lax.top_k(strength_BKQD[:, :, 0], rank)[1]
    q_r = jnp.take_along_axis(q[:, :, :, 0], dims_BKr[:, :, None], -1)  # B K G r
    k_r = k_BTKD[layer, jnp.arange(B)[:, None, None, None], jnp.arange(T)[None, :, None, None],
                 jnp.arange(K)[None, None, :, None], dims_BKr[:, None]]  # B T K r: the chosen dimensions only
    temp = scale / jnp.sqrt(jnp.maximum(jnp.abs(q_r).sum(-1) / total[..., 0], 1e-6))
    s = (jnp.einsum("bkgr,btkr->bkgt", q_r, k_r.astype(jnp.float32)) * temp[..., None])[:, :, :, None]
  else:
    if layer is not None:
      k_BTKD = k_BTKD[layer]
    kth = jax.lax.top_k(strength_BKQD, rank)[0][..., -1:]
    q_r = jnp.where((strength_BKQD >= kth)[:, :, None], q, 0.0)
    temp = scale / jnp.sqrt(jnp.maximum(jnp.abs(q_r).sum(-1) / total, 1e-6))
    s = jnp.einsum("bkgqd,btkd->bkgqt", q_r, k_BTKD.astype(jnp.float32)) * temp[..., None]
  return _mass_of_logits(s, hi_BKGQ, ends_BC, n_sink, key_chunk_BT)


def mass_by_segments() -> bool:
  """Whether decode sums each chunk's keys by a segment sum over their chunk ids (`_mass_of_logits` given
  `key_chunk_BT`: on the CPU, where the running sum over the keys took 3x as long, 3.1 ms against 1.0 ms
  for 9 rows of 32K keys) rather than as a difference of a running sum at the chunk ends (accelerators,
  whose scatter-adds serialise or race)."""
  return jax.default_backend() == "cpu"


def _mass_of_logits(s_BKGQT, hi_BKGQ, ends_BC, n_sink: int, key_chunk_BT=None):
  """Each query's softmax of estimated logits over the keys [n_sink, hi], summed within each chunk (0 for
  chunks ending before n_sink or past the keys; a query with no key gives zeros). [B, K, G, Q, C].
  With `key_chunk_BT` (`boundaries.chunk_ids_from_ends` of the table) a segment sum over the keys' chunk
  ids, else a running sum read at the chunk ends."""
  T, C = s_BKGQT.shape[-1], ends_BC.shape[-1]
  t = jnp.arange(T)
  ok = (t >= n_sink) & (t <= jnp.broadcast_to(hi_BKGQ, s_BKGQT.shape[:-1])[..., None])
  top = jnp.max(jnp.where(ok, s_BKGQT, -jnp.inf), -1, keepdims=True)
  e = jnp.where(ok, jnp.exp(s_BKGQT - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  total = jnp.sum(e, -1, keepdims=True)  # the softmax's denominator: divided once per chunk, not per key
  if key_chunk_BT is not None:
    segment = jnp.where(key_chunk_BT >= 0, key_chunk_BT, C)  # sinks into the dropped segment C
    in_chunks = lambda e_T, seg_T: jax.ops.segment_sum(e_T, seg_T, num_segments=C + 1, indices_are_sorted=False)
    rows = e.reshape(e.shape[0], -1, T)
    mass = jax.vmap(jax.vmap(in_chunks, (0, None)))(rows, segment)[..., :C].reshape(*e.shape[:-1], C)
  else:
    cum = jax.lax.associative_scan(jnp.add, e, axis=-1)  # a parallel prefix sum
    at_end = jnp.take_along_axis(cum, jnp.clip(ends_BC, 0, T - 1)[:, None, None, None, :], -1)
    mass = at_end - jnp.pad(at_end[..., :-1], [(0, 0)] * 4 + [(1, 0)])
  mass = mass / jnp.where(total > 0, total, 1.0)
  return jnp.where(((ends_BC >= n_sink) & (ends_BC < T))[:, None, None, None, :], mass, 0.0)


def key_gram(k_BTKD, valid_BT):
  """Per KV head, sum_t k k^T over the valid tokens: [B, K, D, D] float32 (sums of blocks add up)."""
  k = jnp.where(valid_BT[:, :, None, None], k_BTKD.astype(jnp.float32), 0.0)
  return jnp.einsum("btkd,btke->bkde", k, k)


def key_basis(k_BTKD, valid_BT, rank: int):
  """Per KV head, the `rank` directions that hold most of its keys' energy (the top eigenvectors of
  sum_t k k^T over the valid tokens): [B, K, D, rank] float32, orthonormal columns, each with its
  largest component positive."""
  return gram_basis(key_gram(k_BTKD, valid_BT), rank)


def gram_basis(gram_BKDD, rank: int):
  """`key_basis` from the keys' `key_gram` (summed over blocks of keys where they are read a block at a time)."""
  # One matrix per eigh call: XLA's CPU LAPACK call splits a batch over the thread pool that also runs each
  # device's program, and over several CPU devices that split waits for threads held by collectives
  # (a deadlock, from 64 x 64 matrices up; tests/test_chunk_generate.py::test_sharded_per_head_over_eight_devices).
  # The B x K matrices are eigendecomposed once per prompt and layer, so the loop costs nothing that counts.
  flat = gram_BKDD.reshape(-1, *gram_BKDD.shape[-2:])
  vecs = jax.lax.map(lambda g: jnp.linalg.eigh(g)[1], flat).reshape(gram_BKDD.shape)  # ascending eigenvalues
  vecs = vecs[..., ::-1][..., :rank]
  # An eigenvector's sign is arbitrary, and rounding flips it between equal keys computed two ways (a
  # prompt read in blocks or whole): fixed, the basis and every key's coordinates follow from K alone.
  top = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), axis=-2, keepdims=True), axis=-2)
  return vecs * jnp.where(top < 0, -1.0, 1.0)


def _split_by_basis(x_BKND, basis_BKDr):
  """A vector's coordinates in the basis [B, K, N, r] and what the basis misses [B, K, N, D], float32."""
  x = x_BKND.astype(jnp.float32)
  coords = jnp.einsum("bknd,bkdr->bknr", x, basis_BKDr)
  return coords, x - jnp.einsum("bknr,bkdr->bknd", coords, basis_BKDr)  # no cancellation in its length


def lowrank_coords(x_BKND, basis_BKDr):
  """A vector's coordinates in the basis and the length of what the basis misses: [B, K, N, rank + 1]
  float32. For a key k and a query q with these, (q P) . (k P) + |q_out| |k_out| >= q . k (Cauchy-Schwarz
  on what the basis misses), with equality where the basis holds either one."""
  coords, missed = _split_by_basis(x_BKND, basis_BKDr)
  return jnp.concatenate([coords, jnp.linalg.norm(missed, axis=-1, keepdims=True)], -1)


@functools.lru_cache(maxsize=None)
def sketch_matrix(head_dim: int, bits: int):
  """`residual_sketch`'s projection: [D, bits] float32, iid standard normal from a fixed seed, so the
  prompt's keys, decode's keys and every query meet the same one. Drawn once, at trace time: a
  constant of the compiled step (traced, its random bits were drawn again in every layer of every step)."""
  with jax.ensure_compile_time_eval():
    return jax.random.normal(jax.random.key(0), (head_dim, bits), jnp.float32)


def _pack_signs(missed_BKND, bits: int):
  """The signs of `missed` projected on `sketch_matrix`, packed `SKETCH_WORD` to a uint32, bit i of
  word w for projection 32 w + i: [B, K, N, bits // 32]."""
  signs = (missed_BKND @ sketch_matrix(missed_BKND.shape[-1], bits)) > 0
  signs = signs.reshape(*signs.shape[:-1], bits // SKETCH_WORD, SKETCH_WORD).astype(jnp.uint32)
  return jnp.sum(signs << jnp.arange(SKETCH_WORD, dtype=jnp.uint32), -1, dtype=jnp.uint32)  # distinct bits: or


def residual_sketch(x_BKND, basis_BKDr, bits: int):
  """The signs of what the basis misses, projected on `sketch_matrix` (QJL's 1-bit sketch), packed
  `SKETCH_WORD` to a uint32, bit i of word w for projection 32 w + i: [B, K, N, bits // 32]."""
  return _pack_signs(_split_by_basis(x_BKND, basis_BKDr)[1], bits)


def hamming(words_BKNw, words_BKwT):
  """Bits that differ between each query's packed signs and every key's: [B, K, N, T] int32 (one xor
  and popcount per word, the keys' words read as they lie). Summed over the words as a reduction, which
  XLA computes once into a buffer: as a sum of per-word terms it was fused into each of the softmax's
  passes over the logits and recomputed there, and in the decode step's scan over the layers the score
  ran 2.6x slower (runs of `selection.lowrank_chunk_mass` at 16K keys: 8.5 against 3.3 ms a layer)."""
  differ = jax.lax.population_count(words_BKNw[..., :, None] ^ words_BKwT[:, :, None])  # B K N w T
  return jnp.sum(differ.astype(jnp.int32), -2)


def _sketch_signs(words_BKwT):
  """`residual_sketch` words laid out [B, K, bits // 32, T] as signs +-1.0: [B, K, bits, T] float32."""
  B, K, n_words, T = words_BKwT.shape
  bits = (words_BKwT[:, :, :, None] >> jnp.arange(SKETCH_WORD, dtype=jnp.uint32)[:, None]) & 1
  return bits.reshape(B, K, n_words * SKETCH_WORD, T).astype(jnp.float32) * 2.0 - 1.0


SKETCH_BLOCK = 512  # keys unpacked at a time: their signs stay in cache (all at once ran 7x slower at 32K keys)


def sketch_dot(x_BKNm, words_BKwT):
  """sum_i x_i sign_i against every key's sketch: [B, K, N, T] float32. The signs are unpacked
  `SKETCH_BLOCK` keys at a time (the keys padded to whole blocks), each block one matmul."""
  B, K, n_words, T = words_BKwT.shape
  n = -(-T // SKETCH_BLOCK)
  words = jnp.pad(words_BKwT, [(0, 0)] * 3 + [(0, n * SKETCH_BLOCK - T)])
  blocks = jnp.moveaxis(words.reshape(B, K, n_words, n, SKETCH_BLOCK), 3, 0)
  out = jax.lax.map(lambda w: jnp.einsum("bknm,bkmt->bknt", x_BKNm, _sketch_signs(w)), blocks)  # n B K N block
  return jnp.moveaxis(out, 0, 3).reshape(*x_BKNm.shape[:3], n * SKETCH_BLOCK)[..., :T]


def cos_pi(u):
  """cos(pi u) for u in [0, 1], as -sin(z), z = pi (u - 1/2), by its Taylor polynomial to z^11 (within 2e-7
  of cos in float32): multiplies and adds only. XLA's CPU cos took 3.4 ms for one sparse layer's 9 x 32K
  SimHash angles, about as long as the rest of the score together; the polynomial 0.4 ms."""
  z = math.pi * (u - 0.5)
  z2 = z * z
  return -z * (1 - z2 / 6 * (1 - z2 / 20 * (1 - z2 / 42 * (1 - z2 / 72 * (1 - z2 / 110)))))


def lowrank_chunk_mass(q_BKGQD, k_low_BKcT, basis_BKDr, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, layer=None,
                       k_sketch_BKwT=None, sketch_estimate: str = SKETCH_ESTIMATES[0], key_chunk_BT=None):
  """`chunk_mass` estimated from the keys' `lowrank_coords` (Loki's low-rank keys, with the length of
  what the basis misses), laid out [B, K, rank + 1, T] (each coordinate contiguous over the
  positions, so the scores are one plain matmul per KV head: [B, T, K, rank] ran 5x slower on the
  CPU at 32K keys), or with `layer` the stacked [L, B, K, rank + 1, T]. A key's logit is
  scale * ((q P) . (k P) + r), r the part the basis misses: without a sketch the bound |q_out| |k_out|
  (a key in a direction the prompt's keys rarely take, a needle's, keeps a logit as high as its
  length allows instead of losing it, and so do keys that merely lie off the basis); with
  `k_sketch_BKwT` (`residual_sketch` words [B, K, bits // 32, T], stacked with `layer`) an estimate
  from the sketch (`ChunkConfig.sketch_estimate`): "simhash", |q_out| |k_out| cos(pi h / bits) from
  the Hamming distance h of both sides' signs, or "qjl", QJL's unbiased sqrt(pi / 2) / bits |k_out|
  (S q_out) . sign(S k_out); the error of both shrinks as 1 / sqrt(bits). Softmax over the keys
  [n_sink, hi], summed within each chunk (`key_chunk_BT`: as `_mass_of_logits`'s). float32 [B, K, G, Q, C]."""
  if layer is not None:
    k_low_BKcT = jax.lax.dynamic_index_in_dim(k_low_BKcT, layer, 0, keepdims=False)
    if k_sketch_BKwT is not None:
      k_sketch_BKwT = jax.lax.dynamic_index_in_dim(k_sketch_BKwT, layer, 0, keepdims=False)
  B, K, G, Q, D = q_BKGQD.shape
  k_low = k_low_BKcT.astype(jnp.float32)
  if k_sketch_BKwT is None:
    q_low = lowrank_coords(q_BKGQD.reshape(B, K, G * Q, D), basis_BKDr).reshape(B, K, G, Q, -1)
    s = jnp.einsum("bkgqc,bkct->bkgqt", q_low, k_low)
  else:
    r = basis_BKDr.shape[-1]
    bits = k_sketch_BKwT.shape[-2] * SKETCH_WORD
    coords, missed = _split_by_basis(q_BKGQD.reshape(B, K, G * Q, D), basis_BKDr)
    k_out = k_low[:, :, None, r]  # [B, K, 1, T]
    if sketch_estimate == "simhash":
      h = hamming(_pack_signs(missed, bits), k_sketch_BKwT)
      residual = jnp.linalg.norm(missed, axis=-1, keepdims=True) * k_out * cos_pi(h * (1.0 / bits))
    else:
      residual = sketch_dot(missed @ sketch_matrix(D, bits), k_sketch_BKwT) * (math.sqrt(math.pi / 2) / bits) * k_out
    coords = jnp.pad(coords, [(0, 0)] * 3 + [(0, 1)])  # against all of k_low: its first r rows alone were a copy
    s = jnp.einsum("bkgqc,bkct->bkgqt", coords.reshape(B, K, G, Q, r + 1), k_low) + residual.reshape(B, K, G, Q, -1)
  return _mass_of_logits(s * scale, hi_BKGQ, ends_BC, n_sink, key_chunk_BT)


def attention_probs(q_BRHD, k_BTKD, chunk_end_BC, n_cand_BR, *, n_sink: int, scale: float,
                    softcap: float | None = None, q_pos_BR=None, heads: str = "max", key_block: int = KEY_BLOCK,
                    layer=None):
  """Frozen-attention distribution: per head, the softmax of one query over the candidate chunks'
  tokens, summed within each chunk (`chunk_mass`); then the max over heads (`heads="mean"`: the
  mean, the teacher's other option). [B, R, C] float32.

  Chunks are contiguous from `n_sink` on, so the candidates' tokens are the positions
  [n_sink, end of chunk n_cand - 1]. With `q_pos_BR`, a query reads no key after its own position
  (causality), and a row with a negative position (no such query) scores 0. With `layer`, `k_BTKD`
  is the stacked buffer [L, B, T, K, D] (`chunk_mass`)."""
  K = k_BTKD.shape[-2]
  last = jnp.take_along_axis(chunk_end_BC, jnp.maximum(n_cand_BR - 1, 0), axis=1)  # [B, R]
  hi = jnp.where(n_cand_BR > 0, last, -1)
  if q_pos_BR is not None:
    hi = jnp.minimum(hi, q_pos_BR)
  mass = chunk_mass(attn.split_heads(q_BRHD, K), k_BTKD, hi[:, None, None, :], chunk_end_BC, n_sink=n_sink,
                    scale=scale, softcap=softcap, key_block=key_block, layer=layer)  # [B, K, G, R, C]
  score = mass.max(axis=(1, 2)) if heads == "max" else mass.mean(axis=(1, 2))
  cand = jnp.arange(chunk_end_BC.shape[1]) < n_cand_BR[..., None]
  return jnp.where(cand, score, 0.0)


def renormalise(p, axis: int = -1):
  """`p` divided by its sum over `axis` (0 stays 0): chunk mass as a distribution over the candidates.
  The one renormalisation of the teachers, the student's window and the evaluation's ranks."""
  return p / jnp.maximum(jnp.sum(p, axis=axis, keepdims=True), 1e-30)


def vote_scores(probs_S, vote: str):
  """One score per chunk from the selection layers' distributions (leading axis): "sum" or "max"."""
  return {"sum": jnp.sum, "max": jnp.max}[vote](probs_S, axis=0)


# ----------------------------------------------------------------------------------------------
# From scores to a selection


def order_by_score(score_BRC):
  """Indices of the last axis, best score first; ties by position (the oldest first). [B, R, C] int32.

  One sort of int32 keys: the score's order-preserving bits over the index's bits. XLA's sort of
  floats, or of a key with the index beside it, is 4-7x slower on the CPU (C = 1024 to 4096, `choose`'s
  time with a per-head selection at every step). The index takes the key's low ceil(log2 C) bits, so
  scores within 2^-(23 - that) of each other (relative; 1.2e-4 at C = 1024) count as tied."""
  C = score_BRC.shape[-1]
  idx_bits = max((C - 1).bit_length(), 1)
  bits = jax.lax.bitcast_convert_type(score_BRC.astype(jnp.float32), jnp.int32)
  ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # as signed ints, in the floats' order
  key = ((ordered >> idx_bits) << idx_bits) | (C - 1 - jnp.arange(C, dtype=jnp.int32))
  return C - 1 - (jnp.sort(key, axis=-1)[..., ::-1] & ((1 << idx_bits) - 1))


FILL_PASSES = 4  # passes of the budgeted selection over the chunks it has left out (`choose`)


def choose(score_BRC, n_cand_BR, chunk_len_BC, fixed_BR, seen_BR, cfg: ChunkConfig):
  """Which candidates each row keeps: [B, R, C] bool.

  With a KV budget, chunks are taken in score order while they fit in what the budget leaves after
  `fixed` (sinks, local chunks, open chunk); then, in up to FILL_PASSES - 1 more passes, the best of
  those left out that still fit what remains, again in score order. One pass stops at the first
  chunk that does not fit, which can leave a long chunk's worth of budget unused (50 tokens at 2K,
  2.4 mean chunks); the passes fill it with shorter chunks. With `boundary_tokens` the last tokens of
  the chunks left out are paid for first, as many as `last_token_count` allows. Where that is every
  candidate's, a chunk costs the rest of it, and where they leave no candidate room, the best by score is
  read in place of the oldest of them (`_best_in_place_of_last_tokens`); where it is fewer, they take
  their share and the chunks cost their whole length. Without a budget, the `top_chunks` best are kept."""
  C = score_BRC.shape[-1]
  cand = jnp.arange(C) < n_cand_BR[..., None]
  score = jnp.where(cand, score_BRC, -1.0)
  if not cfg.budgeted:
    k = min(cfg.top_chunks, C)
    if k == 0:
      return jnp.zeros(score.shape, bool)
    val, idx = jax.lax.top_k(score, k)
    picked = jnp.zeros(score.shape, bool)
    put = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v >= 0.0)))
    return put(picked, idx, val)
  cost = jnp.ones_like(chunk_len_BC) if cfg.keep == "boundary" else chunk_len_BC
  cost = jnp.broadcast_to(cost[:, None], score.shape)
  budget = cfg.budget_tokens(seen_BR)
  held = jnp.zeros_like(fixed_BR)  # [B, R]: last tokens paid for only while that many chunks are left out
  if cfg.reads_boundary_tokens:
    n_last = last_token_count(n_cand_BR, budget - fixed_BR, cfg)
    every = n_last >= n_cand_BR  # [B, R]: every candidate's last token is read anyway: a chunk costs the rest
    cost = jnp.where(every[..., None], jnp.maximum(cost - 1, 0), cost)
    held = jnp.where(every, 0, n_last)
    fixed_BR = fixed_BR + n_last
  if cfg.recent_share > 0.0:
    # The most recent candidates come first while they, with what is always read, fit the recent
    # share: a window in tokens, not in chunks, whatever the chunk lengths.
    cost_BRC = jnp.where(cand, cost, 0)
    newer_BRC = jnp.cumsum(cost_BRC[..., ::-1], -1)[..., ::-1]  # tokens from candidate j to the newest
    recent = cand & (newer_BRC + fixed_BR[..., None] <= jnp.floor(cfg.recent_share * budget)[..., None])
    score = jnp.where(recent, jnp.inf, score)
  order = order_by_score(score)
  cost_sorted = jnp.take_along_axis(cost, order, -1)
  cand_sorted = jnp.take_along_axis(cand, order, -1)
  left = budget - fixed_BR  # [B, R]: tokens the chosen chunks may still take
  taken = jnp.zeros(score.shape, bool)
  if cfg.reads_boundary_tokens:
    recent_sorted = jnp.take_along_axis(score == jnp.inf, order, -1)
    taken = _best_in_place_of_last_tokens(cand_sorted, cost_sorted, recent_sorted, left) & every[..., None]
  holds = cfg.reads_boundary_tokens and cfg.boundary_share < 1.0  # static: only then can `held` be nonzero
  for _ in range(FILL_PASSES):
    # Under a share of last tokens, each chunk taken leaves one chunk fewer out: once fewer than `held` are
    # left, the last tokens held for them go back to the chunks (so a budget of every token reads them all).
    n_out = (n_cand_BR - jnp.sum(taken, -1))[..., None]  # [B, R, 1]: the candidates still left out
    freed = (lambda k: held[..., None] - jnp.minimum(held[..., None], n_out - k)) if holds else (lambda k: 0)
    open_ = cand_sorted & ~taken & (cost_sorted <= left[..., None] + freed(1))
    # (Each chunk costs a token or more and frees at most one: the running sum stays a prefix test.)
    fits = open_ & (jnp.cumsum(jnp.where(open_, cost_sorted, 0), -1) <= left[..., None] + freed(jnp.cumsum(open_, -1)))
    taken = taken | fits
    left = left - jnp.sum(jnp.where(fits, cost_sorted, 0), -1)
  put = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))
  return put(jnp.zeros(score.shape, bool), order, taken)


def last_token_count(n_cand, room, cfg: ChunkConfig):
  """How many chunks left out give their last token (`boundary_tokens` under a budget), the newest of them:
  all `n_cand` candidates', or under `boundary_share` < 1 at most that share of `room`, what the budget
  leaves after the sinks, local and open chunk. `choose` pays for them and `working_positions` reads them,
  both with this count, so the two agree on what the budget holds."""
  if cfg.boundary_share >= 1.0:
    return n_cand
  most = jnp.floor(cfg.boundary_share * jnp.maximum(room, 0)).astype(jnp.int32)
  return jnp.minimum(n_cand, most)


def _best_in_place_of_last_tokens(cand_sorted, cost_sorted, recent_sorted, left_BR):
  """`choose`'s start with `boundary_tokens`, in score order: [B, R, C] bool, only the best candidate by
  score, and only where no candidate outside the recent share fits what the last tokens leave of the
  budget, but the best one, whole, fits what it leaves without them. `working_positions` then drops the
  oldest last tokens to make its room.

  Under a budget of a few tokens a chunk (6.25% of the tokens seen, chunks of 27: 1.7 a chunk) the last
  tokens fill what the sinks, local and open chunks leave, and nothing would be read by score. Only the
  best chunk is made room for: with chunks of one token each costs nothing past its last token, and
  letting every such candidate in would read them all whatever the budget."""
  scored = cand_sorted & ~recent_sorted
  n_recent = jnp.sum(recent_sorted, -1)  # the recent share's come first in score order: the best scored next
  room = left_BR - jnp.sum(jnp.where(recent_sorted, cost_sorted, 0), -1)  # after them and the last tokens
  cheapest = jnp.min(jnp.where(scored, cost_sorted, jnp.iinfo(jnp.int32).max), -1)
  best = (jnp.arange(cost_sorted.shape[-1]) == n_recent[..., None]) & scored
  # Without the last tokens of the candidates not read whole, what the budget leaves for one of them.
  whole_room = room + jnp.sum(scored, -1)
  fits_whole = jnp.sum(jnp.where(best, cost_sorted + 1, 0), -1) <= whole_room
  return best & ((cheapest > room) & fits_whole)[..., None]


def local_tokens(chunk_end_BC, n_chunks_BR, n_local, n_sink: int):
  """Tokens in the `n_local` (an int, or one per row: [B, 1] or [B, R]) most recent completed chunks: [B, R] int32."""
  return _end_of(chunk_end_BC, n_chunks_BR - 1, n_sink) - _end_of(chunk_end_BC, n_chunks_BR - 1 - n_local, n_sink)


def _end_of(chunk_end_BC, i_BR, n_sink: int):
  """The position just after chunk i (n_sink for "before chunk 0"): [B, R]."""
  e = jnp.take_along_axis(chunk_end_BC, jnp.maximum(i_BR, 0), axis=1)
  return jnp.where(i_BR >= 0, e + 1, n_sink)


def local_count(chunk_end_BC, n_chunks_B, pos_B, cfg: ChunkConfig):
  """How many of the most recent completed chunks the token at `pos_B` always reads: [B] int32.

  `n_local` of them (fewer where fewer exist). Under a budget with a recent share, only as many as fit the recent
  share with the sinks and the open chunk, and at least the newest: the older local chunks become candidates
  and are read as far as their scores earn them the rest of the budget. Without that cap, text whose chunks
  run long (tables, lists, code: chunks closed by force at `max_chunk_len`) fills a small budget with its local
  chunks alone and leaves nothing to choose by score."""
  n_B = jnp.minimum(cfg.n_local, n_chunks_B)
  if not (cfg.budgeted and cfg.recent_share > 0.0) or cfg.n_local <= 1:
    return n_B
  open_B = jnp.maximum(pos_B + 1 - _end_of(chunk_end_BC, (n_chunks_B - 1)[:, None], cfg.n_sink)[:, 0], 0)
  room_B = jnp.floor(cfg.recent_share * cfg.budget_tokens(pos_B + 1)).astype(jnp.int32) - cfg.n_sink - open_B
  m = jnp.arange(1, cfg.n_local + 1)[None, :]  # [1, n_local]: candidate counts, each within the table
  tokens_BM = local_tokens(chunk_end_BC, jnp.broadcast_to(n_chunks_B[:, None], (n_B.shape[0], cfg.n_local)),
                           jnp.minimum(m, n_chunks_B[:, None]), cfg.n_sink)
  fits_B = jnp.sum(tokens_BM <= room_B[:, None], axis=-1)  # the tokens grow with m: the count of those that fit
  return jnp.minimum(jnp.maximum(fits_B, 1), n_B).astype(jnp.int32)


def chunk_lengths(start_BC, end_BC, n_chunks_B):
  """Tokens in each completed chunk, 0 past the last: [B, C]."""
  return jnp.where(jnp.arange(end_BC.shape[1]) < n_chunks_B[:, None], end_BC - start_BC + 1, 0)
