"""Bytes read per decode step: reading selected chunks in place (by kernel blocks) vs compacting them.

  python bench/bench_bytes.py --text PATH_TO_TEXT

Chunks are real sentences: pySBD on the given English text, tokenized with smollm2-135m's
tokenizer, so their lengths and their misalignment with kernel blocks are what a user sees. For
each context length and retention target, a random selection of chunks (plus sinks, local chunks
and an open chunk) is read both ways; bytes per layer and row, smollm2's KV shape, float32 and
bfloat16 alike in ratio. Writes bench/RESULTS_bytes.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from chunkllm_jax import boundaries, registry, weights  # noqa: E402
from pallas_kernels import bytes_model  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402
SHAPE = dict(n_kv_heads=3, head_dim=64, itemsize=2)  # smollm2-135m, bfloat16
N_SINK, N_LOCAL, WORK_BLOCK = 4, 4, 128
CONTEXTS = (8192, 32768, 131072)


def sentence_lengths(text: str, tokenizer, max_chunk_len: int = 64) -> np.ndarray:
  _, labels = boundaries.sentence_end_labels(text, tokenizer)
  ends = np.flatnonzero(labels)
  lengths = np.diff(np.concatenate([[-1], ends]))
  return np.minimum(lengths, max_chunk_len)  # chunks are force-closed at max_chunk_len


def one_case(lengths, context: int, retention: float, rng):
  pos, spans = N_SINK, []
  for n in lengths:
    if pos + n > context - 20:
      break
    spans.append((pos, int(n)))
    pos += int(n)
  open_span = (pos, 20)
  budget_tokens = retention * context - N_SINK - 20
  local = spans[-N_LOCAL:]
  pool = spans[:-N_LOCAL]
  order = rng.permutation(len(pool))
  chosen, used = [], sum(n for _, n in local)
  for i in order:
    if used + pool[i][1] > budget_tokens:
      break
    chosen.append(pool[i])
    used += pool[i][1]
  visible = [(0, N_SINK)] + sorted(chosen) + local
  mean_len = float(np.mean([n for _, n in spans]))
  packed = N_SINK + sum(n for _, n in chosen + local)
  budget = -(-packed // WORK_BLOCK) * WORK_BLOCK  # decode reads up to the last used block
  row = dict(context=context, retention=bytes_model.tokens_in(visible + [open_span]) / context,
             chunks=len(chosen), mean_chunk=mean_len,
             retained=bytes_model.tokens_in(visible + [open_span]) * bytes_model.kv_bytes_per_token(**SHAPE),
             compaction=bytes_model.compaction_bytes(visible, open_span, budget=budget, block_size=WORK_BLOCK,
                                                     tokens_per_chunk=mean_len, **SHAPE),
             dense=context * bytes_model.kv_bytes_per_token(**SHAPE))
  for bs in (64, 128, 256, 512):
    row[f"in_place_{bs}"] = bytes_model.in_place_bytes(visible + [open_span], block_size=bs, **SHAPE)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--text", required=True, help="English text to segment (e.g. the Brown corpus)")
  ap.add_argument("--chars", type=int, default=2_000_000, help="characters of the text to use")
  ap.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS), help="context lengths in tokens")
  ap.add_argument("--out", default=str(HERE / "RESULTS_bytes.md"))
  args = ap.parse_args(argv)
  if not pathlib.Path(args.text).is_file():
    ap.error(f"--text {args.text} is not a file")
  text = pathlib.Path(args.text).read_text(encoding="utf-8")[: max(args.chars, 0)]
  tok = weights.load_tokenizer((str(registry.resolve("smollm2-135m").parent), registry.resolve("smollm2-135m").name))
  lengths = sentence_lengths(text, tok)
  # Each case starts at a random sentence of the first half and fills its context from there: the second half
  # alone must hold the longest context, or the case would stop short of it and report another retention.
  if len(lengths) < 2 or lengths[len(lengths) // 2:].sum() < max(args.contexts):
    ap.error(f"--text / --chars give {int(lengths.sum())} tokens of sentences; the {max(args.contexts)}-token case "
             f"needs that many in the text's second half: give more --chars or a longer text")
  rng = np.random.default_rng(0)
  rows = [one_case(lengths[rng.integers(0, len(lengths) // 2):], ctx, r, rng)
          for ctx in args.contexts for r in (0.5, 0.25, 0.125)]
  mb = lambda x: f"{x / 2**20:.2f}"
  lines = results_md.header(
      "Bytes read per decode step: in place by blocks vs compaction",
      notes=f"Chunks are pySBD sentences of the text, tokenized by smollm2-135m (mean {np.mean(lengths):.1f} tokens, "
            f"median {np.median(lengths):.0f}, force-closed at 64); a random selection fills the retention target. "
            "Bytes per layer and row, smollm2's KV shape (3 kv heads x 64) in bfloat16; MiB. Compaction = the "
            f"working buffer read up to its last used {WORK_BLOCK}-slot block + the open chunk's block + the "
            "boundary gather spread over a chunk's tokens. A byte count, not a timing: any machine gives the same.") + [
      "| context | retention | dense | retained | compaction | in place, blocks of 64 | 128 | 256 | 512 |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['context']} | {r['retention']:.1%} | {mb(r['dense'])} | {mb(r['retained'])} | "
                 f"{mb(r['compaction'])} ({r['compaction'] / r['retained']:.2f}x) | "
                 + " | ".join(f"{mb(r[f'in_place_{bs}'])} ({r[f'in_place_{bs}'] / r['retained']:.2f}x)"
                              for bs in (64, 128, 256, 512)) + " |")
  best = np.mean([r["compaction"] / r["retained"] for r in rows])
  inplace = np.mean([r["in_place_128"] / r["retained"] for r in rows])
  lines += ["", f"Mean over the cases, bytes read / retained bytes: compaction {best:.2f}x, in place with "
            f"128-token blocks {inplace:.2f}x. The design kept is the one with fewer bytes: "
            f"{'compaction' if best < inplace else 'in place'}."]
  results_md.write(args.out, lines, dict(command=results_md.command_line(), code=results_md.code_version(),
                                         rows=[{k: float(v) for k, v in r.items()} for r in rows]))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
