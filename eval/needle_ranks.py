"""Why a needle is lost: where the needle's chunk ranks, per layer, for the frozen model's own
attention (the teacher) and for the QK Adapters (the student), at the prompt's last token.

  python -m eval.needle_ranks --tokens 2048 4096 --depths 0.25 0.5 0.75 [--adapters DIR]

For each passkey prompt, the Chunk Adapter segments it as inference does; then, at the last prompt
token (the query that makes the first decode selection):
- teacher rank: the needle chunk's rank in the layer's head-averaged attention mass per chunk
  (`teacher.teacher_chunk_attention`, renormalised over the candidates as training sees it);
- oracle rank: its rank under `scorer="attention"` (per head, the last `score_queries` queries'
  chunk mass over the candidates, the max over heads and queries), every full-attention layer;
- student rank: its rank in the layer's QK-Adapter softmax;
- and for all three, its rank under each vote rule of `ChunkConfig.vote` ("sum", "max") over the
  selection layers (the adapters' stored choice unless --selection_layers).
Rank 1 is the top; a chunk is selected when its rank is at most top_chunks. The gap between the two
tells whether selection fails because the adapters mimic the teacher badly (student ranks far below
the teacher's) or because the teacher's own attention does not single the needle out. Writes a
JSON and a PNG (rank per layer) under --out: a new or empty folder, or an earlier run's (one that
holds the needle_ranks.json this tool wrote); any other is refused, so that no user's file is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import adapters as adp  # noqa: E402
from chunkllm_jax import haystack  # noqa: E402
from chunkllm_jax.chunk_config import ATTENTION_QUERIES, ChunkConfig  # noqa: E402
from chunkllm_jax.chunk_generation import chunk_prefill, resolved  # noqa: E402
from chunkllm_jax.prompts import encode_prompt  # noqa: E402
from chunkllm_jax.selection import adapter_window_probs, renormalise, vote_scores  # noqa: E402
from train.teacher import teacher_chunk_attention  # noqa: E402
from train.pick_layers import layer_probs, rank_of  # noqa: E402


VOTES = ("sum", "max")  # the shared-selection rules of ChunkConfig.vote


def needle_prompt(tok, n_tokens: int, depth: float, seed: int):
  key = haystack.passkey(seed)
  fact = f"The secret passkey is {key}. Remember it, it is important."
  doc = haystack.needle_document(tok, n_tokens, depth, fact, seed)
  # As a chat turn where the model has a template (a base model such as gemma3-270m has none).
  ids = encode_prompt(tok, doc + "\n\nWhat is the secret passkey? Answer with the number only.")
  # the needle's position: the token where the key's digits start
  text = tok.decode(ids)
  char = text.index(key)
  pos = len(tok(text[:char], add_special_tokens=False)["input_ids"])
  return ids, key, pos


def ranks_for_prompt(params, ids, needle_pos: int, ccfg: ChunkConfig):
  T = len(ids)
  max_len = -(-T // 128) * 128
  ccfg = resolved(params, ccfg.validate(max_len, params.config.n_layers))
  toks = jnp.asarray([ids + [0] * (max_len - T)], jnp.int32)
  _, _, st = chunk_prefill(params, toks, jnp.asarray([T]), max_len, ccfg)
  n = int(st.n_chunks[0])
  ends = np.asarray(st.chunk_end[0, :n])
  starts = np.asarray(st.chunk_start[0, :n])
  needle = int(np.searchsorted(ends, needle_pos))  # chunk holding the needle's first digit
  chunk_id = np.full(max_len, -1, np.int32)
  for j in range(n):
    chunk_id[starts[j]: ends[j] + 1] = j
  chunk_id[int(st.open_start[0]):T] = n  # the open chunk: not a candidate
  qk_layers = params.adapters.config.qk_layers
  teach = teacher_chunk_attention(params, toks, jnp.asarray(chunk_id)[None], max_chunks=n + 1,
                                  qk_layers=qk_layers, lengths_B=jnp.asarray([T]), block_q=128, block_k=128)
  n_cand = n - ccfg.n_local  # the local chunks are always visible, so they are not ranked
  P_LC = np.asarray(teach.P_LBTC[:, 0, T - 1, :n]) * (np.arange(n) < n_cand)
  P_LC = np.asarray(renormalise(P_LC))
  Q = min(ccfg.score_queries, T) if ccfg.scorer == "adapter" else 1  # the student's window, as decode scores
  q_pos = jnp.arange(T - Q, T)[None, None]
  s_LC = []
  for i in range(len(qk_layers)):
    p = jax.tree.map(lambda a: a[i], params.adapters.params["qk"])
    q, k = adp.qk_adapter_apply(p, teach.h_LBTD[i])
    s_LC.append(np.asarray(adapter_window_probs(q[:, None, T - Q:T], k[:, ends], jnp.asarray(ends)[None],
                                                jnp.asarray([[n_cand]]), q_pos))[0, 0])
  s_LC = np.stack(s_LC)
  if needle >= n_cand:
    return None  # the needle is local: always visible
  cfg = params.config
  chunk_end = np.full((1, max_len), -1, np.int32)
  chunk_end[0, :n] = ends
  o_FC = np.asarray(layer_probs(params, toks, jnp.asarray([T]), jnp.asarray(chunk_end), jnp.asarray([n_cand]),
                                n_sink=ccfg.n_sink, n_queries=ATTENTION_QUERIES))[:, 0, :n]
  full = list(cfg.full_attention_layers)
  sel = ccfg.selection_layers
  at_qk = [list(qk_layers).index(i) for i in sel if i in qk_layers]
  at_full = [full.index(i) for i in sel]
  votes = lambda X, rows: {v: rank_of(np.asarray(vote_scores(X[rows], v))[:n_cand], needle) for v in VOTES}
  return dict(n_chunks=n, needle_chunk=needle, n_candidates=n_cand,
              teacher_rank=[rank_of(np.asarray(P_LC[i])[:n_cand], needle) for i in range(len(qk_layers))],
              student_rank=[rank_of(np.asarray(s_LC[i])[:n_cand], needle) for i in range(len(qk_layers))],
              oracle_rank=[rank_of(np.asarray(o_FC[i])[:n_cand], needle) for i in range(len(full))],
              teacher_vote_rank=votes(P_LC, at_qk), student_vote_rank=votes(s_LC, at_qk),
              oracle_vote_rank=votes(o_FC, at_full), layers=list(map(int, qk_layers)), full_layers=full,
              selection_layers=list(sel))


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  layers = rows[0]["layers"]
  t = np.median([r["teacher_rank"] for r in rows], axis=0)
  s = np.median([r["student_rank"] for r in rows], axis=0)
  ax.plot(layers, t, "o-", label="teacher (frozen attention)")
  ax.plot(layers, s, "s-", label="student (QK Adapter)")
  ax.plot(rows[0]["full_layers"], np.median([r["oracle_rank"] for r in rows], axis=0), "^-",
          label="oracle (scorer='attention')")
  for v, ls in zip(VOTES, (":", "--")):
    ax.axhline(np.median([r["teacher_vote_rank"][v] for r in rows]), color="tab:blue", ls=ls, label=f"teacher, vote {v}")
    ax.axhline(np.median([r["student_vote_rank"][v] for r in rows]), color="tab:orange", ls=ls, label=f"student, vote {v}")
    ax.axhline(np.median([r["oracle_vote_rank"][v] for r in rows]), color="tab:green", ls=ls, label=f"oracle, vote {v}")
  ax.set_yscale("log")
  ax.invert_yaxis()
  ax.set_xlabel("layer")
  ax.set_ylabel("rank of the needle chunk (median; 1 = top)")
  ax.set_title(f"needle chunk rank at the last prompt token ({len(rows)} prompts)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--adapters", default=None, help="an export directory (default: the shipped adapters)")
  ap.add_argument("--tokens", type=int, nargs="+", default=[2048])
  ap.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
  ap.add_argument("--out", default="eval_needle_ranks")  # not inside eval.run's default folder, which it would refuse
  ap.add_argument("--selection_layers", type=int, nargs="+", default=None,
                  help="the layers the votes are taken over (default: the adapters' stored choice)")
  args = ap.parse_args(argv)
  try:
    check_flags(args)
    run(args)
  except (ValueError, FileNotFoundError) as e:  # a user's input (AdapterLoadError, ConfigError are ValueErrors)
    print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 2
  return 0


def check_flags(args) -> None:
  """Everything that needs no weights, before the model is loaded."""
  from chunkllm_jax import adapter_io, checks, weights

  if any(n < 256 for n in args.tokens):
    raise ValueError(f"--tokens {args.tokens}: each prompt needs at least 256 tokens")
  if any(not 0 <= d <= 1 for d in args.depths):  # also refuses nan
    raise ValueError(f"--depths {args.depths}: each is where the needle sits, from 0 (start) to 1 (end)")
  cfg = weights.load_config(args.model)
  if max(args.tokens) + 64 > cfg.max_position:
    raise ValueError(f"--tokens {max(args.tokens)} does not fit {args.model}'s {cfg.max_position} positions")
  adapter_io.read_export_config(args.adapters or args.model)
  # needle_ranks.json and .png are rewritten by name: only in a new or empty folder, or an earlier run's
  checks.check_out_folder(args.out, "--out", "eval.needle_ranks", "needle_ranks.json", is_needle_ranks)


def is_needle_ranks(path) -> bool:
  """Whether `path` is a needle_ranks.json that this tool wrote: a list of `ranks_for_prompt` rows."""
  rows = json.loads(pathlib.Path(path).read_text())
  return isinstance(rows, list) and all(isinstance(r, dict) and {"teacher_rank", "student_rank"} <= r.keys()
                                        for r in rows)


def run(args) -> None:
  model = cj.load(args.model, dtype="float32")
  params = cj.with_adapters(model.params, cj.load_adapters(args.adapters or args.model, model.config))
  rows = []
  for n in args.tokens:
    for i, d in enumerate(args.depths):
      ids, key, pos = needle_prompt(model.tokenizer, n, d, seed=i)
      sel = None if args.selection_layers is None else tuple(args.selection_layers)
      r = ranks_for_prompt(params, ids, pos, ChunkConfig(selection="shared", selection_layers=sel))  # its vote
      if r is None:
        continue
      r.update(tokens=len(ids), depth=d)
      rows.append(r)
      print(f"{len(ids)} tokens, depth {d}: needle chunk {r['needle_chunk']}/{r['n_chunks']}; teacher ranks "
            f"{r['teacher_rank']} (votes {r['teacher_vote_rank']}); student ranks {r['student_rank']} "
            f"(votes {r['student_vote_rank']}); oracle votes {r['oracle_vote_rank']} over layers "
            f"{r['selection_layers']}", flush=True)
  if not rows:  # plot() needs a row; and an empty needle_ranks.json would say nothing
    raise ValueError("every needle fell in a local chunk (always read, nothing to rank): use longer --tokens")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "needle_ranks.json").write_text(json.dumps(rows, indent=1))
  plot(rows, out / "needle_ranks.png")
  print(f"wrote {out / 'needle_ranks.json'} and {out / 'needle_ranks.png'}")


if __name__ == "__main__":
  sys.exit(main())
