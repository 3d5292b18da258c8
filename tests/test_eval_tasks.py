"""The eval tasks without a model: needle cases (placement, kinds, scoring), the short-text items,
and the summary's arithmetic (percent of vanilla, identical outputs, the long-context average)."""

import json

import pytest

from eval import niah, report, short_text
from tests.eval_fixtures import WordTokenizer


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_single_needle_sits_at_its_depth(depth):
  case = niah.make_case(WordTokenizer(), "single", 300, depth, seed=1)
  (key,) = case.answers
  sentences = case.document.split(". ")
  at = next(i for i, s in enumerate(sentences) if key in s) / (len(sentences) - 1)
  assert abs(at - depth) < 0.05 and case.example_id == f"single-L300-d{depth:g}-s1"
  assert 250 < len(case.document.split()) < 360 and "pass key" in case.question
  assert niah.score(case, f"The pass key is {key}.") == (1.0, 1.0) and niah.score(case, "12345") == (0.0, 0.0)


def test_multikey_and_multivalue_needles():
  tok = WordTokenizer()
  mk = niah.make_case(tok, "multikey", 400, 0.5, seed=2)
  assert mk.document.count("The secret number of the") == 4 and len(mk.answers) == 1
  target = mk.question.split("secret number of the ")[1].split("?")[0]
  assert f"The secret number of the {target} is {mk.answers[0]}." in mk.document
  mv = niah.make_case(tok, "multivalue", 400, 0.5, seed=2)
  assert len(mv.answers) == 3 and all(a in mv.document for a in mv.answers)
  assert niah.score(mv, ", ".join(mv.answers[:2])) == (0.0, pytest.approx(2 / 3))
  assert niah.score(mv, " and ".join(mv.answers)) == (1.0, 1.0)
  # a cell is reproducible; each cell draws its own keys, so no two cells of a grid share a needle
  assert niah.make_case(tok, "multikey", 400, 0.5, seed=2) == mk
  cells = [niah.make_case(tok, "single", n, d, seed=s) for n in (300, 400) for d in (0.0, 0.5) for s in (0, 1)]
  assert len({c.answers for c in cells}) == len(cells)


@pytest.mark.parametrize("kind", niah.KINDS)
def test_base_model_prompts_end_with_the_answer_lead(kind):
  """A chat model is asked the question; a base model also gets the answer's first words, naming
  the same thing the question asks for."""
  case = niah.make_case(WordTokenizer(), kind, 200, 0.5, seed=3)
  chat, base = niah.prompt_text(case), niah.prompt_text(case, chat=False)
  assert chat.endswith(case.question) and base == f"{chat}\n{case.lead}"
  subject = {"single": "pass key", "multikey": case.question.split("number of the ")[-1].split("?")[0],
             "multivalue": case.question.split("numbers for the ")[-1].split("?")[0]}[kind]
  assert subject in case.lead and not any(a in case.lead for a in case.answers)


def test_brown_filler_runs_on_from_a_document(tmp_path):
  path = tmp_path / "brown.txt"
  path.write_text("First doc one.\nFirst doc two.\n\nSecond doc one.\nSecond doc two.\n")
  docs = niah.read_sentences(path)
  assert docs == [["First doc one.", "First doc two."], ["Second doc one.", "Second doc two."]]
  case = niah.make_case(WordTokenizer(), "single", 20, 1.0, seed=0, brown=docs)
  assert case.document.endswith("Remember it.") and "doc" in case.document


@pytest.mark.parametrize("kind", ["single", "multikey"])
def test_repeated_filler_is_the_passkey_tests_haystack(kind):
  """niah.REPEATED: five sentences over and over for the whole length, the needles alone differing."""
  case = niah.make_case(WordTokenizer(), kind, 400, 0.5, seed=4, brown=niah.REPEATED)
  sentences = [x.strip() + "." for x in case.document.split(".") if x.strip()]
  filler = [x for x in sentences if x in niah.REPEATED[0]]
  facts = [x for x in sentences if x not in niah.REPEATED[0]]
  assert facts and all(any(c.isdigit() for c in x) or x == "Remember it." for x in facts), facts
  assert set(filler) == set(niah.REPEATED[0]) and filler.count("The grass is green.") > 20
  assert 350 < len(case.document.split()) < 460


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_python_filler_is_code_with_the_needle_on_a_line_of_its_own(depth):
  """--filler python: lines of the installed packages' source, kept as lines; the needle is one of them, at its
  depth in tokens."""
  docs = niah.eval_documents(niah.read_python_documents())
  assert len(docs) > 20 and all(len("\n".join(d)) >= niah.MIN_SOURCE_CHARS for d in docs)
  case = niah.make_case(WordTokenizer(), "single", 600, depth, seed=3, brown=docs, joiner="\n")
  lines = case.document.split("\n")
  (at,) = [i for i, line in enumerate(lines) if "pass key" in line]
  assert lines[at] == f"The pass key is {case.answers[0]}. Remember it."
  words = [len(line.split()) for line in lines]  # the tokenizer's tokens: words
  assert abs(sum(words[:at]) / sum(words) - depth) < 0.05
  assert sum(("def " in x or "import " in x or "return" in x) for x in lines) > 3  # code, line by line
  assert set(niah.python_versions()) == set(niah.PYTHON_PACKAGES)


def test_short_text_items_and_scores(tmp_path):
  items = short_text.read_items()
  assert len(items) == 24 and {i.kind for i in items} == {"choice", "completion"}
  choice = next(i for i in items if i.kind == "choice")
  assert short_text.score(choice, f" {choice.answers[0]}. Mars") == 1.0
  assert short_text.score(choice, "The answer is D") == float(choice.answers[0] == "D")
  paris = next(i for i in items if "France" in i.prompt)
  assert short_text.score(paris, " Paris, of course.\nBerlin") == 1.0
  assert short_text.score(paris, " Lyon.\nParis") == 0.0  # only the first line counts
  bad = tmp_path / "s.jsonl"
  bad.write_text(json.dumps({"id": "a", "kind": "choice", "prompt": "q", "answers": ["A"]}) + "\n{oops\n")
  with pytest.warns(UserWarning, match="s.jsonl:2:"):
    assert [i.id for i in short_text.read_items(bad)] == ["a"]


def test_summary_percent_of_vanilla_and_identical_outputs():
  def r(task, method, retention, example, score, tokens, kv):
    return dict(task=task, method=method, retention=retention, example=example, score=score, new_tokens=tokens,
                kv_retention=kv, prefill_s=1.0, decode_tok_s=10.0)

  records = [r("niah_single", "vanilla", "full", "a", 1.0, [1], 1.0),
             r("niah_single", "vanilla", "full", "b", 1.0, [2], 1.0),
             r("niah_single", "chunkllm", "0.5", "a", 1.0, [1], 0.48),
             r("niah_single", "chunkllm", "0.5", "b", 0.0, [3], 0.52),  # a different answer
             r("qa", "vanilla", "full", "a", 0.5, [1], 1.0), r("qa", "chunkllm", "0.5", "a", 0.5, [1], 0.49)]
  s = report.summarize(records)
  (chunk,) = [x for x in s["tasks"]["niah_single"] if x["method"] == "chunkllm"]
  assert chunk["score"] == 50.0 and chunk["pct_of_vanilla"] == 50.0 and chunk["identical_to_vanilla"] == 0.5
  assert chunk["kv_retention"] == pytest.approx(0.5)
  avg = {x["method"]: x for x in s["long_context"]}
  assert avg["chunkllm"]["score"] == pytest.approx(50.0) and avg["vanilla"]["score"] == pytest.approx(75.0)
  assert avg["chunkllm"]["pct_of_vanilla"] == pytest.approx(100 * 50 / 75) and avg["chunkllm"]["n_tasks"] == 2
  assert report.headline(s) == ["ChunkLLM (target 0.5): 66.67% of vanilla's long-context average at 49.50% KV "
                                "(measured; 2 tasks)"]


@pytest.mark.parametrize("kv, chunks", [(0.45, 2.0), (0.52, 0.8), (0.5, 0.0)])
def test_summary_worst_row_off_budget_in_chunks(kv, chunks):
  """|measured - target| x tokens seen (prompt + half the answer) / mean chunk length, worst row."""
  def r(example, kv_retention):
    return dict(task="niah_single", method="hybrid", retention="0.5", example=example, score=1.0,
                new_tokens=[0] * 20, kv_retention=kv_retention, prompt_tokens=990, mean_chunk_len=25.0)

  s = report.summarize([r("a", 0.5), r("b", kv)])
  (row,) = s["tasks"]["niah_single"]
  assert row["off_budget_chunks"] == pytest.approx(chunks)
  assert (row["kv_min"], row["kv_max"]) == (min(kv, 0.5), max(kv, 0.5))
  full = report.summarize([{**r("a", 1.0), "method": "vanilla", "retention": "full"}])
  assert full["tasks"]["niah_single"][0]["off_budget_chunks"] is None


@pytest.mark.parametrize("depth", [0.25, 0.5, 0.75])
def test_needle_depth_counts_tokens_not_sentences(depth):
  """Short sentences first, long ones after: the needle sits at `depth` of the haystack's tokens (within
  one long sentence), not at `depth` of its sentences."""
  doc = [f"short {i}." for i in range(40)] + [" ".join(["long"] * 29) + f" {i}." for i in range(10)]
  case = niah.make_case(WordTokenizer(), "single", 380, depth, seed=0, brown=[doc])
  words = case.document.split()
  at = words.index("pass") / len(words)
  assert abs(at - depth) <= 30 / len(words)
  # The published rows' placement: at `depth` of the sentences, here well before `depth` of the tokens.
  old = niah.make_case(WordTokenizer(), "single", 380, depth, seed=0, brown=[doc], placement="sentences")
  n_before = old.document.split(" The pass key")[0].count(".")
  assert n_before == round(depth * (old.document.count(".") - 2))  # the needle's own two sentences left out
  with pytest.raises(ValueError, match="placement must be one of"):
    niah.make_case(WordTokenizer(), "single", 380, depth, seed=0, brown=[doc], placement="words")


def test_perplexity_windows_hold_one_bos_at_their_start(tmp_path):
  """Documents shorter than a window run on into the next ones: with a tokenizer that adds a BOS, only the
  window's first token is one (a BOS mid-text would be scored as text)."""
  from eval import perplexity

  class BosTokenizer(WordTokenizer):
    def __call__(self, text, add_special_tokens=True):
      ids = super().__call__(text)["input_ids"]
      return {"input_ids": ([self._id("<bos>")] if add_special_tokens else []) + ids}

  path = tmp_path / "text.txt"
  path.write_text("\n\n".join(f"Sentence {i} of a short document." for i in range(60)) + "\n")
  tok = BosTokenizer()
  windows = perplexity.text_windows(tok, 2, 20, path)
  assert [[t for t, i in enumerate(w) if i == tok.ids["<bos>"]] for w in windows] == [[0], [0]]
