"""LongBench's metrics on hand-made examples, the expected values worked out by hand in the comments."""

import pytest

from eval import metrics


@pytest.mark.parametrize("text,want", [
    ("The Cat, sat!", "cat sat"),
    ("An apple a day", "apple day"),
    ("  the   theory of   a thing ", "theory of thing"),  # 'the' inside 'theory' stays
    ("48,213.", "48213"),
])
def test_normalize_answer(text, want):
  assert metrics.normalize_answer(text) == want


@pytest.mark.parametrize("pred,ref,want", [
    ("the cat sat", "a cat sat down", 0.8),  # cat sat | cat sat down: 2 common, P 2/2, R 2/3, F 2*(2/3)/(5/3)
    ("Paris", "paris.", 1.0),
    ("in Paris, France", "Paris", 0.5),  # in paris france | paris: P 1/3, R 1, F (2/3)/(4/3)
    ("cat cat", "cat", 2 / 3),  # bags: 1 common of 2 predicted: P 1/2, R 1
    ("the", "a", 0.0),  # both normalize to nothing
    ("dog", "cat", 0.0),
])
def test_qa_f1(pred, ref, want):
  assert metrics.qa_f1_score(pred, ref) == pytest.approx(want)


@pytest.mark.parametrize("pred,ref,want", [
    ("a b c d", "a c d e", 0.75),  # LCS a c d: P 3/4, R 3/4
    ("a b c d", "a b c d", 1.0),
    ("d c b a", "a b c d", 0.25),  # LCS of one word
    # The `rouge` package counts distinct words: LCS {the cat on mat}, 5 distinct words each side: 4/5
    ("the cat sat on the mat", "the cat is on the mat", 0.8),
    # Lin's summary-level example: reference w1..w5, two predicted sentences. Union LCS {w1 w2 w3 w5} = 4,
    # R 4/5, P 4/6 (distinct predicted words w1 w2 w6 w3 w8 w5), F 2*(4/5)(4/6)/(4/5+4/6) = 8/11
    ("w1 w2 w6. w1 w3 w8 w5", "w1 w2 w3 w4 w5", 8 / 11),
    ("Cat", "cat", 0.0),  # case is kept
    ("", "a b", 0.0),
    ("...", "a b", 0.0),  # no sentence left: the package raises, LongBench scores 0
])
def test_rouge_l(pred, ref, want):
  assert metrics.rouge_score(pred, ref) == pytest.approx(want, abs=1e-7)


CLASSES = ["Date", "location", "Other location", "Music"]


@pytest.mark.parametrize("pred,ref,want", [
    ("Music", "Music", 1.0),
    ("The label is Music.", "Music", 1.0),
    ("Music or Date", "Music", 0.5),  # two classes named: 1/2
    ("Date", "Music", 0.0),
    ("no idea", "Music", 0.0),  # no class named: 0 (LongBench's difflib fallback never runs)
    ("Other location", "Other location", 1.0),  # 'location' is inside the true class: not counted against
    ("location", "Other location", 0.0),
    ("Other location", "location", 0.5),  # both found; neither is a proper substring of 'location'
])
def test_classification(pred, ref, want):
  assert metrics.classification_score(pred, ref, all_classes=CLASSES) == pytest.approx(want)


@pytest.mark.parametrize("pred,ref,want", [
    ("Paragraph 3", "Paragraph 3", 1.0),
    ("The answer is: Paragraph 3.", "Paragraph 3", 1.0),
    ("3", "Paragraph 3", 1.0),
    ("Paragraph 3 or Paragraph 12", "Paragraph 3", 0.5),
    ("Paragraph 13", "Paragraph 3", 0.0),  # whole numbers, not digits
    ("Paragraph 2, 3, 4 and 3", "Paragraph 3", 0.5),
    ("none", "Paragraph 3", 0.0),
])
def test_retrieval(pred, ref, want):
  assert metrics.retrieval_score(pred, ref) == pytest.approx(want)


def test_retrieval_needs_a_paragraph_reference():
  with pytest.raises(ValueError, match="Paragraph N"):
    metrics.retrieval_score("3", "3")


@pytest.mark.parametrize("pred,ref,want", [
    ("There are 4 unique paragraphs.", "4", 1.0),
    ("4 or 5", "4", 0.5),
    ("14", "4", 0.0),
    ("four", "4", 0.0),
])
def test_count(pred, ref, want):
  assert metrics.count_score(pred, ref) == pytest.approx(want)


@pytest.mark.parametrize("a,b,want", [
    ("abcd", "abce", 0.75),  # 3 matched of 8 characters: 2*3/8
    ("x = f(a)", "x = f(b)", 0.88),  # 7 of 8 match: 14/16 = 87.5%, rounded to 88 as fuzz.ratio does
    ("kitten", "sitting", 0.62),  # 'ittn' matched: 8/13 = 61.5% -> 62
    ("same", "same", 1.0),
    ("", "", 1.0),  # fuzz.ratio checks equality before emptiness
    ("", "abc", 0.0),
])
def test_edit_similarity(a, b, want):
  assert metrics.edit_similarity(a, b) == pytest.approx(want)


@pytest.mark.parametrize("pred,want", [
    ("x = f(a)", 1.0),
    ("\n\nx = f(a)\ny = 2", 1.0),  # leading newlines dropped, first line scored
    ("```python\nx = f(a)\n```", 1.0),  # fences and comments are not code
    ("# call f\nx = f(a)", 1.0),
    ("// x\n```", 0.0),  # no code line at all
])
def test_code_sim(pred, want):
  assert metrics.code_sim_score(pred, "x = f(a)") == pytest.approx(want)


def test_score_takes_the_best_answer_and_the_first_line():
  assert metrics.score("qa_f1", "cat sat", ["dog", "a cat sat down", "cat"]) == pytest.approx(0.8)
  assert metrics.score("qa_f1", "anything", []) == 0.0
  # few-shot tasks: only the first line counts; the model tends to go on with more examples
  pred = "\nMusic\nText: another one\nLabel: Date"
  assert metrics.score("classification", pred, ["Music"], CLASSES, first_line_only=True) == 1.0
  assert metrics.score("classification", pred, ["Music"], CLASSES) == 0.5
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.score("bleu", "a", ["a"])
