"""`python -m eval.filler_split --text brown.txt --out train.txt`: the documents of a filler text that
the evaluation never reads (`niah.training_documents`), to train adapters on without training on
the haystacks and perplexity text the evaluation scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval import niah


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m eval.filler_split", description=__doc__.split("\n\n")[0])
  p.add_argument("--text", required=True, help="one-sentence-a-line text, blank lines between documents")
  p.add_argument("--out", required=True, help="the training text to write (a new file)")
  p.add_argument("--max_documents", type=int, default=0, help="keep the first this many (0: all)")
  args = p.parse_args(argv)
  out = Path(args.out)
  if out.exists():
    print(f"error: --out {out} exists; give a new file", file=sys.stderr)
    return 2
  try:
    docs = niah.training_documents(niah.read_sentences(args.text))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.max_documents > 0:
    docs = docs[:args.max_documents]
  out.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
  print(f"{len(docs)} documents -> {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
