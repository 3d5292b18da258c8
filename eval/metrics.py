"""LongBench's metrics, re-implemented from their definitions so our scores compare with published ones.

LongBench (THUDM/LongBench, `metrics.py` and `eval.py`) scores each prediction against every reference
answer with one metric per dataset, keeps the best, and reports the mean x 100. The originals depend
on `rouge`, `fuzzywuzzy` and `jieba`; here only the standard library is used, and where a library's
exact behaviour decides the number (ROUGE-L's sentence split and unique-word counts, fuzz.ratio's
rounding) it is reproduced and said so. Only the English metrics are here.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Callable, Sequence

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD style)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
  common = sum((Counter(prediction) & Counter(reference)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(prediction), common / len(reference)
  return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
  """Bag-of-words F1 between the normalized prediction and reference."""
  return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _sentences(text: str) -> list[str]:
  # As the `rouge` package LongBench calls: split on every '.', keep non-empty pieces, collapse their
  # whitespace. A piece of only spaces survives as the empty sentence "" (one empty word); kept too.
  return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
  """One longest common subsequence of x and y (the words of x), with `rouge`'s tie-breaking."""
  table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i in range(1, len(x) + 1):
    for j in range(1, len(y) + 1):
      table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
  out, i, j = [], len(x), len(y)
  while i > 0 and j > 0:
    if x[i - 1] == y[j - 1]:
      out.append(x[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:  # ties step left in y, as `rouge` does
      i -= 1
    else:
      j -= 1
  return out[::-1]


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
  """ROUGE-L F, summary level, with the `rouge` package's (v1.0) semantics that LongBench reports.

  Both texts are split into sentences at '.'; each reference sentence takes the union of its LCS with
  every predicted sentence. That package counts *unique* words: the union is a set, and the precision
  and recall denominators are the numbers of distinct words in prediction and reference. So
  "the cat sat on the mat" vs "the cat is on the mat" scores 4/5, not the textbook 5/6. Case is kept.
  An empty prediction or reference scores 0 (the package raises; LongBench catches it as 0).
  """
  hyp, ref = _sentences(prediction), _sentences(ground_truth)
  if not hyp or not ref:
    return 0.0
  hyp_words, ref_words = [s.split(" ") for s in hyp], [s.split(" ") for s in ref]
  union: set[str] = set()
  for r in ref_words:
    for h in hyp_words:
      union.update(_lcs_words(r, h))
  recall = len(union) / len({w for s in ref_words for w in s})
  precision = len(union) / len({w for s in hyp_words for w in s})
  return 2 * precision * recall / (precision + recall + 1e-8)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                         **_) -> float:
  """1/k when the true class is among the k class names found (as substrings) in the prediction.

  A found class that is a proper substring of the true class ("location" in "Other location") is not
  held against it. LongBench's fallback to the closest class by difflib never runs there (its guard is
  always true), so a prediction naming no class scores 0 here too. LongBench removes from a list while
  iterating it, which can keep the second of two adjacent such substrings; we remove all of them.
  """
  if all_classes is None:
    raise ValueError("classification_score needs all_classes")
  found = [c for c in all_classes if c in prediction]
  found = [c for c in found if not (c in ground_truth and c != ground_truth)]
  return 1.0 / len(found) if ground_truth in found else 0.0


def _fraction_equal(numbers: list[str], want: str) -> float:
  return sum(n == want for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
  """Share of the numbers in the prediction that equal N of the reference "Paragraph N"."""
  match = re.search(r"Paragraph (\d+)", ground_truth)
  if match is None:
    raise ValueError(f"retrieval_score: the reference {ground_truth!r} has no 'Paragraph N'")
  return _fraction_equal(re.findall(r"\d+", prediction), match.group(1))


def count_score(prediction: str, ground_truth: str, **_) -> float:
  """Share of the numbers in the prediction that equal the reference count."""
  return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def edit_similarity(a: str, b: str) -> float:
  """fuzzywuzzy's `fuzz.ratio(a, b) / 100`, as LongBench installs it (without python-Levenshtein).

  That is difflib.SequenceMatcher's ratio (2 * matches / total length, default autojunk), rounded to
  a whole percent; equal strings score 1 and an empty one against a non-empty one 0.
  """
  if a == b:
    return 1.0
  if not a or not b:
    return 0.0
  return round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
  """Edit similarity of the first prediction line that is code (no ```, '#' or '//') to the reference."""
  lines = prediction.lstrip("\n").split("\n")
  line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
  return edit_similarity(line, ground_truth)


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge": rouge_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def first_line(prediction: str) -> str:
  """LongBench's post-processing for its few-shot tasks: the model tends to go on with more examples."""
  return prediction.lstrip("\n").split("\n")[0]


def score(task_metric_name: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None,
          first_line_only: bool = False) -> float:
  """One prediction's score in [0, 1]: the best over the reference answers, as LongBench takes it."""
  try:
    metric = METRICS[task_metric_name]
  except KeyError:
    raise ValueError(f"unknown metric {task_metric_name!r}; known: {sorted(METRICS)}") from None
  if first_line_only:
    prediction = first_line(prediction)
  return max((metric(prediction, a, all_classes=all_classes) for a in answers), default=0.0)
