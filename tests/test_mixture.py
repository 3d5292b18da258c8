"""The retrieval mixture (train.mixture): where its facts are, that it is our own, and its errors."""

import re

import numpy as np
import pytest

from eval import niah
from tests.eval_fixtures import WordTokenizer
from train import mixture
from train.tfds_builder import DataError

LINES = [f"Line {i} of the running text tells of the {w} near the river." for i, w in
         enumerate(["mill", "boats", "fields", "church", "bridge", "market", "school", "farm"] * 6)]


@pytest.mark.parametrize("kind", mixture.KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inserted_text_is_where_the_generator_says(kind, seed):
  doc = mixture.make_doc(LINES[:20], kind, np.random.default_rng(seed))
  q0, q1 = doc.query
  assert doc.inserted and all(e <= q0 for _, e in doc.inserted)  # everything asked about comes first
  query = doc.text[q0:q1]
  for s, e in doc.inserted:
    piece = doc.text[s:e]
    if kind == "fact":
      assert _is_a_fact(piece), piece
    if kind == "repeat":
      assert query.endswith(piece)  # the quote repeats the passage
  if kind == "fact":
    assert any(doc.text[s:e] in query for s, e in doc.inserted)  # the answer restates one fact
  if kind == "kv":
    key, value = query.split("Id ")[1].rstrip(".").split(" has value ")
    assert f"id {key} has value {value}" in doc.text[slice(*doc.inserted[0])]
  assert sum(l in doc.text for l in LINES[:20]) >= 20 - 2  # the user's text around it, in order


def _is_a_fact(text: str) -> bool:
  fill = {"v": r"\d{5}", "id": r"\d{4}", "place": "|".join(mixture.PLACES), "name": "|".join(mixture.NAMES)}
  for fact, _ in mixture.FACTS:
    pattern = re.escape(fact)
    for key, alternatives in fill.items():
      pattern = pattern.replace(re.escape("{" + key + "}"), f"(?:{alternatives})")
    if re.fullmatch(pattern, text):
      return True
  return False


def test_the_mixture_uses_none_of_the_evaluations_needles():
  eval_words = set()
  for kind in niah.KINDS:  # the first words of each evaluation question
    case = niah.make_case(WordTokenizer(), kind, 300, 0.5)
    eval_words.add(" ".join(case.question.split()[:4]))
  docs, made = mixture.mix(["\n".join(LINES)] * 4, 0.5, doc_tokens=200, count_tokens=lambda ls: [len(l.split()) for l in ls],
                           seed=3)
  text = "\n".join(m.text for m in made)
  assert made and all(w not in text for w in eval_words)
  for phrase in ("pass key", "secret number", "magic number", "special magic"):
    assert phrase not in text.lower()


def test_mix_ratio_and_order():
  docs = ["\n".join(LINES[i:i + 10]) for i in range(0, 40, 10)]
  count = lambda ls: [len(l.split()) for l in ls]
  same, none = mixture.mix(docs, 0.0, doc_tokens=100, count_tokens=count, seed=0)
  assert same == docs and none == []
  out, made = mixture.mix(docs, 0.5, doc_tokens=100, count_tokens=count, seed=0)
  user = [d for d in out if d in docs]
  assert user == docs and len(out) == len(docs) + len(made)  # the user's documents stay, in order
  mixed_tokens = sum(len(m.text.split()) for m in made)
  assert 0.3 < mixed_tokens / (mixed_tokens + sum(len(d.split()) for d in docs)) < 0.7
  assert mixture.mix(docs, 0.5, doc_tokens=100, count_tokens=count, seed=0) == (out, made)  # deterministic
  only, made1 = mixture.mix(docs, 1.0, doc_tokens=100, count_tokens=count, seed=0)
  assert only == [m.text for m in made1]


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_a_ratio_outside_0_1_is_refused(ratio):
  with pytest.raises(DataError, match="retrieval_mix"):
    mixture.mix(["\n".join(LINES)], ratio, doc_tokens=100, count_tokens=lambda ls: [1] * len(ls), seed=0)


def test_a_text_too_short_for_the_facts_is_refused():
  with pytest.raises(DataError, match="too short to hold the inserted facts"):
    mixture.mix(["one line.\ntwo lines."], 0.5, doc_tokens=100, count_tokens=lambda ls: [3] * len(ls), seed=0)
