"""Short-text tasks: prompts that fit the KV budget whole, where ChunkLLM must change nothing.

The paper reports ChunkLLM comparable to vanilla on short-text benchmarks. Here that is checked in
its strongest form: with each method at its default settings (ChunkLLM: top-16 chunks + 4 local),
a prompt of a few dozen tokens is read whole, so ChunkLLM's greedy tokens must be exactly
vanilla's. The items (`eval/data/short_text.jsonl`) are multiple-choice questions (asked through
the chat template, answered with a letter) and sentence completions (plain text).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

from chunkllm_jax.prompts import encode_prompt, has_chat_template

DATA = Path(__file__).resolve().parent / "data" / "short_text.jsonl"


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  kind: str  # "choice" or "completion"
  prompt: str
  answers: tuple[str, ...]


def read_items(path: str | Path = DATA) -> list[Item]:
  """The items of a short-text JSONL; a malformed line is warned about (file:line) and skipped."""
  items = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        item = Item(str(obj["id"]), obj["kind"], obj["prompt"], tuple(obj["answers"]))
        if item.kind not in ("choice", "completion") or not item.answers:
          raise ValueError(f"kind must be 'choice' or 'completion' with answers, got {obj!r:.80}")
      except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}:{line_no}: skipped a malformed item: {e}", stacklevel=2)
        continue
      items.append(item)
  return items


def encode(tokenizer, item: Item) -> list[int]:
  """Questions through the chat template (when the tokenizer has one), completions as plain text."""
  return encode_prompt(tokenizer, item.prompt, chat=item.kind == "choice" and has_chat_template(tokenizer))


def score(item: Item, prediction: str) -> float:
  """choice: the first lone letter A-D of the prediction is the answer; completion: the first line
  holds an answer (case-insensitive)."""
  if item.kind == "choice":
    m = re.search(r"\b([A-D])\b", prediction)
    return float(m is not None and m.group(1) in item.answers)
  line = prediction.strip().split("\n")[0].lower()
  return float(any(a.lower() in line for a in item.answers))
