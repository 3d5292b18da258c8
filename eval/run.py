"""python -m eval.run: ChunkLLM and the baselines against vanilla, at matched KV budgets.

Suites: needle in a haystack (a grid of context lengths x depths, three kinds), LongBench-format
tasks (the shipped mini set, or the real LongBench with --longbench_dir), perplexity by position
on long text, and short-text prompts. Every method is a selection over the same KV buffer
(eval/methods.py), and every score is reported beside the KV retention the run measured.

Results go to <out>/results.jsonl, one line per (task, method, retention, example), written as
they come; a rerun with the same --out skips what is there (an interrupted run resumes). Then
<out>/summary.json, <out>/results.md (tables) and the plots (<out>/niah_<method>.png,
<out>/perplexity.png). --out is a new or empty folder, or one of eval.run's own (it holds the
run_config.json that eval.run wrote); any other is refused, so that no user's file is replaced.

  python -m eval.run --model smollm2-135m --methods all
  python -m eval.run --quick --out /tmp/eval_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from chunkllm_jax import checks
from chunkllm_jax.chunk_config import (PER_HEAD_FIELDS, SCORE_ESTIMATES, SCORE_SKETCH_BITS, SELECTIONS,
                                       SKETCH_ESTIMATES, ChunkConfig)
from chunkllm_jax.prompts import encode_prompt, has_chat_template
from eval import longbench
from eval import methods as M
from eval import niah
from eval import perplexity as ppl
from eval import short_text
from eval import report
from eval.report import FULL  # vanilla's retention label: it reads everything
from eval.results_io import ResultsFile, is_run_config, result_key, retention_label

REPO = Path(__file__).resolve().parents[1]
BROWN = REPO.parent / "shared" / "data" / "brown.txt"
MINI_DIR = REPO / "eval" / "data" / "longbench_mini"
SUITES = ("niah", "longbench", "ppl", "short")



def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m", help="registered name, HF dir or .gguf file")
  p.add_argument("--adapters", default=None, help="adapter export dir or registered name (default: --model)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--methods", nargs="+", default=["all"],
                 help=f"'all' or some of: {' '.join(M.METHODS)} ('all' leaves out oracle unless --selection shared: "
                      "where each KV head makes decode's selections, oracle is hybrid)")
  p.add_argument("--retention", nargs="+", type=float, default=None,
                 help="KV budgets as fractions of the tokens seen (default 0.5 0.25)")
  p.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
  p.add_argument("--niah_kinds", nargs="+", default=None, choices=niah.KINDS, help="default: all three")
  p.add_argument("--niah_lengths", nargs="+", type=int, default=None, help="haystack tokens (default 1024 2048 4096)")
  p.add_argument("--niah_depths", nargs="+", type=float, default=None, help="default 0 0.25 0.5 0.75 1")
  p.add_argument("--niah_samples", type=int, default=1, help="needles per grid cell")
  p.add_argument("--needle_placement", choices=niah.NEEDLE_PLACEMENTS, default=niah.NEEDLE_PLACEMENTS[0],
                 help="where the target needle goes: at its depth in tokens, or at that share of the sentences "
                      "(how the rows of docs/results.md measured before 6 December 2026 were placed)")
  p.add_argument("--niah_max_new", type=int, default=32)
  p.add_argument("--filler", choices=["brown", "generated", "repeated", "python"], default=None,
                 help="haystack and perplexity text (default: brown when --brown exists); repeated: the passkey "
                      "test's five sentences over and over (needles only); python: the source of the installed "
                      "numpy and jax, a needle on a line of its own (needles only)")
  p.add_argument("--brown", default=str(BROWN), help="one-sentence-a-line text, blank lines between documents")
  p.add_argument("--tasks", nargs="+", default=None,
                 help="LongBench-format tasks (default: the mini set: " + " ".join(longbench.MINI_TASKS) + "; with "
                      "--longbench_dir, the LongBench datasets that folder has a <dataset>.jsonl of)")
  p.add_argument("--longbench_dir", default=None, help="folder of the real LongBench's <dataset>.jsonl files")
  p.add_argument("--max_examples", type=int, default=None, help="per LongBench task, and short-text items")
  p.add_argument("--max_prompt_tokens", type=int, default=None,
                 help="LongBench prompts are cut in the middle to this (default: the model's context minus the "
                      "task's generation length)")
  p.add_argument("--ppl_tokens", type=int, default=2048, help="tokens per perplexity text")
  p.add_argument("--ppl_prefix", type=int, default=256, help="prefilled tokens before scoring starts")
  p.add_argument("--ppl_docs", type=int, default=4)
  p.add_argument("--ppl_bins", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=4, help="prompts per batch (of similar lengths)")
  p.add_argument("--chunk_len", type=float, default=None,
                 help="assume this ChunkLLM mean chunk length for the budgets (default: measured on each batch)")
  p.add_argument("--fix_chunk_len", type=int, default=None,
                 help="fixllm's chunk length (default: ChunkLLM's measured mean, rounded)")
  p.add_argument("--window", type=int, default=256, help="streamingllm/sepllm window where no budget is set")
  p.add_argument("--vote", default="sum", choices=["sum", "max"],
                 help="chunkllm / fixllm, and hybrid / oracle with --selection shared: how the selection layers "
                      "make one selection (ChunkConfig.vote)")
  p.add_argument("--selection_layers", type=int, nargs="+", default=None,
                 help="the layers whose scores choose the shared rule's selections, as --vote's methods read them "
                      "(default: the adapters' stored choice)")
  p.add_argument("--boundary_tokens", action=argparse.BooleanOptionalAction, default=M.MethodSettings.boundary_tokens,
                 help="hybrid / oracle (the methods that read the prompt densely): also read the last token "
                      "of every chunk left out (ChunkConfig.boundary_tokens; default on)")
  p.add_argument("--boundary_share", type=float, default=M.MethodSettings.boundary_share,
                 help="hybrid / oracle with boundary tokens: the most of what the budget leaves after the sinks, "
                      "local and open chunk that the last tokens take, the newest first (ChunkConfig."
                      "boundary_share, in (0, 1]; default %(default)s; 1: every one)")
  p.add_argument("--recent_share", type=float, default=M.MethodSettings.recent_share,
                 help="hybrid / oracle: the share of the KV budget that the most recent chunks get first "
                      "(ChunkConfig.recent_share, in [0, 1]; default %(default)s)")
  p.add_argument("--kv_budget_min_tokens", type=int, default=0,
                 help="hybrid / oracle: the fewest tokens a step reads (ChunkConfig.kv_budget_min_tokens); the "
                      "budget's share is fitted under it so that the measured retention meets the target")
  p.add_argument("--selection", default=M.MethodSettings.selection, choices=SELECTIONS,
                 help="hybrid / oracle: who makes decode's selections (ChunkConfig.selection: 'kv_head', the "
                      "default, each KV head of each sparse layer at every step, or 'shared', the paper's rule)")
  p.add_argument("--score_rank", type=int, default=None,
                 help="with --selection kv_head: the size of each step's score estimate, in dimensions or "
                      "coordinates of K (ChunkConfig.score_rank; default: a quarter of the head dimension)")
  p.add_argument("--score_estimate", default=M.MethodSettings.score_estimate, choices=SCORE_ESTIMATES,
                 help="with --selection kv_head: each key's coordinates in a basis of its KV head's prompt keys "
                      "(lowrank, the default), SparQ's dimensions of K (sparq) or the exact mass (exact) "
                      "(ChunkConfig.score_estimate)")
  p.add_argument("--score_sketch", type=int, default=None,
                 help="with --score_estimate lowrank: bits of a 1-bit random sketch of what each key's basis "
                      "misses, in place of the bound on that part (ChunkConfig.score_sketch; a multiple of 32; "
                      "0: the bound; default %d)" % SCORE_SKETCH_BITS)
  p.add_argument("--sketch_estimate", default=M.MethodSettings.sketch_estimate, choices=SKETCH_ESTIMATES,
                 help="with --score_sketch: the angle from the Hamming distance of both sides' signs (simhash, the "
                      "default) or QJL's unbiased estimate from the query's projection (qjl) "
                      "(ChunkConfig.sketch_estimate)")
  p.add_argument("--head_refresh", type=int, default=M.MethodSettings.head_refresh,
                 help="with --selection kv_head: the heads choose every N steps and after each chunk closes, and "
                      "read their last choice between (ChunkConfig.head_refresh; default 1, every step)")
  p.add_argument("--page_len", type=int, default=None,
                 help="hybrid / oracle: select fixed pages of this many tokens instead of the Chunk Adapter's "
                      "chunks (ChunkConfig boundaries='fixed', max_chunk_len; default: the chunks)")
  p.add_argument("--past_context", action="store_true",
                 help="run prompts past the model's trained context on purpose (refused otherwise): the figures "
                      "then measure the model beyond its positions, every method alike")
  p.add_argument("--seed", type=int, default=0, help="needles and perplexity texts")
  p.add_argument("--out", default="eval_results")
  p.add_argument("--vanilla_from", default=None, metavar="DIR",
                 help="copy vanilla's rows from another folder of eval.run's, made with the same model, texts, "
                      "examples and scoring (checked; its other settings are the sparse methods'), so that a sweep "
                      "of ChunkLLM's settings runs vanilla once")
  p.add_argument("--quick", action="store_true",
                 help="a tiny smoke run: vanilla and hybrid (chunk_generate's defaults; unless --methods), retention 0.5, one 192-token "
                      "needle, a 96-token perplexity text, two short-text items; LongBench only with --tasks "
                      "(then one example cut to 256 tokens)")
  return p


class UsageError(ValueError):
  """A flag or input that cannot work: one `error:` line and exit code 2 from the command line."""


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  prompt: list[int]
  score: Callable[[str], dict]  # prediction text -> score fields (`score` in [0, 1], and more)
  meta: dict


def _resolve(args) -> argparse.Namespace:
  """Fills the defaults that depend on --quick, and checks the flags."""
  q = args.quick
  if args.methods == ["all"]:
    args.methods = ["vanilla", "hybrid"] if q else list(M.METHODS)  # quick: the library's defaults
    if args.selection != "shared" and "oracle" in args.methods:
      # Each KV head makes decode's selections from its own query's attention, and hybrid scores nothing else:
      # oracle's scorer is the shared rule's, which ChunkConfig refuses with the per-head rule.
      args.methods.remove("oracle")
  elif "oracle" in args.methods and args.selection != "shared":
    raise UsageError("oracle is the shared rule scored by the frozen attention (scorer='attention'); with --selection "
                     f"{args.selection} each KV head already chooses by its own attention, as hybrid does: add "
                     "--selection shared, or leave oracle out")
  bad = sorted(set(args.methods) - set(M.METHODS))
  if bad:
    raise UsageError(f"unknown methods {bad}; known: {' '.join(M.METHODS)} (or all)")
  voting = [m for m in args.methods
            if m in ("chunkllm", "fixllm", "oracle") or (m == "hybrid" and args.selection == "shared")]
  if (args.vote != "sum" or args.selection_layers is not None) and not voting:
    raise UsageError("--vote and --selection_layers set how the selection layers vote for the shared rule's chunks "
                     "(chunkllm, fixllm, and hybrid and oracle with --selection shared); none of --methods "
                     f"{' '.join(args.methods)} votes (with --selection {args.selection} each KV head chooses by its "
                     "own query): add --selection shared, or leave them out")
  if args.vanilla_from:  # the copied rows are this run's vanilla: reported with the rest
    args.methods = list({"vanilla", *args.methods})
  args.methods = [m for m in M.METHODS if m in args.methods]  # vanilla first
  args.retention = args.retention or ([0.5] if q else [0.5, 0.25])
  if any(not 0 < r <= 1 for r in args.retention):
    raise UsageError(f"retention targets must be in (0, 1], got {args.retention}")
  if not 0.0 < args.boundary_share <= 1.0:
    raise UsageError(f"--boundary_share is a share of what the budget leaves, in (0, 1]; got {args.boundary_share} "
                     "(--no-boundary_tokens reads no last token)")
  if not 0.0 <= args.recent_share <= 1.0:
    raise UsageError(f"--recent_share is a share of the KV budget, in [0, 1]; got {args.recent_share}")
  if args.kv_budget_min_tokens < 0:
    raise UsageError(f"--kv_budget_min_tokens is a token count, >= 0; got {args.kv_budget_min_tokens}")
  try:  # the selection rule's own checks (ChunkConfig.validate), before anything loads
    ChunkConfig(**_selection_rule(args)).validate(max_len=1 << 20, n_layers=1)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--selection / --score_* / --head_refresh: {e}") from None
  args.niah_kinds = (["single"] if q else list(niah.KINDS)) if args.niah_kinds is None else args.niah_kinds
  args.niah_lengths = args.niah_lengths or ([192] if q else [1024, 2048, 4096])
  args.niah_depths = args.niah_depths or ([0.5] if q else [0.0, 0.25, 0.5, 0.75, 1.0])
  if q:
    args.niah_max_new = min(args.niah_max_new, 12)  # a 5-digit key is 5 tokens, after 'The pass key is'
  if args.tasks is None:  # each task costs --quick a compile or two
    args.tasks = [] if q else _default_tasks(args.longbench_dir)
  _check_tasks(args)
  args.max_examples = (1 if q else None) if args.max_examples is None else args.max_examples
  if q:
    args.max_prompt_tokens = 256 if args.max_prompt_tokens is None else args.max_prompt_tokens
    args.ppl_tokens, args.ppl_prefix, args.ppl_docs = min(args.ppl_tokens, 96), min(args.ppl_prefix, 64), 1
    args.ppl_bins = min(args.ppl_bins, 4)
  if args.brown != str(BROWN) and not Path(args.brown).is_file():  # a path the user gave: never generated in its place
    raise UsageError(f"--brown {args.brown} does not exist (or is not a file): give a UTF-8 text file, one sentence "
                     "a line")
  if args.filler is None:
    args.filler = "brown" if Path(args.brown).exists() else "generated"
    if args.filler == "generated":  # the default text is not beside this checkout: say so, not in silence
      print(f"note: no Brown text at --brown {args.brown}: the haystacks and perplexity texts are generated "
            "(--filler generated); give --brown FILE for real text", file=sys.stderr)
  if args.filler == "brown" and not Path(args.brown).is_file():
    raise UsageError(f"--filler brown needs the text file --brown {args.brown}")
  if args.filler == "brown":  # empty or not text: said now, not after the model loads
    from train.tfds_builder import DataError, check_text_file

    try:
      check_text_file(args.brown)
    except DataError as e:
      raise UsageError(f"--brown {e}") from None
  if args.filler == "repeated" and "ppl" in args.suites:
    raise UsageError("--filler repeated is a haystack for needles: the perplexity of five sentences over and over "
                     "measures nothing; leave ppl out of --suites or give another filler")
  if args.filler == "python" and "ppl" in args.suites:
    raise UsageError("--filler python is a haystack for needles (the perplexity texts are --brown's or generated); "
                     "leave ppl out of --suites or give another filler")
  _check_counts(args)
  out = Path(args.out).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {args.out} is a file; give a folder for the results")
  existing = next(p for p in [out, *out.parents] if p.exists())
  if not existing.is_dir():
    raise UsageError(f"--out {args.out} cannot be made: {existing} is a file; give a folder for the results")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"--out {args.out} cannot be written ({existing} does not let this user create files)")
  try:  # results.md, summary.json and the plots are rewritten by name: only in a folder of eval.run's own
    checks.check_out_folder(out, "--out", "eval.run", "run_config.json", is_run_config)
  except checks.OutFolderError as e:
    raise UsageError(str(e)) from None
  return args


def _default_tasks(longbench_dir) -> list[str]:
  """The shipped mini set; with --longbench_dir, the LongBench datasets that folder has a file of."""
  if longbench_dir is None or not Path(longbench_dir).is_dir():
    return list(longbench.MINI_TASKS)
  found = [t for t in longbench.LONGBENCH_TASKS if longbench.task_file(longbench_dir, t).is_file()]
  if not found:
    raise UsageError(f"--longbench_dir {longbench_dir} has no file of a known LongBench dataset (<dataset>.jsonl: "
                     f"{', '.join(longbench.LONGBENCH_TASKS)})")
  return found


def _task_dir(args, task: str) -> Path:
  """Where a task's file is: the mini tasks ship with the project, the LongBench datasets are --longbench_dir's."""
  return MINI_DIR if task in longbench.MINI_TASKS else Path(args.longbench_dir)


def _check_tasks(args) -> None:
  """Unknown tasks and missing LongBench files, named before the model is loaded."""
  if args.longbench_dir is not None and not Path(args.longbench_dir).is_dir():
    raise UsageError(f"--longbench_dir {args.longbench_dir} is not a folder; give the folder of LongBench's "
                     "<dataset>.jsonl files")
  for t in args.tasks:
    try:
      longbench.get_task(t)
    except ValueError as e:
      raise UsageError(str(e)) from None
    if t not in longbench.MINI_TASKS and args.longbench_dir is None:
      raise UsageError(f"task {t!r} is a LongBench dataset: give --longbench_dir DIR")
    if "longbench" not in args.suites:
      continue
    path, skipped = longbench.task_file(_task_dir(args, t), t), []
    if not path.is_file():
      raise UsageError(f"task {t!r} has no file {path}; put LongBench's {t}.jsonl there, or leave the task out")
    with warnings.catch_warnings():  # a file of no readable record would make a table scored on nothing (the run
      #                                 names each malformed line when it reads the file)
      warnings.simplefilter("ignore")
      first = next(iter(longbench.read_jsonl(path, skipped)), None)
    if first is None:
      raise UsageError(f"task {t!r}: {path} holds no readable record" + (
          f" ({len(skipped)} malformed line(s); the first, line {skipped[0].line}: {skipped[0].reason})"
          if skipped else " (it is empty)"))


def _check_counts(args) -> None:
  least = dict(niah_samples=1, niah_max_new=1, ppl_tokens=2, ppl_prefix=1, ppl_docs=1, ppl_bins=1, batch_size=1,
               window=1)
  for name, n in least.items():
    if getattr(args, name) < n:
      raise UsageError(f"--{name} {getattr(args, name)} is too small: give {n} or more")
  for name in ("max_examples", "max_prompt_tokens", "fix_chunk_len", "page_len"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise UsageError(f"--{name} {getattr(args, name)} is too small: give 1 or more")
  if any(n < 1 for n in args.niah_lengths) or any(not 0 <= d <= 1 for d in args.niah_depths):
    raise UsageError(f"--niah_lengths must be >= 1 and --niah_depths in [0, 1]; got {args.niah_lengths}, "
                     f"{args.niah_depths}")
  if args.ppl_prefix >= args.ppl_tokens:
    raise UsageError(f"--ppl_prefix {args.ppl_prefix} leaves nothing to score in --ppl_tokens {args.ppl_tokens}")
  if args.chunk_len is not None and not 1 <= args.chunk_len < float("inf"):  # also refuses nan; 0 read as unset
    raise UsageError(f"--chunk_len {args.chunk_len} is not a mean chunk length: give 1 or more (or leave it out: "
                     "measured on each batch)")


_SELECTION_RULE = ("selection", *PER_HEAD_FIELDS)


def _selection_rule(args) -> dict:
  """The flags of decode's selection rule, as ChunkConfig's fields of the same names."""
  return {k: getattr(args, k) for k in _SELECTION_RULE}


def _selection_key(settings: dict) -> dict:
  """The selection rule of a fingerprint as what it does: the shared rule has no per-head settings (folders
  of the shared rule recorded the per-head defaults of their day), the sketch is read only where kept, and
  the last tokens' share only where they are read."""
  if "boundary_tokens" in settings and not settings["boundary_tokens"]:
    settings = dict(settings, boundary_share=None)
  if settings["selection"] == "shared":
    return dict(settings, score_rank=None, score_estimate=None, score_sketch=0, sketch_estimate=None, head_refresh=1)
  sketch = ChunkConfig(**{k: settings[k] for k in _SELECTION_RULE}).sketch_bits
  return dict(settings, score_sketch=sketch, sketch_estimate=settings["sketch_estimate"] if sketch else None)


def _fingerprint(args) -> dict:
  """The settings that change what a result is: a resumed run must share them."""
  keys = ["model", "adapters", "dtype", "filler", "niah_max_new", "max_prompt_tokens", "ppl_prefix", "ppl_bins",
          "chunk_len", "fix_chunk_len", "window", "seed", "longbench_dir", "vote", "selection_layers",
          "boundary_tokens", "boundary_share", "recent_share", "kv_budget_min_tokens", "selection", "score_rank",
          "score_estimate", "score_sketch", "sketch_estimate", "head_refresh", "page_len"]
  fp = {k: getattr(args, k) for k in keys}
  fp["brown"] = text_id(args.brown) if args.filler == "brown" else None
  if args.filler == "python":  # the haystack is the installed packages' source: it changes with their versions
    fp["python_filler"] = niah.python_versions()
  fp["adapters"] = adapters_id(args.adapters)
  if "niah" in args.suites:  # how the needle is placed decides the examples; a folder of other ones stays whole
    fp["needle_placement"] = args.needle_placement
  return _selection_key(fp)


def text_id(path) -> str:
  """The filler text by its name and contents, not its path: a folder of results moves with its repository."""
  import hashlib
  digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
  return f"{Path(path).name} sha256:{digest}"


def adapters_id(adapters):
  """An adapter export folder by its name and the contents of its files, not its path (a registered
  name, or None for the model's own, stays as given)."""
  if adapters is None or not Path(adapters).is_dir():
    return adapters
  import hashlib
  digest = hashlib.sha256()
  for f in sorted(q for q in Path(adapters).rglob("*") if q.is_file()):
    digest.update(f.relative_to(adapters).as_posix().encode() + b"\0" + f.read_bytes())
  return f"{Path(adapters).resolve().name} sha256:{digest.hexdigest()[:16]}"


def _same_setting(key: str, old, new) -> bool:
  """Folders written before the filler text and the adapter export were fingerprinted by contents hold
  their paths: a path that still exists must hold the same contents; one that does not, the same name."""
  if key in ("brown", "adapters") and isinstance(old, str) and isinstance(new, str) and " sha256:" in new \
      and " sha256:" not in old:
    if Path(old).exists():
      return (text_id(old) if key == "brown" else adapters_id(old)) == new
    return Path(old).name == new.split(" sha256:")[0]
  return old == new


_ADDED_LATER = {"vote": "sum", "selection_layers": None, "boundary_tokens": False, "boundary_share": 1.0,
                "recent_share": 0.0, "kv_budget_min_tokens": 0, "selection": "shared", "score_rank": None, "score_estimate": "sparq",
                "score_sketch": 0, "head_refresh": 1, "page_len": None,
                "needle_placement": "sentences"}  # settings newer than some result folders: what those folders used


def _settings_of(run_config: dict) -> dict:
  """A folder's recorded settings, with what the folders older than a setting used."""
  old = {**_ADDED_LATER, **run_config}
  if "sketch_estimate" not in run_config:  # before it was a setting, a sketch was read with QJL's estimate
    old["sketch_estimate"] = "qjl" if old["score_sketch"] else SKETCH_ESTIMATES[0]
  if old["score_estimate"] == "sparq" and old["score_rank"] is None and old["selection"] == "kv_head":
    old["score_estimate"] = "exact"  # before "exact" was an estimate's name, no score_rank meant the exact mass
  return _selection_key(old)


def _check_fingerprint(out: Path, fp: dict) -> None:
  """Refuses to add results of other settings to a folder's results.jsonl. Only results are guarded:
  without a results.jsonl, an old run_config.json is simply replaced (see `_write_fingerprint`)."""
  path = out / "run_config.json"
  if path.exists() and (out / "results.jsonl").exists():
    try:
      old = _settings_of(json.loads(path.read_text()))
    except ValueError:
      raise UsageError(f"{path} is damaged, so the settings of {out / 'results.jsonl'} are unknown; use another "
                       "--out, or delete that results.jsonl") from None
    diff = {k: (old.get(k), v) for k, v in fp.items() if not _same_setting(k, old.get(k), v)}
    if diff:
      raise UsageError(f"{out} holds results made with other settings {diff} (old, new); "
                       f"use another --out, or delete {out / 'results.jsonl'} to start over there")


# Settings of the sparse methods alone: vanilla reads everything, whatever they are.
VANILLA_BLIND = ("adapters", "chunk_len", "fix_chunk_len", "window", "vote", "selection_layers", "boundary_tokens",
                 "boundary_share", "recent_share", "kv_budget_min_tokens", "selection", "score_rank",
                 "score_estimate", "score_sketch", "sketch_estimate", "head_refresh", "page_len")


def _check_vanilla_source(src: Path, fp: dict) -> None:
  """Refuses a --vanilla_from folder that is not eval.run's, or whose settings differ from `fp` beyond
  `VANILLA_BLIND`: its vanilla rows must be this run's (the same model, texts, examples and scoring)."""
  config, rows = src / "run_config.json", src / "results.jsonl"
  if not (config.is_file() and rows.is_file()):
    raise UsageError(f"--vanilla_from {src}: not a folder of eval.run's results (no run_config.json and "
                     "results.jsonl there)")
  try:
    old = _settings_of(json.loads(config.read_text()))
  except ValueError:
    raise UsageError(f"--vanilla_from {src}: {config} is damaged, so its rows' settings are unknown") from None
  diff = {k: (old.get(k), v) for k, v in fp.items()
          if k not in VANILLA_BLIND and not _same_setting(k, old.get(k), v)}
  if diff:
    raise UsageError(f"--vanilla_from {src}: its vanilla ran with other settings {diff} (theirs, this run's)")


def _copy_vanilla_rows(src: Path, results: ResultsFile) -> int:
  """Appends to `results` the vanilla rows of `src` (checked by `_check_vanilla_source`) that it lacks, each
  marked with the folder it came from; returns how many."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a malformed line there is simply not copied: vanilla runs for it here
    source = ResultsFile(src / "results.jsonl")
  copied = [r for r in source.records if r["method"] == "vanilla" and result_key(r) not in results]
  for r in copied:
    results.append(dict(r, copied_from=r.get("copied_from", src.resolve().name)))
  return len(copied)


def _write_fingerprint(out: Path, fp: dict) -> None:
  """Written only once the model, the adapters and the examples are checked: a refused run leaves nothing
  that would refuse its corrected re-run."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / "run_config.json"
  if not path.exists() or not (out / "results.jsonl").exists():
    path.write_text(json.dumps(fp, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# The examples of each suite


def niah_examples(args, tokenizer) -> dict[str, list[Example]]:
  joiner = " "
  if args.filler == "brown":
    brown = niah.eval_documents(niah.read_sentences(args.brown))
  elif args.filler == "python":  # lines of code, a needle on a line of its own
    brown, joiner = niah.eval_documents(niah.read_python_documents()), "\n"
  else:  # the passkey test's sentences, or None: generated ones
    brown = niah.REPEATED if args.filler == "repeated" else None
  cases = niah.grid(tokenizer, args.niah_kinds, args.niah_lengths, args.niah_depths, args.niah_samples, brown,
                    seed=args.seed, placement=args.needle_placement, joiner=joiner)
  out: dict[str, list[Example]] = defaultdict(list)
  chat = has_chat_template(tokenizer)
  for case in cases:
    def score(text, case=case):
      s, recall = niah.score(case, text)
      return dict(score=s, recall=recall)
    ids = encode_prompt(tokenizer, niah.prompt_text(case, chat), chat=chat)
    out[f"niah_{case.kind}"].append(Example(case.example_id, ids, score, dict(
        kind=case.kind, length=case.length, depth=case.depth, answers=list(case.answers))))
  return dict(out)


def longbench_examples(args, tokenizer, max_position: int) -> dict[str, list[Example]]:
  out = {}
  for name in args.tasks:
    task = longbench.get_task(name)
    path = longbench.task_file(_task_dir(args, name), name)
    records = list(longbench.read_jsonl(path))[: args.max_examples]
    budget = args.max_prompt_tokens or max_position - task.max_new_tokens
    chat = has_chat_template(tokenizer)
    examples = []
    for r in records:
      ids = longbench.build_prompt(tokenizer, r, task, budget, chat_template=chat)
      examples.append(Example(r.id, ids, lambda text, r=r, task=task: dict(score=longbench.score_record(task, r, text)),
                              dict(answers=r.answers)))
    out[name] = examples
  return out


def short_examples(args, tokenizer) -> list[Example]:
  items = short_text.read_items()
  if args.quick:  # one of each kind
    items = [next(i for i in items if i.kind == k) for k in ("choice", "completion")]
  elif args.max_examples:
    items = items[: args.max_examples]
  return [Example(i.id, short_text.encode(tokenizer, i), lambda text, i=i: dict(score=short_text.score(i, text)),
                  dict(kind=i.kind, answers=list(i.answers))) for i in items]


# ----------------------------------------------------------------------------------------------
# Running


class Runner:
  def __init__(self, args, model, params, settings, results: ResultsFile):
    self.args, self.model, self.params, self.settings, self.results = args, model, params, settings, results
    self.planned: set[tuple] = set()  # every key this run asks for (the summary covers these)

  def jobs(self, task: str, methods: Sequence[str], retentions: Sequence[float | None], example_ids):
    """(method, retention, label, pending ids) for each method and budget; vanilla runs once."""
    out = []
    for m in methods:
      for r in ([1.0] if m == "vanilla" else retentions):
        label = FULL if m == "vanilla" else retention_label(r)
        keys = [(task, m, label, e) for e in example_ids]
        self.planned.update(keys)
        out.append((m, r, label, [k[3] for k in self.results.missing(keys)]))
    return out

  def generation(self, task: str, examples: list[Example], max_new: int, retentions, bar) -> None:
    by_id = {e.id: e for e in examples}
    for method, r, label, pending in self.jobs(task, self.args.methods, retentions, list(by_id)):
      if not pending:
        continue
      bar.set_postfix_str(f"{task} {method} r={label}")
      todo = [by_id[i] for i in pending]
      for i, new, stats in M.iter_method(method, self.model, self.params, [e.prompt for e in todo], max_new, r,
                                         self.settings):
        e = todo[i]
        text = self.model.tokenizer.decode(new, skip_special_tokens=True)
        self.results.append(dict(task=task, method=method, retention=label, example=e.id, prediction=text,
                                 new_tokens=new, prompt_tokens=len(e.prompt), **e.score(text), **e.meta,
                                 **stats))
        bar.update()

  def perplexity(self, docs: list[list[int]], bar) -> None:
    a = self.args
    ids = [f"doc{i}-N{a.ppl_tokens}" for i in range(len(docs))]
    edges = ppl.position_bins(a.ppl_prefix, a.ppl_tokens, a.ppl_bins)
    for method, r, label, pending in self.jobs("perplexity", self.args.methods, self.args.retention, ids):
      bar.set_postfix_str(f"perplexity {method} r={label}")
      todo = [ids.index(i) for i in pending]
      for start in range(0, len(todo), self.settings.batch_size):
        batch = todo[start: start + self.settings.batch_size]
        logp, stats = ppl.token_logprobs(method, self.params, [docs[i] for i in batch], a.ppl_prefix,
                                         None if method == "vanilla" else r, self.settings)
        for row, (i, st) in enumerate(zip(batch, stats)):
          sums, counts = ppl.binned_nll(logp[row], a.ppl_prefix, edges)
          self.results.append(dict(task="perplexity", method=method, retention=label, example=ids[i],
                                   nll_bins=sums, token_bins=counts, bin_edges=edges.tolist(),
                                   nll=float(-logp[row].sum()), n_scored=int(logp.shape[1]), **st))
          bar.update()


PAST_CONTEXT = "; give --past_context to run past it on purpose"


def _check_context(args, max_position: int) -> None:
  """The lengths asked for against the model's context, before it loads: the runs give `max_len` (the
  library's way to run past the context on purpose), so nothing else would stop them."""
  if args.past_context:
    return
  if "niah" in args.suites and max(args.niah_lengths) + args.niah_max_new > max_position:
    raise UsageError(f"--niah_lengths {max(args.niah_lengths)} and --niah_max_new {args.niah_max_new} do not fit "
                     f"{args.model}'s {max_position} positions{PAST_CONTEXT}")
  if "ppl" in args.suites and args.ppl_tokens > max_position:
    raise UsageError(f"--ppl_tokens {args.ppl_tokens} does not fit {args.model}'s {max_position} positions"
                     f"{PAST_CONTEXT}")
  if "longbench" in args.suites and args.tasks and args.max_prompt_tokens is not None:
    longest = max(longbench.get_task(t).max_new_tokens for t in args.tasks)
    if args.max_prompt_tokens + longest > max_position:
      raise UsageError(f"--max_prompt_tokens {args.max_prompt_tokens} and the tasks' {longest} new tokens do not "
                       f"fit {args.model}'s {max_position} positions{PAST_CONTEXT}")


def _check_selection_fits(args, config) -> None:
  """The selection rule's layers and score sizes against the model's config, before the weights load (the
  adapters' own layers are checked where they load)."""
  if args.methods == ["vanilla"]:
    return
  layers = None if args.selection_layers is None else tuple(args.selection_layers)
  full = config.full_attention_layers
  try:
    ChunkConfig(**_selection_rule(args), selection_layers=layers).resolve(full, full, head_dim=config.head_dim)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--selection_layers / --score_*: {e}") from None


def _check_prompts_fit(args, gen, max_position: int) -> None:
  """Each suite's longest prompt as tokenized (a haystack comes out a few percent longer than its nominal
  length), before anything generates."""
  if args.past_context:
    return
  for task, examples, max_new, _ in gen:
    longest = max((len(e.prompt) for e in examples), default=0)
    if longest + max_new > max_position:
      flag = "--niah_lengths" if task.startswith("niah_") else "--max_prompt_tokens" if task in args.tasks else None
      raise UsageError(f"{task}: a prompt of {longest} tokens and {max_new} new tokens do not fit {args.model}'s "
                       f"{max_position} positions" + (f"; give a smaller {flag}" if flag else "") + PAST_CONTEXT)


def _count_pending(runner: Runner, task: str, ids, retentions, methods) -> int:
  n = 0
  for m in methods:
    for r in ([1.0] if m == "vanilla" else retentions):
      label = FULL if m == "vanilla" else retention_label(r)
      n += len(runner.results.missing([(task, m, label, e) for e in ids]))
  return n


def run(args, model=None, params=None) -> Path:
  """The whole evaluation; `model` (a cj.Model) and `params` (with adapters) may be given already loaded."""
  import chunkllm_jax as cj
  from tqdm import tqdm

  from chunkllm_jax import weights

  args = _resolve(args)
  out = Path(args.out)
  fingerprint = _fingerprint(args)
  _check_fingerprint(out, fingerprint)  # compared now, written once everything is checked
  if args.vanilla_from:
    _check_vanilla_source(Path(args.vanilla_from), fingerprint)
  results = ResultsFile(out / "results.jsonl")
  for bad in results.bad_lines:
    print(f"warning: {results.path}:{bad.line}: malformed result line skipped ({bad.reason}); "
          "its example runs again", file=sys.stderr)

  t0 = time.perf_counter()
  config = model.config if model is not None else weights.load_config(args.model)
  _check_context(args, config.max_position)
  _check_selection_fits(args, config)
  # Read before the weights: adapters made for another model, or none there, are refused in seconds.
  adapters = cj.load_adapters(args.adapters or args.model, config) if params is None else None
  model = model or cj.load(args.model, dtype=args.dtype)
  if params is None:
    params = cj.with_adapters(model.params, adapters)
  settings = M.settings_for(model, batch_size=args.batch_size, chunk_len=args.chunk_len,
                            fix_chunk_len=args.fix_chunk_len, window=args.window, vote=args.vote,
                            boundary_tokens=args.boundary_tokens, boundary_share=args.boundary_share,
                            recent_share=args.recent_share,
                            kv_budget_min_tokens=args.kv_budget_min_tokens, selection=args.selection,
                            score_rank=args.score_rank, score_estimate=args.score_estimate,
                            score_sketch=args.score_sketch, sketch_estimate=args.sketch_estimate,
                            head_refresh=args.head_refresh, page_len=args.page_len,
                            selection_layers=None if args.selection_layers is None else tuple(args.selection_layers))
  print(f"[{args.model}: loaded in {time.perf_counter() - t0:.1f}s; methods {' '.join(args.methods)}; "
        f"retention {' '.join(f'{r:g}' for r in args.retention)}; {len(settings.separator_ids)} separator tokens]",
        file=sys.stderr)
  tok = model.tokenizer
  gen: list[tuple[str, list[Example], int, list]] = []  # (task, examples, max_new, retentions)
  if "niah" in args.suites:
    for task, ex in niah_examples(args, tok).items():
      gen.append((task, ex, args.niah_max_new, args.retention))
  if "longbench" in args.suites:
    for task, ex in longbench_examples(args, tok, model.config.max_position).items():
      max_new = longbench.get_task(task).max_new_tokens
      gen.append((task, ex, min(max_new, 8) if args.quick else max_new, args.retention))
  if "short" in args.suites:
    gen.append(("short_text", short_examples(args, tok), 6 if args.quick else 16, [None]))
  docs = []
  if "ppl" in args.suites:
    docs = ppl.text_windows(tok, args.ppl_docs, args.ppl_tokens, args.brown if args.filler == "brown" else None,
                            args.seed)

  _check_prompts_fit(args, gen, model.config.max_position)
  _write_fingerprint(out, fingerprint)
  if args.vanilla_from:
    n = _copy_vanilla_rows(Path(args.vanilla_from), results)
    print(f"[{n} vanilla rows copied from {args.vanilla_from}]", file=sys.stderr)
  runner = Runner(args, model, params, settings, results)
  ppl_ids = [f"doc{i}-N{args.ppl_tokens}" for i in range(len(docs))]
  total = sum(_count_pending(runner, t, [e.id for e in ex], rs, args.methods) for t, ex, _, rs in gen)
  total += _count_pending(runner, "perplexity", ppl_ids, args.retention, args.methods)
  with tqdm(total=total, desc="eval", unit="run", file=sys.stderr) as bar:
    for task, examples, max_new, retentions in gen:
      runner.generation(task, examples, max_new, retentions, bar)
    if docs:
      runner.perplexity(docs, bar)

  planned = {tuple(map(str, k)) for k in runner.planned}
  records = [r for r in results.records if result_key(r) in planned]  # this run's plan, not older extras
  paths = report.write_all(out, records, vars(args), results.bad_lines)
  if len(records) < len(results.records):
    print(f"the report covers this command's {len(records)} results; {results.path} holds "
          f"{len(results.records) - len(records)} more (other methods, lengths or budgets), which "
          f"`python -m eval.report --out {out}` reports with these", file=sys.stderr)
  print(f"[{time.perf_counter() - t0:.0f}s] results: {results.path}", file=sys.stderr)
  for p in paths:
    print(f"  {p}", file=sys.stderr)
  return out


def main(argv=None, model=None, params=None) -> Path:
  return run(_parser().parse_args(argv), model=model, params=params)


def cli(argv=None) -> int:
  """`main` for a user: a bad input is one `error:` line and exit code 2, never a traceback."""
  from chunkllm_jax.adapter_io import AdapterLoadError

  try:
    main(argv)
  except (UsageError, AdapterLoadError, FileNotFoundError, ValueError) as e:
    print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(cli())
