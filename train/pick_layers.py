"""Picks the selection layers: the full-attention layers whose frozen attention best finds a fact
hidden in calibration prompts made from the training text.

  python -m train.pick_layers --model smollm2-135m --data brown.txt --tokens 2048 4096 \
      --n_prompts 12 [--adapters DIR] [--write DIR] [--out DIR]

A prompt is running text of the --data files with a fact ("Maria's locker number is 77310.") at a
random depth and its question at the end. The Chunk Adapter segments it as inference does; at the
last prompt token (the query of the first decode selection) each layer ranks the candidate chunks
by `selection.attention_probs`, and we keep the rank of the chunk holding the fact's value. Layers
are scored by mean reciprocal rank (MRR); the pick takes the best layer and adds up to two while
the set's vote (sum or max) raises the MRR. --write stores the choice in an adapter export (and
refuses a folder that is not one), choosing among the layers that have QK Adapters there. --out is a
new or empty folder, or an earlier run's (one that holds the pick_layers.json this tool wrote); any
other is refused, so that no user's file is replaced.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import adapter_io, checks, model  # noqa: E402
from chunkllm_jax.chunk_config import ATTENTION_QUERIES, VOTES, ChunkConfig  # noqa: E402
from chunkllm_jax.prompts import chat_text, has_chat_template  # noqa: E402
from chunkllm_jax import adapters as adp  # noqa: E402
from chunkllm_jax.chunk_generation import resolved, segment_prompts  # noqa: E402
from chunkllm_jax.selection import adapter_window_probs, attention_probs, vote_scores  # noqa: E402
from train.mixture import FACTS, NAMES, PLACES  # noqa: E402
from train.tfds_builder import read_documents  # noqa: E402

TOP = 8  # "found": the fact's chunk among the 8 best
MAX_LAYERS = 3
# The facts and keys are training's retrieval-mixture templates (our own wording, never the
# evaluation's needles), so the layers are not picked on the test.
ASK = " Reply with the number alone."


def read_lines(files) -> list[str]:
  """The files' non-blank lines. Documents are split at blank lines as training reads them, and a
  document's first line starts with a newline, so running text keeps a blank line between documents."""
  return ["\n" * (j == 0) + line for f in files for doc in read_documents(f)
          for j, line in enumerate(l for l in doc.splitlines() if l.strip())]


def check_text_length(tok, lines, n_tokens: int, files) -> None:
  """A calibration prompt is running text: a text shorter than the prompt would be repeated to fill it, and
  the layers' ranks measured on repeats of one passage."""
  total = 0
  for line in lines:
    total += len(tok(line.strip(), add_special_tokens=False)["input_ids"]) + 1
    if total >= n_tokens:
      return
  raise ValueError(f"--data {' '.join(files)} holds about {total} tokens, fewer than a prompt of --tokens {n_tokens}: "
                   "the prompt would repeat the text; give a longer text or smaller --tokens")


def encode(tok, body: str, question: str, lead: str):
  """(encoding with offsets, text): the chat template where the tokenizer has one; else plain text that
  ends with the answer's lead, so a base model answers instead of continuing the text."""
  if has_chat_template(tok):
    text = chat_text(tok, f"{body}\n\n{question}{ASK}")
    return tok(text, add_special_tokens=False, return_offsets_mapping=True), text
  text = f"{body}\n\n{question}{ASK}\n{lead}"
  return tok(text, return_offsets_mapping=True), text


def calibration_prompt(tok, lines, n_tokens: int, rng) -> dict:
  """Running text from a random line on (up to about `n_tokens` tokens in all), a fact at a random
  depth, its question at the end; `needle_pos` is the token where the fact's value starts."""
  template = int(rng.integers(len(FACTS)))
  fact, question = FACTS[template]
  keys = dict(place=rng.choice(PLACES), name=rng.choice(NAMES), id=rng.integers(1000, 10000))
  value = str(rng.integers(10000, 100000))
  lead = fact[:fact.index("{v}")].rstrip().format(**keys)
  fact, question = fact.format(v=value, **keys), question.format(**keys)
  room = n_tokens - len(encode(tok, fact, question, lead)[0]["input_ids"])
  body, i = [], int(rng.integers(len(lines)))
  while True:  # whole lines while they fit (at least one); wraps around a short text
    line = lines[i % len(lines)]
    room -= len(tok(line.strip(), add_special_tokens=False)["input_ids"]) + 1
    if body and room < 0:
      break
    body.append(line if body else line.lstrip("\n"))
    i += 1
  at = int(round(rng.uniform(0.05, 0.9) * len(body)))
  enc, text = encode(tok, "\n".join(body[:at] + [fact] + body[at:]), question, lead)
  char = text.index(fact) + fact.index(value)
  pos = next(t for t, (_, end) in enumerate(enc["offset_mapping"]) if end > char)
  return dict(ids=list(enc["input_ids"]), needle_pos=pos, depth=at / len(body), fact=fact, template=template,
              text=text)


def capture_qk(params, tokens_BT, lengths_B, n_queries: int):
  """The dense forward pass, keeping per layer the last `n_queries` tokens' q [L, B, Q, H, D] (their
  positions [B, Q], < 0 where the prompt is shorter) and the keys [L, B, T, K, D]."""
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  dense = model.self_attend_fn(params.config, positions, positions < lengths_B[:, None])
  q_pos = (lengths_B - n_queries)[:, None] + jnp.arange(n_queries)

  def attend_fn(state, layer, q, k, v, h):
    o, state, _ = dense(state, layer, q, k, v, h)
    return o, state, (jnp.take_along_axis(q, jnp.maximum(q_pos, 0)[..., None, None], axis=1), k)

  _, _, (q_LBQHD, k_LBTKD) = model.run_layers(params, model.embed(params, tokens_BT), positions, attend_fn)
  return q_LBQHD, q_pos, k_LBTKD


@functools.partial(jax.jit, static_argnames=("n_sink", "n_queries"))
def layer_probs(params, tokens_BT, lengths_B, chunk_end_BC, n_cand_B, *, n_sink: int, n_queries: int):
  """Each full-attention layer's distribution over the candidate chunks at the prompt's end, as
  `scorer="attention"` makes the first selection (the max over the last `n_queries` queries):
  [L_full, B, C]."""
  cfg = params.config
  q, q_pos, k = capture_qk(params, tokens_BT, lengths_B, n_queries)
  full = np.asarray(cfg.full_attention_layers)
  n_cand = jnp.broadcast_to(n_cand_B[:, None], q_pos.shape)
  one = lambda q, k: attention_probs(q, k, chunk_end_BC, n_cand, n_sink=n_sink, scale=cfg.attn_scale,
                                     softcap=cfg.attn_softcap, q_pos_BR=q_pos).max(1)
  return jax.vmap(one)(q[full], k[full])




@functools.partial(jax.jit, static_argnames=("selection_layers", "n_queries", "vote"))
def student_scores(params, tokens_BT, lengths_B, chunk_end_BC, n_cand_B, *, selection_layers: tuple[int, ...],
                   n_queries: int, vote: str):
  """The adapters' vote at the prompt's end, as `scorer="adapter"` makes the first selection: each
  selection layer's `adapter_window_probs` of the last `n_queries` q~, voted: [B, C]."""
  cfg, acfg = params.config, params.adapters.config
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  dense = model.self_attend_fn(cfg, positions, positions < lengths_B[:, None])
  q_pos = (lengths_B - n_queries)[:, None] + jnp.arange(n_queries)
  slot_of = np.full(cfg.n_layers, -1, np.int32)
  slot_of[list(selection_layers)] = [acfg.qk_layers.index(l) for l in selection_layers]
  d_c = acfg.d_c

  def attend_fn(state, layer, q, k, v, h):
    o, state, _ = dense(state, layer, q, k, v, h)
    slot = jnp.asarray(slot_of)[layer["index"]]

    def adapters():
      qt, kt = adp.qk_adapter_apply(jax.tree.map(lambda w: w[jnp.maximum(slot, 0)], params.adapters.params["qk"]), h)
      return jnp.take_along_axis(qt, jnp.maximum(q_pos, 0)[..., None], axis=1), kt

    none = (jnp.zeros((B, n_queries, d_c), jnp.float32), jnp.zeros((B, T, d_c), jnp.float32))
    return o, state, jax.lax.cond(slot >= 0, adapters, lambda: none)

  _, _, (qt_LBQd, kt_LBTd) = model.run_layers(params, model.embed(params, tokens_BT), positions, attend_fn)
  probs = [adapter_window_probs(qt_LBQd[l][:, None], adp.chunk_keys(kt_LBTd[l], chunk_end_BC), chunk_end_BC,
                                n_cand_B[:, None], q_pos[:, None])[:, 0] for l in selection_layers]
  return vote_scores(jnp.stack(probs), vote)


def rank_of(scores, target: int) -> int:
  """1-based rank of `target` among the candidates' `scores`; ties count against it."""
  return int(np.sum(np.asarray(scores) >= scores[target]))


def prompt_ranks(params, ids, needle_pos: int, ccfg: ChunkConfig, student: ChunkConfig | None = None):
  """Segments a prompt as inference does; the needle chunk's rank per full-attention layer at the last
  token, over the candidates (all completed chunks but the `n_local` newest). None if the needle is local.
  With `student` (a resolved config of `scorer="adapter"`), also the rank under the adapters' vote."""
  T = len(ids)
  max_len = -(-T // 128) * 128  # few shapes, few compilations
  toks, lens = jnp.asarray([ids + [0] * (max_len - T)], jnp.int32), jnp.asarray([T], jnp.int32)
  ends = np.flatnonzero(np.asarray(segment_prompts(params, toks, lens, ccfg)[0]))
  needle, n_cand = int(np.searchsorted(ends, needle_pos)), len(ends) - ccfg.n_local
  if needle >= n_cand:
    return None  # always read, nothing to select
  chunk_end = np.full((1, max_len), -1, np.int32)
  chunk_end[0, :len(ends)] = ends
  probs = np.asarray(layer_probs(params, toks, lens, jnp.asarray(chunk_end), jnp.asarray([n_cand]),
                                 n_sink=ccfg.n_sink, n_queries=ccfg.score_queries or ATTENTION_QUERIES))[:, 0, :n_cand]
  out = dict(n_chunks=len(ends), needle_chunk=needle, n_candidates=n_cand, probs=probs,
             ranks=[rank_of(p, needle) for p in probs])
  if student is not None:
    vote = np.asarray(student_scores(params, toks, lens, jnp.asarray(chunk_end), jnp.asarray([n_cand]),
                                     selection_layers=student.selection_layers, n_queries=student.score_queries,
                                     vote=student.vote))[0, :n_cand]
    out["student_rank"] = rank_of(vote, needle)
  return out


def mrr(ranks) -> float:
  return float(np.mean(1.0 / np.asarray(ranks, float)))


def pick(probs, needles, layers, max_layers: int = MAX_LAYERS):
  """Greedy, for each vote: the best layer (by MRR, then top-8; the lowest on ties), then, while that
  raises the MRR, the layer that raises it most. Returns ({vote: choice}, the vote with the best MRR).

  probs: per prompt, [len(layers), candidates]; needles: per prompt, the fact's chunk."""
  def ranks(subset, vote):
    return [rank_of(np.asarray(vote_scores(p[subset], vote)), n) for p, n in zip(probs, needles)]

  def score(subset, vote):
    r = np.asarray(ranks(subset, vote))
    return mrr(r), float(np.mean(r <= TOP))

  first = max(range(len(layers)), key=lambda i: score([i], "sum"))  # one layer: both votes agree
  out = {}
  for vote in VOTES:
    chosen, best = [first], score([first], vote)
    while len(chosen) < min(max_layers, len(layers)):
      tries = {i: score(chosen + [i], vote) for i in range(len(layers)) if i not in chosen}
      i = max(tries, key=tries.get)
      if tries[i][0] <= best[0]:
        break
      chosen, best = chosen + [i], tries[i]
    out[vote] = dict(layers=sorted(int(layers[i]) for i in chosen), mrr=best[0], top8=best[1],
                     ranks=ranks(chosen, vote))
  return out, max(VOTES, key=lambda v: (out[v]["mrr"], -len(out[v]["layers"]), v == "sum"))


def export_meta(directory) -> dict:
  """DIR/config.json of an adapter export, or a ValueError saying why DIR is not one."""
  try:
    meta = json.loads((Path(directory) / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"--write {directory}: not an adapter export (no readable config.json: {e})") from None
  if not (isinstance(meta, dict) and meta.get("format") == adapter_io.FORMAT
          and isinstance(meta.get("adapter_config"), dict)):
    raise ValueError(f"--write {directory}: its config.json is not an adapter export's "
                     f"(format {adapter_io.FORMAT!r} with an adapter_config)")
  return meta


def write_choice(directory, layers) -> None:
  """Sets adapter_config.selection_layers in DIR/config.json and nothing else; the file is replaced whole
  (never left half-written), and refused untouched where a layer has no QK Adapter."""
  meta, path = export_meta(directory), Path(directory) / "config.json"
  qk = meta["adapter_config"].get("qk_layers") or []
  missing = [i for i in layers if i not in qk]
  if missing:
    raise ValueError(f"--write {directory}: layers {missing} have no QK Adapter there (qk_layers {qk}); "
                     "train adapters for them or store the choice with other adapters")
  meta["adapter_config"]["selection_layers"] = [int(i) for i in layers]
  adapter_io.write_atomic(path, (json.dumps(meta, indent=2) + "\n").encode())  # save_adapters' layout: only the field differs


def is_pick_layers(path) -> bool:
  """Whether `path` is a pick_layers.json that this tool wrote: it records the command that made it."""
  result = json.loads(Path(path).read_text())
  return isinstance(result, dict) and str(result.get("command", "")).startswith("python -m train.pick_layers")


def plot(layers, ranks_PL, chosen, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  q25, med, q75 = np.percentile(ranks_PL, [25, 50, 75], axis=0)
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.fill_between(layers, q25, q75, alpha=0.3, label="quartiles")
  ax.plot(layers, med, "o-", label="median")
  ax.plot(chosen["layers"], [med[layers.index(i)] for i in chosen["layers"]], "r*", ms=14,
          label=f"chosen (vote {chosen['vote']}: MRR {chosen['mrr']:.2f})")
  ax.axhline(np.median(chosen["ranks"]), color="tab:red", ls="--",
             label=f"vote {chosen['vote']} of the chosen layers: median")
  ax.axhline(TOP, color="gray", ls=":", label=f"top-{TOP}")
  ax.set(yscale="log", xlabel="layer", ylabel="rank of the fact's chunk (1 = top)",
         title=f"frozen attention at the last prompt token ({len(ranks_PL)} calibration prompts)")
  ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= ranks_PL.max() * 2]
  ax.set_yticks(ticks, [str(t) for t in ticks])
  ax.invert_yaxis()
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(args, argv) -> None:
  if min(args.tokens) < 256:
    raise ValueError(f"--tokens must be at least 256 (room for text around the fact), got {min(args.tokens)}")
  if args.score_queries < 1:
    raise ValueError(f"--score_queries must be at least 1, got {args.score_queries}")
  if args.n_prompts < 1:
    raise ValueError(f"--n_prompts must be at least 1, got {args.n_prompts}")
  # pick_layers.json and .png are rewritten by name: only in a new or empty folder, or an earlier run's
  checks.check_out_folder(args.out, "--out", "train.pick_layers", "pick_layers.json", is_pick_layers)
  from chunkllm_jax import weights

  context = weights.load_config(args.model).max_position  # the config alone: the weights load later
  if max(args.tokens) > context:
    raise ValueError(f"--tokens {max(args.tokens)} is past {args.model}'s context ({context} positions): give at "
                     f"most {context}")
  lines = read_lines(args.data)
  target = export_meta(args.write) if args.write else None  # refuse a bad target now, not after the run
  m = cj.load(args.model, dtype="float32")
  check_text_length(m.tokenizer, lines, max(args.tokens), args.data)
  if target:
    adapter_io.check_backbone(target, m.config, args.write)
  params = cj.with_adapters(m.params, cj.load_adapters(args.adapters or args.model, m.config))
  ccfg, layers = ChunkConfig(score_queries=args.score_queries), list(m.config.full_attention_layers)
  pickable = layers  # with --write, the layers that have a QK Adapter in the export: a choice it can store
  if target:
    qk = target["adapter_config"].get("qk_layers") or []
    pickable = [l for l in layers if l in qk]
    if not pickable:
      raise ValueError(f"--write {args.write}: its QK Adapters (qk_layers {qk}) are on none of the model's "
                       f"full-attention layers {layers}; train adapters for them or store the choice with other "
                       "adapters")
    if pickable != layers:
      print(f"measuring every full-attention layer; choosing among the export's QK Adapter layers {pickable}")
  student = resolved(params, ChunkConfig()) if args.student else None
  rows = []
  print(f"scoring {args.n_prompts} prompt(s) of each of {', '.join(map(str, args.tokens))} tokens with every layer "
        "(a prompt length's first prompt compiles first)", flush=True)
  for n_tokens in args.tokens:
    for i in range(args.n_prompts):
      t0 = time.perf_counter()
      p = calibration_prompt(m.tokenizer, lines, n_tokens, np.random.default_rng([args.seed, n_tokens, i]))
      r = prompt_ranks(params, p["ids"], p["needle_pos"], ccfg, student)
      head = f"[{n_tokens}:{i + 1}/{args.n_prompts}] {len(p['ids'])} tokens, depth {p['depth']:.2f}"
      if r is None:
        print(f"{head}: the fact is in a local chunk (always read), skipped", flush=True)
        continue
      rows.append(dict(tokens=len(p["ids"]), depth=p["depth"], fact=p["fact"], **r))
      top = ", ".join(f"{layers[j]} ({r['ranks'][j]})" for j in np.argsort(r["ranks"], kind="stable")[:3])
      print(f"{head}: fact in chunk {r['needle_chunk']} of {r['n_candidates']} candidates; best layers (rank) "
            f"{top}; {time.perf_counter() - t0:.1f}s", flush=True)
  if not rows:
    raise ValueError("every fact fell in a local chunk: use longer --tokens")
  ranks = np.asarray([r["ranks"] for r in rows])
  cols = [layers.index(l) for l in pickable]
  votes, vote = pick([np.asarray(r["probs"])[cols] for r in rows], [r["needle_chunk"] for r in rows], pickable)
  chosen = dict(votes[vote], vote=vote)
  per_layer = [dict(layer=l, mrr=mrr(ranks[:, j]), top8=float(np.mean(ranks[:, j] <= TOP)),
                    median=float(np.median(ranks[:, j]))) for j, l in enumerate(layers)]
  print(f"\nlayer    MRR  top-{TOP}  median rank   ({len(rows)} prompts; * chosen)")
  for s in per_layer:
    mark = "  *" * (s["layer"] in chosen["layers"])
    print(f"{s['layer']:5d}  {s['mrr']:5.3f}  {s['top8']:5.2f}  {s['median']:11.1f}{mark}")
  for v in VOTES:
    print(f"vote {v}: layers {votes[v]['layers']}, MRR {votes[v]['mrr']:.3f}, top-{TOP} {votes[v]['top8']:.2f}")
  print(f"chosen: layers {chosen['layers']}, vote {vote}")
  if student is not None:
    sr = np.asarray([r["student_rank"] for r in rows])
    chosen["student"] = dict(selection_layers=list(student.selection_layers), score_queries=student.score_queries,
                             vote=student.vote, mrr=mrr(sr), top8=float(np.mean(sr <= TOP)), median=float(np.median(sr)))
    print(f"the adapters' vote (layers {list(student.selection_layers)}, {student.score_queries} queries, "
          f"{student.vote}): MRR {mrr(sr):.3f}, top-{TOP} {np.mean(sr <= TOP):.2f}, median rank {np.median(sr):.1f}")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = dict(command="python -m train.pick_layers " + " ".join(argv), adapters=args.adapters or args.model,
                chunk_config=dict(n_sink=ccfg.n_sink, n_local=ccfg.n_local, alpha=ccfg.alpha,
                                  max_chunk_len=ccfg.max_chunk_len, score_queries=ccfg.score_queries),
                layers=layers, per_layer=per_layer, votes=votes, chosen=chosen,
                prompts=[{k: v for k, v in r.items() if k != "probs"} for r in rows])
  (out / "pick_layers.json").write_text(json.dumps(result, indent=1) + "\n")
  plot(layers, ranks, chosen, out / "pick_layers.png")
  print(f"wrote {out / 'pick_layers.json'} and {out / 'pick_layers.png'}")
  if args.write:
    write_choice(args.write, chosen["layers"])
    print(f"stored selection_layers {chosen['layers']} in {Path(args.write) / 'config.json'}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--data", nargs="+", required=True, help="the training text files (UTF-8)")
  ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="prompt lengths")
  ap.add_argument("--n_prompts", type=int, default=12, help="prompts per length")
  ap.add_argument("--adapters", help="the export whose Chunk Adapter segments the prompts (default: --model's)")
  ap.add_argument("--write", help="an adapter export: store the chosen layers in its config.json")
  ap.add_argument("--student", action="store_true",
                  help="also rank the fact's chunk by the adapters' own vote (their selection layers and query "
                       "window): a held-out retrieval check of trained adapters on text they were not scored on")
  ap.add_argument("--out", default="runs/pick_layers")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--score_queries", type=int, default=ATTENTION_QUERIES,
                  help="score with the last this many queries, as scorer='attention' does (ChunkConfig.score_queries)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  try:
    run(args, argv)
  except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
