"""Generate a small offline task set in LongBench's JSONL format, its answers planted in the context.

The real LongBench needs a download and hours of generation; this set (8 examples per task, ~3000-word
contexts, i.e. ~4K tokens) runs anywhere in minutes and still exercises LongBench's task forms:
single-document QA, multi-document QA, passage retrieval, passage count, few-shot classification
and code completion, each scored with LongBench's metric for that form (see `eval.longbench.MINI_TASKS`).
The filler is real prose, Brown-corpus sentences (one a line), so the text is not trivially
predictable; `--synthetic` uses `chunkllm_jax.haystack`'s generated sentences instead and needs no file.
The same seed and inputs give the same files.

  python -m eval.make_longbench_mini --out eval/data/longbench_mini --brown brown.txt
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Iterable

Filler = Callable[[random.Random, int], list[str]]  # (rng, n_words) -> about n_words of consecutive sentences
Example = tuple[str, str, list[str], list[str] | None]  # context, input, answers, all_classes

N_RETRIEVAL_PARAGRAPHS = 30  # LongBench's passage_retrieval_en shows 30, and its template says so
N_DOCS = 10  # passages in the multi-document QA context


def brown_filler(path: str | Path) -> Filler:
  """Runs of consecutive Brown sentences from a random line: real prose that reads on."""
  with open(path, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f if ln.strip()]
  if not lines:
    raise ValueError(f"{path}: no sentences")

  def run(rng: random.Random, n_words: int) -> list[str]:
    start = rng.randrange(len(lines))
    return _about(n_words, (lines[(start + i) % len(lines)] for i in range(len(lines))))

  return run


def synthetic_filler() -> Filler:
  from chunkllm_jax.haystack import filler_sentences  # imported here: it pulls in the package (and jax)

  def run(rng: random.Random, n_words: int) -> list[str]:
    return _about(n_words, filler_sentences(n_words // 6 + 1, seed=rng.randrange(2**31)))  # >= 8 words each

  return run


def _about(n_words: int, sentences: Iterable[str]) -> list[str]:
  """Leading sentences totalling about n_words: the next is taken if that lands nearer n_words (at least one)."""
  out, words = [], 0
  for s in sentences:
    n = len(s.split())
    if out and words + n - n_words > n_words - words:
      break
    out.append(s)
    words += n
    if words >= n_words:
      break
  return out


def _words(text: str) -> int:
  return len(text.split())


def _insert_at_random_depths(rng: random.Random, sentences: list[str], facts: list[str]) -> list[str]:
  out = list(sentences)
  for fact in facts:
    out.insert(rng.randint(0, len(out)), fact)
  return out


# ---- single-document QA: one keyed number among a few distractors (LongBench kv_retrieval style) ----

_COLORS = ["blue", "green", "amber", "crimson", "silver", "violet", "golden", "scarlet", "grey", "white"]
_THINGS = ["lantern", "compass", "teapot", "violin", "lighthouse", "telescope", "carriage", "clock tower",
           "music box", "sundial", "windmill", "typewriter"]


def make_kv_qa(rng: random.Random, filler: Filler, n_words: int) -> Example:
  keys = rng.sample([(c, t) for c in _COLORS for t in _THINGS], 4)  # the first is asked about
  codes = rng.sample(range(10000, 100000), len(keys))
  facts = [f"The secret code of the {c} {t} is {code}." for (c, t), code in zip(keys, codes)]
  sentences = _insert_at_random_depths(rng, filler(rng, n_words - 10 * len(facts)), facts)
  (color, thing), code = keys[0], codes[0]
  return " ".join(sentences), f"What is the secret code of the {color} {thing}?", [str(code)], None


# ---- multi-document QA: a fact in one of several passages, same-shaped distractors in others ----

_PLACES = ["Port Alden", "Marrow Point", "Kestrel Bay", "Fenwick Harbour", "Saltmere", "Cape Orrin", "Dunhollow",
           "Larkspur Sound", "Eastwick Quay", "Brannock Head"]
_FIRST = ["Maria", "Tobias", "Edith", "Anselm", "Greta", "Oskar", "Lucinda", "Bertram", "Ines", "Casimir"]
_LAST = ["Lindqvist", "Hallorann", "Mbeki", "Castellane", "Ferreira", "Oyelaran", "Whitcombe", "Novak", "Achterberg",
         "Quill"]
_FESTIVALS = ["Lantern", "Harvest Moon", "Blue Kite", "Iron Bell", "Juniper", "Salt and Honey", "Paper Boat",
              "Winter Fiddle"]
_TOWNS = ["Ashby Cross", "Millbrook", "Tarnwell", "Oakhurst", "Ravensmoor", "Little Penrose", "Hollins Ford",
          "Westerleigh", "Colbrook", "Fairhaven"]
_ORGS = ["Guild of River Pilots", "Northfield Chess Society", "Society of Glass Painters", "Order of Clockmakers",
         "League of Night Cartographers", "Company of Beekeepers"]
_SHIPS = ["Marigold", "Northern Star", "Patience", "Sea Wren", "Albatross", "Good Hope", "Cormorant", "Evening Tide"]

def _fact(rng: random.Random, form: int) -> tuple[str, str, str]:
  """(fact, question, answer) of one of four shapes, with freshly drawn names."""
  if form == 0:
    place, person = rng.choice(_PLACES), f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return f"The lighthouse keeper of {place} was {person}.", f"Who was the lighthouse keeper of {place}?", person
  if form == 1:
    fest, town = rng.choice(_FESTIVALS), rng.choice(_TOWNS)
    return (f"The {fest} festival is held every year in the town of {town}.",
            f"In which town is the {fest} festival held every year?", town)
  if form == 2:
    org, year = rng.choice(_ORGS), str(rng.randint(1620, 1910))
    return f"The {org} was founded in the year {year}.", f"In which year was the {org} founded?", year
  ship, port = rng.choice(_SHIPS), rng.choice(_PLACES)
  return f"The ship {ship} was built in the port of {port}.", f"In which port was the ship {ship} built?", port


def make_multidoc_qa(rng: random.Random, filler: Filler, n_words: int) -> Example:
  form = rng.randrange(4)
  target = _fact(rng, form)
  distractors: list[tuple[str, str, str]] = []
  while len(distractors) < 2:  # same shape, other keys, other answers: the keyed passage must be found
    d = _fact(rng, form)
    if d[1] != target[1] and d[2] != target[2] and all(d[1] != x[1] for x in distractors):
      distractors.append(d)
  passages = [filler(rng, n_words // N_DOCS) for _ in range(N_DOCS)]
  for where, (fact, _, _) in zip(rng.sample(range(N_DOCS), 3), [target, *distractors]):
    passages[where] = _insert_at_random_depths(rng, passages[where], [fact])
  context = "\n\n".join(f"Passage {i + 1}:\n{' '.join(p)}" for i, p in enumerate(passages))
  return context, target[1], [target[2]], None


# ---- passage retrieval: which paragraph a sentence was copied from (passage_retrieval_en's form) ----

def make_passage_retrieval(rng: random.Random, filler: Filler, n_words: int) -> Example:
  paragraphs = [filler(rng, n_words // N_RETRIEVAL_PARAGRAPHS) for _ in range(N_RETRIEVAL_PARAGRAPHS)]
  context = "\n\n".join(f"Paragraph {i + 1}: {' '.join(p)}" for i, p in enumerate(paragraphs))
  for k in rng.sample(range(N_RETRIEVAL_PARAGRAPHS), N_RETRIEVAL_PARAGRAPHS):
    # a long sentence that no other paragraph repeats names its paragraph
    sentences = [s for s in paragraphs[k] if _words(s) >= 10 and context.count(s) == 1]
    if sentences:
      return context, rng.choice(sentences), [f"Paragraph {k + 1}"], None
  raise RuntimeError("no paragraph has a unique sentence of 10+ words; the filler repeats itself too much")


# ---- passage count: unique paragraphs among repeats (passage_count's form) ----

def make_passage_count(rng: random.Random, filler: Filler, n_words: int) -> Example:
  n_slots = max(n_words // 150, 4)
  n_unique = rng.randint(max(2, n_slots // 3), n_slots - 1)
  unique = [" ".join(filler(rng, 150)) for _ in range(n_unique)]
  slots = unique + [rng.choice(unique) for _ in range(n_slots - n_unique)]
  rng.shuffle(slots)
  context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(slots))
  return context, "", [str(n_unique)], None


# ---- few-shot classification: the label follows from a keyword, shown in the examples (trec's form) ----

_CLASSES = {
    "Astronomy": ["telescope", "comet", "nebula", "meteor", "planet"],
    "Botany": ["orchid", "fern", "pollen", "seedling", "moss"],
    "Cooking": ["saucepan", "pastry", "oven", "recipe", "skillet"],
    "Finance": ["dividend", "mortgage", "ledger", "invoice", "bond"],
    "Music": ["violin", "melody", "chorus", "sonata", "drum"],
    "Sailing": ["mast", "rudder", "anchor", "keel", "jib"],
}
_LABEL_OF = {kw: label for label, kws in _CLASSES.items() for kw in kws}


def _short_sentence(rng: random.Random, filler: Filler) -> str:
  for _ in range(20):  # keep the examples short, so that many fit
    s = filler(rng, 1)[0]
    if 5 <= _words(s) <= 40:
      return s
  return s


def make_classification(rng: random.Random, filler: Filler, n_words: int) -> Example:
  keywords = sorted(_LABEL_OF)
  examples, used, words = [], set(), 0
  while words < n_words:
    kw = rng.choice(keywords)
    text = f"Text: {_short_sentence(rng, filler)} It mentions the {kw}.\nLabel: {_LABEL_OF[kw]}"
    examples.append(text)
    used.add(kw)
    words += _words(text)
  kw = rng.choice(sorted(used))  # a keyword the examples label
  query = f"Text: {_short_sentence(rng, filler)} It mentions the {kw}.\nLabel:"
  return "\n".join(examples), query, [_LABEL_OF[kw]], list(_CLASSES)


# ---- code completion: call a helper defined far up, with the arguments its signature names (repobench-p) ----

_VERBS = ["scale", "measure", "blend", "rotate", "count", "merge", "shift", "weigh", "balance", "trim", "estimate",
          "adjust"]
_NOUNS = ["comet", "harbour", "orchid", "lantern", "glacier", "meadow", "quarry", "beacon", "canyon", "orchard",
          "citadel", "estuary", "prairie", "lagoon", "summit", "valley"]
_QUANTITIES = ["ratio", "angle", "total", "weight", "score", "offset", "depth", "margin", "height", "yield"]
_VARS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
_OPS = ["+", "-", "*"]


def _function(rng: random.Random, verb: str, noun: str, quantity: str) -> tuple[str, list[str]]:
  params = rng.sample(_VARS, rng.randint(2, 3))
  expr = f" {rng.choice(_OPS)} ".join(f"{p} * {rng.randint(2, 9)}" if rng.random() < 0.5 else p for p in params)
  src = (f"def {verb}_{noun}_{quantity}({', '.join(params)}):\n"
         f"    \"\"\"{verb.capitalize()} the {noun} {quantity} from {', '.join(params[:-1])} and {params[-1]}.\"\"\"\n"
         f"    value = {expr}\n"
         f"    return value {rng.choice(_OPS)} {rng.randint(1, 20)}\n")
  return src, params


def make_code(rng: random.Random, filler: Filler, n_words: int) -> Example:
  del filler  # code has its own text
  names = [(v, n, q) for v in _VERBS for n in _NOUNS for q in _QUANTITIES]
  rng.shuffle(names)
  functions, words = [], 0
  for name in names:
    src, params = _function(rng, *name)
    functions.append((name, params, src))
    words += _words(src)
    if words >= n_words:
      break
  context = "# Path: survey/helpers.py\n\"\"\"Small helpers for the field survey.\"\"\"\n\n\n" + "\n\n".join(
      src for _, _, src in functions) + "\n\n"
  values = ", ".join(str(rng.randint(1, 9)) for _ in _VARS)
  calls = rng.sample(range(len(functions)), 4)  # three shown calls set the pattern; the fourth is asked

  def call(k: int) -> tuple[str, str]:
    (verb, noun, quantity), params, _ = functions[k]
    return f"# {verb} the {noun} {quantity}", f"{noun}_{quantity} = {verb}_{noun}_{quantity}({', '.join(params)})"

  shown = "".join(f"{comment}\n{line}\n" for comment, line in map(call, calls[:3]))
  comment, answer = call(calls[3])
  query = (f"# Path: survey/report.py\nfrom survey.helpers import *\n\n{', '.join(_VARS)} = {values}\n\n"
           f"{shown}{comment}\n")
  return context, query, [answer], None


MAKERS: dict[str, Callable[[random.Random, Filler, int], Example]] = {
    "mini_kv_qa": make_kv_qa,
    "mini_multidoc_qa": make_multidoc_qa,
    "mini_passage_retrieval": make_passage_retrieval,
    "mini_passage_count": make_passage_count,
    "mini_classification": make_classification,
    "mini_code": make_code,
}


def make_records(task: str, filler: Filler, n: int, n_words: int, seed: int) -> list[dict]:
  """`n` LongBench-format records of `task`; the same seed, filler and sizes give the same records."""
  rng = random.Random(f"{seed}/{task}")  # a str seed hashes the same on every run and platform
  records = []
  for i in range(n):
    context, query, answers, classes = MAKERS[task](rng, filler, n_words)
    records.append({"input": query, "context": context, "answers": answers, "length": _words(context),
                    "dataset": task, "language": "en", "all_classes": classes, "_id": f"{task}-s{seed}-{i}"})
  return records


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="eval/data/longbench_mini", help="directory for the <task>.jsonl files")
  # not required: --synthetic needs no file
  p.add_argument("--brown", help="filler: Brown sentences, one a line (train.prepare_brown)")
  p.add_argument("--synthetic", action="store_true", help="generated filler sentences instead (no data file)")
  p.add_argument("--n", type=int, default=8, help="examples per task")
  p.add_argument("--context_words", "--context_tokens", dest="context_words", type=int, default=3000,
                 help="about this many words of context per example (LongBench's `length`; ~1.3 tokens a word)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tasks", default=",".join(MAKERS), help="comma-separated subset of: " + ", ".join(MAKERS))
  args = p.parse_args(argv)
  if not args.synthetic and not args.brown:
    p.error("give the filler: --brown FILE (Brown sentences, one a line), or --synthetic")

  filler = synthetic_filler() if args.synthetic else brown_filler(args.brown)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for task in args.tasks.split(","):
    if task not in MAKERS:
      p.error(f"unknown task {task!r}")
    records = make_records(task, filler, args.n, args.context_words, args.seed)
    path = out / f"{task}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    mean = sum(r["length"] for r in records) / len(records)
    print(f"{path}: {len(records)} records, {mean:.0f} words of context on average")


if __name__ == "__main__":
  main()
