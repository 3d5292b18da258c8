"""The evaluated methods, each a selection over the same static KV buffer, at matched KV budgets.

Vanilla decoding runs through `cj.generate`; ChunkLLM and the paper's three baselines run through
`chunk_generate`, each with the `ChunkConfig` that makes it what it is, so that a score difference
comes from what attention reads, never from a second implementation:

- `chunkllm`: the Chunk Adapter's boundaries, the QK Adapters of the selection layers vote.
- `oracle`: the same chunks, scored by the frozen model's own attention at the selection layers
  (`scorer="attention"`, no training): the ceiling the QK Adapters are measured against.
- `streamingllm`: sinks + a recent window: fixed 16-token chunks, no selection (`top_chunks=0`), the
  window is `n_local` chunks.
- `sepllm`: sinks + the KV of every separator token + a recent window: chunks end at separator
  tokens (any token whose text holds one of `.,;:!?` or a newline), every chunk is selected but
  contributes its last token only (`keep="boundary"`), the window is `n_local` whole chunks.
- `fixllm`: fixed-length chunks (about ChunkLLM's mean chunk length) with the same QK-adapter
  selection, no Chunk Adapter.

Methods that select (chunkllm, hybrid, oracle, fixllm) take the target r as their token budget
(`ChunkConfig.kv_budget`): the selection itself fills chunks until r of the tokens seen are read.
The windows of streamingllm and sepllm are matched by *expected* retention, row by row: the knob
is the one whose expected retention, counted
step by step the way chunk_generate counts it (visible / seen, averaged over the decode steps),
comes closest to r. The count uses where each method's chunks really end in the prompts:
ChunkLLM's from the Chunk Adapter run on layer 0 alone (the segmentation chunk_prefill makes),
SepLLM's from the separator tokens, the fixed grid for the others. Only which chunks a selection
will pick, and the boundaries in text not generated yet, are estimated (from mean lengths).
What gets reported is always the retention `chunk_generate` measured, never this estimate:
SepLLM's separators alone can exceed a low budget, and then its real (higher) retention shows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import chunkllm_jax as cj
from chunkllm_jax import boundaries
from chunkllm_jax.chunk_config import ChunkConfig, ChunkRules
from chunkllm_jax.chunk_generation import chunk_generate, segment_prompts

METHODS = ("vanilla", "oracle", "chunkllm", "hybrid", "streamingllm", "sepllm", "fixllm")
SELECTING = ("oracle", "chunkllm", "hybrid", "fixllm")  # the methods whose selection meets a token budget
WINDOWED = ("streamingllm", "sepllm")  # the methods whose window is fitted to a retention target
SEPARATOR_CHARS = ".,;:!?\n"


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """What the methods share, and the knobs that no retention target sets."""

  separator_ids: tuple[int, ...] = ()  # SepLLM's separators (`separator_ids(tokenizer)`)
  n_sink: int = ChunkRules.n_sink
  window: int = 256  # streamingllm / sepllm window in tokens when no retention is targeted
  stream_chunk_len: int = 16  # streamingllm's window moves in steps of this many tokens
  sep_max_chunk_len: int = 64  # a run this long without a separator is closed by force
  fix_chunk_len: int | None = None  # fixllm's chunk length; None: ChunkLLM's measured mean, rounded
  chunk_len: float | None = None  # ChunkLLM's mean chunk length; None: measured on the prompts (layer 0)
  max_n_local: int = ChunkRules.n_local  # recent chunks always visible for chunkllm / fixllm (at most)
  vote: str = "sum"  # chunkllm / fixllm, and hybrid / oracle under selection="shared": how the selection layers' scores
  #                   make one selection (the per-head rule votes on nothing)
  selection_layers: tuple[int, ...] | None = None  # None: the adapters' stored choice
  boundary_tokens: bool = True  # hybrid / oracle: also read the last token of every chunk left out, where a
  #                               budget pays for them (`ChunkConfig`'s rule, boundary_tokens=None); False: never
  boundary_share: float = ChunkConfig.boundary_share  # hybrid / oracle: the most of what the budget leaves that
  #                                                     the last tokens take
  recent_share: float = ChunkConfig.recent_share  # hybrid / oracle: the budget's share that the most recent
  #                                                 chunks get first
  kv_budget_min_tokens: int = 0  # hybrid / oracle: the budget's floor in tokens (the share is fitted under it)
  selection: str = ChunkConfig.selection  # hybrid / oracle: who makes decode's selections ("kv_head": each
  #                                         KV head of each sparse layer, at every step; "shared")
  # hybrid / oracle with selection="kv_head", as ChunkConfig's fields of the same names:
  score_rank: int | None = ChunkConfig.score_rank  # the size of its scores' estimate (None: a quarter of D)
  score_estimate: str = ChunkConfig.score_estimate  # "lowrank", "sparq" or "exact"
  score_sketch: int | None = ChunkConfig.score_sketch  # with "lowrank": bits of the residual sketch (0: the bound)
  sketch_estimate: str = ChunkConfig.sketch_estimate  # with score_sketch: "simhash" or "qjl"
  head_refresh: int = ChunkConfig.head_refresh  # with selection="kv_head": steps between the heads' choices
  page_len: int | None = None  # hybrid / oracle: fixed pages of this many tokens instead of the Chunk Adapter's
  #                              chunks (boundaries="fixed"); None: the chunks
  batch_size: int = 4  # prompts per batch, taken in order of length


@functools.lru_cache(maxsize=4)
def separator_ids(tokenizer, vocab_size: int | None = None, chars: str = SEPARATOR_CHARS) -> tuple[int, ...]:
  """Ids of the tokens whose decoded text contains any of `chars` (computed once per tokenizer)."""
  n = vocab_size or len(tokenizer)
  texts = tokenizer.batch_decode([[i] for i in range(n)])
  return tuple(i for i, t in enumerate(texts) if any(c in t for c in chars))


def settings_for(model, **overrides) -> MethodSettings:
  """The settings for a loaded model: its separators, and any field given by keyword."""
  seps = separator_ids(model.tokenizer, model.config.vocab_size) if model.tokenizer is not None else ()
  return MethodSettings(**{"separator_ids": seps, **overrides})


# ----------------------------------------------------------------------------------------------
# Segmentation of the rows, for the budget estimate and the chunk-table size


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """Where a boundary rule ends its chunks in each row (of prompts, or of whole texts)."""

  ends: tuple[tuple[int, ...], ...]  # per row: the completed chunks' last positions, ascending
  lengths: tuple[int, ...]  # per row: tokens segmented
  n_sink: int

  @property
  def mean_len(self) -> float:
    """Tokens per completed chunk over the rows (the sinks are in no chunk); 0 with no chunk."""
    covered = sum(e[-1] + 1 - self.n_sink for e in self.ends if e)
    return covered / max(sum(len(e) for e in self.ends), 1)

  @property
  def max_chunks(self) -> int:
    return max((len(e) for e in self.ends), default=0)


def adapter_segmentation(params, rows: Sequence[Sequence[int]], ccfg: ChunkConfig = ChunkConfig()) -> Segmentation:
  """ChunkLLM's chunks in these token rows: the Chunk Adapter on layer 0's output, as chunk_prefill does."""
  lens = [len(r) for r in rows]
  width = -(-max(lens) // 64) * 64  # few shapes, few compiles
  tokens = np.zeros((len(rows), width), np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r
  closes = np.asarray(segment_prompts(params, jnp.asarray(tokens), jnp.asarray(lens, jnp.int32), ccfg))
  return Segmentation(tuple(tuple(np.flatnonzero(c).tolist()) for c in closes), tuple(lens), ccfg.n_sink)


_rule_closes = jax.jit(boundaries.segment, static_argnames=("ccfg",))


def separator_chunk_ends(row: Sequence[int], seps, n_sink: int, max_chunk_len: int) -> list[int]:
  """SepLLM's chunk ends in one row, by the one boundary rule (`boundaries.segment`)."""
  width = _round_up(max(len(row), 1), 64)  # few shapes, few compiles
  tokens = np.zeros((1, width), np.int32)
  tokens[0, : len(row)] = row
  ccfg = ChunkConfig(n_sink=n_sink, max_chunk_len=max_chunk_len, boundaries="separators", separator_ids=tuple(seps))
  valid = jnp.arange(width)[None] < len(row)
  closes = _rule_closes(jnp.zeros((1, width), jnp.float32), valid, jnp.asarray(tokens), ccfg=ccfg)
  return np.flatnonzero(np.asarray(closes[0])).tolist()


def separator_segmentation(rows, settings: MethodSettings) -> Segmentation:
  ends = [separator_chunk_ends(r, settings.separator_ids, settings.n_sink, settings.sep_max_chunk_len) for r in rows]
  return Segmentation(tuple(map(tuple, ends)), tuple(len(r) for r in rows), settings.n_sink)


def fixed_segmentation(lengths: Sequence[int], chunk_len: int, n_sink: int) -> Segmentation:
  ends = [tuple(range(n_sink + chunk_len - 1, n, chunk_len)) for n in lengths]
  return Segmentation(tuple(ends), tuple(lengths), n_sink)


def segmentation_for(method: str, params, rows, settings: MethodSettings) -> Segmentation | None:
  """The measured segmentation a method's budget needs (None where it needs none)."""
  if method == "sepllm":
    return separator_segmentation(rows, settings)
  if method in ("chunkllm", "hybrid", "oracle") or (method == "fixllm" and settings.fix_chunk_len is None):
    if settings.chunk_len is not None or (method in ("hybrid", "oracle") and settings.page_len):
      return None
    return adapter_segmentation(params, rows, ChunkConfig(n_sink=settings.n_sink))
  return None


# ----------------------------------------------------------------------------------------------
# Budgets: expected retention of a configuration, and the knob that meets a target


def _row_visible(ends: Sequence[int], n_segmented: int, prompt_len: int, n_new: int, mean_len: float,
                 top_chunks: int, n_local: int, keep_boundary: bool, n_sink: int):
  """Visible tokens and tokens seen at each decode step of one row, as chunk_generate counts them.

  Decode step i feeds position p = prompt_len + i (i = 0 .. n_new - 2): `p + 1` tokens are seen; the
  sinks, the selected and the local chunks completed before p, and the open chunk up to p are
  visible. Chunk ends past the segmented tokens (text not generated yet) are taken every
  `mean_len` tokens. Which chunks the selection picks is unknown: each counts the mean length of
  the candidates (1 token with keep='boundary')."""
  p = prompt_len + np.arange(max(n_new - 1, 1))
  ends = np.asarray([e for e in ends if e < p[-1]], np.int64)
  if n_segmented < p[-1] and mean_len > 0:  # extrapolate the boundaries of the text still to come
    step = max(int(round(mean_len)), 1)
    last = max(ends[-1] if len(ends) else n_sink - 1, n_segmented - 1)
    ends = np.concatenate([ends, np.arange(last + step, p[-1], step)])
  cum = np.concatenate([[0], np.cumsum(np.diff(np.concatenate([[n_sink - 1], ends])))])
  n = np.searchsorted(ends, p, side="left")  # chunks completed before p
  open_start = np.where(n > 0, ends[np.maximum(n - 1, 0)] + 1, n_sink) if len(ends) else np.full_like(p, n_sink)
  local = np.minimum(n_local, n)
  cand = n - local
  n_sel = np.minimum(top_chunks, cand)
  sel_tok = n_sel if keep_boundary else n_sel * cum[cand] / np.maximum(cand, 1)
  visible = n_sink + (cum[n] - cum[cand]) + sel_tok + np.maximum(p + 1 - open_start, 0)
  return np.minimum(visible, p + 1), p + 1


def expected_retention(ccfg: ChunkConfig, seg: Segmentation, prompt_lens: Sequence[int], n_new: int) -> float:
  """The kv_retention chunk_generate should measure with `ccfg` (visible / seen, averaged over the
  decode steps, then over the rows) on rows segmented as `seg`."""
  out = []
  for ends, n_seg, T in zip(seg.ends, seg.lengths, prompt_lens):
    vis, seen = _row_visible(ends, n_seg, T, n_new, seg.mean_len, ccfg.top_chunks, ccfg.n_local,
                             ccfg.keep == "boundary", ccfg.n_sink)
    out.append(np.mean(vis / seen))
  return float(np.mean(out))


def local_chunks(total: int, settings: MethodSettings) -> int:
  """chunkllm / fixllm: how many of `total` visible chunks are the recent ones (4 once there are 16+)."""
  return min(settings.max_n_local, max(1, total // 4)) if total > 0 else 0


def with_knob(method: str, base: ChunkConfig, knob: int, settings: MethodSettings) -> ChunkConfig:
  """chunkllm / fixllm: knob = visible chunks (top_chunks + n_local); streamingllm / sepllm: the window in chunks."""
  if method in ("chunkllm", "fixllm"):
    n_local = local_chunks(knob, settings)
    return dataclasses.replace(base, top_chunks=knob - n_local, n_local=n_local)
  return dataclasses.replace(base, n_local=knob)


def fit_knob(method: str, base: ChunkConfig, retention: float, seg: Segmentation, prompt_lens: Sequence[int],
             n_new: int, settings: MethodSettings) -> ChunkConfig:
  """The configuration whose expected retention is closest to `retention` (the smaller knob on a tie)."""
  least = 1  # no visible chunk at all is not a method (and top_chunks = n_local = 0 fails in chunk_prefill)
  most = seg.max_chunks + n_new // max(int(seg.mean_len), 1) + 2
  best = None
  for knob in range(least, max(most, least) + 1):
    ccfg = with_knob(method, base, knob, settings)
    err = abs(expected_retention(ccfg, seg, prompt_lens, n_new) - retention)
    if best is None or err < best[0] - 1e-12:
      best = (err, ccfg)
  return best[1]


def budget_share(retention: float, floor: int, prompt_lens: Sequence[int], n_new: int) -> float:
  """The `kv_budget` (share of the tokens seen) that reads `retention` of them on average over the
  decode steps under a floor of `floor` tokens (`ChunkConfig.kv_budget_min_tokens`), as the measured
  kv_retention averages them; `retention` itself where the floor never binds. The floor spends its
  tokens where a context is short, so the share falls below the target (by bisection over
  `ChunkConfig.budget_tokens`, the rule decode reads by; at least 1e-3 where the floor alone reads
  more than the target)."""
  # Every row runs the same steps, so the mean over rows of each row's mean is the mean over all steps:
  # n_new - 1 of them (the prefill gives the first token), the one at position p seeing p + 1 tokens.
  seen = np.concatenate([T + 1 + np.arange(max(n_new - 1, 1)) for T in prompt_lens])
  if floor <= retention * seen.min():
    return float(retention)  # the floor never binds

  def read(share):
    budget = np.asarray(ChunkConfig(kv_budget=share, kv_budget_min_tokens=floor).budget_tokens(seen))
    return float(np.mean(np.minimum(budget, seen) / seen))

  lo, hi = 1e-3, float(retention)
  if read(lo) >= retention:
    return lo
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if read(mid) < retention else (lo, mid)
  return hi


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def base_config(method: str, settings: MethodSettings, seg: Segmentation | None = None) -> ChunkConfig | None:
  """A method's ChunkConfig before the budget (vanilla: None). fixllm's chunk length, when not
  given, is ChunkLLM's mean on `seg` (its adapter segmentation)."""
  S = settings.n_sink
  if method == "vanilla":
    return None
  chosen = dict(vote=settings.vote, selection_layers=settings.selection_layers)
  # chunkllm and fixllm keep the paper's rule (one shared selection a boundary, the budget by score alone,
  # chunks read whole), and the window baselines their own: hybrid's and oracle's selection rule, recent
  # share and boundary tokens are not theirs.
  own_rule = dict(recent_share=0.0, boundary_tokens=False, selection="shared")
  # hybrid's and oracle's budget shape: boundary tokens by ChunkConfig's rule (None: where a budget pays).
  shape = dict(recent_share=settings.recent_share, kv_budget_min_tokens=settings.kv_budget_min_tokens,
               boundary_tokens=None if settings.boundary_tokens else False,
               boundary_share=settings.boundary_share, selection=settings.selection,
               score_rank=settings.score_rank, score_estimate=settings.score_estimate,
               score_sketch=settings.score_sketch, sketch_estimate=settings.sketch_estimate,
               head_refresh=settings.head_refresh)
  if settings.page_len:  # the same rules over fixed pages (Quest's unit) instead of the Chunk Adapter's chunks
    shape.update(boundaries="fixed", max_chunk_len=settings.page_len)
  if method == "chunkllm":  # the QK Adapters make every selection (the paper's rule)
    return ChunkConfig(n_sink=S, scorer="adapter", prefill_scorer="adapter", **own_rule, **chosen)
  if method == "oracle":
    return ChunkConfig(n_sink=S, scorer="attention", **shape, **chosen)
  if method == "hybrid":  # chunk_generate's default: decode by `selection` (under "shared", the QK Adapters',
    #                        with the prompt scored by the frozen attention)
    return ChunkConfig(n_sink=S, scorer="adapter", prefill_scorer="attention", **shape,
                       **(chosen if settings.selection == "shared" else {}))  # the per-head rule votes on nothing
  if method == "fixllm":
    L = settings.fix_chunk_len or max(2, int(round(settings.chunk_len or (seg.mean_len if seg else 24.0))))
    return ChunkConfig(n_sink=S, boundaries="fixed", max_chunk_len=L, scorer="adapter", prefill_scorer="adapter",
                       **own_rule, **chosen)
  # The window baselines read the prompt by their own rule too (sparse prefill), as their papers do.
  if method == "streamingllm":
    return ChunkConfig(n_sink=S, boundaries="fixed", max_chunk_len=settings.stream_chunk_len, top_chunks=0,
                       prefill="sparse", **own_rule)
  if method == "sepllm":
    if not settings.separator_ids:
      raise ValueError("sepllm needs separator_ids (settings_for(model) computes them from the tokenizer)")
    return ChunkConfig(n_sink=S, boundaries="separators", separator_ids=settings.separator_ids, keep="boundary",
                       max_chunk_len=settings.sep_max_chunk_len, prefill="sparse", **own_rule)
  raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def budget_segmentation(base: ChunkConfig, settings: MethodSettings, seg: Segmentation | None,
                        lengths: Sequence[int]) -> Segmentation:
  """The segmentation the budget counts with: the fixed grid, the measured one, or an assumed mean length."""
  if base.boundaries == "fixed":
    return fixed_segmentation(lengths, base.max_chunk_len, base.n_sink)
  if seg is not None:
    return seg
  # An assumed ChunkLLM chunk length (`settings.chunk_len`): boundaries every that many tokens.
  return fixed_segmentation(lengths, max(int(round(settings.chunk_len or 25)), 1), base.n_sink)


def method_config(method: str, retention: float | None, prompt_lens: Sequence[int], n_new: int, max_len: int,
                  settings: MethodSettings, seg: Segmentation | None = None) -> tuple[ChunkConfig | None, dict]:
  """A method's ChunkConfig at a retention target, and what its budget assumed.

  retention None: the method's defaults (oracle / chunkllm / fixllm: top-16 + 4 local chunks;
  windows of `settings.window` tokens); 1.0: every chunk visible; otherwise the token budget
  (selecting methods) or the window whose expected retention is closest to the target. `seg`: the method's measured segmentation of the rows
  (`segmentation_for`); its rows may run past the prompts (perplexity segments the whole text).
  Vanilla: (None, {})."""
  base = base_config(method, settings, seg)
  if base is None:
    return None, {}
  bseg = budget_segmentation(base, settings, seg, seg.lengths if seg else prompt_lens)
  L = bseg.mean_len or float(base.max_chunk_len)
  # The chunk table holds every chunk the rows and the new tokens can make (no overflow), in
  # multiples of 64 so that nearby batches share a compiled program, and never more than the buffer's
  # positions (a chunk holds a token at least; perplexity's segmentation already covers its new tokens,
  # so the sum can pass the buffer: at 8K, 8320 slots for 8192 positions).
  need = bseg.max_chunks + n_new + 1 if base.boundaries != "fixed" else 0
  max_chunks = min(_round_up(max(-(-(max_len - base.n_sink) // base.max_chunk_len), need, 1), 64), max_len)
  base = dataclasses.replace(base, max_chunks=max_chunks)
  if method == "sepllm":
    base = dataclasses.replace(base, top_chunks=max_chunks)  # every separator
  if retention is None:
    if method in WINDOWED:  # at most the table: a window past every chunk the rows make is all of them
      ccfg = dataclasses.replace(base, n_local=min(max(1, int(round(settings.window / L))), max_chunks))
    else:
      ccfg = base  # the DESIGN defaults: top_chunks 16, n_local 4
  elif retention >= 1.0:
    ccfg = dataclasses.replace(base, n_local=max_chunks if method in WINDOWED else base.n_local,
                               top_chunks=0 if method == "streamingllm" else max_chunks)
  elif method in SELECTING:
    ccfg = dataclasses.replace(base, kv_budget=budget_share(retention, base.kv_budget_min_tokens, prompt_lens, n_new))
  else:
    ccfg = fit_knob(method, base, retention, bseg, prompt_lens, n_new, settings)
  if not ccfg.budgeted and ccfg.kv_budget_min_tokens:
    ccfg = dataclasses.replace(ccfg, kv_budget_min_tokens=0)  # a floor under no budget: nothing to hold up
  info = dict(target_retention=retention, mean_chunk_len=L)
  if ccfg.kv_budget is not None and ccfg.kv_budget_min_tokens:
    info["budget_share"] = ccfg.kv_budget
  if retention is None:
    pass
  elif ccfg.budgeted:  # the selection meets the budget itself, above what it always reads (sinks, local, open)
    # under a recent share only the newest local chunk is read whatever the budget (`selection.local_count`)
    always = dict(n_local=min(ccfg.n_local, 1)) if ccfg.recent_share > 0 else {}
    floor = expected_retention(dataclasses.replace(ccfg, kv_budget=None, top_chunks=0, **always), bseg, prompt_lens,
                               n_new)
    info["expected_retention"] = max(float(retention), floor)
  else:
    info["expected_retention"] = expected_retention(ccfg, bseg, prompt_lens, n_new)
  return ccfg, info


def config_summary(ccfg: ChunkConfig | None) -> dict:
  """The knobs of a configuration, for the results file (separator ids are summarised by count)."""
  if ccfg is None:
    return {}
  layers = None if ccfg.selection_layers is None else list(ccfg.selection_layers)
  return dict(boundaries=ccfg.boundaries, keep=ccfg.keep, vote=ccfg.vote, scorer=ccfg.scorer, kv_budget=ccfg.kv_budget,
              selection_layers=layers, top_chunks=ccfg.top_chunks, n_local=ccfg.n_local,
              n_sink=ccfg.n_sink, max_chunk_len=ccfg.max_chunk_len, max_chunks=ccfg.max_chunks,
              recent_share=ccfg.recent_share, kv_budget_min_tokens=ccfg.kv_budget_min_tokens,
              boundary_tokens=ccfg.reads_boundary_tokens,
              boundary_share=ccfg.boundary_share if ccfg.reads_boundary_tokens else None, prefill=ccfg.prefill_mode,
              n_separator_ids=len(ccfg.separator_ids), selection=ccfg.selection, score_rank=ccfg.score_rank,
              score_estimate=ccfg.score_estimate if ccfg.selection == "kv_head" else None,
              score_sketch=ccfg.sketch_bits, sketch_estimate=ccfg.sketch_estimate if ccfg.sketch_bits else None,
              head_refresh=ccfg.head_refresh if ccfg.selection == "kv_head" else None)


# ----------------------------------------------------------------------------------------------
# Running a method


def _row_stats(out, b: int, extra: dict) -> dict:
  stats = {k: (v[b].item() if hasattr(v[b], "item") else v[b]) for k, v in out.stats.items()}
  return {**stats, **extra}


def run_batch(method: str, params, rows, max_new_tokens: int, retention: float | None,
              settings: MethodSettings, *, eos_ids=None) -> list[tuple[list[int], dict]]:
  """One batch: (new token ids, stats) per row."""
  lens = [len(r) for r in rows]
  max_len = _round_up(max(lens) + max_new_tokens, 128)
  kw = dict(max_new_tokens=max_new_tokens, max_len=max_len, eos_ids=eos_ids)
  if method == "vanilla":
    out = cj.generate(params, [list(r) for r in rows], **kw)
    extra = dict(kv_retention=1.0, batch_size=len(rows))
    return [(out.new_tokens(b).tolist(), _row_stats(out, b, extra)) for b in range(len(rows))]
  seg = segmentation_for(method, params, rows, settings)
  ccfg, info = method_config(method, retention, lens, max_new_tokens, max_len, settings, seg)
  results: list = [None] * len(rows)
  for ccfg_g, info_g, group in row_windows(method, ccfg, info, retention, seg, lens, max_new_tokens, settings):
    out = chunk_generate(params, [list(rows[b]) for b in group], chunk_config=ccfg_g, **kw)
    extra = dict(batch_size=len(group), **config_summary(ccfg_g), **info_g)
    for j, b in enumerate(group):
      results[b] = (out.new_tokens(j).tolist(), _row_stats(out, j, extra))
  return results


def row_windows(method: str, ccfg: ChunkConfig, info: dict, retention: float | None, seg: Segmentation | None,
                lens: Sequence[int], n_new: int, settings: MethodSettings):
  """(config, budget info, row indices) groups: a window method's knob fitted to each row's own text.

  One window for a whole batch meets the target on the batch's mean, and a row whose text is
  denser in separators than its neighbours' reads more than its budget (SepLLM keeps every
  separator token); fitted per row, each row's window meets its own target. Rows that get the
  same window still run together. Methods whose selection meets a token budget, and untargeted
  runs, keep the batch's one config."""
  rows = list(range(len(lens)))
  if method not in WINDOWED or retention is None or retention >= 1.0 or len(lens) == 1:
    return [(ccfg, info, rows)]
  bseg = budget_segmentation(ccfg, settings, seg, seg.lengths if seg else lens)
  groups: dict = {}
  for b in rows:
    row_seg = Segmentation((bseg.ends[b],), (bseg.lengths[b],), bseg.n_sink)
    fitted = fit_knob(method, ccfg, retention, row_seg, [lens[b]], n_new, settings)
    groups.setdefault(fitted, []).append(b)
  out = []
  for fitted, group in groups.items():
    sub = Segmentation(tuple(bseg.ends[b] for b in group), tuple(bseg.lengths[b] for b in group), bseg.n_sink)
    expected = expected_retention(fitted, sub, [lens[b] for b in group], n_new)
    out.append((fitted, {**info, "expected_retention": expected}, group))
  return out


def iter_method(method: str, model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                retention: float | None, settings: MethodSettings | None = None, *,
                eos_ids=None) -> Iterator[tuple[int, list[int], dict]]:
  """(prompt index, new token ids, stats) as each batch finishes; prompts go in batches of similar
  length (`length_batches`), so little of a batch is padding."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
  settings = settings or settings_for(model)
  for batch in length_batches([len(p) for p in prompts], settings.batch_size):
    results = run_batch(method, params, [prompts[i] for i in batch], max_new_tokens, retention, settings,
                        eos_ids=eos_ids)
    for i, (new, stats) in zip(batch, results):
      yield i, new, stats


def length_batches(lengths: Sequence[int], batch_size: int, spread: float = 1.2) -> list[list[int]]:
  """Indices in batches of at most `batch_size`, by length, a batch's longest at most `spread` x its
  shortest (+ 32 tokens): a batch is padded to its longest prompt, so mixed lengths would waste work."""
  batches: list[list[int]] = []
  for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
    b = batches[-1] if batches else None
    if b and len(b) < batch_size and lengths[i] <= spread * lengths[b[0]] + 32:
      b.append(i)
    else:
      batches.append([i])
  return batches


def run_method(method: str, model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               retention: float | None, settings: MethodSettings | None = None, *,
               eos_ids=None) -> list[tuple[list[int], dict]]:
  """Every prompt's (new token ids, stats dict), in the prompts' order.

  method: one of METHODS. model: a `cj.Model` (its tokenizer gives SepLLM's separators; with
  `settings` given it may be None). params: the backbone with adapters. retention: the KV budget
  as a fraction of the tokens seen (None: each method's defaults; 1.0: every chunk visible).
  The stats hold the measured `kv_retention`, speed, and the knobs the budget chose."""
  out: list = [None] * len(prompts)
  for i, new, stats in iter_method(method, model, params, prompts, max_new_tokens, retention, settings,
                                   eos_ids=eos_ids):
    out[i] = (new, stats)
  return out
