"""Stand-ins for the evaluation tests: a word tokenizer, and a whole `eval.run` with the model
calls stubbed out (counted, and killable after n results)."""

import types

import numpy as np

from eval import methods as M
from eval import perplexity as P
from eval import run as eval_run


class WordTokenizer:
  """One token a word; no chat template; ids are given in order of first sight."""

  chat_template = None

  def __init__(self):
    self.ids, self.words = {}, []

  def _id(self, w):
    if w not in self.ids:
      self.ids[w] = len(self.words)
      self.words.append(w)
    return self.ids[w]

  def __call__(self, text, add_special_tokens=True):
    if isinstance(text, list):
      return {"input_ids": [self(t)["input_ids"] for t in text]}
    return {"input_ids": [self._id(w) for w in text.split()]}

  def decode(self, ids, skip_special_tokens=True):
    return " ".join(self.words[i] if i < len(self.words) else "?" for i in ids)

  def batch_decode(self, rows):
    return [self.decode(r) for r in rows]

  def __len__(self):
    return 64


class Stubs:
  """Stands in for iter_method / token_logprobs: counts what is computed, can stop after n results."""

  def __init__(self, stop_after=None):
    self.computed, self.stop_after = [], stop_after

  def _tick(self, what):
    if self.stop_after is not None and len(self.computed) >= self.stop_after:
      raise KeyboardInterrupt  # the run is killed here
    self.computed.append(what)

  def iter_method(self, method, model, params, prompts, max_new_tokens, retention, settings=None, eos_ids=None):
    words = model.tokenizer.words
    for i, p in enumerate(prompts):
      self._tick((method, retention, tuple(p)))
      number = [t for t in p if words[t].strip(".").isdigit()][:1]  # "answers" with the first number
      yield i, number, dict(kv_retention=1.0 if retention in (None, 1.0) else retention, prefill_s=0.5,
                            decode_tok_s=20.0)

  def token_logprobs(self, method, params, docs, prefix, retention, settings):
    for d in docs:
      self._tick((method, retention, tuple(d)))
    lp = np.full((len(docs), len(docs[0]) - prefix), -2.0 if method == "vanilla" else -2.2)
    return lp, [dict(kv_retention=retention or 1.0, tok_s=100.0) for _ in docs]


FLAGS = ["--methods", "vanilla", "chunkllm", "sepllm", "--retention", "0.5", "0.25", "--niah_kinds", "single",
         "multivalue", "--niah_lengths", "64", "128", "--niah_depths", "0", "1", "--tasks", "mini_kv_qa",
         "--max_examples", "2", "--max_prompt_tokens", "200", "--ppl_tokens", "96", "--ppl_prefix", "32",
         "--ppl_docs", "2", "--filler", "generated"]
# niah: 8 cases x 5 (vanilla, 2 methods x 2 budgets); LongBench: 2 x 5; short text: 2 x 3; perplexity: 2 x 5
N_RESULTS = 8 * 5 + 2 * 5 + 2 * 3 + 2 * 5


def run_stubbed(monkeypatch, out, stubs, extra=()):
  monkeypatch.setattr(M, "iter_method", stubs.iter_method)
  monkeypatch.setattr(P, "token_logprobs", stubs.token_logprobs)
  cfg = types.SimpleNamespace(vocab_size=64, max_position=512, full_attention_layers=(0, 1, 2), head_dim=8)
  model = types.SimpleNamespace(config=cfg, tokenizer=WordTokenizer(), params=None)
  return eval_run.main([*FLAGS, "--out", str(out), *extra], model=model, params="params")
