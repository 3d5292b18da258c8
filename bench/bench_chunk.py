"""ChunkLLM vs dense on the CPU: decode tokens/s, K/V bytes per decode step, prefill time.

  python bench/bench_chunk.py --selection shared --lengths 4096 16384 32768 65536

Synthetic weights of smollm2-135m's shape (float32) and fresh adapters; speed does not depend on
the weights. Decode does not run a real prefill (dense prefill at 64K would take about an hour
here): the KV buffer is filled with random K/V up to the context length, the chunk table holds
uniform 30-token chunks with random keys, and the first selection is a real vote (`selection.choose`) of a random
query, compacted by `_fill_working_buffer`. The Chunk Adapter's output bias is set very
negative, so chunks close only by `max_chunk_len = 30`: one boundary every 30 tokens.

Each round runs, interleaved: one dense `decode_step`, one plain ChunkLLM step (open chunk half
full) and one boundary ChunkLLM step (the open chunk reaches 30 tokens: append, re-select,
re-compact). ChunkLLM reads the `top_k` chunks its selection scores best for each target retention
(`top_chunks`), or with --budget a KV budget of that retention (`kv_budget`, the budget's default shape:
the recent share and the chunks' last tokens), as the README's demo and the eval set it. ChunkLLM's per-token
time is amortised: plain * 29/30 + boundary / 30, from medians.
Both steps are jitted once with the buffers donated (in place, as in the generate loops); compile
is excluded. Prefill: `chunk_generate.chunk_prefill` (whatever it is now; `prefill="sparse"` is
passed when ChunkConfig has that field) against `kv_cache.prefill`, interleaved, medians.
Writes bench/RESULTS_chunk.md, bench/RESULTS_chunk.json and bench/chunk_speed.png: the shared rule's page, so
another rule (the library's default included) needs its own --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import chunkllm_jax as cj  # noqa: E402
from chunkllm_jax import ChunkConfig  # noqa: E402  (the package's name: this bench also runs older code)
from chunkllm_jax import chunk_generation as cg  # noqa: E402
from chunkllm_jax import decoding  # noqa: E402
from chunkllm_jax import kv_cache  # noqa: E402
from chunkllm_jax.chunk_cache import init_chunk_state, working_size  # noqa: E402
from chunkllm_jax.selection import adapter_probs, vote_scores  # noqa: E402
import results_md  # noqa: E402


CHUNK = 30  # tokens per chunk (the paper's semantic chunks are 20-40)
CFG = cj.ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                     head_dim=64, d_ff=1536, rope_theta=1e5, max_position=131072, tie_embeddings=True)
TARGET_DECODE, TARGET_PREFILL = 2.0, 2.0  # 25% retention: decode at 32K, prefill at 16K (bench/summary.py's too)
PREFILL_TARGET_CONTEXT = 16384


def make_params():
  params = cj.init_backbone(jax.random.key(0), CFG, jnp.float32)
  ad = cj.init_adapters(jax.random.key(1), CFG)
  # p ~ 0 everywhere: chunks close only when they reach max_chunk_len, exactly every 30 tokens.
  chunk = dict(ad.params["chunk"])
  chunk["outer"] = dict(chunk["outer"], bias=jnp.full_like(chunk["outer"]["bias"], -30.0))
  return cj.with_adapters(params, ad.replace(params=dict(ad.params, chunk=chunk)))


def consistent_queries(params):
  """The Q-adapters' input weights zeroed (q~ a constant per layer): every chunk then selects the same
  top-k, the perfect intra-chunk/inter-chunk consistency that trained adapters approach. Random
  adapters pick independently per chunk, and a query block's union then covers nearly everything."""
  ad = params.adapters
  qk = ad.params["qk"]
  inner = qk["q"]["inner"]
  inner = dict(inner, kernel=jnp.zeros_like(inner["kernel"]), bias=jax.random.normal(jax.random.key(5), inner["bias"].shape))
  return params.replace(adapters=ad.replace(params=dict(ad.params, qk=dict(qk, q=dict(qk["q"], inner=inner)))))


def chunk_config(top_k: int, max_len: int, **selection) -> ChunkConfig:
  # The adapters score the prompt too (the path where sparse prefill is the default): the frozen
  # attention's rows (`prefill_scorer="attention"`, the library default) would ignore the
  # consistent queries, and random weights' attention picks unrelated chunks for each query chunk.
  fields = {f.name for f in dataclasses.fields(ChunkConfig)}
  extra = {"prefill": "sparse"} if "prefill" in fields else {}
  if "prefill_scorer" in fields:
    extra["prefill_scorer"] = "adapter"
  c = ChunkConfig(top_chunks=top_k, max_chunk_len=CHUNK, **extra, **selection).validate(max_len, CFG.n_layers)
  if hasattr(c, "score_rank_for"):  # the per-head score's size for these keys, as `chunk_generation.resolved` fills it
    c = dataclasses.replace(c, score_rank=c.score_rank_for(CFG.head_dim), score_sketch=c.sketch_bits)
  return c


def selection_rule(args) -> dict:
  """The selection flags given (`--selection` ... `--head_refresh`), as ChunkConfig's fields. Named here, not
  taken from `chunk_config.PER_HEAD_FIELDS`: the bench also times older code, run from a worktree."""
  keys = ("selection", "score_rank", "score_estimate", "score_sketch", "sketch_estimate", "head_refresh", "attention")
  return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}  # (callers may lack a flag)


def top_k_for(ratio: float, L: int, c: ChunkConfig) -> int:
  return max(1, round((ratio * L - c.n_sink) / CHUNK - c.n_local))


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_cache(L: int, max_len: int, key):
  shape = (CFG.n_layers, 1, max_len, CFG.n_kv_heads, CFG.head_dim)
  kk, kv = jax.random.split(key)
  return kv_cache.KVCache(k=jax.random.normal(kk, shape, jnp.float32), v=jax.random.normal(kv, shape, jnp.float32),
                          length=jnp.full((1,), L, jnp.int32))


@functools.partial(jax.jit, static_argnums=(3, 4))
def synthetic_state(params, cache, key, L: int, ccfg: ChunkConfig):
  """Chunk table of uniform chunks ending at L - 1 (the first takes the remainder), random k~,
  the top_k chunks a random q~ picks, compacted into the working buffer."""
  acfg = params.adapters.config
  ccfg = cg.resolved(params, ccfg)  # the state's query rings take the adapters' window
  n_qk = len(acfg.qk_layers)
  W = working_size(ccfg, cache.max_len, cg.WORK_BLOCK)
  d_c = cg._d_c(params, ccfg)  # 0 where the state keeps no k~ (the per-head rule)
  st = init_chunk_state(CFG.n_layers, n_qk, 1, d_c, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, cache.k.dtype,
                        ccfg, W)
  n = -(-(L - ccfg.n_sink) // CHUNK)
  ends = L - 1 - CHUNK * np.arange(n)[::-1]
  starts = np.maximum(ends - CHUNK + 1, ccfg.n_sink)
  kk, kq = jax.random.split(key)
  st = st.replace(chunk_start=st.chunk_start.at[0, :n].set(starts), chunk_end=st.chunk_end.at[0, :n].set(ends),
                  chunk_key=jax.random.normal(kk, st.chunk_key.shape), n_chunks=jnp.full((1,), n, jnp.int32),
                  open_start=jnp.full((1,), L, jnp.int32))
  if getattr(ccfg, "shares_selection", True):  # the shared rule's first selection (older code, timed from a
    #                                           worktree, makes it for both rules and has no such property)
    probs = jnp.stack([adapter_probs(q[:, None], k, (st.n_chunks - ccfg.n_local)[:, None])[:, 0]
                       for q, k in zip(jax.random.normal(kq, (n_qk, 1, d_c)), st.chunk_key)])
    st = cg._reselect(st, jnp.ones((1,), bool), vote_scores(probs, ccfg.vote), jnp.full((1,), L - 1), ccfg)
  # At the last token (cache.length = L): compacted, or the per-head rule's own state, for the layers it scores
  # (older code, timed from a worktree, built it for every layer and takes no such argument).
  scored = getattr(cg._layer_plan(params, ccfg), "scored", None)
  return cg._fill_working_buffer(st, cache, ccfg, *(() if scored is None else (scored,)))


def timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def aot(fn, *args, donate=()):
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def bench_decode(params, L: int, ratios, rounds: int, selection: dict | None = None, budget: bool = False):
  headroom = -(-CHUNK * (rounds + 1) // 128) * 128  # the rounds advance 30 positions each
  max_len = L + headroom
  cache = random_cache(L, max_len, jax.random.key(L))
  tok = jnp.zeros((1,), jnp.int32)
  pos = lambda p: jnp.full((1,), p, jnp.int32)
  dense, dense_compile_s = aot(kv_cache.decode_step, params, tok, cache, donate=(2,))
  rows = []
  for ratio in ratios:
    base = chunk_config(1, max_len)
    read = dict(kv_budget=ratio) if budget else {}
    ccfg = chunk_config(top_k_for(ratio, L, base), max_len, **read, **(selection or {}))
    st = jax.block_until_ready(synthetic_state(params, cache, jax.random.key(7), L, ccfg))
    step = functools.partial(cg.chunk_decode_step, ccfg=ccfg)
    chunk, chunk_compile_s = aot(step, params, tok, cache, st, donate=(2, 3))
    # With head_refresh = N > 1 the heads choose at the step after each boundary and every N steps: of a
    # chunk's 29 plain steps ceil(29 / N) choose (timed with the state's age set to N) and the rest read
    # the last choice (age set to 1); the boundary step is timed choosing, an upper bound.
    refresh = ccfg.head_refresh if ccfg.selection == "kv_head" else 1
    t_dense, t_plain, t_reuse, t_bound, ret_plain, ret_bound, slots = [], [], [], [], [], [], []
    for r in range(rounds):
      s = L + CHUNK * r  # the open chunk starts here
      order = ("dense", "chunk") if r % 2 == 0 else ("chunk", "dense")
      for who in order:
        if who == "dense":
          (_, cache), t = timed(dense, params, tok, cache.replace(length=pos(s + CHUNK // 2 - 1)))
          t_dense.append(t)
          continue
        steps = [(s + CHUNK // 2 - 1, t_plain, ret_plain, refresh), (s + CHUNK - 1, t_bound, ret_bound, refresh)]
        if refresh > 1:
          steps.insert(1, (s + CHUNK // 2, t_reuse, [], 1))
        for p, ts, rets, age in steps:
          before = (float(st.retained[0]), float(st.read_slots[0]), int(st.n_chunks[0]))
          st = st.replace(head_age=jnp.full_like(st.head_age, age))
          (_, cache, st), t = timed(chunk, params, tok, cache.replace(length=pos(p)), st)
          ts.append(t)
          rets.append(float(st.retained[0]) - before[0])
          if ts is not t_reuse:  # the bytes count the choosing steps' score reads: an upper bound
            slots.append(float(st.read_slots[0]) - before[1])
          closed = int(st.n_chunks[0]) - before[2]
          assert closed == (1 if ts is t_bound else 0), f"expected a boundary only on the 30th token, got {closed}"
    plain, bound, d = statistics.median(t_plain), statistics.median(t_bound), statistics.median(t_dense)
    n_choose = -(-(CHUNK - 1) // refresh)
    if refresh > 1:  # the plain steps' mean: choosing and reusing ones in their proportion
      plain = (plain * n_choose + statistics.median(t_reuse) * (CHUNK - 1 - n_choose)) / (CHUNK - 1)
    amort = plain * (CHUNK - 1) / CHUNK + bound / CHUNK
    retention = np.mean(ret_plain) * (CHUNK - 1) / CHUNK + np.mean(ret_bound) / CHUNK
    nbytes = cg.bytes_per_decode_step(params, ccfg, 4, np.array([np.mean(slots)]), np.array([L + 1.0]))
    row = dict(context=L, max_len=max_len, target_retention=ratio, top_k=None if budget else ccfg.top_chunks,
               kv_budget=ratio if budget else None, retention=float(retention),
               selection=ccfg.selection, score_rank=ccfg.score_rank, score_estimate=ccfg.score_estimate,
               score_sketch=ccfg.score_sketch, sketch_estimate=ccfg.sketch_estimate, head_refresh=refresh,
               attention=getattr(ccfg, "attention", "xla"),
               chunk_reuse_steps=t_reuse,
               bytes_chunk=float(nbytes["chunk"][0]), bytes_dense=float(nbytes["dense"][0]),
               dense_step_s=d, chunk_plain_step_s=plain, chunk_boundary_step_s=bound, chunk_step_s=amort,
               decode_tok_s_chunk=1 / amort, decode_tok_s_dense=1 / d, decode_speedup=d / amort,
               dense_steps=t_dense, chunk_plain_steps=t_plain, chunk_boundary_steps=t_bound,
               compile_s=dict(dense=dense_compile_s, chunk=chunk_compile_s), code=results_md.code_version())
    row["bytes_ratio"] = row["bytes_dense"] / row["bytes_chunk"]
    print(f"decode L={L} {f'kv_budget={ratio}' if budget else f'top_k={ccfg.top_chunks}'} retention={retention:.3f} dense {d * 1e3:.0f} ms, chunk plain "
          f"{plain * 1e3:.0f} ms / boundary {bound * 1e3:.0f} ms -> amortised {amort * 1e3:.0f} ms, speedup "
          f"{row['decode_speedup']:.2f}x (bytes {row['bytes_ratio']:.2f}x)", flush=True)
    rows.append(row)
    del st, chunk
  del cache, dense
  return rows


def bench_prefill(params, L: int, ratio: float, repeats: int, headroom: int, selection: str):
  max_len = decoding.buffer_len(L + headroom)  # whole key blocks, as generate allocates (a blocked prefill needs them)
  chunk_params = consistent_queries(params) if selection == "consistent" else params
  ccfg = chunk_config(top_k_for(ratio, L, chunk_config(1, max_len)), max_len)
  tokens = jax.random.randint(jax.random.key(3), (1, L), 0, CFG.vocab_size, jnp.int32)
  lengths = jnp.full((1,), L, jnp.int32)

  def dense_fn(params, tokens, lengths):
    return kv_cache.prefill(params, tokens, lengths, kv_cache.init_cache(CFG, 1, max_len, jnp.float32))

  chunk_fn = functools.partial(cg.chunk_prefill, max_len=max_len, ccfg=ccfg)
  # The same sparse code with a selection of every chunk: the gain of the method alone, apart from
  # how the dense path (kv_cache.prefill) happens to be implemented.
  full_fn = functools.partial(cg.chunk_prefill, max_len=max_len, ccfg=dataclasses.replace(ccfg, top_chunks=ccfg.max_chunks))
  progs = {"dense": (aot(dense_fn, params, tokens, lengths), params),
           "chunk": (aot(chunk_fn, chunk_params, tokens, lengths), chunk_params),
           "full": (aot(full_fn, chunk_params, tokens, lengths), chunk_params)}
  times = {who: [] for who in progs}
  for r in range(repeats):
    for who in (list(progs) if r % 2 == 0 else list(progs)[::-1]):
      (fn, _), p = progs[who]
      out, t = timed(fn, p, tokens, lengths)
      del out
      times[who].append(t)
      print(f"  prefill L={L} {who}: {t:.1f} s", flush=True)
  t_dense, t_chunk = times["dense"], times["chunk"]
  d, c, f = (statistics.median(times[w]) for w in ("dense", "chunk", "full"))
  dense_c, chunk_c = progs["dense"][0][1], progs["chunk"][0][1]
  print(f"prefill L={L} top_k={ccfg.top_chunks} {selection}: dense {d:.1f} s, chunk {c:.1f} s, speedup {d / c:.2f}x, "
        f"vs full coverage {f:.1f} s: {f / c:.2f}x", flush=True)
  return dict(context=L, top_k=ccfg.top_chunks, prefill_s_chunk=c, prefill_s_dense=d, prefill_speedup=d / c,
              prefill_s_full=f, prefill_speedup_vs_full=f / c,
              prefill_mode=ccfg.prefill, selection=selection,
              dense_runs=t_dense, chunk_runs=t_chunk, compile_s=dict(dense=dense_c, chunk=chunk_c), code=results_md.code_version())


def estimate_prefill(prefill_rows, L: int):
  """Dense prefill time at L from a*L + b*L^2 fitted through the measured lengths."""
  pts = [(r["context"], r["prefill_s_dense"]) for r in prefill_rows]
  if len(pts) < 2:
    return None
  x = np.array([p[0] for p in pts], float)
  A = np.stack([x, x**2], -1)
  coef, *_ = np.linalg.lstsq(A, np.array([p[1] for p in pts]), rcond=None)
  return float(coef[0] * L + coef[1] * L**2)


def machine_rates(read_mib: int = 1024, repeats: int = 5) -> dict:
  """The machine's own read bandwidth and float32 matmul rate, as jitted XLA programs reach them.

  Read bandwidth is the faster of a reduction over `read_mib` MiB and a matrix-vector product over
  the same bytes (a decode step's weight reads are matrix-vector products); the rate is a
  2048 x 2048 x 2048 matmul. Medians of `repeats` runs."""
  n = read_mib * 2**20 // 4
  x = jnp.ones((n // 1024, 1024), jnp.float32)
  v = jnp.ones((1024,), jnp.float32)
  a = jnp.ones((2048, 2048), jnp.float32)
  progs = dict(sum=(jax.jit(jnp.sum), (x,)), matvec=(jax.jit(jnp.dot), (x, v)), matmul=(jax.jit(jnp.dot), (a, a)))
  best = {}
  for name, (fn, args) in progs.items():
    jax.block_until_ready(fn(*args))
    best[name] = statistics.median(timed(fn, *args)[1] for _ in range(repeats))
  read = n * 4 / min(best["sum"], best["matvec"])
  return dict(read_bytes_s=read, matmul_flop_s=2 * 2048**3 / best["matmul"], read_mib=read_mib,
              read_s=dict(sum=best["sum"], matvec=best["matvec"]), matmul_s=best["matmul"])


def decode_floor_s(step_bytes: float, weight_bytes_: int, context: float, rates: dict) -> float:
  """The fastest a batch-1 decode step can be here: its bytes at the read bandwidth, or its flops
  (2 per float32 weight, and 4 per head per key for QK and PV) at the matmul rate, whichever is
  slower."""
  flops = 2 * weight_bytes_ / 4 + 4 * CFG.n_layers * CFG.n_heads * CFG.head_dim * context
  return max(step_bytes / rates["read_bytes_s"], flops / rates["matmul_flop_s"])


def weight_bytes() -> int:
  """Weight bytes a decode step reads: every leaf once (the LM head reads the whole tied table)."""
  p = jax.eval_shape(make_params)
  leaves = jax.tree.leaves((p.backbone, p.adapters.params))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def verdict(decode_rows, prefill_rows):
  out = ["## Against the targets (~25% retention: decode at 32K, prefill at 16K)", ""]
  d = [r for r in decode_rows if r["context"] == 32768 and r["target_retention"] == 0.25]
  if d:
    s = d[0]["decode_speedup"]
    out.append(f"- Decode: {s:.2f}x (target {TARGET_DECODE:g}x): **{'met' if s >= TARGET_DECODE else 'not met'}**.")
  else:
    out.append("- Decode: not measured at 32K.")
  p = [r for r in prefill_rows if r["context"] == PREFILL_TARGET_CONTEXT and r.get("selection") == "consistent"]
  if p:
    s = p[0]["prefill_speedup"]
    out.append(f"- Prefill: {s:.2f}x (target {TARGET_PREFILL:g}x): **{'met' if s >= TARGET_PREFILL else 'not met'}** "
               f"({p[0]['prefill_mode']}, consistent selection).")
  elif prefill_rows:
    out.append(f"- Prefill: not measured at {PREFILL_TARGET_CONTEXT // 1024}K with a consistent selection (target "
               f"{TARGET_PREFILL:g}x).")
  return out


def rule_text(row: dict) -> str:
  """A decode row's selection rule, in words."""
  if row.get("selection", "shared") != "kv_head":
    return "shared (`selection=\"shared\"`: one selection by the QK Adapters' vote at each boundary)"
  score = row.get("score_estimate") or "exact"
  if score == "lowrank":
    score = f"low-rank keys of rank {row.get('score_rank')} + a {row.get('score_sketch')}-bit " \
            f"{row.get('sketch_estimate') or 'simhash'} sketch"
  elif score == "sparq":
    score = f"SparQ's {row.get('score_rank')} largest query dimensions"
  kernel = ", read by the per-head decode kernel (`attention=\"pallas\"`)" if row.get("attention") == "pallas" else ""
  return f"per-head (`selection=\"kv_head\"`: each KV head chooses its chunks by {score}, " \
         f"every {row.get('head_refresh', 1)} step(s){kernel})"


def read_text(row: dict) -> str:
  """What a decode row's ChunkLLM step reads, in words."""
  if row.get("kv_budget") is None:
    return "the `top_k` chunks the selection scores best (`top_chunks`), for each target retention"
  return ("a KV budget of the target retention (`kv_budget`), in the budget's default shape (the recent share, "
          "the chunks' last tokens); top_k `-`")


def write_outputs(out, command, decode_rows, prefill_rows, notes, rates=None, device=None):
  """Writes the page and its .json; `device` is the machine measured on (None: this one, as a run writes)."""
  device = device or results_md.machine_line()
  wb = weight_bytes()
  for r in decode_rows:  # the ceiling for a memory-bound step: weights are read by both designs
    r["weight_bytes"] = wb
    r["bytes_ratio_with_weights"] = (r["bytes_dense"] + wb) / (r["bytes_chunk"] + wb)
    if rates:  # measured in this run: each step as a fraction of the floor the machine allows
      r["dense_floor_s"] = decode_floor_s(r["bytes_dense"] + wb, wb, r["context"], rates)
      r["chunk_floor_s"] = decode_floor_s(r["bytes_chunk"] + wb, wb, r["context"] * r["retention"], rates)
      r["dense_of_floor"] = r["dense_floor_s"] / r["dense_step_s"]
      r["chunk_of_floor"] = r["chunk_floor_s"] / r["chunk_step_s"]
    # Cross-check that is less sensitive to load drift: the ratio within each round, then the median.
    r["decode_speedup_paired"] = statistics.median(
        d / (p * (CHUNK - 1) / CHUNK + b / CHUNK)
        for d, p, b in zip(r["dense_steps"], r["chunk_plain_steps"], r["chunk_boundary_steps"]))
  lines = [
      "# ChunkLLM vs dense: decode and prefill speed on the CPU", "",
      f"Machine: {device}. Synthetic smollm2-135m-shaped weights (30 layers, 9 heads / 3 KV heads, "
      "head_dim 64), float32, batch 1; adapters from `init_adapters`; ChunkConfig defaults (n_sink 4, n_local 4, "
      "vote sum, layer 0 dense) with `max_chunk_len=30` and uniform 30-token chunks.", "",
      "Decode's selection rule: " + "; ".join(sorted({rule_text(r) for r in decode_rows})) + ".", "",
      "ChunkLLM's read: " + "; ".join(sorted({read_text(r) for r in decode_rows})) + ".", "",
      f"Command: `{command}`", "",
      "Code measured (git): decode " + ", ".join(sorted({r.get("code", "?") for r in decode_rows})) + "; prefill "
      + ", ".join(sorted({r.get("code", "?") for r in prefill_rows})) + ".", "",
      f"Targets, at 25% retention: decode >= {TARGET_DECODE:g}x dense at 32K and prefill >= {TARGET_PREFILL:g}x "
      f"dense at {PREFILL_TARGET_CONTEXT // 1024}K, on the CPU.", "",
      "## Decode", "",
      "| context | top_k | retention | K/V bytes/step chunk | dense | K/V bytes ratio | ratio with weights "
      "| decode tok/s chunk | dense | decode speedup |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in decode_rows:
    lines.append(f"| {r['context']} | {r['top_k'] or '-'} | {r['retention']:.1%} | {r['bytes_chunk'] / 2**20:.0f} MiB | "
                 f"{r['bytes_dense'] / 2**20:.0f} MiB | {r['bytes_ratio']:.2f}x | {r['bytes_ratio_with_weights']:.2f}x | "
                 f"{r['decode_tok_s_chunk']:.2f} | "
                 f"{r['decode_tok_s_dense']:.2f} | {r['decode_speedup']:.2f}x |")
  if rates and decode_rows and "dense_of_floor" in decode_rows[0]:
    lines += ["", "### Against the machine's floor", "",
              f"Measured in this run: read bandwidth {rates['read_bytes_s'] / 2**30:.1f} GiB/s (the faster of a "
              f"sum and a matrix-vector product over {rates['read_mib']} MiB), float32 matmul "
              f"{rates['matmul_flop_s'] / 1e9:.0f} GFLOP/s (2048^3). A step's floor is its bytes (weights + the K/V "
              "it reads) at that bandwidth, or its flops at that rate, whichever is slower; the fraction is "
              "floor / measured step (target: at least 60%).", "",
              "| context | retention | dense floor ms | dense step ms | dense % of floor | ChunkLLM floor ms "
              "| ChunkLLM step ms | ChunkLLM % of floor |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in decode_rows:
      lines.append(f"| {r['context']} | {r['retention']:.1%} | {r['dense_floor_s'] * 1e3:.0f} | "
                   f"{r['dense_step_s'] * 1e3:.0f} | {r['dense_of_floor']:.0%} | {r['chunk_floor_s'] * 1e3:.0f} | "
                   f"{r['chunk_step_s'] * 1e3:.0f} | {r['chunk_of_floor']:.0%} |")
  lines += ["", "Decode step times (medians, ms): ChunkLLM plain and boundary steps, and the amortised "
            "plain * 29/30 + boundary / 30 that the table uses. The last column "
            "pairs each dense step with the ChunkLLM steps of the same round (a check against load drift).", "",
            "| context | top_k | dense | chunk plain | chunk boundary | chunk amortised | speedup, median of per-round ratios |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in decode_rows:
    lines.append(f"| {r['context']} | {r['top_k'] or '-'} | {r['dense_step_s'] * 1e3:.0f} | {r['chunk_plain_step_s'] * 1e3:.0f} | "
                 f"{r['chunk_boundary_step_s'] * 1e3:.0f} | {r['chunk_step_s'] * 1e3:.0f} | {r['decode_speedup_paired']:.2f}x |")
  lines += ["", "## Prefill", "",
            "Chunk-sparse prefill (`chunk_prefill`, `prefill=\"sparse\"`: per-layer top-k at every boundary, packed "
            "per query block) against dense `kv_cache.prefill`, medians of interleaved runs. `consistent`: synthetic "
            "Q-adapters with a constant query, so every chunk selects the same top-k (the intra-chunk consistency "
            "trained adapters approach); `random`: random adapters, each chunk selects independently. Selection "
            "only reaches back past the local chunks, so early queries see everything and prefill retention is "
            "above the decode target.", "",
            "The `full coverage` column runs the same sparse code with a selection of every chunk: the speedup "
            "against it is the method's own, independent of how the dense path is implemented.", "",
            "| context | top_k | selection | prefill s chunk | dense | speedup vs dense | full coverage s | speedup vs full |",
            "|---:|---:|---|---:|---:|---:|---:|---:|"]
  for p in prefill_rows:
    full = (f"{p['prefill_s_full']:.1f} | {p['prefill_speedup_vs_full']:.2f}x" if "prefill_s_full" in p else "- | -")
    lines.append(f"| {p['context']} | {p['top_k']} | {p.get('selection', 'random')} ({p['prefill_mode']}) | "
                 f"{p['prefill_s_chunk']:.1f} | {p['prefill_s_dense']:.1f} | {p['prefill_speedup']:.2f}x | {full} |")
  lines += ["", "How it was measured: " + " ".join(__doc__.split("\n\n", 2)[2].split("Writes")[0].split()),
            "Retention is SepLLM's (tokens a sparse layer reads / tokens seen), measured by `chunk_decode_step`; "
            "bytes/step are K/V bytes over all 30 layers (`bytes_per_decode_step`: sparse layers read the working "
            "buffer up to its last used 128-slot block plus the 30-slot open-chunk window; dense reads the whole "
            "buffer, which has room for the measured steps beyond the context). \"Ratio with weights\" adds the "
            f"{wb / 2**20:.0f} MiB of weights (backbone + adapters, float32) that every step reads on both sides: "
            "the speedup a purely memory-bound step could reach."]
  lines += [""] + [f"Note: {n}" for n in notes]
  lines += [""] + verdict(decode_rows, prefill_rows)
  results_md.write(out, lines, dict(device=device, command=command, machine=rates,
                                    decode=decode_rows, prefill=prefill_rows, notes=notes))
  return lines


def plot(decode_rows, prefill_rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(10, 4.8))
  colors = {0.5: "tab:blue", 0.25: "tab:orange"}
  for ratio in sorted({r["target_retention"] for r in decode_rows}, reverse=True):
    rs = [r for r in decode_rows if r["target_retention"] == ratio]
    x = [r["context"] for r in rs]
    c = colors.get(ratio)
    ax.plot(x, [r["decode_speedup"] for r in rs], "o-", color=c, label=f"decode speedup, ~{ratio:.0%} retention")
    ax.plot(x, [r["bytes_ratio_with_weights"] for r in rs], "s--", color=c, alpha=0.7,
            label=f"bytes ratio incl. weights, ~{ratio:.0%}")
    ax.plot(x, [r["bytes_ratio"] for r in rs], "x:", color=c, alpha=0.5, label=f"K/V bytes ratio, ~{ratio:.0%}")
  for sel, c in (("consistent", "tab:green"), ("random", "tab:olive")):
    rs = [r for r in prefill_rows if r.get("selection", "random") == sel and r["prefill_mode"] == "sparse"]
    if rs:
      ax.plot([r["context"] for r in rs], [r["prefill_speedup"] for r in rs], "^:", color=c,
              label=f"prefill speedup, ~25%, {sel} selection")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.axhline(TARGET_DECODE, color="tab:red", lw=0.8, ls=":", label=f"decode target {TARGET_DECODE:g}x (32K, 25%)")
  ax.set_xscale("log", base=2)
  xs = sorted({r["context"] for r in decode_rows})
  ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("dense / ChunkLLM (higher is better)")
  ax.set_title("ChunkLLM vs dense, smollm2-135m shape, float32, CPU")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the plot
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
  ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25], help="target KV retention rates")
  ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds per (context, top_k)")
  ap.add_argument("--prefill-lengths", type=int, nargs="*", default=[4096, 16384])
  ap.add_argument("--prefill-ratio", type=float, default=0.25)
  ap.add_argument("--prefill-repeats", type=int, default=2)
  ap.add_argument("--prefill-selection", nargs="+", default=["consistent", "random"], choices=["consistent", "random"],
                  help="synthetic Q-adapters: constant queries (every chunk picks the same top-k) or random ones")
  ap.add_argument("--decode-from-json", action="store_true",
                  help="reuse the decode rows of the existing .json (when only prefill changed)")
  ap.add_argument("--out", default=str(HERE / "RESULTS_chunk.md"))
  ap.add_argument("--prefill-from-json", action="store_true",
                  help="reuse the prefill rows of the existing .json (when only decode changed) instead of measuring")
  ap.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json")
  # Decode's selection rule, as ChunkConfig's fields; a flag not given leaves the library's default.
  ap.add_argument("--selection", default=None, choices=["kv_head", "shared"],
                  help="decode's ChunkConfig.selection ('kv_head': each KV head chooses at every step)")
  ap.add_argument("--score_rank", type=int, default=None, help="ChunkConfig.score_rank, with --selection kv_head")
  ap.add_argument("--score_estimate", default=None, choices=["lowrank", "sparq", "exact"],
                  help="ChunkConfig.score_estimate, with --selection kv_head")
  ap.add_argument("--score_sketch", type=int, default=None, help="ChunkConfig.score_sketch, with --score_estimate lowrank")
  ap.add_argument("--sketch_estimate", default=None, choices=["simhash", "qjl"],
                  help="ChunkConfig.sketch_estimate, with --score_sketch")
  ap.add_argument("--head_refresh", type=int, default=None, help="ChunkConfig.head_refresh, with --selection kv_head")
  ap.add_argument("--attention", default=None, choices=["xla", "pallas"],
                  help="ChunkConfig.attention: 'pallas' runs the kernels where they compile (GPU, TPU)")
  ap.add_argument("--budget", action="store_true",
                  help="decode reads a KV budget of each ratio (kv_budget), as users set it, not top_k chunks")
  args = ap.parse_args(argv)
  # One error line before anything is measured (a count of 0 recorded a failed row; a ratio past 1 was measured).
  counts = dict(lengths=min(args.lengths, default=1), rounds=args.rounds, prefill_lengths=min(args.prefill_lengths,
                default=1), prefill_repeats=args.prefill_repeats)
  if min(counts.values()) < 1:
    ap.error("--lengths, --rounds, --prefill-lengths and --prefill-repeats must be >= 1; got "
             + ", ".join(f"{k} {v}" for k, v in counts.items()))
  if not all(0 < r <= 1 for r in [*args.ratios, args.prefill_ratio]):
    ap.error(f"--ratios and --prefill-ratio are KV retention targets in (0, 1]; got {args.ratios}, {args.prefill_ratio}")
  out = pathlib.Path(args.out)
  png = out.with_name("chunk_speed.png") if out.name == "RESULTS_chunk.md" else out.with_suffix(".png")
  if args.render and not out.with_suffix(".json").is_file():
    ap.error(f"--render rewrites {out} from its .json, and {out.with_suffix('.json')} does not exist")
  if args.render:
    res = json.loads(pathlib.Path(args.out).with_suffix(".json").read_text())
    cmd = res["command"] if res["command"].startswith("python") else "python " + res["command"]
    lines = write_outputs(args.out, cmd, res["decode"], res["prefill"], res["notes"], res.get("machine"),
                          res.get("device"))  # the machine it was measured on, not this one
    plot(res["decode"], res["prefill"], png)
    print("\n".join(lines))
    return
  # bench/RESULTS_chunk.md is the shared rule's page (regenerate.py's `chunk` step, read by summary.py under that
  # rule's name); since the per-head rule became the library's default, a run without --selection measures that.
  rule = args.selection or getattr(ChunkConfig, "selection", "shared")  # (older code, from a worktree: shared)
  if out.resolve() == HERE / "RESULTS_chunk.md" and rule != "shared" and args.lengths and not args.decode_from_json:
    ap.error(f"bench/RESULTS_chunk.md is the shared rule's page, and this run's decode rule is {rule!r}: add "
             "--selection shared, or give this rule's page as --out")
  command = "python bench/bench_chunk.py " + " ".join(sys.argv[1:] if argv is None else argv)

  rates = None
  if not args.decode_from_json:  # the floor the decode steps are measured against, on this machine now
    rates = machine_rates()
    print(f"read {rates['read_bytes_s'] / 2**30:.1f} GiB/s, matmul {rates['matmul_flop_s'] / 1e9:.0f} GFLOP/s",
          flush=True)
  params = make_params()
  decode_rows, prefill_rows, notes = [], [], []
  if args.prefill_from_json:
    old = json.loads(pathlib.Path(args.out).with_suffix(".json").read_text())
    prefill_rows = old["prefill"]
    notes.append(f"prefill rows reused from an earlier run (`{old['command']}`, code {prefill_rows[0].get('code', '?')}); "
                 "chunk_prefill has not changed since.")
    args.prefill_lengths = []
  if args.decode_from_json:
    old = json.loads(pathlib.Path(args.out).with_suffix(".json").read_text())
    decode_rows = old["decode"]
    notes.append(f"decode rows reused from an earlier run (`{old['command']}`, code {decode_rows[0].get('code', '?')}); "
                 "chunk_decode_step has not changed since, apart from sharing the boundary rule with prefill.")
  for L in ([] if args.decode_from_json else args.lengths):
    try:
      decode_rows += bench_decode(params, L, args.ratios, args.rounds,
                                  selection_rule(args), args.budget)
    except Exception as e:  # e.g. out of memory at 64K: report it, keep the rest
      notes.append(f"decode at {L} failed: {type(e).__name__}: {str(e)[:200]}")
      print(notes[-1], flush=True)
    write_outputs(args.out, command, decode_rows, prefill_rows, notes, rates)
  headroom = decode_rows[0]["max_len"] - decode_rows[0]["context"] if decode_rows else 256
  for L in args.prefill_lengths:
    for selection in args.prefill_selection:
      prefill_rows.append(bench_prefill(params, L, args.prefill_ratio, args.prefill_repeats, headroom, selection))
      write_outputs(args.out, command, decode_rows, prefill_rows, notes, rates)
  for L in args.lengths:
    if L not in {r["context"] for r in prefill_rows}:
      est = estimate_prefill(prefill_rows, L)
      if est is not None:
        took = f"{est / 60:.0f} minutes" if est >= 120 else f"{est:.0f} s"
        notes.append(f"prefill not measured at {L // 1024}K (not among --prefill-lengths): dense prefill there "
                     f"would take about {took} on this CPU (fitted a*L + b*L^2 through the measured lengths).")
  lines = write_outputs(args.out, command, decode_rows, prefill_rows, notes, rates)
  plot(decode_rows, prefill_rows, png)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
