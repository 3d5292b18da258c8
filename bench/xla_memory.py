"""XLA's own account of the generation programs' buffers: what each program holds beyond its inputs.

  python bench/xla_memory.py --contexts 8192 16384

Compiles (does not run) smollm2-135m's dense prefill, dense decode step, ChunkLLM prefill and
ChunkLLM decode step (25% KV budget, the shipped adapters) for one prompt of each context, and
prints `compiled.memory_analysis()`: the temporaries XLA allocates, the outputs, and the bytes an
output shares with a donated input (the KV buffer, updated in place). Peak RSS
(bench/bench_memory.py) adds the runtime and the allocator to these; this separates the two.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--contexts", nargs="+", type=int, default=[8192])
  ap.add_argument("--budget", type=float, default=0.25)
  args = ap.parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp

  import chunkllm_jax as cj
  from chunkllm_jax import kv_cache
  from chunkllm_jax.chunk_generation import chunk_decode_step, chunk_prefill

  model = cj.load("smollm2-135m", dtype="float32")
  params = cj.with_adapters(model.params, cj.load_adapters("smollm2-135m", model.config))
  cfg = model.config
  mib = lambda x: f"{x / 2**20:.0f}"
  print("| program | context | KV MiB | temporaries MiB | temp / KV | outputs MiB | aliased to a donated input MiB |")
  print("|---|---|---|---|---|---|---|")
  for T in args.contexts:
    kv = 2 * cfg.n_layers * T * cfg.n_kv_heads * cfg.head_dim * 4
    ccfg = cj.ChunkConfig(kv_budget=args.budget).validate(T, cfg.n_layers)
    toks, lens, tok = jnp.zeros((1, T), jnp.int32), jnp.full((1,), T, jnp.int32), jnp.zeros((1,), jnp.int32)

    def dense_prefill(p, t, n):
      return kv_cache.prefill(p, t, n, kv_cache.init_cache(p.config, 1, T, jnp.float32))

    # chunk_generate's prefill leaves the working buffer to its decode program (which the step's
    # state below carries)
    sparse_prefill = lambda p, t, n: chunk_prefill(p, t, n, T, ccfg, working_buffer=False)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, T, jnp.float32))
    _, ccache, cstate = jax.eval_shape(lambda p, t, n: chunk_prefill(p, t, n, T, ccfg), params, toks, lens)
    programs = [
        ("dense prefill", jax.jit(dense_prefill), (params, toks, lens)),
        ("dense decode step", jax.jit(kv_cache.decode_step, donate_argnums=(2,)), (params, tok, cache)),
        ("ChunkLLM prefill", jax.jit(sparse_prefill), (params, toks, lens)),
        ("ChunkLLM decode step", jax.jit(lambda p, t, c, s: chunk_decode_step(p, t, c, s, ccfg), donate_argnums=(2, 3)),
         (params, tok, ccache, cstate)),
    ]
    for name, fn, fargs in programs:
      m = fn.lower(*fargs).compile().memory_analysis()
      print(f"| {name} | {T} | {mib(kv)} | {mib(m.temp_size_in_bytes)} | {m.temp_size_in_bytes / kv:.2f} | "
            f"{mib(m.output_size_in_bytes)} | {mib(m.alias_size_in_bytes)} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
