"""Command line: `python -m chunkllm_jax generate --model smollm2-135m --prompt "..."`."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings


from chunkllm_jax.chunk_config import PER_HEAD_FIELDS, SCORE_ESTIMATES, SCORE_SKETCH_BITS, SELECTIONS
from chunkllm_jax.prompts import encode_prompt


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m chunkllm_jax", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="generate text, streamed as it comes")
  g.add_argument("--model", default="smollm2-135m", help="registered name, HF safetensors dir or .gguf file")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="the prompt text")
  src.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
  g.add_argument("--chunk", action="store_true", help="ChunkLLM decoding (needs adapters); prints the stats")
  g.add_argument("--adapters", default=None, help="adapter export dir or registered name (default: --model)")
  _chunk_flags(g)

  d = sub.add_parser("demo", help="a passkey hidden in a long document: vanilla, ChunkLLM's defaults (each KV head "
                                   "chooses its chunks) at 25%% and 50%% of the KV, and the paper's shared rule at "
                                   "25%%, side by side")
  d.add_argument("--model", default="smollm2-135m")
  d.add_argument("--adapters", default=None, help="adapter export dir or registered name (default: --model)")
  d.add_argument("--context", type=int, default=4096,
                 help="document length in tokens (the prompt adds the question and the chat template)")
  d.add_argument("--depth", type=float, default=0.5, help="where the fact sits, 0 (start) to 1 (end)")
  d.add_argument("--seed", type=int, default=0)
  _chunk_flags(d)
  return p


def _chunk_flags(p) -> None:
  """ChunkLLM settings; each left out keeps its `ChunkConfig` default."""
  p.add_argument("--kv-budget", type=float, default=None, help="fraction of the tokens seen that attention reads")
  p.add_argument("--scorer", choices=["adapter", "attention"], default=None,
                 help="the shared rule's scorer (--selection shared; the demo's shared-rule run): adapter, the QK "
                      "Adapters; attention, the frozen model's own attention (no training)")
  p.add_argument("--top-k-chunks", type=int, default=None, help="a chunk count instead of --kv-budget")
  p.add_argument("--n-local", type=int, default=None, help="recent chunks always visible")
  p.add_argument("--n-sink", type=int, default=None, help="first tokens always visible")
  p.add_argument("--recent-share", type=float, default=None,
                 help="share of the budget the most recent tokens get first (default 0.75; 0: by score alone)")
  p.add_argument("--boundary-tokens", action=argparse.BooleanOptionalAction, default=None,
                 help="also read the last token of each chunk left out "
                      "(default: on with --kv-budget, the prompt read densely)")
  p.add_argument("--boundary-share", type=float, default=None,
                 help="with --boundary-tokens: the most of what the budget leaves after the sinks, local and open "
                      "chunk that the last tokens take, the newest first (default 0.25; 1: every one)")
  p.add_argument("--selection", choices=list(SELECTIONS), default=None,
                 help="kv_head (default): each KV head of each layer chooses at every step; shared: one selection "
                      "at each chunk boundary for every layer and head (the paper's rule, by the QK Adapters)")
  p.add_argument("--score-rank", type=int, default=None,
                 help="with --selection kv_head: the size of its scores' estimate (default: a quarter of the "
                      "head dimension)")
  p.add_argument("--score-estimate", choices=list(SCORE_ESTIMATES), default=None,
                 help="with --selection kv_head: each key's coordinates in a basis of its head's prompt keys "
                      "(lowrank, default), SparQ's dimensions of K (sparq) or the exact mass (exact)")
  p.add_argument("--score-sketch", type=int, default=None,
                 help="with --score-estimate lowrank: bits of a 1-bit random sketch of what each key's basis misses "
                      f"(a multiple of 32; 0: the bound on that part; default {SCORE_SKETCH_BITS})")
  p.add_argument("--sketch-estimate", choices=["simhash", "qjl"], default=None,
                 help="with --score-sketch: the angle from the Hamming distance of both sides' signs (default) or "
                      "QJL's estimate from the query's projection (qjl)")
  p.add_argument("--head-refresh", type=int, default=None,
                 help="with --selection kv_head: the heads choose every N steps and after each chunk closes "
                      "(default 1: every step)")


# The ChunkConfig fields the flags above set: a refused setting is named by its flag.
FLAG_OF_FIELD = {"kv_budget": "--kv-budget", "scorer": "--scorer", "top_chunks": "--top-k-chunks",
                 "n_local": "--n-local", "n_sink": "--n-sink", "recent_share": "--recent-share",
                 "boundary_tokens": "--boundary-tokens", "boundary_share": "--boundary-share", "selection": "--selection", "score_rank": "--score-rank",
                 "score_estimate": "--score-estimate", "score_sketch": "--score-sketch",
                 "sketch_estimate": "--sketch-estimate", "head_refresh": "--head-refresh"}


def _check_chunk_settings(settings: dict, cfg) -> None:
  """The settings' own checks (`ChunkConfig.validate`) at the model's longest context, in the flags' words."""
  from chunkllm_jax.chunk_generation import with_fields
  from chunkllm_jax.chunk_config import ChunkConfig

  try:
    ccfg = with_fields(ChunkConfig(), settings).validate(cfg.max_position, cfg.n_layers, vocab_size=cfg.vocab_size)
    full = cfg.full_attention_layers  # the sizes against the model's keys (the adapters' own layers: where they load)
    ccfg.resolve(full, full, head_dim=cfg.head_dim)
  except (TypeError, ValueError) as e:
    # a field's name where the message names the field: always for names with an underscore, and for the plain
    # words ("selection", "scorer") only as `name=...`, so the prose around them stays as it is
    names = r"\b(" + "|".join(f for f in FLAG_OF_FIELD if "_" in f) + r")\b|\b(selection|scorer)(?==)"
    words = re.sub(names, lambda m: FLAG_OF_FIELD[m.group()], str(e))
    raise type(e)(words) from None


def _chunk_settings(args) -> dict:
  given = dict(kv_budget=args.kv_budget, scorer=args.scorer, top_chunks=args.top_k_chunks, n_local=args.n_local,
               n_sink=args.n_sink, recent_share=args.recent_share, boundary_tokens=args.boundary_tokens,
               boundary_share=args.boundary_share, selection=args.selection, score_rank=args.score_rank,
               score_estimate=args.score_estimate,
               score_sketch=args.score_sketch, sketch_estimate=args.sketch_estimate, head_refresh=args.head_refresh)
  kw = {k: v for k, v in given.items() if v is not None}
  if args.top_k_chunks is not None and args.kv_budget is None:
    kw["kv_budget"] = None  # a chunk count was asked for: no token budget
  return kw


def _read_prompt(args) -> str:
  if args.prompt is not None:
    try:  # bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer refuses obscurely
      args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"--prompt is not valid UTF-8 text (at character {e.start}); give UTF-8 text or "
                       "--prompt-file") from None
    return args.prompt
  try:
    with open(args.prompt_file, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"prompt file not found: {args.prompt_file}") from None
  except IsADirectoryError:
    raise ValueError(f"--prompt-file {args.prompt_file} is a folder; give a UTF-8 text file") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{args.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _tokenizer(name: str):
  """The model's tokenizer alone: a prompt is tokenized and its length checked before the weights are read."""
  from chunkllm_jax import weights

  return weights.load_tokenizer(weights.tokenizer_source(name))


def _load_backbone(args, tokenizer):
  """The backbone's weights, beside the tokenizer already loaded."""
  import chunkllm_jax as cj

  t0 = time.perf_counter()
  model = cj.load(args.model, dtype=getattr(args, "dtype", "float32"), tokenizer=False)._replace(tokenizer=tokenizer)
  print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
  return model


def _adapters(args, cfg):
  """The adapters (an export dir or a shipped name), read before the backbone: ones made for another model,
  or a folder that holds none, are refused before the weights load."""
  import chunkllm_jax as cj

  return cj.load_adapters(args.adapters or args.model, cfg)


def _check_prompt_fits(n_prompt: int, max_new: int, cfg, model: str, new_flag: str) -> None:
  if n_prompt + max_new <= cfg.max_position:
    return
  fix = ("shorten the prompt" if n_prompt >= cfg.max_position else
         f"give {new_flag} {cfg.max_position - n_prompt} or less, or a shorter prompt")
  raise ValueError(f"the prompt ({n_prompt} tokens) and {max_new} new tokens need {n_prompt + max_new} positions, more "
                   f"than {model}'s context of {cfg.max_position}: {fix}")


def _ended_at_once_hint(args, tokenizer, n_new: int) -> None:
  from chunkllm_jax.prompts import has_chat_template

  if n_new == 0 and not args.chat and has_chat_template(tokenizer):
    print("[the model ended its answer at once: an instruct model reads a question best in its chat template "
          "(add --chat)]", file=sys.stderr)


def _print_stats(stats, row: int = 0, max_new_tokens: int | None = None) -> None:
  s = {k: float(v[row]) for k, v in stats.items()}
  if math.isnan(s["kv_retention"]):  # no decode step: nothing was read to measure
    why = "--max-new-tokens 1" if max_new_tokens == 1 else "the first new token ended the answer"
    print(f"[{int(s['n_chunks'])} chunks, no decode step ({why}), prefill {s['prefill_s']:.2f}s]", file=sys.stderr)
    return
  print(f"[kv retention {s['kv_retention']:.1%}, {int(s['n_chunks'])} chunks, {int(s['n_selections'])} selections, "
        f"K/V bytes per step {s['bytes_per_step'] / 2**20:.1f} MiB vs dense {s['dense_bytes_per_step'] / 2**20:.1f} MiB, "
        f"prefill {s['prefill_s']:.2f}s, decode {s['decode_tok_s']:.1f} tok/s]", file=sys.stderr)


def run_chunk_generate(args, model, ids, adapters) -> None:
  import chunkllm_jax as cj

  params = cj.with_adapters(model.params, adapters)
  out = cj.chunk_generate(params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, **_chunk_settings(args))
  new = [t for t in out.new_tokens(0).tolist() if t not in model.config.eos_ids]
  print(model.tokenizer.decode(new, skip_special_tokens=True))
  _print_stats(out.stats, max_new_tokens=args.max_new_tokens)
  _ended_at_once_hint(args, model.tokenizer, len(new))


DEMO_NEW_TOKENS = 12
SCORER_WORDS = {"adapter": "QK Adapters", "attention": "frozen model's own attention"}


def run_demo(args) -> None:
  import chunkllm_jax as cj
  from chunkllm_jax import haystack, weights

  from chunkllm_jax.decoding import check_seed

  check_seed(args.seed)
  if args.seed < 0:  # it also seeds the document's filler sentences (numpy takes no negative seed)
    raise ValueError(f"--seed picks the demo's document and passkey: give an integer >= 0, got {args.seed}")
  if not 0.0 <= args.depth <= 1.0:  # also false for nan
    raise ValueError(f"--depth is where the fact sits, from 0 (start) to 1 (end); got {args.depth}")
  if args.context < 256:
    raise ValueError(f"--context must be at least 256 tokens, got {args.context}")
  cfg = weights.load_config(args.model)  # the config alone: refuse before loading
  if args.context >= cfg.max_position:
    raise ValueError(f"--context {args.context} does not fit {args.model}'s {cfg.max_position} positions with the "
                     "question and the answer")
  settings = _chunk_settings(args)
  # Unless a budget is given, ChunkLLM runs at a quarter and at half of the KV, and under the per-head rule the
  # paper's rule too (one selection at each chunk boundary, for every layer and head) at the first budget: --scorer
  # is that rule's (its decode selections: the QK Adapters by default).
  budgets = [settings.pop("kv_budget")] if "kv_budget" in settings else [0.25, 0.5]
  shared = None
  scorer = settings.get("scorer", cj.ChunkConfig.scorer)
  if settings.get("selection", cj.ChunkConfig.selection) != "shared":
    shared = {k: v for k, v in settings.items() if k not in PER_HEAD_FIELDS}
    shared.update(selection="shared", kv_budget=budgets[0])
    settings.pop("scorer", None)
  for run in [dict(settings, kv_budget=b) for b in budgets] + ([shared] if shared else []):
    _check_chunk_settings(run, cfg)  # every run's settings, at the model's longest context, before anything loads
  tokenizer = _tokenizer(args.model)
  text, key = haystack.passkey_prompt(tokenizer, args.context, args.depth, args.seed)
  ids = encode_prompt(tokenizer, text)
  if len(ids) + DEMO_NEW_TOKENS > cfg.max_position:  # the filler's length is an estimate: check the real prompt
    # in proportion, less a margin: the filler comes in whole sentences and the question does not scale
    fits = int(args.context * (cfg.max_position - DEMO_NEW_TOKENS - 64) / len(ids))
    raise ValueError(f"--context {args.context} makes a prompt of {len(ids)} tokens (the document, the question and "
                     f"the chat template), which with the {DEMO_NEW_TOKENS}-token answer does not fit {args.model}'s "
                     f"{cfg.max_position} positions: give --context {fits} or less")
  adapters = _adapters(args, cfg)
  model = _load_backbone(args, tokenizer)
  params = cj.with_adapters(model.params, adapters)
  print(f"[document: {len(ids)} tokens, passkey {key} hidden at depth {args.depth:.0%}]", file=sys.stderr)
  runs = [("vanilla", None, cj.generate(params, [ids], max_new_tokens=DEMO_NEW_TOKENS))]
  for budget in budgets:
    runs.append(("ChunkLLM", budget, cj.chunk_generate(params, [ids], max_new_tokens=DEMO_NEW_TOKENS,
                                                       kv_budget=budget, **settings)))
  if shared:
    runs.append(("shared rule", budgets[0], cj.chunk_generate(params, [ids], max_new_tokens=DEMO_NEW_TOKENS,
                                                              **shared)))
  van = runs[0][2].stats
  for name, budget, out in runs:
    answer = model.tokenizer.decode(out.new_tokens(0), skip_special_tokens=True).strip()
    target = "" if name == "vanilla" else (f", {budget:.0%} budget" if budget is not None else ", top chunks")
    print(f"{name:>11}: {answer!r} ({'correct' if key in answer else 'wrong'}){target}")
    if name != "vanilla":
      st = out.stats
      print(f"{'':>13}read {float(st['kv_retention'][0]):.1%} of the KV cache "
            f"({float(st['bytes_per_step'][0] / st['dense_bytes_per_step'][0]):.1%} of dense bytes per step); "
            f"decode {_times(st['decode_tok_s'][0], van['decode_tok_s'][0])}, "
            f"prefill {_times(van['prefill_s'][0], st['prefill_s'][0])} the speed of vanilla")
  if shared:
    print("ChunkLLM (the defaults): the Chunk Adapter cuts the text into chunks, and each KV head of each layer "
          "chooses the chunks it reads at every step, from low-rank keys; shared rule: the paper's, one selection "
          f"at each chunk boundary by the {SCORER_WORDS[scorer]} for every layer and head (selection='shared')")
  else:
    print("ChunkLLM (selection='shared', the paper's rule): the Chunk Adapter cuts the text into chunks, and one "
          f"selection at each chunk boundary, by the {SCORER_WORDS[scorer]}, serves every layer and head")


def _times(a, b) -> str:
  """a / b as "1.23x"; "n/a" where a run made no decode step (its answer was one end-of-sequence token)."""
  a, b = float(a), float(b)
  return f"{a / b:.2f}x" if a > 0 and b > 0 and math.isfinite(a / b) else "n/a"


def check_generate_flags(args):
  """Every flag that can be judged without the weights, then the model's context (its config only):
  a size that cannot fit is refused before anything is loaded, compiled or allocated. Returns the model config."""
  from chunkllm_jax import checks, weights

  from chunkllm_jax.decoding import check_seed

  checks.check_count("--max-new-tokens", args.max_new_tokens)
  checks.check_sampling(args.temperature, args.top_k, args.top_p)
  check_seed(args.seed)
  settings = _chunk_settings(args)
  given = [k for k, v in settings.items() if v is not None]  # (a chunk count adds kv_budget=None)
  if args.adapters is not None:
    given.append("adapters")
  if given and not args.chunk:  # dense generation would ignore them without a word
    given = ", ".join(sorted("--top-k-chunks" if k == "top_chunks" else "--" + k.replace("_", "-") for k in given))
    raise ValueError(f"{given}: ChunkLLM settings, which dense generation ignores; add --chunk")
  cfg = weights.load_config(args.model)
  if args.max_new_tokens >= cfg.max_position:
    raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in {args.model}'s "
                     f"context of {cfg.max_position} positions: give at most {cfg.max_position - 1}")
  if args.chunk:  # the settings' own checks, at the model's longest context (chunk_generate checks the real one)
    _check_chunk_settings(settings, cfg)
  return cfg


def run_generate(args) -> None:
  import chunkllm_jax as cj

  cfg = check_generate_flags(args)
  text = _read_prompt(args)
  if not text.strip():
    raise ValueError("the prompt is empty: give some text with --prompt or --prompt-file")
  tokenizer = _tokenizer(args.model)
  ids = encode_prompt(tokenizer, text, args.chat)
  _check_prompt_fits(len(ids), args.max_new_tokens, cfg, args.model, "--max-new-tokens")
  adapters = _adapters(args, cfg) if args.chunk else None
  print(f"[prompt: {len(ids)} tokens]", file=sys.stderr)
  model = _load_backbone(args, tokenizer)
  if args.chunk:
    return run_chunk_generate(args, model, ids, adapters)
  new: list[int] = []
  shown = ""
  t0 = time.perf_counter()
  for step in cj.stream(model.params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed):
    tok = int(step[0])
    if tok in model.config.eos_ids:
      break
    new.append(tok)
    decoded = model.tokenizer.decode(new, skip_special_tokens=True)
    if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      sys.stdout.write(decoded[len(shown):])
      sys.stdout.flush()
      shown = decoded
  dt = time.perf_counter() - t0
  print(f"\n[{len(new)} tokens in {dt:.1f}s, {len(new) / max(dt, 1e-9):.1f} tok/s incl. compilation]",
        file=sys.stderr)
  _ended_at_once_hint(args, model.tokenizer, len(new))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  print(f"warning: {message}", file=sys.stderr)  # one line, as the errors: no source line of the library


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  shown, warnings.showwarning = warnings.showwarning, _show_warning
  try:
    if args.command == "generate":
      run_generate(args)
    elif args.command == "demo":
      run_demo(args)
  except (FileNotFoundError, ValueError, TypeError) as e:  # bad input: say what is wrong, no traceback
    print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)  # one line
    sys.exit(2)
  finally:
    warnings.showwarning = shown


if __name__ == "__main__":
  main()
