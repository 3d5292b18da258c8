"""The perplexity a selection family reaches when the frozen model itself chooses: selections scored
by its own attention (the target the QK Adapters are distilled toward), under chunk_generate's
budget shape.

A family says who shares a selection and how fresh it is:
- sharing: `shared` (one selection serves every sparse layer; each layer's distribution over the
  candidates, max over its heads, summed over the voting layers, as ChunkLLM votes), `layer` (each
  sparse layer its own, max over its heads), `kv_head` (each KV head of each layer its own, max over
  the query heads that read it);
- timing: `fresh` (each query selects with its own attention, Quest's rule) or `boundary` (the
  selection made by the query at the last unit end before a token serves it: ChunkLLM's rule).

The scores are the frozen attention's mass per unit (`--scorer attention`: the teacher's choice),
or a training-free estimate from a summary of each unit's keys, as a per-step scorer would read
instead of K: Quest's bound from their elementwise min and max (`--scorer bound`), their mean
(`--scorer centroid`), or SparQ's logits over a few of K's dimensions (`--scorer sparq --rank r`, as decode's
`selection="kv_head", score_rank=r` scores), or each key's r coordinates in a basis of its KV head's
keys fitted on the dense prefix (`--scorer lowrank --rank r`, Loki's estimate).
Each row also gives what scoring reads per step (`scoring_kv`, a share of the seen tokens' KV).

Units are ChunkLLM's chunks (the Chunk Adapter's ends over the text) or fixed pages. Each query
reads the sinks, its open unit, the most recent `recent_share` of its budget, and the best-scored
units that fit the rest (units in score order while they fit). Teacher-forced: one dense pass gives every
layer's attention mass per unit, then each family runs one masked pass. The masks read everything,
so nothing here saves KV: it bounds what each family can keep, to decide which one to build.

  python -m eval.selection_ceiling --tokens 2048 --docs 8 --retention 0.5 \\
      --out docs/selection_ceiling/brown_8x2048.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import chunkllm_jax as cj
from chunkllm_jax import attention as attn
from chunkllm_jax import model as mdl
from chunkllm_jax import selection as sel
from chunkllm_jax import weights
from chunkllm_jax.chunk_config import SKETCH_ESTIMATES, SKETCH_WORD
from eval import methods as M
from eval import perplexity as P
from eval.run import BROWN

SHARING = ("shared", "layer", "kv_head")
TIMING = ("fresh", "boundary")
MAX_TOKENS = 4096  # the dense pass holds every layer's [heads, T, units] mass; past this it outgrows the host


@dataclasses.dataclass(frozen=True)
class Budget:
  """chunk_generate's budget shape (ChunkConfig's fields of the same names)."""

  retention: float = 0.5
  recent_share: float = cj.ChunkConfig.recent_share
  n_sink: int = cj.ChunkConfig.n_sink

  def split(self, seen):
    """Per query: (tokens of the recent window, tokens left for scored units)."""
    budget = jnp.maximum(jnp.floor(self.retention * seen), self.n_sink + 1)
    recent = jnp.maximum(jnp.floor(self.recent_share * budget) - self.n_sink, 1)
    return recent, jnp.maximum(budget - self.n_sink - recent, 0)


def units(T: int, n_sink: int, ends=None, page: int | None = None, pad_to: int = 0):
  """(unit of each position [T], -1 for the sinks and the open tail; last position of each unit [U]).
  Units are the chunks that `ends` close (ascending last positions), or pages of `page` tokens.
  `pad_to`: at least this many units, the extra ones empty and ending at T (never a candidate), so
  texts of different chunk counts share one compiled program."""
  if (ends is None) == (page is None):
    raise ValueError("give chunk ends or a page size")
  if page is not None:
    ends = np.arange(n_sink + page - 1, T, page)
  ends = np.asarray([e for e in ends if n_sink <= e < T], np.int64)
  unit_of = np.searchsorted(ends, np.arange(T))  # the first unit whose end is at or after the position
  unit_of = np.where((np.arange(T) < n_sink) | (unit_of >= len(ends)), -1, unit_of)
  ends = np.concatenate([ends, np.full(max(pad_to - len(ends), 0), T)])
  return unit_of.astype(np.int32), ends.astype(np.int32)


def choose_units(score_XTU, unit_end_U, unit_len_U, budget: Budget, timing: str):
  """Which units each query reads: [..., T, U] bool, from scores [..., T, U] (any leading axes).

  A unit is a candidate for query t when it ended before t's recent window starts (and, under
  `boundary`, by the boundary that serves t); candidates are taken in score order while their
  lengths fit t's room."""
  T, U = score_XTU.shape[-2:]
  t = jnp.arange(T)
  recent, room = budget.split(t + 1)
  window_start = t + 1 - recent  # first position of the recent window
  if timing == "boundary":  # the last unit end before t: that query's scores serve t
    k = jnp.searchsorted(unit_end_U, t, side="left") - 1
    at = jnp.where(k >= 0, unit_end_U[jnp.maximum(k, 0)], 0)
    score_XTU = jnp.take(score_XTU, at, axis=-2)
    seen_end = at
  else:
    seen_end = t
  cand = (unit_end_U[None, :] < window_start[:, None]) & (unit_end_U[None, :] <= seen_end[:, None])
  s = jnp.where(cand, score_XTU, -jnp.inf)
  order = jnp.argsort(-s, axis=-1)
  used = jnp.cumsum(jnp.take_along_axis(jnp.broadcast_to(unit_len_U, s.shape), order, -1), -1)
  fits = (used <= room[:, None]) & jnp.isfinite(jnp.take_along_axis(s, order, -1))
  return jnp.take_along_axis(fits, jnp.argsort(order, axis=-1), -1)  # back from score order


def _family_scores(mass_LKGTU, cand_TU, sharing: str, vote_L):
  """Per head, the mass renormalised over the candidates, then the family's max and vote: [L, K, T, U]."""
  m = jnp.where(cand_TU, mass_LKGTU, 0.0)
  m = m / jnp.maximum(m.sum(-1, keepdims=True), 1e-30)
  if sharing == "kv_head":
    return m.max(2)
  per_layer = m.max((1, 2))  # L T U
  if sharing == "shared":
    per_layer = jnp.broadcast_to(jnp.sum(jnp.where(vote_L[:, None, None], per_layer, 0.0), 0), per_layer.shape)
  return jnp.broadcast_to(per_layer[:, None], (m.shape[0], m.shape[1]) + m.shape[3:])


def _nll(params, x, tokens_T, prefix: int):
  logp = jax.nn.log_softmax(mdl.unembed(params, x)[0], -1)
  return -jnp.take_along_axis(logp[:-1], tokens_T[1:, None], -1)[prefix - 1:, 0]


def _segments(unit_of_S, n_units: int):
  """(segment of each position, n_units for the sinks and the open tail, a dropped segment; tokens per unit [U])."""
  seg = jnp.where(unit_of_S >= 0, unit_of_S, n_units)
  return seg, jax.ops.segment_sum(jnp.ones(seg.shape, jnp.float32), seg, num_segments=n_units + 1)[:n_units]


def unit_bound(q_KGTD, k_SKD, unit_of_S, n_units: int, scale: float):
  """Quest's bound at unit granularity: per unit and KV head the elementwise min and max of its keys;
  a query's bound on its best logit in the unit is scale * sum_d max(q_d min_d, q_d max_d). [K, G, T, U]
  (0 for an empty unit: padding, never a candidate)."""
  seg, length = _segments(unit_of_S, n_units)
  full = (length > 0)[:, None, None]
  kmax = jnp.where(full, jax.ops.segment_max(k_SKD, seg, num_segments=n_units + 1)[:n_units], 0.0)  # U K D
  kmin = jnp.where(full, -jax.ops.segment_max(-k_SKD, seg, num_segments=n_units + 1)[:n_units], 0.0)
  return (jnp.einsum("kgtd,ukd->kgtu", jnp.maximum(q_KGTD, 0), kmax)
          + jnp.einsum("kgtd,ukd->kgtu", jnp.minimum(q_KGTD, 0), kmin)) * scale


def unit_centroid(q_KGTD, k_SKD, unit_of_S, n_units: int, scale: float):
  """A query's logit against each unit's mean key, per KV head: scale * q . mean(k). [K, G, T, U]."""
  seg, length = _segments(unit_of_S, n_units)
  total = jax.ops.segment_sum(k_SKD, seg, num_segments=n_units + 1)[:n_units]  # U K D
  return jnp.einsum("kgtd,ukd->kgtu", q_KGTD, total / jnp.maximum(length, 1.0)[:, None, None]) * scale


def estimated_mass(logit_KGTU, unit_of_S, n_units: int):
  """A per-unit logit as a mass: each unit weighs as if all its tokens reached it, exp(logit) * length
  (per query up to a constant, which the candidates' renormalisation removes). [K, G, T, U]."""
  _, length = _segments(unit_of_S, n_units)
  logit = logit_KGTU + jnp.log(jnp.maximum(length, 1.0))
  return jnp.exp(logit - logit.max(-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("n_units", "scorer", "rank", "basis_tokens", "sketch", "sketch_estimate"))
def _vanilla_and_mass(params, tokens_T, unit_of_T, n_units: int, scorer: str = "attention", rank: int = 16,
                      basis_tokens: int = 256, sketch: int = 0, sketch_estimate: str = SKETCH_ESTIMATES[0]):
  """The dense pass: vanilla's NLL per position, and every layer's scores per unit [L, K, G, T, U]:
  the attention mass (`attention`), or a mass estimated from Quest's bound (`bound`), each unit's
  mean key (`centroid`), `rank` dimensions of every key (`sparq`), or every key's `rank` coordinates in
  a basis fitted on the first `basis_tokens` keys (`lowrank`, as a prompt would fit it; with `sketch`
  bits of the signs of what the basis misses in place of the bound on that part)."""
  cfg = params.config
  T = tokens_T.shape[0]
  pos = jnp.arange(T)
  onehot_SU = jax.nn.one_hot(unit_of_T, n_units, dtype=jnp.float32)  # -1 (sinks): a zero row
  seg, length = _segments(unit_of_T, n_units)
  unit_end = jnp.where(length > 0, jax.ops.segment_max(pos, seg, num_segments=n_units + 1)[:n_units], T)
  n_sink = jnp.argmax(unit_of_T >= 0)  # the first unit's first position

  def attend_fn(state, layer, q, k, v, h):
    ok = attn.visible(pos[None], pos[None], jnp.ones((1, T), bool), layer["window"])[:, None]
    qh = attn.split_heads(q, k.shape[2])
    s = attn.scores(qh, k, ok[:, :, None], scale=cfg.attn_scale, softcap=cfg.attn_softcap)
    p = jax.nn.softmax(s, -1)
    o = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if scorer in ("bound", "centroid"):
      estimate = unit_bound if scorer == "bound" else unit_centroid
      logit = estimate(qh[0].astype(jnp.float32), k[0].astype(jnp.float32), unit_of_T, n_units, cfg.attn_scale)
      mass = estimated_mass(logit, unit_of_T, n_units)
    elif scorer == "lowrank":  # each key's coordinates in its KV head's basis, fitted on the dense prefix
      basis = sel.key_basis(k, pos[None] < basis_tokens, rank)
      k_low = jnp.swapaxes(sel.lowrank_coords(jnp.swapaxes(k, 1, 2), basis), -1, -2)  # B K r+1 T
      k_sketch = jnp.swapaxes(sel.residual_sketch(jnp.swapaxes(k, 1, 2), basis, sketch), -1, -2) if sketch else None
      mass = sel.lowrank_chunk_mass(qh, k_low, basis, pos[None, None, None, :], unit_end[None], n_sink=n_sink,
                                    scale=cfg.attn_scale, k_sketch_BKwT=k_sketch, sketch_estimate=sketch_estimate)[0]
    elif scorer == "sparq":  # decode's own estimate (`selection="kv_head", score_rank=rank`), every query at once
      mass = sel.sparq_chunk_mass(qh, k, pos[None, None, None, :], unit_end[None], n_sink=n_sink,
                                  scale=cfg.attn_scale, rank=rank)[0]
    else:
      mass = jnp.einsum("kgts,su->kgtu", p[0], onehot_SU)
    return attn.merge_heads(o).astype(q.dtype), state, mass

  x, _, mass = mdl.run_layers(params, mdl.embed(params, tokens_T[None]), pos[None], attend_fn)
  return x, mass


def family_nll(params, tokens_T, unit_of_T, unit_end_U, mass_LKGTU, sparse_L, vote_L, budget: Budget,
               sharing: str, timing: str, prefix: int):
  """One family's NLL per scored position, and the sparse layers' mean read share per scored query."""
  return _family_nll(params, tokens_T, jnp.asarray(unit_of_T), jnp.asarray(unit_end_U), mass_LKGTU,
                     jnp.asarray(sparse_L), jnp.asarray(vote_L), budget, sharing, timing, prefix)


@functools.partial(jax.jit, static_argnames=("budget", "sharing", "timing", "prefix"))
def _family_nll(params, tokens_T, unit_of_T, unit_end_U, mass_LKGTU, sparse_L, vote_L, budget, sharing, timing,
                prefix):
  cfg = params.config
  T = tokens_T.shape[0]
  pos = jnp.arange(T)
  unit_len_U = jnp.diff(unit_end_U, prepend=budget.n_sink - 1)
  recent, _ = budget.split(pos + 1)
  cand_TU = unit_end_U[None, :] < (pos + 1 - recent)[:, None]
  take_LKTU = choose_units(_family_scores(mass_LKGTU, cand_TU, sharing, vote_L), unit_end_U, unit_len_U, budget,
                           timing)
  # Always read: the sinks, the recent window, and the open unit (not closed by t; the tail never closes).
  end_of_S = jnp.where(unit_of_T >= 0, unit_end_U[jnp.maximum(unit_of_T, 0)], T)
  end_of_S = jnp.where(pos < budget.n_sink, -1, end_of_S)
  base_TS = ((pos[None, :] < budget.n_sink) | (pos[None, :] >= (pos + 1 - recent)[:, None])
             | (end_of_S[None, :] >= pos[:, None]))
  causal_TS = pos[None, :] <= pos[:, None]
  scored_T = pos >= prefix

  def attend_fn(reads, layer, q, k, v, h):
    idx = layer["index"]
    picked_KTS = jnp.where(unit_of_T >= 0, jnp.take(take_LKTU[idx], jnp.maximum(unit_of_T, 0), axis=-1), False)
    sparse_ok = (picked_KTS | base_TS) & causal_TS
    dense_ok = attn.visible(pos[None], pos[None], jnp.ones((1, T), bool), layer["window"])[0]
    use_sparse = sparse_L[idx] & scored_T[:, None]
    ok_KTS = jnp.where(use_sparse, sparse_ok, dense_ok)
    share = jnp.sum(ok_KTS, -1) / (pos + 1)  # K T
    reads = reads + jnp.where(sparse_L[idx], jnp.sum(jnp.where(scored_T, share, 0.0)) / share.shape[0], 0.0)
    return attn.attend(q, k, v, ok_KTS[None], scale=cfg.attn_scale, softcap=cfg.attn_softcap), reads, None

  x, reads, _ = mdl.run_layers(params, mdl.embed(params, tokens_T[None]), pos[None], attend_fn, jnp.float32(0))
  return _nll(params, x, tokens_T, prefix), reads / (jnp.maximum(jnp.sum(sparse_L), 1) * jnp.sum(scored_T))


SCORERS = ("attention", "bound", "centroid", "sparq", "lowrank")


def scoring_reads(scorer: str, n_units: int, seen: int, head_dim: int, rank: int, itemsize: int = 4,
                  sketch: int = 0) -> float:
  """What a decode step reads to score, as a share of the KV of the `seen` tokens it scores: all of K
  (the attention), two keys a unit (the bound), one (the centroid), the cache lines of K that `rank`
  of its dimensions touch (sparq: all of them at 16 of 64 in float32), `rank` of the D coordinates of
  each key in a basis, stored apart, and its `sketch` bits (lowrank): `selection.score_read_share`, as
  decode counts them."""
  per_unit = {"bound": 2, "centroid": 1}
  if scorer in per_unit:
    return per_unit[scorer] * n_units / (2 * seen)
  return sel.score_read_share(head_dim, itemsize, None if scorer == "attention" else rank,
                              "lowrank" if scorer == "lowrank" else "sparq", sketch if scorer == "lowrank" else 0)


def vanilla_nll(params, tokens_T, unit_of_T, n_units: int, prefix: int, scorer: str = "attention", rank: int = 16,
                sketch: int = 0, sketch_estimate: str = SKETCH_ESTIMATES[0]):
  x, mass = _vanilla_and_mass(params, tokens_T, jnp.asarray(unit_of_T), n_units, scorer, rank, prefix, sketch,
                              sketch_estimate)
  return _nll(params, x, tokens_T, prefix), mass


def _refuse(message: str):
  """A bad flag: one `error:` line and exit code 2, as the other command lines."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--tokens", type=int, default=2048, help=f"tokens per text (at most {MAX_TOKENS})")
  p.add_argument("--docs", type=int, default=8)
  p.add_argument("--prefix", type=int, default=256, help="tokens before scoring starts (read densely)")
  p.add_argument("--retention", type=float, default=0.5)
  p.add_argument("--recent_share", type=float, default=cj.ChunkConfig.recent_share)
  p.add_argument("--unit", default="chunks", help="'chunks' (the Chunk Adapter's) or a page size in tokens")
  p.add_argument("--vote_layers", default="sparse", help="who votes for `shared`: 'sparse' (every sparse layer), "
                 "'selection' (the adapters' selection layers) or comma-separated layer indices")
  p.add_argument("--scorer", default="attention", choices=SCORERS,
                 help="the units' scores: the attention mass (the teacher), or an estimate from "
                 "each unit's min/max keys (Quest's bound) or mean key, `--rank` dimensions of every "
                 "key (SparQ), or every key's `--rank` coordinates in a basis fitted on the prefix (lowrank)")
  p.add_argument("--rank", type=int, default=16, help="dimensions of K that `--scorer sparq` reads, or the "
                 "basis size of `--scorer lowrank`")
  p.add_argument("--sketch", type=int, default=0, help="with `--scorer lowrank`: bits of a sketch of the signs of "
                 "what the basis misses, in place of the bound on that part (ChunkConfig.score_sketch; a multiple "
                 "of 32; 0: the bound)")
  p.add_argument("--sketch_estimate", default=SKETCH_ESTIMATES[0], choices=SKETCH_ESTIMATES,
                 help="with `--sketch`: SimHash's angle (default) or QJL's estimate (ChunkConfig.sketch_estimate)")
  p.add_argument("--families", nargs="+", default=[f"{s}/{t}" for t in TIMING for s in SHARING])
  p.add_argument("--text", default=str(BROWN))
  p.add_argument("--out", default=None, help="write the rows here as JSON lines (a new file)")
  args = p.parse_args(argv)
  if not 0 < args.retention <= 1 or not 0 <= args.recent_share <= 1:
    _refuse(f"--retention must be in (0, 1] and --recent_share in [0, 1]; got {args.retention}, "
                     f"{args.recent_share}")
  if not 0 < args.prefix < args.tokens <= MAX_TOKENS:
    _refuse(f"need 0 < --prefix < --tokens <= {MAX_TOKENS}; got {args.prefix}, {args.tokens}")
  if args.sketch and (args.scorer != "lowrank" or args.sketch < 0 or args.sketch % SKETCH_WORD):
    _refuse(f"--sketch is a multiple of {SKETCH_WORD} bits for --scorer lowrank; got {args.sketch} "
                     f"with --scorer {args.scorer}")
  if args.sketch_estimate != SKETCH_ESTIMATES[0] and not args.sketch:
    _refuse(f"--sketch_estimate {args.sketch_estimate} scores the sketch: give --sketch too")
  families = [tuple(f.split("/")) for f in args.families]
  for f in families:
    if len(f) != 2 or f[0] not in SHARING or f[1] not in TIMING:
      _refuse(f"a family is sharing/timing with sharing in {SHARING} and timing in {TIMING}; "
                       f"got {'/'.join(f)!r}")
  if args.unit != "chunks" and not args.unit.isdigit():
    _refuse(f"--unit is 'chunks' or a page size; got {args.unit!r}")
  if args.docs < 1:
    _refuse(f"--docs must be at least 1; got {args.docs}")
  if not Path(args.text).is_file():
    _refuse(f"--text {args.text} is not a file: give a text, one sentence a line and a blank line between "
            "documents (`python -m train.prepare_brown --out DIR` writes the Brown corpus so)")
  head_dim = weights.load_config(args.model).head_dim  # the config alone: checked before the weights load
  if not 1 <= args.rank <= head_dim:
    _refuse(f"--rank must be from 1 to the head dimension, {head_dim}; got {args.rank}")
  if args.out and Path(args.out).exists():
    _refuse(f"--out {args.out} exists; name a new file (this tool does not overwrite)")

  model = cj.load(args.model, dtype="float32")
  adapters = cj.load_adapters(args.model, model.config)
  params = cj.with_adapters(model.params, adapters)
  cfg = model.config
  ccfg = cj.ChunkConfig()
  sparse_L = np.array([i not in ccfg.dense_layers and not cfg.sliding_layers[i] for i in range(cfg.n_layers)])
  if args.vote_layers == "sparse":
    vote_L = sparse_L
  else:
    names = (adapters.config.selection_layers or adapters.config.qk_layers) if args.vote_layers == "selection" \
        else [int(i) for i in args.vote_layers.split(",")]
    vote_L = np.isin(np.arange(cfg.n_layers), names)
  budget = Budget(args.retention, args.recent_share, ccfg.n_sink)
  docs = P.text_windows(model.tokenizer, args.docs, args.tokens, args.text)
  seg = M.adapter_segmentation(params, docs, ccfg) if args.unit == "chunks" else None
  edges = P.position_bins(args.prefix, args.tokens, 8)
  sums = {f: np.zeros(len(edges) - 1) for f in [("vanilla", "")] + families}
  reads = {f: [] for f in families}
  score_reads = []
  t0 = time.time()
  n_units = -(-max(len(e) for e in seg.ends) // 32) * 32 if seg else 0  # one unit count: one compile
  for i, doc in enumerate(docs):
    tokens = jnp.asarray(doc, jnp.int32)
    unit_of, ends = units(args.tokens, ccfg.n_sink, ends=seg.ends[i], pad_to=n_units) if seg else \
        units(args.tokens, ccfg.n_sink, page=int(args.unit))
    van, mass = vanilla_nll(params, tokens, unit_of, len(ends), args.prefix, args.scorer, args.rank, args.sketch,
                            args.sketch_estimate)
    n_real = int(np.sum(ends < args.tokens))
    score_reads.append(scoring_reads(args.scorer, n_real, args.tokens, cfg.head_dim, args.rank, sketch=args.sketch))
    sums[("vanilla", "")] += P.binned_nll(-np.asarray(van), args.prefix, edges)[0]
    for f in families:
      nll, share = family_nll(params, tokens, unit_of, ends, mass, sparse_L, vote_L, budget, *f, args.prefix)
      sums[f] += P.binned_nll(-np.asarray(nll), args.prefix, edges)[0]
      reads[f].append(float(share))
    print(f"text {i + 1}/{len(docs)} ({n_real} units) done at {time.time() - t0:.0f} s", flush=True)
  n = args.docs * (args.tokens - args.prefix)
  ref = sums[("vanilla", "")].sum()
  rows = []
  for f, s in sums.items():
    row = dict(family="/".join(f) if f[1] else "vanilla", perplexity=float(np.exp(s.sum() / n)),
               ppl_vs_vanilla=float(np.exp((s.sum() - ref) / n) - 1),
               kv=float(np.mean(reads[f])) if f in reads else 1.0,
               scoring_kv=float(np.mean(score_reads)) if f in reads else 0.0,
               nll_bins_minus_vanilla=(s - sums[("vanilla", "")]).round(2).tolist(), bin_edges=edges.tolist())
    rows.append(row)
    print(f"{row['family']:20s} KV {row['kv']:6.1%} (+{row['scoring_kv']:.1%} to score)  perplexity {row['perplexity']:7.3f} {row['ppl_vs_vanilla']:+7.2%}"
          "  NLL - vanilla per bin:", " ".join(f"{d:6.1f}" for d in row["nll_bins_minus_vanilla"]), flush=True)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, **vars(args)}) + "\n" for r in rows))
    _plot(rows, out.with_suffix(".png"), f"{args.model}, {args.docs} x {args.tokens} tokens, "
          f"{args.retention:.0%} budget, units: {args.unit}, scores: {args.scorer}"
          + (f" (rank {args.rank})" if args.scorer in ("sparq", "lowrank") else "")
          + (f", {args.sketch}-bit sketch ({args.sketch_estimate})" if args.sketch else ""))


def _plot(rows, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if r["family"] != "vanilla"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.barh([f"{r['family']} ({r['kv']:.1%} KV)" for r in rows], [100 * r["ppl_vs_vanilla"] for r in rows])
  ax.set_xlabel("perplexity over vanilla's (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
