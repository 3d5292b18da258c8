"""Needle in a haystack: facts hidden at a depth of a long document, asked for at its end.

Three kinds, after RULER's:
- `single`: one passkey ("The pass key is 48213. Remember it."), asked for;
- `multikey`: several "The secret number of the <name> is <n>." facts, asked for one of them;
- `multivalue`: one name with several numbers, asked for all of them.
The target fact sits at the cell's depth in tokens (0: start, 1: end), at the nearest sentence break;
the other facts of the kind at seeded random depths. The haystack is Brown-corpus prose (running
sentences from a seeded document), `chunkllm_jax.haystack`'s generated sentences, or Python source
(`read_python_documents`: lines of installed packages' files, a fact on a line of its own). A cell scores 1
when the answer holds the number (single, multikey) or every number (multivalue; `recall` keeps the
fraction found).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from chunkllm_jax import haystack

KINDS = ("single", "multikey", "multivalue")
_NAMES = ["crimson lantern", "silver harbour", "quiet orchard", "amber tower", "northern gate", "painted drum",
          "copper river", "velvet meadow", "broken compass", "hidden garden", "winter bell", "golden anchor"]


@dataclasses.dataclass(frozen=True)
class NeedleCase:
  kind: str
  length: int  # haystack tokens asked for
  depth: float
  seed: int
  document: str
  question: str
  answers: tuple[str, ...]  # every one must appear in the prediction
  lead: str = ""  # the answer's opening words, which a base (non-chat) model is prompted to continue

  @property
  def example_id(self) -> str:
    return f"{self.kind}-L{self.length}-d{self.depth:g}-s{self.seed}"


def _number(rng) -> str:
  return str(int(rng.integers(10000, 99999)))


def _needles(kind: str, rng) -> tuple[str, list[str], str, tuple[str, ...], str]:
  """(the target fact, the other facts, the question, the answers, the answer's lead)."""
  if kind == "single":
    key = _number(rng)
    return (f"The pass key is {key}. Remember it.", [], "What is the pass key? Answer with the number only.",
            (key,), "The pass key is")
  names = [_NAMES[i] for i in rng.permutation(len(_NAMES))]
  if kind == "multikey":
    values = [_number(rng) for _ in range(4)]
    facts = [f"The secret number of the {n} is {v}." for n, v in zip(names, values)]
    return (facts[0], facts[1:], f"What is the secret number of the {names[0]}? Answer with the number only.",
            (values[0],), f"The secret number of the {names[0]} is")
  if kind == "multivalue":
    values = [_number(rng) for _ in range(3)]
    facts = [f"One of the special numbers for the {names[0]} is {v}." for v in values]
    return (facts[0], facts[1:], f"What are all the special numbers for the {names[0]}? "
            "List every one of them, separated by commas.", tuple(values),
            f"The special numbers for the {names[0]} are")
  raise ValueError(f"unknown needle kind {kind!r}; known: {', '.join(KINDS)}")


def read_sentences(path: str | Path) -> list[list[str]]:
  """The documents of a one-sentence-a-line text file (blank lines between them), as sentence lists."""
  docs, cur = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        cur.append(line.strip())
      elif cur:
        docs.append(cur)
        cur = []
  if cur:
    docs.append(cur)
  if not docs:
    raise ValueError(f"{path} holds no sentences")
  return docs


# The evaluation reads every EVAL_SHARE-th document of a filler text (documents 4, 9, 14, ...), and
# training must use the others: `python -m eval.filler_split` writes them as a training text.
EVAL_SHARE = 5

# Where `make_case` puts the target: at its depth in tokens (the default), or at that share of the
# haystack's sentences, as the published rows measured before were placed (eval.run records which).
NEEDLE_PLACEMENTS = ("tokens", "sentences")


# The code haystack: source files of these installed packages (always beside this project: it depends on both).
PYTHON_PACKAGES = ("numpy", "jax")
MIN_SOURCE_CHARS = 20_000  # a file this long at least, so that a haystack is mostly one file's code


def read_python_documents(packages: Sequence[str] = PYTHON_PACKAGES) -> list[list[str]]:
  """The Python source of installed packages as documents of lines (a file each, tests left out), in a fixed
  order: a haystack of code that is at hand offline. Its text follows the packages' versions
  (`python_versions`, which eval.run records with its results)."""
  import importlib.util

  docs = []
  for name in packages:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
      raise ValueError(f"the code haystack reads the source of package {name!r}, which is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for f in sorted(root.rglob("*.py")):
      if "test" in f.relative_to(root).as_posix():
        continue
      text = f.read_text(encoding="utf-8", errors="replace")
      if len(text) >= MIN_SOURCE_CHARS:
        docs.append([line.rstrip() for line in text.splitlines()])
  return docs


def python_versions(packages: Sequence[str] = PYTHON_PACKAGES) -> dict[str, str]:
  from importlib.metadata import version

  return {name: version(name) for name in packages}


def eval_documents(docs: Sequence) -> list:
  """The evaluation's share of a filler text's documents (its needles' haystacks, its perplexity text)."""
  return list(docs[EVAL_SHARE - 1::EVAL_SHARE])


def training_documents(docs: Sequence) -> list:
  """The documents evaluation never reads: the text to train adapters on when the filler is that text."""
  return [d for i, d in enumerate(docs) if i % EVAL_SHARE != EVAL_SHARE - 1]


# The passkey test's haystack (Mohtashami & Jaggi, 2023): five sentences repeated, nothing like the needle.
# Given as one document, `_filler` cycles it as it reads on past a document's end.
REPEATED = (("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."),)


def _token_counts(tokenizer, sentences: Sequence[str], joiner: str = " ") -> list[int]:
  """Tokens of each sentence as it sits in running text (after the joiner: a space, or a line break in code)."""
  return [len(ids) for ids in tokenizer([joiner + s for s in sentences], add_special_tokens=False)["input_ids"]]


def _filler(tokenizer, n_tokens: int, seed: int, brown: Sequence[Sequence[str]] | None, joiner: str = " ") -> list[str]:
  """Running sentences (or lines) of about `n_tokens` tokens, from a seeded document onwards, or generated."""
  if brown is None:
    per = max(len(tokenizer(" ".join(haystack.filler_sentences(20, seed)))["input_ids"]) // 20, 1)
    return haystack.filler_sentences(max(n_tokens // per, 1), seed)
  out, total, d = [], 0, int(np.random.default_rng(seed).integers(len(brown)))
  while total < n_tokens:
    sentences = list(brown[d % len(brown)])
    counts = _token_counts(tokenizer, sentences, joiner)
    for s, c in zip(sentences, counts):
      if total >= n_tokens:
        break
      out.append(s)
      total += c
    d += 1
  return out


def make_case(tokenizer, kind: str, length: int, depth: float, seed: int = 0,
              brown: Sequence[Sequence[str]] | None = None, placement: str = "tokens", joiner: str = " ") -> NeedleCase:
  """One needle case. `brown`: the haystack's documents (sentences, or lines of code with joiner="\\n");
  None: generated sentences."""
  # Keys depend on the whole cell (length, depth, seed), so that no two cells share a needle.
  rng = np.random.default_rng([seed, KINDS.index(kind) if kind in KINDS else 99, length, int(round(depth * 1000))])
  target, others, question, answers, lead = _needles(kind, rng)
  sentences = _filler(tokenizer, length, seed, brown, joiner)
  # The other facts first (at random places), then the target at its depth, so no fact moves it.
  for fact in others:
    sentences.insert(int(rng.integers(len(sentences) + 1)), fact)
  # "tokens": the sentence break with `depth` of the tokens before it. Sentences differ in length, so `depth`
  # of the sentences can be far from it (Brown at 2K tokens: 0.7 of the sentences at 0.54 of the tokens).
  if placement == "tokens":
    before = np.concatenate([[0], np.cumsum(_token_counts(tokenizer, sentences, joiner))])
    sentences.insert(int(np.argmin(np.abs(before - depth * before[-1]))), target)
  elif placement == "sentences":
    sentences.insert(int(round(depth * len(sentences))), target)
  else:
    raise ValueError(f"placement must be one of {NEEDLE_PLACEMENTS}, got {placement!r}")
  return NeedleCase(kind, length, depth, seed, joiner.join(sentences), question, answers, lead)


def prompt_text(case: NeedleCase, chat: bool = True) -> str:
  """The document, then the question; for a base model (no chat template, so nothing marks where
  the answer starts) also the answer's lead to continue, as in the passkey test of Mohtashami &
  Jaggi (2023)."""
  if chat:
    return f"{case.document}\n\n{case.question}"
  return f"{case.document}\n\n{case.question}\n{case.lead}"


def score(case: NeedleCase, prediction: str) -> tuple[float, float]:
  """(1 if every answer appears in the prediction else 0, the fraction that appears)."""
  found = sum(a in prediction for a in case.answers)
  return float(found == len(case.answers)), found / len(case.answers)


def grid(tokenizer, kinds: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int = 1,
         brown: Sequence[Sequence[str]] | None = None, seed: int = 0, placement: str = "tokens",
         joiner: str = " ") -> list[NeedleCase]:
  """Every (kind, length, depth) cell, `samples` cases each (seeds seed, seed + 1, ...)."""
  return [make_case(tokenizer, k, n, d, seed + s, brown, placement, joiner) for k in kinds for n in lengths
          for d in depths for s in range(samples)]


def heatmap(cells: dict[tuple[str, str], dict[tuple[int, float], float]], lengths: Sequence[int],
            depths: Sequence[float], path: str | Path, title: str) -> None:
  """One panel per (row label, kind): accuracy by depth (rows) and context length (columns).

  cells maps (row label, kind) -> {(length, depth): accuracy}; a missing cell is blank."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = list(cells)
  rows = sorted({r for r, _ in panels}, key=[r for r, _ in panels].index)
  kinds = sorted({k for _, k in panels}, key=[k for _, k in panels].index)
  # Wide enough for the titles too (about 0.07 inch a character at their sizes): a small grid clipped them.
  panel_title = max(len(f"{k}: {r}") for r, k in panels)
  width = max(1.2 + 0.9 * len(lengths) * len(kinds), 0.07 * len(title) + 0.4, (0.065 * panel_title + 0.5) * len(kinds))
  fig, axes = plt.subplots(len(rows), len(kinds), squeeze=False,
                           figsize=(width, 0.6 + 0.5 * len(depths) * len(rows) + 0.6))
  for i, r in enumerate(rows):
    for j, k in enumerate(kinds):
      ax = axes[i][j]
      acc = np.full((len(depths), len(lengths)), np.nan)
      for (n, d), a in cells.get((r, k), {}).items():
        if n in lengths and d in depths:
          acc[list(depths).index(d), list(lengths).index(n)] = a
      ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
      for y in range(len(depths)):
        for x in range(len(lengths)):
          if not np.isnan(acc[y, x]):
            ax.text(x, y, f"{acc[y, x]:.2g}", ha="center", va="center", fontsize=7)
      ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
      ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
      ax.set_title(f"{k}: {r}", fontsize=8)
      if i == len(rows) - 1:
        ax.set_xlabel("context (tokens)", fontsize=7)
      if j == 0:
        ax.set_ylabel("depth", fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
