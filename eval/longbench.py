"""LongBench-format tasks: read their JSONL, build the prompt, and score the predictions.

A LongBench file (THUDM/LongBench's `data/<dataset>.jsonl`, one record a line: `input`, `context`,
`answers`, `length`, `dataset`, `all_classes`, `_id`) reads the same whether it is the real benchmark
or our generated mini set (`eval/data/longbench_mini`, see `make_longbench_mini`). Each task carries
LongBench's prompt template, generation length and metric, so that a run here follows LongBench's
`pred.py` / `eval.py`: prompts too long for the model are cut in the middle, where the instructions
are not, and the reported figure is the mean best-over-answers score x 100.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from chunkllm_jax.prompts import encode_prompt
from eval import metrics


@dataclasses.dataclass(frozen=True)
class Record:
  input: str
  context: str
  answers: list[str]
  length: int  # words in the context, as LongBench counts it for English
  dataset: str
  all_classes: list[str] | None
  id: str  # LongBench's `_id`


class Skipped(NamedTuple):
  path: str
  line: int  # 1-based
  reason: str


def _check_str_list(value: Any, field: str, allow_int: bool = False) -> list[str]:
  ok = (str, int) if allow_int else (str,)
  if not isinstance(value, list) or not all(isinstance(v, ok) and not isinstance(v, bool) for v in value):
    raise ValueError(f"field {field!r} must be a list of strings, got {value!r:.80}")
  return [str(v) for v in value]


def _parse_record(obj: Any, default_dataset: str, default_id: str) -> Record:
  if not isinstance(obj, dict):
    raise ValueError(f"a line must hold a JSON object, got {type(obj).__name__}")
  for field in ("input", "context", "answers"):
    if field not in obj:
      raise ValueError(f"missing field {field!r}")
  for field in ("input", "context"):
    if not isinstance(obj[field], str):
      raise ValueError(f"field {field!r} must be a string, got {type(obj[field]).__name__}")
  # Real LongBench answers are strings; a bare number (a count) is taken as its text.
  answers = _check_str_list(obj["answers"], "answers", allow_int=True)
  length = obj.get("length")
  if length is None:
    length = len(obj["context"].split())
  elif not isinstance(length, int) or isinstance(length, bool):
    raise ValueError(f"field 'length' must be an integer, got {length!r:.80}")
  dataset, rid = obj.get("dataset") or default_dataset, obj.get("_id") or default_id
  if not isinstance(dataset, str) or not isinstance(rid, str):
    raise ValueError("fields 'dataset' and '_id' must be strings")
  classes = obj.get("all_classes")
  if classes is not None:
    classes = _check_str_list(classes, "all_classes")
  return Record(obj["input"], obj["context"], answers, length, dataset, classes, rid)


def read_jsonl(path: str | Path, skipped: list[Skipped] | None = None) -> Iterator[Record]:
  """The records of a LongBench JSONL file, in order.

  A malformed line (bad JSON, a missing or ill-typed field) never stops the read: it is warned about
  with the file name and line number, appended to `skipped` when the caller passes a list, and passed
  over. Blank lines are ignored. `length`, `dataset`, `all_classes` and `_id` may be absent (the
  context's word count, the file's stem, None, and "<stem>-<line>").
  """
  path = Path(path)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = _parse_record(json.loads(line), path.stem, f"{path.stem}-{line_no}")
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        reason = f"bad JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
        warnings.warn(f"{path}:{line_no}: skipped a malformed record: {reason}", stacklevel=2)
        if skipped is not None:
          skipped.append(Skipped(str(path), line_no, reason))
        continue
      yield record


def task_file(directory: str | Path, task_name: str) -> Path:
  """Where a task's records are: LongBench names its files after the dataset."""
  return Path(directory) / f"{task_name}.jsonl"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  template: str  # with {context} and {input}
  max_new_tokens: int
  metric: str  # a key of metrics.METRICS
  # LongBench's few-shot tasks: only the prediction's first line is scored, and chat models get the raw
  # prompt (the examples already set the answer format; a chat wrapper makes them talk instead).
  few_shot: bool = False
  chat: bool = True  # whether a chat template may wrap this task's prompt


_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
                "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
                "Answer:")
_READ_BRIEFLY = ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based "
                 "on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
                 "Answer:")
_CONCISE = ("as concisely as you can, using a single phrase {what}if possible.")
_UNANSWERABLE = ("If the question cannot be answered based on the information in the article, write \"unanswerable\". "
                 "If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
                 "explanation.")

# LongBench's English datasets: config/dataset2prompt.json, config/dataset2maxlen.json, eval.py's metric.
LONGBENCH_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("narrativeqa",
         "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
         + _CONCISE.format(what="") + " Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the "
         "question based on the story " + _CONCISE.format(what="") + " Do not provide any explanation.\n\n"
         "Question: {input}\n\nAnswer:", 128, "qa_f1"),
    Task("qasper",
         "You are given a scientific article and a question. Answer the question " + _CONCISE.format(what="or sentence ")
         + " " + _UNANSWERABLE + "\n\nArticle: {context}\n\n Answer the question based on the above article "
         + _CONCISE.format(what="or sentence ") + " " + _UNANSWERABLE + "\n\nQuestion: {input}\n\nAnswer:",
         128, "qa_f1"),
    Task("multifieldqa_en", _READ_BRIEFLY, 64, "qa_f1"),
    Task("hotpotqa", _QA_PASSAGES, 32, "qa_f1"),
    Task("2wikimqa", _QA_PASSAGES, 32, "qa_f1"),
    Task("musique", _QA_PASSAGES, 32, "qa_f1"),
    Task("gov_report",
         "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
         "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge"),
    Task("qmsum",
         "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
         "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
         "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge"),
    Task("multi_news",
         "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
         "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge"),
    Task("trec",
         "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
         64, "classification", few_shot=True, chat=False),
    Task("triviaqa",
         "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
         "The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1", few_shot=True, chat=False),
    Task("samsum",
         "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
         128, "rouge", few_shot=True, chat=False),
    Task("passage_count",
         "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
         "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
         "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
         "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
         "3, and so on.\n\nThe final answer is: ", 32, "count"),
    Task("passage_retrieval_en",
         "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
         "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
         "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc."
         "\n\nThe answer is: ", 32, "retrieval"),
    # The code tasks are plain continuation: no chat wrapper (LongBench), but every line is scored.
    Task("lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim", chat=False),
    Task("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim",
         chat=False),
]}

# Our generated tasks (make_longbench_mini): LongBench's forms on Brown-corpus text, answers in the context.
MINI_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mini_kv_qa", _READ_BRIEFLY, 32, "qa_f1"),
    Task("mini_multidoc_qa", _QA_PASSAGES, 32, "qa_f1"),
    Task("mini_passage_retrieval",
         "Here are 30 paragraphs, along with a sentence taken from one of them. Please determine which paragraph the "
         "sentence is from.\n\n{context}\n\nThe following is the sentence.\n\n{input}\n\nPlease enter the number of "
         "the paragraph that the sentence is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
         "etc.\n\nThe answer is: ", 32, "retrieval"),
    Task("mini_passage_count",
         "There are some paragraphs below. Some of them may be duplicates. Please carefully read these paragraphs and "
         "determine how many unique paragraphs there are after removing duplicates. In other words, how many "
         "non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique "
         "paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
         "and so on.\n\nThe final answer is: ", 32, "count"),
    Task("mini_classification",
         "Please determine the label of the text below. Here are some examples of texts with their labels.\n\n"
         "{context}\n{input}", 64, "classification", few_shot=True, chat=False),
    Task("mini_code", "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim",
         chat=False),
]}

TASKS: dict[str, Task] = {**LONGBENCH_TASKS, **MINI_TASKS}


def get_task(name: str) -> Task:
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def _middle_cut(ids: list[int], keep: int) -> list[int]:
  """The first keep // 2 and the last keep // 2 tokens (LongBench's cut: an odd keep loses one more)."""
  half = keep // 2
  return ids[:half] + ids[len(ids) - half:] if len(ids) > keep else ids


def build_prompt(tokenizer, record: Record, task: Task, max_prompt_tokens: int,
                 chat_template: bool = False) -> list[int]:
  """The prompt's token ids, at most `max_prompt_tokens`, cut in the middle as LongBench's pred.py does.

  LongBench fills the template, and when the tokens exceed the budget keeps the first and the last
  half (the instructions sit at both ends; the middle is context). With `chat_template`, tasks that
  allow it are wrapped in the tokenizer's chat template; the wrapper's own tokens are taken from the
  budget before the cut, and the wrapped prompt is cut again in the middle if re-tokenizing at the
  seam made it a token or two longer.
  """
  if max_prompt_tokens < 2:
    raise ValueError(f"max_prompt_tokens must be at least 2, got {max_prompt_tokens}")
  text = task.template.format(context=record.context, input=record.input)
  if not (chat_template and task.chat):
    return _middle_cut(encode_prompt(tokenizer, text, chat=False), max_prompt_tokens)
  content = list(tokenizer(text, add_special_tokens=False)["input_ids"])
  overhead = len(encode_prompt(tokenizer, "", chat=True))
  keep = max(max_prompt_tokens - overhead, 2)
  if len(content) > keep:
    # One decode of the spliced ids: LongBench decodes the halves apart and joins the strings, which
    # glues the two words at the seam together with tokenizers that drop a leading space.
    text = tokenizer.decode(_middle_cut(content, keep), skip_special_tokens=True)
  return _middle_cut(encode_prompt(tokenizer, text, chat=True), max_prompt_tokens)


def score_record(task: Task, record: Record, prediction: str) -> float:
  """One prediction's score in [0, 1]."""
  return metrics.score(task.metric, prediction, record.answers, record.all_classes, first_line_only=task.few_shot)


def evaluate_predictions(task: Task, records: Sequence[Record], predictions: Sequence[str]) -> float:
  """LongBench's reported figure: the mean score x 100 (0 for no records; LongBench rounds it to 2 places)."""
  if len(records) != len(predictions):
    raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
  if not records:
    return 0.0
  return 100.0 * sum(score_record(task, r, p) for r, p in zip(records, predictions)) / len(records)
