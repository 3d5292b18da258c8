"""The retrieval mixture: training documents with long-range dependencies, made from the user's text.

Running text rarely makes a late query attend far back, so a selector trained on it learns recency.
Each mixture document is a stretch of the training text with something a later sentence needs:
- `fact`: one to three facts in varied templates at random depths, and near the end a question
  about one of them followed by its answer;
- `repeat`: a passage from early in the stretch, quoted again near the end;
- `kv`: a list of key-value records at a random depth, and near the end one key's lookup.
The templates are our own, never the evaluation's needles, and the filler is the user's text
(tests/test_mixture.py checks both). `--retrieval_mix r` makes about a fraction r of the training
tokens mixture documents, spread evenly among the user's documents.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from train.tfds_builder import DataError

# (fact, question): {place}, {name}, {id}: a random key; {v}: the value. The answer restates the fact.
FACTS = (("The access code for the {place} gate is {v}.", "What is the access code for the {place} gate?"),
         ("{name}'s locker number is {v}.", "What is {name}'s locker number?"),
         ("id {id}: value {v}", "Which value is listed for id {id}?"),
         ("The parcel for {name} left with tracking number {v}.", "Which tracking number did {name}'s parcel get?"),
         ("The {place} depot stores {v} crates.", "How many crates does the {place} depot store?"),
         ("Dr. {name} answers the phone at extension {v}.", "At which extension does Dr. {name} answer?"),
         ("The ferry to {place} island leaves from pier {v}.", "From which pier does the ferry to {place} island leave?"),
         ("{name} booked room {v} for the meeting.", "Which room did {name} book for the meeting?"))
PLACES = ("north", "south", "east", "west", "mill", "quarry", "station", "dock", "market", "chapel", "harbor",
          "orchard")
NAMES = ("Maria", "Tomas", "Aiko", "Farid", "Olga", "Kwame", "Lucia", "Henrik", "Priya", "Mateo", "Ingrid", "Yusuf")
KINDS = ("fact", "repeat", "kv")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_LINES = 8  # a mixture document needs this many lines of running text around what it inserts


@dataclasses.dataclass(frozen=True)
class MixtureDoc:
  """One mixture document; `inserted` are the (start, end) character spans of what was put in (facts,
  the records, the quoted passage's first copy), `query` the span of the late question or quote."""

  kind: str
  text: str
  inserted: tuple[tuple[int, int], ...]
  query: tuple[int, int]


def fact_text(template: int, rng) -> tuple[str, str, str]:
  """(fact, question, value) of FACTS[template] with random keys and a 5-digit value."""
  fact, question = FACTS[template]
  keys = dict(place=rng.choice(PLACES), name=rng.choice(NAMES), id=int(rng.integers(1000, 10000)))
  value = str(int(rng.integers(10000, 100000)))
  return fact.format(v=value, **keys), question.format(**keys), value


def _assemble(parts: Sequence[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
  """Joins lines with newlines; returns the text and the spans of the parts flagged True."""
  text, spans, at = [], [], 0
  for s, mark in parts:
    if mark:
      spans.append((at, at + len(s)))
    text.append(s)
    at += len(s) + 1
  return "\n".join(text), spans


def make_doc(lines: Sequence[str], kind: str, rng) -> MixtureDoc:
  """A mixture document of `kind` around `lines` (consecutive lines of running text)."""
  lines = list(lines)
  if len(lines) < MIN_LINES:
    raise DataError(f"a {kind} document needs {MIN_LINES} lines of text around what it inserts, got {len(lines)}")
  tail = int(rng.integers(1, 3))  # running text after the question: the answer is not always last
  body, end = lines[:-tail], lines[-tail:]
  if kind == "fact":
    n = int(rng.integers(1, 4))
    facts = [fact_text(int(t), rng) for t in rng.choice(len(FACTS), size=n, replace=False)]
    at = sorted(rng.integers(0, int(len(body) * 0.8) + 1, size=n))
    parts = [(l, False) for l in body]
    for i, (fact, _, _) in sorted(zip(at, facts), reverse=True):
      parts.insert(int(i), (fact, True))
    fact, question, _ = facts[int(rng.integers(n))]
    parts.append((f"{question} {fact}", None))
  elif kind == "repeat":
    start = int(rng.integers(0, max(len(body) // 2 - 2, 1)))
    n = int(rng.integers(1, 4))
    quoted = " ".join(l.strip() for l in body[start:start + n])
    parts = [(l, False) for l in body[:start]] + [(quoted, True)] + [(l, False) for l in body[start + n:]]
    parts.append((f"To repeat the earlier passage: {quoted}", None))
  elif kind == "kv":
    n = int(rng.integers(4, 11))
    ids = rng.choice(np.arange(1000, 10000), size=n, replace=False)
    vals = rng.integers(10000, 100000, size=n)
    table = "Records: " + "; ".join(f"id {i} has value {v}" for i, v in zip(ids, vals)) + "."
    at = int(rng.integers(0, int(len(body) * 0.8) + 1))
    parts = [(l, False) for l in body[:at]] + [(table, True)] + [(l, False) for l in body[at:]]
    j = int(rng.integers(n))
    parts.append((f"Which value does id {ids[j]} have? Id {ids[j]} has value {vals[j]}.", None))
  else:
    raise ValueError(f"unknown mixture kind {kind!r}; kinds: {KINDS}")
  parts += [(l, False) for l in end]
  text, spans = _assemble([(s, bool(m)) for s, m in parts])
  q = next(i for i, (_, m) in enumerate(parts) if m is None)
  q_start = sum(len(s) + 1 for s, _ in parts[:q])
  return MixtureDoc(kind, text, tuple(spans), (q_start, q_start + len(parts[q][0])))


def mix(documents: Sequence[str], ratio: float, *, doc_tokens: int, count_tokens, seed: int
        ) -> tuple[list[str], list[MixtureDoc]]:
  """The user's documents with mixture documents spread among them, about `ratio` of the tokens.

  doc_tokens: a mixture document's length in tokens (about a training sequence);
  count_tokens(list of str) -> list of token counts. Returns (all documents in order, the mixture ones)."""
  if not 0.0 <= ratio <= 1.0:
    raise DataError(f"--retrieval_mix {ratio} is not a fraction: give a value in [0, 1]")
  if ratio == 0.0:
    return list(documents), []
  # units of running text: lines, and sentences within long lines (a paragraph may be one line)
  lines = [u for d in documents for l in d.splitlines() for u in _SENTENCE_END.split(l.strip()) if u.strip()]
  counts = np.asarray(count_tokens(lines), np.int64) + 1
  need = max(doc_tokens // 2, 1)
  if len(lines) < MIN_LINES or counts.sum() < need:
    raise DataError(f"the training text has {counts.sum()} tokens in {len(lines)} lines, too short to hold the "
                    f"inserted facts of a retrieval document ({need}+ tokens and {MIN_LINES}+ lines): give more "
                    "text or --retrieval_mix 0")
  total = int(counts.sum())
  n_docs = max(1, int(round(total / doc_tokens * (1.0 if ratio == 1.0 else ratio / (1.0 - ratio)))))
  rng = np.random.default_rng([seed, 0x6d6978])
  cum = np.concatenate([[0], np.cumsum(counts)])
  made = []
  for i in range(n_docs):
    want = int(doc_tokens * rng.uniform(0.5, 1.0))
    start = int(rng.integers(len(lines)))
    stop = int(np.searchsorted(cum, cum[start] + want))  # lines until about `want` tokens (wrapping)
    idx = np.arange(start, max(stop, start + MIN_LINES)) % len(lines)
    made.append(make_doc([lines[j] for j in idx], KINDS[i % len(KINDS)], rng))
  if ratio == 1.0:
    return [m.text for m in made], made
  out, every = [], max(len(documents) / len(made), 1e-9)
  k = 0
  for i, d in enumerate(documents):  # mixture documents spread evenly among the user's
    out.append(d)
    while k < len(made) and (k + 1) * every <= i + 1:
      out.append(made[k].text)
      k += 1
  out += [m.text for m in made[k:]]
  return out, made
