"""LongBench-format reading, prompt building (middle truncation), scoring, and the generated mini set."""

import json
import re
from pathlib import Path

import pytest

from eval import longbench, make_longbench_mini, metrics

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "eval" / "data" / "longbench_mini"
BROWN = REPO.parent / "shared" / "data" / "brown.txt"


def good(i: int, **over) -> str:
  rec = {"input": f"q{i}", "context": "one two three", "answers": [f"a{i}"], "length": 3, "dataset": "toy",
         "all_classes": None, "_id": f"id{i}"}
  rec.update(over)
  return json.dumps(rec)


def test_reader_skips_and_reports_malformed_lines(tmp_path):
  path = tmp_path / "toy.jsonl"
  lines = [good(1), '{"input": "q2", "context": ', good(3, answers="a3"), json.dumps({"input": "q4", "context": "c"}),
           "", good(5, length="long"), "[1, 2]", good(7)]
  path.write_text("\n".join(lines) + "\n")
  skipped = []
  with pytest.warns(UserWarning) as caught:
    records = list(longbench.read_jsonl(path, skipped))
  assert [r.input for r in records] == ["q1", "q7"]
  assert [s.line for s in skipped] == [2, 3, 4, 6, 7]  # line 5 is blank: not an error
  messages = [str(w.message) for w in caught]
  assert len(messages) == 5
  for line, message in zip([2, 3, 4, 6, 7], messages):
    assert f"toy.jsonl:{line}:" in message
  assert "bad JSON" in skipped[0].reason and "'answers'" in skipped[1].reason
  assert "missing field 'answers'" in skipped[2].reason and "'length'" in skipped[3].reason
  assert records[0] == longbench.Record("q1", "one two three", ["a1"], 3, "toy", None, "id1")


def test_reader_fills_in_optional_fields(tmp_path):
  path = tmp_path / "passage_count.jsonl"
  path.write_text(json.dumps({"input": "", "context": "a b c d", "answers": [4]}) + "\n")
  (record,) = longbench.read_jsonl(path)
  assert record == longbench.Record("", "a b c d", ["4"], 4, "passage_count", None, "passage_count-1")
  assert longbench.task_file(tmp_path, "passage_count") == path


class WhitespaceTokenizer:
  """One token a word, BOS (id 0) in front; a chat template of three marker words around the content."""

  def __init__(self):
    self.vocab = {"<s>": 0}

  def _id(self, word):
    return self.vocab.setdefault(word, len(self.vocab))

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": ([0] if add_special_tokens else []) + [self._id(w) for w in text.split()]}

  def decode(self, ids, skip_special_tokens=False):
    words = {i: w for w, i in self.vocab.items()}
    return " ".join(words[i] for i in ids if not (skip_special_tokens and i == 0))

  def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
    assert add_generation_prompt and tokenize and not return_dict
    return self(f"<user> {messages[0]['content']} <end> <assistant>")["input_ids"]


TOY = longbench.Task("toy", "Start {context} Question: {input} End", 8, "qa_f1")
RECORD = longbench.Record("q", " ".join(f"w{i}" for i in range(1, 101)), ["w7"], 100, "toy", None, "0")


@pytest.mark.parametrize("budget,want", [
    (200, "Start " + RECORD.context + " Question: q End"),  # fits: untouched
    (10, "Start w1 w2 w3 w99 w100 Question: q End"),  # BOS + 4 words | the last 5
    (9, "Start w1 w2 w100 Question: q End"),  # an odd budget keeps 4 + 4, as LongBench's int(n / 2)
])
def test_build_prompt_cuts_the_middle(budget, want):
  tok = WhitespaceTokenizer()
  ids = longbench.build_prompt(tok, RECORD, TOY, budget)
  assert ids[0] == 0 and len(ids) <= budget
  assert tok.decode(ids, skip_special_tokens=True) == want


def test_build_prompt_with_chat_template():
  tok = WhitespaceTokenizer()
  ids = longbench.build_prompt(tok, RECORD, TOY, 14, chat_template=True)
  # 4 tokens of wrapper (BOS <user> .. <end> <assistant>) leave 10: the first 5 and last 5 words of the prompt
  assert tok.decode(ids) == "<s> <user> Start w1 w2 w3 w4 w99 w100 Question: q End <end> <assistant>"
  # few-shot and code tasks are never wrapped (LongBench), whatever the caller asks
  plain = longbench.Task("plain", TOY.template, 8, "qa_f1", few_shot=True, chat=False)
  assert tok.decode(longbench.build_prompt(tok, RECORD, plain, 14, chat_template=True)) == (
      "<s> Start w1 w2 w3 w4 w5 w97 w98 w99 w100 Question: q End")


def test_evaluate_predictions_mean_times_100():
  task = longbench.get_task("trec")
  classes = ["Date", "Music"]
  records = [longbench.Record("", "", [label], 0, "trec", classes, str(i)) for i, label in enumerate(["Date", "Music"])]
  # the second prediction's first line names both classes: 1/2; its other lines are not scored
  assert longbench.evaluate_predictions(task, records, ["Date", "Music, Date\nDate"]) == pytest.approx(75.0)
  assert longbench.evaluate_predictions(task, [], []) == 0.0
  with pytest.raises(ValueError):
    longbench.evaluate_predictions(task, records, ["Date"])
  with pytest.raises(ValueError, match="unknown task"):
    longbench.get_task("nope")


@pytest.mark.parametrize("name", sorted(longbench.TASKS))
def test_every_task_has_a_template_and_a_metric(name):
  task = longbench.TASKS[name]
  assert task.name == name and task.metric in metrics.METRICS and task.max_new_tokens > 0
  assert "{context}" in task.template
  assert task.template.format(context="CTX", input="INP").count("CTX") == 1  # no stray braces


def test_longbench_tasks_are_the_english_sixteen():
  assert set(longbench.LONGBENCH_TASKS) == {
      "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
      "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"}
  assert set(longbench.MINI_TASKS) == set(make_longbench_mini.MAKERS)


def test_composed_templates_are_longbenchs_text():
  # qasper's and narrativeqa's templates are assembled from repeated pieces; pin the result to LongBench's text
  repeat = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
            "answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
            "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
  assert longbench.TASKS["qasper"].template == (
      "You are given a scientific article and a question. Answer the question " + repeat + "\n\nArticle: {context}"
      "\n\n Answer the question based on the above article " + repeat + "\n\nQuestion: {input}\n\nAnswer:")
  assert longbench.TASKS["narrativeqa"].template.endswith(
      "Now, answer the question based on the story as concisely as you can, using a single phrase if possible. "
      "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:")


def mini_records(task):
  skipped = []
  records = list(longbench.read_jsonl(longbench.task_file(MINI, task), skipped))
  assert not skipped
  return records


@pytest.mark.parametrize("task", sorted(longbench.MINI_TASKS))
def test_mini_set_loads_and_its_answers_follow_from_the_context(task):
  records = mini_records(task)
  assert len(records) == 8 and len({r.id for r in records}) == 8
  for r in records:
    assert r.dataset == task and r.length == len(r.context.split()) and 2000 < r.length < 5000
    assert len(r.answers) == 1
    answer = r.answers[0]
    if task in ("mini_kv_qa", "mini_multidoc_qa", "mini_passage_retrieval", "mini_classification"):
      assert answer in r.context
    if task == "mini_passage_retrieval":
      (paragraph,) = [p for p in r.context.split("\n\n") if r.input in p]  # the sentence is in one paragraph only
      assert paragraph.startswith(answer + ": ")
    if task == "mini_passage_count":
      paragraphs = re.split(r"(?:^|\n\n)Paragraph \d+: ", r.context)[1:]
      assert len(set(paragraphs)) == int(answer) < len(paragraphs)
    if task == "mini_classification":
      assert answer in r.all_classes and r.input.endswith("\nLabel:")
      keyword = re.search(r"It mentions the (\w+)\.\nLabel:$", r.input).group(1)
      assert f"It mentions the {keyword}.\nLabel: {answer}" in r.context  # the examples show its label
    if task == "mini_code":
      name, args = re.fullmatch(r"\w+ = (\w+)\((.*)\)", answer).groups()
      assert f"def {name}({args}):" in r.context and r.input.endswith("\n")
    # a perfect prediction scores 1
    assert longbench.score_record(longbench.MINI_TASKS[task], r, answer) == 1.0


def test_mini_generation_is_deterministic():
  filler = make_longbench_mini.synthetic_filler()
  for task in make_longbench_mini.MAKERS:
    a = make_longbench_mini.make_records(task, filler, 2, 300, seed=1)
    assert a == make_longbench_mini.make_records(task, filler, 2, 300, seed=1)
    assert a != make_longbench_mini.make_records(task, filler, 2, 300, seed=2)


@pytest.mark.skipif(not BROWN.exists(), reason="no Brown corpus file next to the repository")
def test_committed_mini_set_is_what_the_readme_command_makes(tmp_path):
  make_longbench_mini.main(["--out", str(tmp_path), "--brown", str(BROWN)])
  for task in make_longbench_mini.MAKERS:
    assert (tmp_path / f"{task}.jsonl").read_text() == (MINI / f"{task}.jsonl").read_text(), task


def test_synthetic_mini_set_needs_no_brown_file(tmp_path, capsys):
  make_longbench_mini.main(["--synthetic", "--out", str(tmp_path), "--n", "1", "--context_words", "100",
                            "--tasks", "mini_kv_qa"])
  assert len((tmp_path / "mini_kv_qa.jsonl").read_text().splitlines()) == 1
  with pytest.raises(SystemExit) as e:  # neither filler: refused, naming both ways
    make_longbench_mini.main(["--out", str(tmp_path)])
  assert e.value.code == 2 and "--brown" in capsys.readouterr().err
