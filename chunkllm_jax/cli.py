"""Command line: `python -m chunkllm_jax generate --model smollm2-135m --prompt "..."`."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


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
  return p


def _read_prompt(args) -> str:
  if args.prompt is not None:
    return args.prompt
  try:
    with open(args.prompt_file, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    sys.exit(f"error: prompt file not found: {args.prompt_file}")
  except UnicodeDecodeError as e:
    sys.exit(f"error: {args.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})")


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
  if chat:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False))
  return list(tokenizer(text)["input_ids"])


def run_generate(args) -> None:
  import chunkllm_jax as cj

  text = _read_prompt(args)
  t0 = time.perf_counter()
  model = cj.load(args.model, dtype=args.dtype)
  print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
  ids = encode_prompt(model.tokenizer, text, args.chat)
  print(f"[prompt: {len(ids)} tokens]", file=sys.stderr)
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


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  try:
    if args.command == "generate":
      run_generate(args)
  except (FileNotFoundError, ValueError) as e:  # bad input: say what is wrong, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
