"""`python -m eval.package_docs --out docs.txt`: a haystack of technical documentation at hand offline, the
long descriptions (their READMEs) in the metadata of the installed Python distributions, written as a filler
text for `eval.run --filler brown --brown docs.txt`: one sentence (or markdown / reStructuredText line) a
line, a blank line between packages, in the order of their names.

No training text is like it: URLs, badges, code and tables between the prose. The text follows what is
installed; eval.run's results record it by contents (its sha256), not by path."""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

MIN_CHARS = 3000  # a description this long at least: a README, not a one-line summary
OWN = "chunkllm-jax"  # this project's README is its own business, not a haystack
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def normalized(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def descriptions(min_chars: int = MIN_CHARS) -> dict[str, str]:
  """Each installed distribution's long description of `min_chars` or more, by normalized name."""
  out = {}
  for dist in metadata.distributions():
    name = dist.metadata["Name"]
    body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    if name and normalized(name) != OWN and len(body) >= min_chars:
      out[normalized(name)] = body
  return out


def sentence_lines(text: str) -> list[str]:
  """The text's lines, spaces collapsed, blank ones left out, and prose lines split after each sentence."""
  lines = []
  for line in text.splitlines():
    line = re.sub(r"\s+", " ", line).strip()
    lines += [s for s in SENTENCE_END.split(line) if s]
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m eval.package_docs", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="the text to write (a new file)")
  p.add_argument("--min_chars", type=int, default=MIN_CHARS, help="the shortest description kept")
  args = p.parse_args(argv)
  out = Path(args.out)
  if out.exists():
    print(f"error: --out {out} exists; give a new file", file=sys.stderr)
    return 2
  docs = descriptions(args.min_chars)
  if not docs:
    print(f"error: no installed distribution has a description of {args.min_chars} characters or more", file=sys.stderr)
    return 2
  out.write_text("\n\n".join("\n".join(sentence_lines(docs[k])) for k in sorted(docs)) + "\n", encoding="utf-8")
  print(f"{len(docs)} documents -> {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
