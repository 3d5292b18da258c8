"""Synthetic long documents with a hidden fact: for the demo and needle-in-a-haystack tests.

The filler is generated (no data files): plain declarative sentences from small word lists,
varied enough that the Chunk Adapter sees sentence boundaries and the model sees no repeats
to copy from. The same seed gives the same document.
"""

from __future__ import annotations

import numpy as np

_SUBJECTS = ["The committee", "A local farmer", "The old bridge", "Our neighbour", "The museum", "A young doctor",
             "The river", "The city council", "A small bakery", "The library", "An engineer", "The school band",
             "The harbour master", "A travelling writer", "The village choir", "The night train"]
_VERBS = ["described", "repaired", "visited", "ignored", "praised", "measured", "painted", "questioned",
          "photographed", "rebuilt", "studied", "celebrated", "counted", "moved", "cleaned", "opened"]
_OBJECTS = ["the northern road", "a wooden fence", "the market square", "an empty warehouse", "the summer garden",
            "a broken clock", "the public park", "an old map", "the stone church", "a green boat",
            "the west wing", "a quiet cafe", "the long corridor", "a copper kettle", "the hill path", "a red door"]
_TAILS = ["before the rain started", "on a cold Tuesday morning", "after a long meeting", "with great care",
          "for the third time this year", "while the crowd watched", "without telling anyone", "in the late evening",
          "as the sun went down", "during the spring festival", "with help from friends", "at an unusual hour"]


def filler_sentences(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  pick = lambda xs: xs[int(rng.integers(len(xs)))]
  return [f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}." for _ in range(n)]


def needle_document(tokenizer, n_tokens: int, depth: float, fact: str, seed: int = 0) -> str:
  """About `n_tokens` tokens of filler with `fact` inserted at `depth` (0: start, 1: end)."""
  per_sentence = max(len(tokenizer(" ".join(filler_sentences(20, seed)))["input_ids"]) // 20, 1)
  sentences = filler_sentences(max(n_tokens // per_sentence, 1), seed)
  sentences.insert(int(round(depth * len(sentences))), fact)
  return " ".join(sentences)


def passkey(seed: int = 0) -> str:
  return str(int(np.random.default_rng(seed + 1000).integers(10000, 99999)))


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int = 0) -> tuple[str, str]:
  """The demo's prompt: a passkey hidden at `depth` of an `n_tokens`-token document, then the
  question. Returns (text, passkey); the demo and its speed benchmark share it."""
  key = passkey(seed)
  doc = needle_document(tokenizer, n_tokens, depth, f"The secret passkey is {key}. Remember it, it is important.", seed)
  return f"{doc}\n\nWhat is the secret passkey? Answer with the number only.", key
