"""Where dense prefill time goes: one layer's causal attention against torch's sdpa, and the model
with and without its attention.

  python bench/prefill_attention.py --length 8192 --tiles 256,256 512,256
  taskset -c 0 python bench/prefill_attention.py --length 8192      # the same on one core

Attention: `attention.causal_attention` for each `block_q,block_k` tile against
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)` on the same smollm2-shaped
inputs (9 query heads, 3 kv heads, head dim 64, float32), best of `--repeats` after compilation;
torch is timed before and after the JAX runs, so a change in the machine shows. With `--model`,
the whole prefill stack of smollm2-135m (embedding and every layer under the scan, no output
layer) with its attention and with the attention replaced by nothing, so the two differ by the
attention alone.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from chunkllm_jax import attention as attn  # noqa: E402

H, K, D = 9, 3, 64  # smollm2-135m's heads, kv heads and head dim


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def attention_rows(T: int, tiles, repeats: int) -> list[dict]:
  """Times torch's sdpa, each tile size of `causal_attention`, then torch again; prints a markdown
  row per run and returns them (label, ms, torch_before / ms, max abs error vs torch)."""
  import torch

  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, T, h, D), np.float32) for h in (H, K, K))
  pos, valid = np.arange(T, dtype=np.int32)[None], np.ones((1, T), bool)
  qt = torch.from_numpy(q).transpose(1, 2)
  kt, vt = (torch.from_numpy(x).transpose(1, 2).repeat_interleave(H // K, 1) for x in (k, v))

  def run_torch():
    with torch.inference_mode():
      return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

  reference = run_torch().transpose(1, 2).numpy()
  rows = []

  def add(label, seconds, err=None):
    rows.append(dict(label=label, ms=seconds * 1e3, vs_torch=rows[0]["ms"] / (seconds * 1e3) if rows else 1.0, err=err))
    r = rows[-1]
    print(f"| {label} | {r['ms']:.0f} | {r['vs_torch']:.2f}x | {'-' if err is None else f'{err:.1e}'} |", flush=True)

  add("torch sdpa (before)", best_of(run_torch, repeats))
  for bq, bk in tiles:
    fn = jax.jit(lambda q, k, v, bq=bq, bk=bk: attn.causal_attention(
        q, k, v, pos, valid, attn.NO_WINDOW, scale=D ** -0.5, block_q=bq, block_k=bk))
    err = float(np.abs(np.asarray(fn(q, k, v)) - reference).max())
    add(f"JAX {bq} x {bk} tiles", best_of(lambda: fn(q, k, v).block_until_ready(), repeats), err)
  add("torch sdpa (after)", best_of(run_torch, repeats))
  return rows


def model_rows(T: int, repeats: int) -> list[dict]:
  """Times smollm2-135m's prefill stack with its attention and with the attention replaced by
  nothing; prints a markdown row per run and returns them (label, seconds)."""
  import chunkllm_jax as cj
  from chunkllm_jax import model

  params = cj.load("smollm2-135m", dtype="float32").params
  cfg = params.config
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  with_attention = model.self_attend_fn(cfg, pos, jnp.ones((1, T), bool))

  def without_attention(state, layer, q, k, v, h):
    return q, state, None  # q has the attention output's shape [B, T, H, D]

  rows = []
  for label, attend_fn in [("every layer", with_attention),
                           ("every layer, attention replaced by nothing", without_attention)]:
    fn = jax.jit(lambda attend_fn=attend_fn: model.run_layers(params, model.embed(params, ids), pos, attend_fn)[0][:, -1])
    fn().block_until_ready()  # compiles
    rows.append(dict(label=label, seconds=best_of(lambda: fn().block_until_ready(), repeats)))
    print(f"| {label} | {rows[-1]['seconds']:.2f} |", flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--tiles", nargs="+", default=["256,256", "512,256"], help="block_q,block_k pairs")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--model", action="store_true", help="also time the model's prefill stack with and without attention")
  args = p.parse_args(argv)
  tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
  print(f"T={args.length}, {os.cpu_count()} CPUs visible, affinity {len(os.sched_getaffinity(0))} cores", flush=True)
  print("| one layer's causal attention | ms | torch (before) / this | max abs error vs torch |\n|---|---|---|---|")
  attention_rows(args.length, tiles, args.repeats)
  if args.model:
    print("\n| smollm2-135m prefill stack | seconds |\n|---|---|")
    model_rows(args.length, max(args.repeats - 1, 1))


if __name__ == "__main__":
  main()
