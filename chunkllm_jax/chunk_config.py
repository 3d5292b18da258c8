"""ChunkConfig: ChunkLLM's inference settings, and `ChunkRules`, the chunk rules it shares with training
and the evaluation. One frozen dataclass, checked on the host before anything compiles (`validate`), a
static argument of the compiled programs; `resolve` fills in what the adapters decide. The functions that
read it are in `selection.py` (scores to a choice), `chunk_cache.py` (the chunk table and working
buffer) and `head_selection.py` (the per-head rule)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import checks

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
SKETCH_WORD = 32  # bits of `selection.residual_sketch` a uint32 holds


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
  # the length of what the basis misses, kept beside the cache (`selection.lowrank_chunk_mass`; (score_rank + 1) /
  # head_dim of K's bytes, read and held); "sparq", the query's `score_rank` largest dimensions of K
  # (`selection.sparq_chunk_mass`; on this cache's layout they touch every cache line of K); or "exact", the mass
  # itself (`selection.chunk_mass`, reading all of K). score_rank None: a quarter of the head dimension (the size
  # measured on both models: 16 of smollm2-135m's 64, 64 of gemma3-270m's 256).
  score_rank: int | None = None
  score_estimate: str = SCORE_ESTIMATES[0]
  # With score_estimate="lowrank": bits of a 1-bit random sketch of what each key's basis misses
  # (`selection.residual_sketch`, read as `sketch_estimate` says), kept beside the low-rank keys, in place of the
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
  # (`selection.last_token_count`), and the chunks chosen by score keep the rest: there the chunks are worth more.
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
