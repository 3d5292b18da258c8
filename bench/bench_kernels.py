"""Builds, checks and times every Pallas kernel on one accelerator, in one call.

On a lent NVIDIA H100 (or a TPU), from the repository root:

  python bench/bench_kernels.py

It writes bench/RESULTS.md (naming the device), bench/RESULTS.json and bench/kernels_speed.png. Through the
device tool, whose machine hands back only what is written under $OUT, whose `python3` holds JAX (its own
version, which may differ from this repo's venv: the report records it), and where a command may run 10 minutes:

  PYTHONUNBUFFERED=1 python3 bench/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/log"
  # then copy RESULTS.md, RESULTS.json and kernels_speed.png from the returned files into bench/

Should that call run out of time, copy the partial RESULTS.json into bench/ and go on where it stopped (finished
cases are kept; the case it died in is recorded as killed and skipped):

  python3 bench/bench_kernels.py --out "$OUT" --resume bench/RESULTS.json

--resume refuses a JSON measured on another kind of device: name the same kind (nvidia-h100-x1) in every call.
The whole run may well take longer than 10 minutes (Triton compiles, the 128K prefill cases last); splitting it
in two from the start wastes nothing:

  python3 bench/bench_kernels.py --out "$OUT" --only bandwidth checks decode distill
  python3 bench/bench_kernels.py --out "$OUT" --only prefill --resume bench/RESULTS.json

The numbers are still to come: no GPU or TPU was lent to the session that wrote this script, so only --smoke has
run (on a CPU), and bench/RESULTS.md does not exist until a session with a device runs the command above.

On a CPU, `python bench/bench_kernels.py --smoke` runs everything at tiny shapes with the kernels in interpret
mode (timings meaningless, and labelled so), writing to a temporary folder unless --out names one (never over
bench/RESULTS.md); tests/test_bench_kernels.py runs it so that the script cannot rot. --smoke on a GPU runs the
compiled kernels at the tiny shapes: a quick check that they build.

What runs where (pallas_kernels/dispatch.py): on GPU the Triton-lowered kernels (`*_gpu` modules; gather_chunks
has no GPU kernel, so the XLA gather that dispatch runs on GPU is what is timed); on TPU the Mosaic kernels; on a
CPU with --smoke the GPU kernels in interpret mode (--family tpu for the TPU ones).

What it measures, in this order (every finished case is saved at once, so a timeout loses only the case it hit):
1. Bandwidth references: a jitted device-to-device copy (`jnp.copy`, and `-x` in case XLA makes the copy
   slower than an elementwise kernel) of --copy-mib MiB, counted as read + write bytes, and a jitted sum of the
   same buffer (read only); medians.
2. Correctness, on fresh random inputs, each kernel against its jnp reference: decode (in place over the static
   buffer, and over a compacted working buffer as chunk_generate runs it) and gather at the largest decode context
   and the lowest retention; prefill and distill at --check-context (their references are O(T^2)). float32 and
   bfloat16; on a GPU or TPU float32 twice: at the default matmul precision (what the model runs: Triton rounds
   f32 dots to TF32 there, a TPU to bf16 passes) and under `jax.default_matmul_precision("highest")`. The
   references always run at "highest". Error: max |out - ref| / (1 + |ref|), the tests' allclose with
   rtol = atol = bound; bounds float32 1e-5, bfloat16 1e-2. A default-precision float32 error above 1e-5 but
   below 1e-2 on an accelerator is flagged (TF32 or bf16-pass dots), not hidden and not failed; the "highest" row
   must then pass.
3. Decode, at each context and retention: sinks (--n-sink), the --n-local most recent chunks, the open chunk
   and randomly placed selected chunks of --chunk-min..--chunk-max tokens (as real chunks fall), chosen so the
   visible tokens are about the retention. Timed: the in-place kernel (block lists over the static buffer, blocks
   of --decode-block) and the compacted path (the kernel over a working buffer of the visible tokens in
   128-slot blocks plus the open chunk's --chunk-max-token window, sliced beforehand, as
   chunk_kernels.decode_attention_kernel; the gather that fills the buffer runs once per chunk boundary and is
   charged per token as gather / mean chunk length), each at every --n-splits,
   against dense decode over the whole context: chunkllm_jax.attention.decode_attention over a one-layer buffer
   (what the model runs), jax.nn.dot_product_attention with implementation "xla", and on GPU "cudnn".
   Achieved bandwidth: K/V bytes the kernel actually reads (listed blocks, or working-buffer blocks + open
   chunk) / its time, as a fraction of the copy bandwidth.
4. Distill (the teacher's attention + chunk mass P) at --distill-contexts against dense flash attention.
5. Prefill, at each context and retention: chunk ids of random lengths; `consistent` selection (one random set of
   chunks that every later chunk selects, minus its local ones: the intra-chunk consistency trained adapters
   approach) or `random` (each chunk picks its own); 100% retention is the kernel's dense causal mode
   (n_local >= chunks, no selection columns). The kernel (blocks of --prefill-block-q/-k, as chunk_prefill) and
   the building of its block lists (prefill_block_lists, once per layer), against dense causal flash attention
   (jax.nn.dot_product_attention with is_causal=True: cudnn on GPU, xla on CPU; the Pallas TPU flash kernel on
   TPU). Cases run cheapest first: the kernel unrolls one compare per selection column (about retention x
   context / 30 of them), so the 128K cases compile and run longest.
6. The issue's targets, met or not: decode at 128K and 25% retention >= 3x faster than the fastest dense decode;
   the decode kernel there at >= 70% of the copy bandwidth; prefill at 128K and 25% >= 3x faster than dense flash.

Timing: each function is compiled ahead of time (compile time recorded), run --warmup times, then timed as the
median of up to --repeats samples (fewer when a call is slow: --case-budget-s), each sample a run of back-to-back
calls closed by `jax.block_until_ready`, so host dispatch overlaps the device work; the calls cycle through
copies of the K/V buffers totalling >= --rotate-mib MiB, so that a decode does not find its K/V in the L2
cache. On an NVIDIA GPU the kernels' device time is also taken with CUPTI (the timer of
jax.experimental.mosaic.gpu.profiler), during the same calls; where there is one, the tables and targets use it
(both are in the JSON). A failed compile or an out-of-memory at one size is recorded as a note and the rest goes
on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from chunkllm_jax import attention  # noqa: E402
from chunkllm_jax.chunk_generation import WORK_BLOCK  # noqa: E402
from chunkllm_jax.chunk_prefill import PREFILL_BLOCK  # noqa: E402
from pallas_kernels import chunk_decode_attention as cda  # noqa: E402
from pallas_kernels import chunk_prefill_attention as cpa  # noqa: E402
from pallas_kernels import distill_attention as dsa  # noqa: E402
from pallas_kernels import gather_chunks as gch  # noqa: E402


TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # as the kernel tests
FLAG_BOUND = 1e-2  # default-precision f32 error up to this on an accelerator: TF32 / bf16-pass dots, flagged
TARGET_SPEEDUP, TARGET_BW = 3.0, 0.70
TARGET_CONTEXT, TARGET_RETENTION = 131072, 0.25
KEEP = "<!-- analysis below is kept when the script rewrites this file -->"
SMOKE_DEFAULTS = dict(contexts=[256], prefill_contexts=None, retentions=[1.0, 0.25], distill_contexts=[256],
                      check_context=256, decode_block=16, n_splits=[2], prefill_block_q=32, prefill_block_k=32,
                      distill_block_q=32, distill_block_k=32, warmup=1, repeats=2, case_budget_s=2.0,
                      copy_mib=4, rotate_mib=0, min_sample_ms=0.0)


# ---------------------------------------------------------------------------------------------------------------
# What runs: the kernels through their dispatchers, and the dense baselines


def decode_inplace(q, k, v, ids, n, mask, *, scale, block_size, n_splits, interpret, backend):
  """The decode kernel over the static buffer, reading the listed blocks."""
  return cda.chunk_decode_attention(q, k, v, ids, n, mask, scale=scale, block_size=block_size, n_splits=n_splits,
                                    interpret=interpret, backend=backend)


def decode_compacted(q, work_k, work_v, work_ok, used, open_k, open_v, open_ok, *, scale, block, n_splits,
                     interpret, backend):
  """chunk_kernels.decode_attention_kernel (what chunk_generate's pallas path runs), with the backend and the
  working buffer's n_splits as arguments: the working buffer's blocks up to each row's last used slot, and the
  open chunk as one more block, merged by log-sum-exp."""
  B, W, M = q.shape[0], work_k.shape[1], open_k.shape[1]
  ids = jnp.broadcast_to(jnp.arange(W // block, dtype=jnp.int32), (B, W // block))
  work = cda.partials(q, work_k, work_v, ids, -(-used // block), work_ok, scale=scale, block_size=block,
                      n_splits=n_splits, interpret=interpret, backend=backend)
  opened = cda.partials(q, open_k, open_v, jnp.zeros((B, 1), jnp.int32), jnp.ones((B,), jnp.int32), open_ok,
                        scale=scale, block_size=M, n_splits=1, interpret=interpret, backend=backend)
  parts = [jnp.concatenate([a, b], axis=1) for a, b in zip(work, opened)]
  return cda.combine_splits(*parts).astype(q.dtype)


def gather(k, v, span_start, span_len, *, budget, interpret):
  """The compaction: the DMA kernel on TPU (or in interpret mode), the XLA gather elsewhere."""
  return gch.gather_chunks(k, v, span_start, span_len, budget=budget, interpret=interpret)


def open_window(k, v, start, *, size):
  """The open chunk's window [start, start + size) of each row (zeros past the buffer)."""
  S = k.shape[1]
  idx = start[:, None] + jnp.arange(size)
  ok = (idx < S)[..., None, None]
  idx = jnp.minimum(idx, S - 1)[..., None, None]
  take = lambda x: jnp.where(ok, jnp.take_along_axis(x, idx, axis=1), 0).astype(x.dtype)
  return take(k), take(v)


def prefill(q, k, v, ids, n, chunk_id, sel, *, scale, block_q, block_k, n_sink, n_local, interpret, backend):
  return cpa.chunk_prefill_attention(q, k, v, ids, n, chunk_id, sel, scale=scale, block_q=block_q,
                                     block_k=block_k, n_sink=n_sink, n_local=n_local, interpret=interpret,
                                     backend=backend)


def distill(q, k, v, chunk_id, *, scale, max_chunks, n_sink, block_q, block_k, interpret, backend):
  return dsa.distill_attention(q, k, v, chunk_id, scale=scale, max_chunks=max_chunks, n_sink=n_sink,
                               block_q=block_q, block_k=block_k, interpret=interpret, backend=backend)


def dense_decode_model(q, k, v, pos, *, scale):
  """The model's dense decode (attention.decode_attention) over a one-layer buffer. [B, H, D]."""
  return attention.decode_attention(q[:, None], k[None], v[None], 0, pos, attention.NO_WINDOW, scale=scale)[:, 0]


def dense_decode_nn(q, k, v, *, scale, implementation):
  """jax.nn.dot_product_attention of one query per row over every key. [B, H, D]."""
  return jax.nn.dot_product_attention(q[:, None], k, v, scale=scale, implementation=implementation)[:, 0]


def dense_prefill(q, k, v, *, scale, implementation):
  """Dense causal flash attention: jax.nn.dot_product_attention, or the Pallas TPU flash kernel (which takes
  [B, H, T, D] and as many kv heads as query heads, so K/V are repeated: that copy is in its time)."""
  if implementation == "pallas_tpu_flash":
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
    G = q.shape[2] // k.shape[2]
    bhtd = lambda x: jnp.swapaxes(x, 1, 2)
    out = flash_attention(bhtd(q), bhtd(jnp.repeat(k, G, axis=2)), bhtd(jnp.repeat(v, G, axis=2)), causal=True,
                          sm_scale=scale)
    return bhtd(out)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)


@jax.jit
def rel_err(out, ref):
  """max |out - ref| / (1 + |ref|) in float32; inf where either holds a NaN or an inf."""
  o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
  err = jnp.max(jnp.abs(o - r) / (1.0 + jnp.abs(r)))
  return jnp.where(jnp.isfinite(o).all() & jnp.isfinite(r).all(), err, jnp.inf)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, dtype)


def normal(seed: int, shape, dtype):
  """Fresh standard-normal values made on the device (no host transfer at 128K)."""
  return _normal(jax.random.key(seed), tuple(int(s) for s in shape), jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic chunkings


def chunk_lengths(rng, n_tokens: int, lo: int, hi: int):
  """Chunk lengths uniform in [lo, hi] covering n_tokens exactly (the last one cut)."""
  lens = rng.integers(lo, hi + 1, size=n_tokens // lo + 2)
  ends = np.cumsum(lens)
  n = int(np.searchsorted(ends, n_tokens)) + 1
  lens = lens[:n].copy()
  lens[-1] -= int(ends[n - 1]) - n_tokens
  return lens[lens > 0]


def decode_selection(rng, L: int, retention: float, a):
  """One row's visible tokens at a decode step at position L - 1: the sinks, randomly placed selected chunks,
  the n_local most recent complete chunks, and the open (last) chunk. Returns a dict: spans (start, len) of
  what the working buffer holds (all but the open chunk, ascending), the open chunk, the token mask."""
  lens = chunk_lengths(rng, L - a.n_sink, a.chunk_min, a.chunk_max)
  starts = a.n_sink + np.concatenate([[0], np.cumsum(lens)[:-1]])
  C = len(lens)
  local = np.arange(max(0, C - 1 - a.n_local), C - 1)
  cand = np.arange(0, max(0, C - 1 - a.n_local))
  if retention >= 1.0:
    picked = cand
  else:
    fixed = a.n_sink + lens[-1] + lens[local].sum()
    k = round((retention * L - fixed) / lens[cand].mean()) if len(cand) else 0
    picked = np.sort(rng.choice(cand, int(np.clip(k, 0, len(cand))), replace=False))
  keep = np.sort(np.concatenate([picked, local])).astype(int)
  visible = np.zeros(C, bool)
  visible[keep] = True
  visible[-1] = True
  mask = np.concatenate([np.ones(a.n_sink, bool), np.repeat(visible, lens)])
  return dict(span_start=np.concatenate([[0], starts[keep]]).astype(np.int32),
              span_len=np.concatenate([[a.n_sink], lens[keep]]).astype(np.int32),
              open_start=int(starts[-1]), open_len=int(lens[-1]), mask=mask, top_k=len(picked))


def prefill_layout(rng, T: int, retention: float, mode: str, a):
  """Chunk ids in the kernels' convention (sinks 0, chunks 1..C, consecutive), each chunk's selections
  (kernel ids, -1 = empty) as a [C + 1, N] table, the n_local to use, and the pair retention (visible (query,
  key) pairs / causal pairs). 100% retention is the kernel's dense causal mode: n_local > C, no selections."""
  lens = chunk_lengths(rng, T - a.n_sink, a.chunk_min, a.chunk_max)
  C = len(lens)
  chunk_id = np.concatenate([np.zeros(a.n_sink, np.int32), np.repeat(np.arange(1, C + 1, dtype=np.int32), lens)])
  c = np.arange(C + 1)
  if retention >= 1.0:
    n_local, sel = C + 1, np.full((C + 1, 1), -1, np.int32)
  else:
    n_local = a.n_local
    if mode == "consistent":  # chunk c selects the chosen chunks below its local ones: a prefix of them
      chosen = np.sort(rng.choice(np.arange(1, C + 1), max(1, round(retention * C)), replace=False))
      m = np.searchsorted(chosen, c - n_local, side="left")
      N = max(1, int(m.max()))
      sel = np.where(np.arange(N)[None] < m[:, None], chosen[None, :N], -1)
    else:  # each chunk picks its own
      rows = []
      for ci in c:
        elig = np.arange(1, max(1, ci - n_local))
        rows.append(np.sort(rng.choice(elig, round(retention * len(elig)), replace=False)) if len(elig) else [])
      N = max(1, max(len(r) for r in rows))
      sel = np.full((C + 1, N), -1, np.int64)
      for ci, r in enumerate(rows):
        sel[ci, :len(r)] = r
    sel = sel.astype(np.int32)
  # visible pairs: per chunk c, each of its tokens sees the sinks, its local chunks, its selections and its own
  # prefix (a selected chunk is never local: selections lie below c - n_local)
  len_id = np.concatenate([[a.n_sink], lens]).astype(np.float64)
  P = np.concatenate([[0.0], np.cumsum(lens, dtype=np.float64)])  # tokens of chunks 1..j
  cc = np.arange(1, C + 1)
  local_tok = P[cc - 1] - P[np.maximum(cc - n_local, 1) - 1]
  sel_tok = np.where(sel >= 0, len_id[np.maximum(sel, 0)], 0).sum(-1)[1:]
  lc = lens.astype(np.float64)
  pairs = a.n_sink * (a.n_sink + 1) / 2 + (lc * (a.n_sink + local_tok + sel_tok) + lc * (lc + 1) / 2).sum()
  return dict(chunk_id=chunk_id, sel=sel, n_local=int(n_local), n_chunks=C, n_sel=int(sel.shape[1]),
              retention=float(pairs / (T * (T + 1) / 2)))


def causal_block_pairs(T: int, bq: int, bk: int) -> int:
  """(query block, key block) pairs that causality leaves: what dense block-sparse attention reads."""
  return sum(((qi + 1) * bq - 1) // bk + 1 for qi in range(T // bq))


# ---------------------------------------------------------------------------------------------------------------
# The run: device, compile cache, timer, cases saved as they finish


class Run:
  """Everything one invocation knows: arguments, device, which kernels run, results so far."""

  def __init__(self, args, argv):
    self.args = args
    self.smoke = args.smoke
    self.platform = jax.default_backend()
    self.family = {"gpu": "gpu", "tpu": "tpu"}.get(self.platform, args.family)
    self.interpret = self.platform not in ("gpu", "tpu")
    self.backend = "gpu" if self.family == "gpu" else "tpu"
    self.out = pathlib.Path(args.out)
    self.command = "python bench/bench_kernels.py" + "".join(" " + x for x in argv)
    self.cases: dict = {}
    self.notes: list[str] = []
    self.compiled: dict = {}
    self.device = device_info()
    self.cupti = cupti_ext() if self.platform == "gpu" and not args.no_cupti else None
    if self.platform == "gpu" and self.cupti is None and not args.no_cupti:
      self.notes.append("CUPTI (jax's mosaic_gpu extension) not found: GPU times are wall-clock medians.")

  def impl(self, kernel: str) -> str:
    """What runs for `kernel` here, in words."""
    mode = " (interpret mode on CPU)" if self.interpret else ""
    if kernel == "gather" and self.family == "gpu":
      return ("Pallas TPU DMA kernel (interpret mode on CPU; on a GPU the XLA gather runs)" if self.interpret
              else "XLA gather (no GPU kernel; what dispatch runs on GPU)")
    return ("Triton Pallas kernel" if self.family == "gpu" else "Mosaic Pallas kernel") + mode

  def compile(self, name, fn, args, *, precision=None, **static):
    """AOT-compiles fn(*args, **static) (under `precision` if given), once per name, static args and shapes.
    Returns (executable, seconds spent compiling)."""
    key = (name, precision, tuple(sorted(static.items())),
           tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)))
    if key not in self.compiled:
      ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
      t0 = time.perf_counter()
      with ctx:
        exe = jax.jit(functools.partial(fn, **static)).lower(*args).compile()
      self.compiled[key] = (exe, time.perf_counter() - t0)
    return self.compiled[key]

  def measure(self, exe, arg_sets) -> dict:
    """Times exe over the argument sets (cycled): warmups, then samples of back-to-back calls each closed by
    block_until_ready; with CUPTI, the device time of each call's kernels during the same calls."""
    a = self.args
    n = len(arg_sets)
    call = lambda i: exe(*arg_sets[i % n])
    for i in range(a.warmup):
      t0 = time.perf_counter()
      jax.block_until_ready(call(i))
      if time.perf_counter() - t0 > a.case_budget_s / 10:  # a slow call: one warmup is enough
        break
    t0 = time.perf_counter()
    jax.block_until_ready(call(0))
    probe = time.perf_counter() - t0
    inner = int(min(64, max(1, math.ceil(a.min_sample_ms * 1e-3 / max(probe, 1e-9)))))
    # fewer samples for slow calls: at least 3, or 1 when a single call outlasts the budget
    floor = 1 if probe > a.case_budget_s else min(3, a.repeats)
    samples = int(max(floor, min(a.repeats, a.case_budget_s // max(probe * inner, 1e-9))))
    ext = self.cupti
    if ext is not None:
      try:
        ext._cupti_init()
      except Exception as e:  # noqa: BLE001
        self.notes.append(f"CUPTI failed to start ({short(e)}): wall-clock times from here on.")
        ext = self.cupti = None
    wall, calls = [], 0
    try:
      for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(inner):
          out = call(calls)
          calls += 1
        jax.block_until_ready(out)
        wall.append((time.perf_counter() - t0) / inner)
    finally:
      timings = None
      if ext is not None:
        try:
          timings = ext._cupti_get_timings(True)
        except Exception as e:  # noqa: BLE001
          self.notes.append(f"CUPTI failed to report ({short(e)}): wall-clock times from here on.")
          self.cupti = None
    res = dict(wall_s=statistics.median(wall), wall_samples=wall, inner=inner, samples=samples, copies=n,
               probe_s=probe, timer="wall")
    if timings:
      if len(timings) % calls == 0:
        per = len(timings) // calls
        dev = [sum(t for _, t in timings[i * per:(i + 1) * per]) * 1e-3 for i in range(calls)]
        res.update(device_s=statistics.median(dev), kernels_per_call=per,
                   kernel_names=sorted({name for name, _ in timings[:per]}), timer="device (CUPTI)")
      else:
        res["cupti_note"] = f"{len(timings)} kernel records for {calls} calls: not used"
    res["time_s"] = res.get("device_s", res["wall_s"])
    return res

  def case(self, cid: str, fn) -> dict:
    """Runs one case unless a resumed run has it; saves it (and the report) as soon as it ends. A failure
    (compile error, out of memory) becomes a note, and the run goes on."""
    old = self.cases.get(cid)
    if old is not None and not (self.args.retry_errors and old.get("status") == "error"):
      if old.get("status") == "running":
        old.update(status="error", error="killed or timed out during this case in an earlier run")
        self.notes.append(f"{cid}: killed or timed out during this case in an earlier run (skipped on --resume).")
      return old
    self.cases[cid] = dict(status="running", started=now())
    self.save()
    print(f"[{cid}]", flush=True)
    t0 = time.perf_counter()
    try:
      res = dict(fn(), status="ok")
    except Exception as e:  # noqa: BLE001: OOM, a compile error, anything: record it, go on
      res = dict(status="error", error=short(e))
      self.notes.append(f"{cid} failed: {short(e)}")
      print("".join(traceback.format_exception(e)[-3:]), file=sys.stderr, flush=True)
    res["case_s"] = time.perf_counter() - t0
    self.cases[cid] = res
    self.save()
    gc.collect()
    return res

  def save(self, render: bool = True):
    self.out.mkdir(parents=True, exist_ok=True)
    doc = dict(device=self.device, command=self.command, smoke=self.smoke, platform=self.platform,
               family=self.family, interpret=self.interpret, args=vars(self.args), cases=self.cases,
               notes=self.notes)
    (self.out / "RESULTS.json").write_text(json.dumps(doc, indent=1, default=float))
    if render:  # a report that fails to render must not stop the measuring: the JSON has everything
      md = self.out / "RESULTS.md"
      try:
        md.write_text(render_md(doc, md))
      except Exception as e:  # noqa: BLE001
        print(f"RESULTS.md not rendered ({short(e)}); `--render` rebuilds it from RESULTS.json", file=sys.stderr)


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def short(e: BaseException) -> str:
  msg = (str(e).strip().splitlines() or [""])[0][:300]
  oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
  return ("out of memory: " if oom else "") + f"{type(e).__name__}: {msg}"


def device_info() -> dict:
  d = jax.devices()[0]
  info = dict(kind=d.device_kind, platform=d.platform, count=jax.device_count(), jax=jax.__version__,
              date=now(), code=code_version())
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
    info["platform_version"] = " ".join(str(d.client.platform_version).split())
  except Exception:  # noqa: BLE001
    pass
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if d.platform == "cpu" and cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        info["kind"] = f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
        break
  return info


def code_version() -> str:
  """The commit measured, and whether the kernels or chunkllm_jax differ from it."""
  git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  try:
    dirty = git("status", "--porcelain", "--", "pallas_kernels", "chunkllm_jax", "bench/bench_kernels.py")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" + uncommitted changes" if dirty else "")
  except OSError:
    return "unknown"


def cupti_ext():
  """jax's CUPTI binding (what jax.experimental.mosaic.gpu.profiler.measure uses), or None."""
  try:
    from jax._src.lib import mosaic_gpu as lib
    ext = lib._mosaic_gpu_ext
    ext._cupti_init, ext._cupti_get_timings  # noqa: B018: both must exist
    return ext
  except Exception:  # noqa: BLE001
    return None


def n_copies(run: Run, nbytes: int) -> int:
  """Copies of a buffer to cycle through so that the calls do not find it in cache."""
  if run.args.rotate_mib <= 0:
    return 1
  return int(min(64, max(1, math.ceil(run.args.rotate_mib * 2**20 / max(nbytes, 1)))))


# ---------------------------------------------------------------------------------------------------------------
# Cases


def case_bandwidth(run: Run) -> dict:
  """Copy and read bandwidth of one large float32 buffer. Device time where CUPTI sees a kernel (a copy may be
  a memcpy, which it does not: wall clock then, over milliseconds, where dispatch is negligible)."""
  n = run.args.copy_mib * 2**20 // 4
  x = normal(1, (n,), jnp.float32)
  res = dict(bytes=4 * n)
  for name, fn, moved in (("copy", jnp.copy, 8 * n), ("negate", jnp.negative, 8 * n), ("read", jnp.sum, 4 * n)):
    exe, cs = run.compile("bw_" + name, fn, (x,))
    m = run.measure(exe, [(x,)])
    t = m["time_s"]
    res[name] = dict(time_s=t, wall_s=m["wall_s"], timer=m["timer"], bytes_moved=moved, bandwidth=moved / t,
                     compile_s=cs)
    print(f"  {name}: {moved / t / 1e9:.1f} GB/s", flush=True)
  # a copy XLA elided, or slower than an elementwise kernel: the faster of the two is what HBM allows
  res["copy_bandwidth"] = max(res["copy"]["bandwidth"], res["negate"]["bandwidth"])
  res["read_bandwidth"] = res["read"]["bandwidth"]
  return res


def decode_inputs(run: Run, L: int, retention: float, dtype, *, copies: int = 1, seed: int = 0):
  """Selections of every row, block lists, and `copies` sets of fresh q/K/V at context L."""
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  rng = np.random.default_rng([a.seed, L, round(retention * 1000)])
  sels = [decode_selection(rng, L, retention, a) for _ in range(B)]
  mask = np.stack([s["mask"] for s in sels])
  bs = a.decode_block
  touched = mask.reshape(B, L // bs, bs).any(-1)
  n = touched.sum(-1).astype(np.int32)
  ids = np.zeros((B, max(1, int(n.max()))), np.int32)
  for b in range(B):
    nz = np.nonzero(touched[b])[0]
    ids[b, :len(nz)] = nz
  Ns = max(len(s["span_len"]) for s in sels)
  span_start = np.zeros((B, Ns), np.int32)
  span_len = np.zeros((B, Ns), np.int32)
  for b, s in enumerate(sels):
    span_start[b, :len(s["span_len"])] = s["span_start"]
    span_len[b, :len(s["span_len"])] = s["span_len"]
  used = span_len.sum(-1).astype(np.int32)
  base = 1000 * seed + 10
  q = normal(base, (B, H, D), dtype)
  kv = [(normal(base + 2 * i + 1, (B, L, K, D), dtype), normal(base + 2 * i + 2, (B, L, K, D), dtype))
        for i in range(copies)]
  return dict(sels=sels, mask=jnp.asarray(mask), ids=jnp.asarray(ids), n=jnp.asarray(n), n_listed=int(n.sum()),
              span_start=jnp.asarray(span_start), span_len=jnp.asarray(span_len), used=jnp.asarray(used),
              W=int(-(-int(used.max()) // WORK_BLOCK) * WORK_BLOCK),
              open_start=jnp.asarray([s["open_start"] for s in sels], jnp.int32),
              open_ok=jnp.asarray(np.arange(a.chunk_max)[None] < np.array([s["open_len"] for s in sels])[:, None]),
              retention=float(mask.sum() / mask.size), top_k=int(np.mean([s["top_k"] for s in sels])), q=q, kv=kv)


def compacted_inputs(run: Run, d: dict, copy: int):
  """The working buffer (gathered by the gather under test) and the open chunk's window, for one K/V copy."""
  k, v = d["kv"][copy]
  gexe, _ = run.compile("gather", gather, (k, v, d["span_start"], d["span_len"]), budget=d["W"],
                        interpret=run.interpret)
  wk, wv, wok = gexe(k, v, d["span_start"], d["span_len"])
  oexe, _ = run.compile("open_window", open_window, (k, v, d["open_start"]), size=run.args.chunk_max)
  ok_, ov = oexe(k, v, d["open_start"])
  return (d["q"], wk, wv, wok, d["used"], ok_, ov, d["open_ok"])


def case_dense_decode(run: Run, L: int) -> dict:
  """Dense decode of one query per row over all L keys, each baseline on its own (a failure is recorded)."""
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  copies = n_copies(run, 2 * B * L * K * D * dt.itemsize)
  q = normal(7, (B, H, D), dt)
  kv = [(normal(8 + 2 * i, (B, L, K, D), dt), normal(9 + 2 * i, (B, L, K, D), dt)) for i in range(copies)]
  pos = jnp.full((B,), L - 1, jnp.int32)
  scale = D ** -0.5
  baselines = [("decode_attention", dense_decode_model, dict(scale=scale), True),
               ("jax.nn xla", dense_decode_nn, dict(scale=scale, implementation="xla"), False)]
  if run.platform == "gpu":
    baselines.append(("jax.nn cudnn", dense_decode_nn, dict(scale=scale, implementation="cudnn"), False))
  res = dict(context=L, bytes=2 * B * L * K * D * dt.itemsize, baselines={})
  ref = None
  for name, fn, kw, with_pos in baselines:
    try:
      extra = (pos,) if with_pos else ()
      exe, cs = run.compile(name, fn, (q, *kv[0], *extra), **kw)
      m = run.measure(exe, [(q, k, v, *extra) for k, v in kv])
      out = exe(q, *kv[0], *extra)
      ref = out if ref is None else ref
      m.update(compile_s=cs, err_vs_decode_attention=float(rel_err(out, ref)))
      res["baselines"][name] = m
      print(f"  dense {name}: {m['time_s'] * 1e6:.1f} us ({m['timer']})", flush=True)
    except Exception as e:  # noqa: BLE001
      res["baselines"][name] = dict(error=short(e))
      run.notes.append(f"dense decode {name} at {L}: {short(e)}")
  return res


def case_decode(run: Run, L: int, retention: float) -> dict:
  """The chunk decode paths at context L and one retention, every n_splits; gather; bytes and bandwidth."""
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, K, D = a.batch, a.kv_heads, a.head_dim
  tok_bytes = 2 * K * D * dt.itemsize  # K and V of one token
  d = decode_inputs(run, L, retention, dt, copies=n_copies(run, B * L * tok_bytes))
  scale = D ** -0.5
  res = dict(context=L, target_retention=retention, retention=d["retention"], top_k=d["top_k"],
             listed_blocks=d["n_listed"], all_blocks=B * L // a.decode_block, W=d["W"],
             used=float(np.mean(np.asarray(d["used"]))),
             bytes_inplace=d["n_listed"] * a.decode_block * tok_bytes,
             bytes_compacted=B * (d["W"] + a.chunk_max) * tok_bytes,
             bytes_gather=int(np.asarray(d["used"]).sum() + B * d["W"]) * tok_bytes,
             bytes_dense=B * L * tok_bytes, inplace={}, compacted={})
  base = (d["q"],)
  args0 = (*base, *d["kv"][0], d["ids"], d["n"], d["mask"])
  for ns in a.n_splits:
    try:
      exe, cs = run.compile("decode_inplace", decode_inplace, args0, scale=scale, block_size=a.decode_block,
                            n_splits=ns, interpret=run.interpret, backend=run.backend)
      m = run.measure(exe, [(*base, k, v, d["ids"], d["n"], d["mask"]) for k, v in d["kv"]])
      m.update(compile_s=cs, bandwidth=res["bytes_inplace"] / m["time_s"])
      res["inplace"][str(ns)] = m
      print(f"  in place n_splits={ns}: {m['time_s'] * 1e6:.1f} us", flush=True)
    except Exception as e:  # noqa: BLE001
      res["inplace"][str(ns)] = dict(error=short(e))
      run.notes.append(f"decode in place {L}/{retention:.0%} n_splits={ns}: {short(e)}")
  k0, v0 = d["kv"][0]
  gexe, gcs = run.compile("gather", gather, (k0, v0, d["span_start"], d["span_len"]), budget=d["W"],
                          interpret=run.interpret)
  g = run.measure(gexe, [(k, v, d["span_start"], d["span_len"]) for k, v in d["kv"]])
  g.update(compile_s=gcs, bandwidth=res["bytes_gather"] / g["time_s"])
  res["gather"] = g
  print(f"  gather (budget {d['W']}): {g['time_s'] * 1e6:.1f} us", flush=True)
  work = [compacted_inputs(run, d, i) for i in range(len(d["kv"]))]
  del d["kv"]
  for ns in a.n_splits:
    try:
      exe, cs = run.compile("decode_compacted", decode_compacted, work[0], scale=scale, block=WORK_BLOCK,
                            n_splits=ns, interpret=run.interpret, backend=run.backend)
      m = run.measure(exe, work)
      m.update(compile_s=cs, bandwidth=res["bytes_compacted"] / m["time_s"])
      res["compacted"][str(ns)] = m
      print(f"  compacted n_splits={ns}: {m['time_s'] * 1e6:.1f} us", flush=True)
    except Exception as e:  # noqa: BLE001
      res["compacted"][str(ns)] = dict(error=short(e))
      run.notes.append(f"decode compacted {L}/{retention:.0%} n_splits={ns}: {short(e)}")
  return res


def prefill_inputs(run: Run, T: int, retention: float, mode: str, dtype, seed: int = 0):
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  lay = prefill_layout(np.random.default_rng([a.seed, T, round(retention * 1000), mode == "random"]), T,
                       retention, mode, a)
  chunk_id = jnp.asarray(np.broadcast_to(lay["chunk_id"], (B, T)))
  sel = jnp.asarray(lay["sel"])[chunk_id]  # [B, T, N]: each token's chunk's selections
  kw = dict(block_q=a.prefill_block_q, block_k=a.prefill_block_k, n_sink=a.n_sink, n_local=lay["n_local"])
  lexe, _ = run.compile("prefill_block_lists", cpa.prefill_block_lists, (chunk_id, sel), **kw,
                        max_chunks=lay["n_chunks"] + 1)
  ids, n = lexe(chunk_id, sel)
  base = 1000 * seed + 500
  q, k, v = (normal(base, (B, T, H, D), dtype), normal(base + 1, (B, T, K, D), dtype),
             normal(base + 2, (B, T, K, D), dtype))
  return lay, kw, (q, k, v, ids, n, chunk_id, sel)


def case_prefill(run: Run, T: int, retention: float, mode: str) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  lay, kw, args = prefill_inputs(run, T, retention, mode, dt)
  lexe, _ = run.compile("prefill_block_lists", cpa.prefill_block_lists, (args[5], args[6]), **kw,
                        max_chunks=lay["n_chunks"] + 1)
  lists = run.measure(lexe, [(args[5], args[6])])
  exe, cs = run.compile("prefill", prefill, args, scale=a.head_dim ** -0.5, **kw, interpret=run.interpret,
                        backend=run.backend)
  print(f"  compiled in {cs:.1f} s ({lay['n_sel']} selection columns)", flush=True)
  m = run.measure(exe, [args])
  pairs = a.batch * causal_block_pairs(T, a.prefill_block_q, a.prefill_block_k)
  print(f"  prefill kernel: {m['time_s'] * 1e3:.2f} ms, block lists {lists['time_s'] * 1e3:.2f} ms", flush=True)
  return dict(context=T, target_retention=retention, selection=mode if retention < 1 else "all",
              retention=lay["retention"], n_chunks=lay["n_chunks"], n_sel=lay["n_sel"], n_local=lay["n_local"],
              blocks_read=float(np.asarray(args[4]).sum() / pairs), kernel=dict(m, compile_s=cs), lists=lists)


def dense_prefill_impl(run: Run) -> str:
  return {"gpu": "cudnn", "tpu": "pallas_tpu_flash"}.get(run.platform, "xla")


def case_dense_prefill(run: Run, T: int) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  q, k, v = normal(21, (B, T, H, D), dt), normal(22, (B, T, K, D), dt), normal(23, (B, T, K, D), dt)
  impl = dense_prefill_impl(run)
  exe, cs = run.compile("dense_prefill", dense_prefill, (q, k, v), scale=D ** -0.5, implementation=impl)
  m = run.measure(exe, [(q, k, v)])
  print(f"  dense flash ({impl}): {m['time_s'] * 1e3:.2f} ms", flush=True)
  return dict(context=T, implementation=impl, dense=dict(m, compile_s=cs))


def distill_inputs(run: Run, T: int, dtype, seed: int = 0):
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  lay = prefill_layout(np.random.default_rng([a.seed, T, 7]), T, 1.0, "consistent", a)
  chunk_id = jnp.asarray(np.broadcast_to(lay["chunk_id"], (B, T)))
  base = 1000 * seed + 700
  q, k, v = (normal(base, (B, T, H, D), dtype), normal(base + 1, (B, T, K, D), dtype),
             normal(base + 2, (B, T, K, D), dtype))
  kw = dict(scale=D ** -0.5, max_chunks=lay["n_chunks"] + 1, n_sink=a.n_sink, block_q=a.distill_block_q,
            block_k=a.distill_block_k)
  return kw, (q, k, v, chunk_id)


def case_distill(run: Run, T: int) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  kw, args = distill_inputs(run, T, dt)
  exe, cs = run.compile("distill", distill, args, **kw, interpret=run.interpret, backend=run.backend)
  m = run.measure(exe, [args])
  impl = dense_prefill_impl(run)
  res = dict(context=T, max_chunks=kw["max_chunks"], kernel=dict(m, compile_s=cs), implementation=impl)
  print(f"  distill kernel: {m['time_s'] * 1e3:.2f} ms", flush=True)
  try:
    dexe, dcs = run.compile("dense_prefill", dense_prefill, args[:3], scale=kw["scale"], implementation=impl)
    res["dense"] = dict(run.measure(dexe, [args[:3]]), compile_s=dcs)
  except Exception as e:  # noqa: BLE001
    res["dense"] = dict(error=short(e))
    run.notes.append(f"dense flash at {T} (distill baseline): {short(e)}")
  return res


# ---------------------------------------------------------------------------------------------------------------
# Correctness


def precisions(run: Run):
  """(dtype, matmul precision) pairs to check. On a CPU f32 dots are exact at the default precision."""
  if run.interpret:
    return [("float32", None), ("bfloat16", None)]
  return [("float32", None), ("float32", "highest"), ("bfloat16", None)]


def judge(err: float, dtype: str, precision, run: Run) -> tuple[str, str]:
  bound = TOL[dtype]
  if err <= bound:
    return "pass", ""
  if dtype == "float32" and precision is None and not run.interpret and err <= FLAG_BOUND:
    why = "TF32 dots (Triton's default f32 precision)" if run.family == "gpu" else "bf16-pass f32 dots (TPU default)"
    return "flag", f"above {bound:g} at the default precision: {why}; the 'highest' row decides"
  return "fail", ""


def check_record(run, kernel, dtype, precision, shape, parts: dict) -> dict:
  err = max(parts.values())
  status, why = judge(err, dtype, precision, run)
  return dict(kernel=kernel, impl=run.impl(kernel), dtype=dtype, precision=precision or "default", shape=shape,
              err=err, parts=parts, bound=TOL[dtype], verdict=status, why=why)


def check_decode(run: Run, dtype: str, precision) -> dict:
  """In place (every n_splits) and compacted against the reference over the same visible tokens."""
  a = run.args
  L, r = max(a.contexts), min(a.retentions)
  d = decode_inputs(run, L, r, dtype, seed=1)
  k, v = d["kv"][0]
  scale = a.head_dim ** -0.5
  args = (d["q"], k, v, d["ids"], d["n"], d["mask"])
  rexe, _ = run.compile("decode_reference", cda.chunk_decode_attention_reference, args, precision="highest",
                        scale=scale, block_size=a.decode_block)
  ref = rexe(*args)
  parts = {}
  work = compacted_inputs(run, d, 0)
  for ns in a.n_splits:
    exe, _ = run.compile("decode_inplace", decode_inplace, args, precision=precision, scale=scale,
                         block_size=a.decode_block, n_splits=ns, interpret=run.interpret, backend=run.backend)
    parts[f"in place, n_splits={ns}"] = float(rel_err(exe(*args), ref))
    exe, _ = run.compile("decode_compacted", decode_compacted, work, precision=precision, scale=scale,
                         block=WORK_BLOCK, n_splits=ns, interpret=run.interpret, backend=run.backend)
    parts[f"compacted, n_splits={ns}"] = float(rel_err(exe(*work), ref))
  shape = f"B={a.batch} S={L} H={a.heads} K={a.kv_heads} D={a.head_dim}, {d['retention']:.0%} visible"
  return check_record(run, "decode", dtype, precision, shape, parts)


def check_gather(run: Run, dtype: str) -> dict:
  """The gather against numpy: span by span, token rows copied in order, zeros after."""
  a = run.args
  L, r = max(a.contexts), min(a.retentions)
  d = decode_inputs(run, L, r, dtype, seed=2)
  k, v = d["kv"][0]
  exe, _ = run.compile("gather", gather, (k, v, d["span_start"], d["span_len"]), budget=d["W"],
                       interpret=run.interpret)
  gk, gv, valid = exe(k, v, d["span_start"], d["span_len"])
  kn, vn = np.asarray(k, np.float32), np.asarray(v, np.float32)
  want_k = np.zeros((a.batch, d["W"], *kn.shape[2:]), np.float32)
  want_v = np.zeros_like(want_k)
  want_valid = np.zeros((a.batch, d["W"]), bool)
  for b, s in enumerate(d["sels"]):
    idx = np.concatenate([np.arange(st, st + ln) for st, ln in zip(s["span_start"], s["span_len"])])[:d["W"]]
    want_k[b, :len(idx)], want_v[b, :len(idx)], want_valid[b, :len(idx)] = kn[b, idx], vn[b, idx], True
  parts = {"k": float(rel_err(gk, jnp.asarray(want_k))), "v": float(rel_err(gv, jnp.asarray(want_v))),
           "valid": float(np.any(np.asarray(valid) != want_valid))}
  shape = f"B={a.batch} S={L} K={a.kv_heads} D={a.head_dim}, budget {d['W']}"
  return check_record(run, "gather", dtype, None, shape, parts)


def check_prefill(run: Run, dtype: str, precision) -> dict:
  a = run.args
  T, r, mode = check_context(run, a.prefill_block_q, a.prefill_block_k), min(a.retentions), a.prefill_selection[0]
  lay, kw, args = prefill_inputs(run, T, r, mode, dtype, seed=3)
  scale = a.head_dim ** -0.5
  rexe, _ = run.compile("prefill_reference", cpa.chunk_prefill_attention_reference, args, precision="highest",
                        scale=scale, **kw)
  exe, _ = run.compile("prefill", prefill, args, precision=precision, scale=scale, **kw, interpret=run.interpret,
                       backend=run.backend)
  shape = (f"B={a.batch} T={T} H={a.heads} K={a.kv_heads} D={a.head_dim}, {mode} {lay['retention']:.0%}, "
           f"{lay['n_sel']} selection columns")
  return check_record(run, "prefill", dtype, precision, shape, {"o": float(rel_err(exe(*args), rexe(*args)))})


def check_distill(run: Run, dtype: str, precision) -> dict:
  a = run.args
  T = check_context(run, a.distill_block_q, a.distill_block_k)
  kw, args = distill_inputs(run, T, dtype, seed=4)
  rexe, _ = run.compile("distill_reference", dsa.distill_attention_reference, args, precision="highest", **kw)
  exe, _ = run.compile("distill", distill, args, precision=precision, **kw, interpret=run.interpret,
                       backend=run.backend)
  (o, p), (ro, rp) = exe(*args), rexe(*args)
  shape = f"B={a.batch} T={T} H={a.heads} K={a.kv_heads} D={a.head_dim}, {kw['max_chunks']} chunks"
  return check_record(run, "distill", dtype, precision, shape, {"o": float(rel_err(o, ro)), "P": float(rel_err(p, rp))})


def check_context(run: Run, bq: int, bk: int) -> int:
  """--check-context, cut to the largest benchmarked context and rounded to whole blocks."""
  a = run.args
  T = min(a.check_context, max(a.prefill_contexts or a.contexts))
  step = math.lcm(bq, bk)
  return max(step, T // step * step)


# ---------------------------------------------------------------------------------------------------------------
# Report


def best(d: dict) -> tuple[str | None, dict | None]:
  """The fastest successful entry of {name: measurement}."""
  ok = [(k, m) for k, m in d.items() if "time_s" in m]
  return min(ok, key=lambda km: km[1]["time_s"]) if ok else (None, None)


def decode_summary(doc: dict, L: int, r: float, a: dict) -> dict | None:
  """Speedups and bandwidth of one decode case against its context's dense baselines."""
  c, dn = doc["cases"].get(f"decode/{L}/{r:g}"), doc["cases"].get(f"decode_dense/{L}")
  if not c or c.get("status") != "ok":
    return None
  bw = doc["cases"].get("bandwidth", {}).get("copy_bandwidth")
  dense_name, dense = best(dn["baselines"]) if dn and dn.get("status") == "ok" else (None, None)
  ip_ns, ip = best(c["inplace"])
  cp_ns, cp = best(c["compacted"])
  mean_chunk = (a["chunk_min"] + a["chunk_max"]) / 2
  per_token = cp["time_s"] + c["gather"]["time_s"] / mean_chunk if cp and "time_s" in c.get("gather", {}) else None
  paths = {k: t for k, t in (("in place", ip and ip["time_s"]), ("compacted", per_token)) if t}
  path = min(paths, key=paths.get) if paths else None
  s = dict(c=c, dense_name=dense_name, dense=dense, ip_ns=ip_ns, ip=ip, cp_ns=cp_ns, cp=cp, per_token=per_token,
           path=path, chunk_time=paths.get(path))
  s["speedup"] = dense["time_s"] / s["chunk_time"] if dense and path else None
  frac = lambda m: m["bandwidth"] / bw if m and bw else None
  s["bw_ip"], s["bw_cp"] = frac(ip), frac(cp)
  s["bw_dense"] = c["bytes_dense"] / dense["time_s"] / bw if dense and bw else None
  fr = {k: f for k, f in (("in place", s["bw_ip"]), ("compacted", s["bw_cp"])) if f is not None}
  s["bw_best"] = max(fr.items(), key=lambda kv: kv[1]) if fr else None
  return s


def prefill_summary(doc: dict, T: int, r: float, mode: str) -> dict | None:
  c = doc["cases"].get(prefill_id(T, r, mode))
  dn = doc["cases"].get(f"prefill_dense/{T}")
  if not c or c.get("status") != "ok":
    return None
  full = doc["cases"].get(prefill_id(T, 1.0, mode))
  t = c["kernel"]["time_s"]
  t_lists = c.get("lists", {}).get("time_s", 0.0)
  s = dict(c=c, t=t, t_lists=t_lists, dense=dn["dense"]["time_s"] if dn and dn.get("status") == "ok" else None,
           full=full["kernel"]["time_s"] if full and full.get("status") == "ok" else None)
  s["speedup"] = s["dense"] / (t + t_lists) if s["dense"] else None
  s["speedup_kernel"] = s["dense"] / t if s["dense"] else None
  s["vs_full"] = s["full"] / t if s["full"] else None
  return s


def prefill_id(T: int, r: float, mode: str) -> str:
  return f"prefill/{'all' if r >= 1 else mode}/{T}/{r:g}"


def target_point(doc: dict) -> tuple[int, float, str]:
  """The targets' context and retention; a smoke run judges its largest context and lowest retention instead."""
  a = doc["args"]
  if doc["smoke"]:
    return max(a["contexts"]), min(a["retentions"]), " (smoke stand-in: tiny shapes, meaningless)"
  return TARGET_CONTEXT, TARGET_RETENTION, ""


def targets(doc: dict) -> list[dict]:
  a = doc["args"]
  L, r, stand_in = target_point(doc)
  out = []
  s = decode_summary(doc, L, r, a)
  where = f"{ctx(L)}, {r:.0%}{stand_in}"
  if s and s["speedup"]:
    out.append(dict(name="decode speedup", where=where, value=s["speedup"], goal=TARGET_SPEEDUP,
                    met=s["speedup"] >= TARGET_SPEEDUP,
                    detail=f"{s['path']} path against {s['dense_name']}"))
  else:
    out.append(dict(name="decode speedup", where=where, value=None, goal=TARGET_SPEEDUP, met=None,
                    detail="not measured"))
  if s and s["bw_best"]:
    k, f = s["bw_best"]
    ns = s["ip_ns"] if k == "in place" else s["cp_ns"]
    out.append(dict(name="decode bandwidth / copy bandwidth", where=where, value=f, goal=TARGET_BW,
                    met=f >= TARGET_BW, detail=f"{k} kernel, n_splits={ns}"))
  else:
    out.append(dict(name="decode bandwidth / copy bandwidth", where=where, value=None, goal=TARGET_BW, met=None,
                    detail="not measured"))
  mode = a["prefill_selection"][0]
  p = prefill_summary(doc, L, r, mode)
  if p and p["speedup"]:
    out.append(dict(name="prefill speedup", where=where + f", {mode}", value=p["speedup"], goal=TARGET_SPEEDUP,
                    met=p["speedup"] >= TARGET_SPEEDUP,
                    detail=f"kernel + block lists against dense flash attention; kernel alone "
                    f"{p['speedup_kernel']:.2f}x"))
  else:
    out.append(dict(name="prefill speedup", where=where + f", {mode}", value=None, goal=TARGET_SPEEDUP, met=None,
                    detail="not measured"))
  return out


def ctx(n: int) -> str:
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def us(t) -> str:
  return "-" if t is None else f"{t * 1e6:.1f}"


def ms(t) -> str:
  return "-" if t is None else f"{t * 1e3:.2f}"


def x(v) -> str:
  return "-" if v is None else f"{v:.2f}x"


def pct(v) -> str:
  return "-" if v is None else f"{v:.0%}"


def render_md(doc: dict, md_path: pathlib.Path) -> str:
  a, dev, cases = doc["args"], doc["device"], doc["cases"]
  title = "SMOKE RUN: " if doc["smoke"] else ""
  L = [f"# {title}Pallas kernels on {dev['kind']}: correctness, speed, bandwidth", ""]
  if doc["smoke"]:
    L += ["**Smoke run: tiny shapes" + (", kernels in interpret mode on a CPU" if doc["interpret"] else "")
          + ". The timings, speedups and verdicts below are meaningless; only the correctness checks and that "
          "every step runs mean anything.**", ""]
  L += [f"Device: {dev['kind']} ({dev['platform']}, {dev['count']} device(s)"
        + (f", {dev['platform_version']}" if dev.get("platform_version") else "") + f"); jax {dev['jax']}"
        + (f", jaxlib {dev['jaxlib']}" if dev.get("jaxlib") else "") + f"; {dev['date']}; code {dev['code']}.", "",
        f"Command: `{doc['command']}`", "",
        f"Kernels: {doc['family'].upper()} family" + (" in interpret mode" if doc["interpret"] else "")
        + f". Shape: batch {a['batch']}, {a['heads']} query heads, {a['kv_heads']} kv heads, head_dim "
        f"{a['head_dim']} (smollm2-135m's attention); timed in {a['dtype']}. Chunks of {a['chunk_min']}-"
        f"{a['chunk_max']} tokens, n_sink {a['n_sink']}, n_local {a['n_local']}.", ""]
  # correctness
  checks = [c for k, c in cases.items() if k.startswith("check/")]
  L += ["## Correctness", "",
        "Each kernel against its jnp reference (run at `highest` precision) on fresh random inputs. Error: max "
        "|out - ref| / (1 + |ref|) (the tests' allclose with rtol = atol = bound).", "",
        "| kernel | runs as | dtype | dot precision | shape | error | bound | verdict |",
        "|---|---|---|---|---|---:|---:|---|"]
  for k, c in cases.items():
    if not k.startswith("check/"):
      continue
    if c.get("status") != "ok":
      L.append(f"| {k.split('/')[1]} | | {k.split('/')[2]} | {k.split('/')[3]} | | - | | "
               f"**error**: {c.get('error', c.get('status'))} |")
      continue
    parts = ", ".join(f"{n} {e:.1e}" for n, e in c["parts"].items()) if len(c["parts"]) > 1 else ""
    verdict = {"pass": "pass", "flag": "**flagged**", "fail": "**FAIL**"}[c["verdict"]]
    L.append(f"| {c['kernel']} | {c['impl']} | {c['dtype']} | {c['precision']} | {c['shape']} | {c['err']:.1e}"
             + (f" ({parts})" if parts else "") + f" | {c['bound']:g} | {verdict}"
             + (f": {c['why']}" if c["why"] else "") + " |")
  if not checks:
    L.append("| (not run) | | | | | | | |")
  # bandwidth
  bw = cases.get("bandwidth")
  L += ["", "## Bandwidth references", ""]
  if bw and bw.get("status") == "ok":
    L += [f"A {bw['bytes'] / 2**20:.0f} MiB float32 buffer, jitted, medians. Copy and negate count read + write "
          "bytes, read (a sum) the bytes read.", "", "| operation | time (ms) | timer | GB/s |",
          "|---|---:|---|---:|"]
    for n in ("copy", "negate", "read"):
      L.append(f"| {n} | {ms(bw[n].get('time_s', bw[n]['wall_s']))} | {bw[n].get('timer', 'wall')} | "
               f"{bw[n]['bandwidth'] / 1e9:.1f} |")
    L += ["", f"Copy bandwidth used below: {bw['copy_bandwidth'] / 1e9:.1f} GB/s (the faster of copy and negate)."]
  else:
    L.append("Not measured" + (f": {bw.get('error')}" if bw else "") + ".")
  # decode
  mean_chunk = (a["chunk_min"] + a["chunk_max"]) / 2
  L += ["", "## Decode", "",
        f"Times in microseconds per call ({timer_name(doc)}). In place: the kernel over the static buffer, blocks "
        f"of {a['decode_block']} read when they hold a visible token. Compacted: the kernel over the working "
        f"buffer ({WORK_BLOCK}-slot blocks) plus the {a['chunk_max']}-token open-chunk window, and the gather "
        f"that fills the buffer once per boundary charged per token (/ {mean_chunk:g}). Each at its best "
        f"n_splits of {a['n_splits']}. Retention: the target (the visible share of the context). Speedup: the "
        "fastest dense decode over the faster chunk path. Bandwidth: K/V bytes the kernel reads / its time, as a "
        "fraction of the copy bandwidth (BW dense: the fastest dense decode's, reading the whole context).", "",
        "| context | retention | blocks read in place | dense decode_attention | dense jax.nn xla | dense cudnn "
        "| in place | compacted | gather | compacted + gather/chunk | speedup | BW in place | BW compacted "
        "| BW dense |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  details = []
  for Lc in a["contexts"]:
    dn = cases.get(f"decode_dense/{Lc}")
    base = dn["baselines"] if dn and dn.get("status") == "ok" else {}
    bt = lambda n: us(base.get(n, {}).get("time_s"))
    for r in a["retentions"]:
      c = cases.get(f"decode/{Lc}/{r:g}")
      if not c:
        continue
      if c.get("status") != "ok":
        L.append(f"| {Lc} | {r:.0%} | | | | | | | | | **error**: {c.get('error', c.get('status'))} | | | |")
        continue
      s = decode_summary(doc, Lc, r, a)
      L.append(f"| {Lc} | {r:.0%} ({c['retention']:.1%}) | {c['listed_blocks'] / c['all_blocks']:.0%} | "
               f"{bt('decode_attention')} | {bt('jax.nn xla')} | {bt('jax.nn cudnn')} | "
               f"{us(s['ip'] and s['ip']['time_s'])} (n={s['ip_ns']}) | {us(s['cp'] and s['cp']['time_s'])} "
               f"(n={s['cp_ns']}) | {us(c['gather'].get('time_s'))} | {us(s['per_token'])} | {x(s['speedup'])} | "
               f"{pct(s['bw_ip'])} | {pct(s['bw_cp'])} | {pct(s['bw_dense'])} |")
      for ns in a["n_splits"]:
        ip, cp = c["inplace"].get(str(ns), {}), c["compacted"].get(str(ns), {})
        details.append(f"| {Lc} | {r:.0%} | {ns} | {us(ip.get('time_s'))} | {us(ip.get('wall_s'))} | "
                       f"{ms(ip.get('compile_s'))} | {us(cp.get('time_s'))} | {us(cp.get('wall_s'))} | "
                       f"{ms(cp.get('compile_s'))} |")
  L += ["", "Every n_splits (chunk_generate uses 2); times in us, compile in ms; `wall` is the wall-clock "
        "median beside the table's timer.", "",
        "| context | retention | n_splits | in place | wall | compile | compacted | wall | compile |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"] + details
  errs = [f"{n} at {Lc}: {m['error']}" for Lc in a["contexts"]
          for n, m in (cases.get(f"decode_dense/{Lc}") or {}).get("baselines", {}).items() if "error" in m]
  if errs:
    L += [""] + [f"- dense baseline failed: {e}" for e in errs]
  # distill
  L += ["", "## Distill", "",
        f"The teacher's attention and chunk mass P (blocks {a['distill_block_q']} x {a['distill_block_k']}) "
        "against dense causal flash attention alone (ms): the price of P.", "",
        "| context | chunks | distill | dense flash | distill / flash |", "|---:|---:|---:|---:|---:|"]
  for T in a["distill_contexts"]:
    c = cases.get(f"distill/{T}")
    if not c:
      continue
    if c.get("status") != "ok":
      L.append(f"| {T} | | **error**: {c.get('error', c.get('status'))} | | |")
      continue
    dt_ = c["dense"].get("time_s")
    L.append(f"| {T} | {c['max_chunks']} | {ms(c['kernel']['time_s'])} | {ms(dt_)} ({c['implementation']}) | "
             f"{x(c['kernel']['time_s'] / dt_ if dt_ else None)} |")
  # prefill
  L += ["", "## Prefill", "",
        f"Times in ms ({timer_name(doc)}). Blocks {a['prefill_block_q']} x {a['prefill_block_k']}; retention "
        "counts visible (query, key) pairs over causal pairs; blocks read: listed block pairs over causal block "
        "pairs; lists: building the block lists (`prefill_block_lists`, once per layer). 100% is the kernel's "
        "dense causal mode. Speedup: dense flash over kernel + lists (over the kernel alone in brackets). "
        "`vs 100%`: the kernel at 100% over the kernel here (the method's own gain).", "",
        "| context | selection | retention | selection columns | blocks read | kernel | compile (s) | lists "
        "| dense flash | speedup | vs 100% |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for mode in a["prefill_selection"]:
    for T in a["prefill_contexts"] or a["contexts"]:
      for r in a["retentions"]:
        if r >= 1 and mode != a["prefill_selection"][0]:
          continue
        cid = prefill_id(T, r, mode)
        c = cases.get(cid)
        if not c:
          continue
        if c.get("status") != "ok":
          L.append(f"| {T} | {mode} | {r:.0%} | | | **error**: {c.get('error', c.get('status'))} | | | | | |")
          continue
        s = prefill_summary(doc, T, r, mode)
        dn = cases.get(f"prefill_dense/{T}", {})
        L.append(f"| {T} | {c['selection']} | {c['retention']:.1%} | {c['n_sel']} | {c['blocks_read']:.0%} | "
                 f"{ms(s['t'])} | {c['kernel']['compile_s']:.1f} | {ms(s['t_lists'])} | {ms(s['dense'])} "
                 f"({dn.get('implementation', '-')}) | {x(s['speedup'])} ({x(s['speedup_kernel'])}) | "
                 f"{x(s['vs_full'])} |")
  # targets
  L += ["", "## Targets", ""]
  for t in targets(doc):
    verdict = {True: "**met**", False: "**not met**", None: "**not measured**"}[t["met"]]
    val = "-" if t["value"] is None else (f"{t['value']:.0%}" if "bandwidth" in t["name"] else f"{t['value']:.2f}x")
    goal = f">= {t['goal']:.0%}" if "bandwidth" in t["name"] else f">= {t['goal']:g}x"
    L.append(f"- {t['name']} at {t['where']}: {val} (goal {goal}; {t['detail']}): {verdict}.")
  L += ["", "## How it was measured", "", "Timing: " + " ".join(__doc__.split("Timing:", 1)[1].split())]
  if doc["notes"]:
    L += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
  kept = "\n"
  if md_path.exists() and KEEP in md_path.read_text():
    kept = md_path.read_text().split(KEEP, 1)[1]
  L += ["", KEEP + kept.rstrip("\n")]
  return "\n".join(L) + "\n"


def timer_name(doc: dict) -> str:
  timers = {m.get("timer") for c in doc["cases"].values() if isinstance(c, dict)
            for m in [c.get("kernel", {})] + list(c.get("inplace", {}).values()) if isinstance(m, dict)}
  timers.discard(None)
  return " / ".join(sorted(timers)) or "wall"


def plot(doc: dict, path: pathlib.Path):
  """Speedup against context, one line per retention: decode (the faster chunk path, and in place alone) and
  prefill."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a = doc["args"]
  fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(12, 4.6))
  colors = dict(zip(sorted(a["retentions"], reverse=True), ["tab:blue", "tab:green", "tab:orange", "tab:red",
                                                            "tab:purple", "tab:brown"]))
  for r in sorted(a["retentions"], reverse=True):
    pts = [(Lc, decode_summary(doc, Lc, r, a)) for Lc in a["contexts"]]
    pts = [(Lc, s) for Lc, s in pts if s and s["speedup"]]
    if pts:
      ax_d.plot([p[0] for p in pts], [p[1]["speedup"] for p in pts], "o-", color=colors[r],
                label=f"{r:.0%}, faster chunk path")
      ip = [(Lc, s["dense"]["time_s"] / s["ip"]["time_s"]) for Lc, s in pts if s["ip"]]
      if ip:
        ax_d.plot(*zip(*ip), "x:", color=colors[r], alpha=0.6, label=f"{r:.0%}, in place")
    for mode, style in zip(a["prefill_selection"], ("o-", "s--")):
      pts = [(T, prefill_summary(doc, T, r, mode)) for T in a["prefill_contexts"] or a["contexts"]]
      pts = [(T, s["speedup"]) for T, s in pts if s and s["speedup"]]
      if pts:
        ax_p.plot(*zip(*pts), style, color=colors[r], label=f"{r:.0%}, {mode if r < 1 else 'dense mode'}")
  kind = doc["device"]["kind"] + (" - SMOKE RUN, meaningless" if doc["smoke"] else "")
  for ax, what in ((ax_d, "decode: fastest dense / chunk"), (ax_p, "prefill: dense flash / chunk kernel")):
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(TARGET_SPEEDUP, color="tab:red", lw=0.8, ls=":", label=f"target {TARGET_SPEEDUP:g}x (128K, 25%)")
    ax.set_xscale("log", base=2)
    xs = sorted(set(a["contexts"]) | set(a["prefill_contexts"] or []))
    ax.set_xticks(xs, [f"{v // 1024}K" if v >= 1024 else str(v) for v in xs])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speedup (higher is better)")
    ax.set_title(f"{what}\n{kind}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Driver


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and every flag's default."""


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
  g = ap.add_argument_group("what and where")
  g.add_argument("--smoke", action="store_true",
                 help="tiny shapes (interpret mode on a CPU): checks that everything runs; timings meaningless. "
                 "Writes to --out, by default a new temporary folder, never over bench/RESULTS.md. Changes the "
                 "defaults (flags given still win): " + ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()))
  g.add_argument("--out", default=None,
                 help="folder for RESULTS.md, RESULTS.json, kernels_speed.png (default: bench/, or a temporary "
                 "folder with --smoke)")
  g.add_argument("--resume", default=None, metavar="JSON",
                 help="a RESULTS.json of an earlier run on the same device: its finished cases are kept, the case "
                 "it died in is recorded as killed, the rest runs")
  g.add_argument("--retry-errors", action="store_true", help="with --resume: run the cases that failed again")
  g.add_argument("--only", nargs="+", default=["bandwidth", "checks", "decode", "distill", "prefill"],
                 choices=["bandwidth", "checks", "decode", "distill", "prefill"], help="sections to run")
  g.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and the plot from RESULTS.json")
  g.add_argument("--family", choices=["gpu", "tpu"], default="gpu",
                 help="on a CPU (--smoke): which kernels run in interpret mode (on a GPU or TPU: the device's own)")
  g.add_argument("--no-cupti", action="store_true", help="on a GPU: wall-clock times only")
  g = ap.add_argument_group("shapes")
  g.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072],
                 help="decode (and prefill) contexts, in tokens")
  g.add_argument("--prefill-contexts", type=int, nargs="+", default=None, help="None: --contexts")
  g.add_argument("--distill-contexts", type=int, nargs="+", default=[4096, 8192])
  g.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                 help="target shares of the context a step reads (1.0: dense)")
  g.add_argument("--check-context", type=int, default=8192,
                 help="prefill and distill correctness context (their references are O(T^2))")
  g.add_argument("--batch", type=int, default=1, help="rows (each with its own random decode selection)")
  g.add_argument("--heads", type=int, default=9, help="query heads (default: smollm2-135m's)")
  g.add_argument("--kv-heads", type=int, default=3)
  g.add_argument("--head-dim", type=int, default=64)
  g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the timings")
  g.add_argument("--n-sink", type=int, default=4, help="first tokens, always visible (ChunkConfig's)")
  g.add_argument("--n-local", type=int, default=4, help="most recent chunks, always visible (ChunkConfig's)")
  g.add_argument("--chunk-min", type=int, default=20, help="chunk lengths are uniform in [min, max]")
  g.add_argument("--chunk-max", type=int, default=40, help="also the decode open-chunk window")
  g = ap.add_argument_group("kernel parameters")
  g.add_argument("--decode-block", type=int, default=64, help="block of the in-place decode kernel")
  g.add_argument("--n-splits", type=int, nargs="+", default=[2, 8, 32],
                 help="flash-decoding splits to time (chunk_generate uses 2; a batch-1 step has "
                 "n_splits x kv_heads programs)")
  g.add_argument("--prefill-block-q", type=int, default=PREFILL_BLOCK, help="default: chunk_prefill's")
  g.add_argument("--prefill-block-k", type=int, default=PREFILL_BLOCK)
  g.add_argument("--prefill-selection", nargs="+", default=["consistent"], choices=["consistent", "random"],
                 help="how chunks select: one shared random set (consistent), or each its own (random)")
  g.add_argument("--distill-block-q", type=int, default=256, help="default: train/config.py's")
  g.add_argument("--distill-block-k", type=int, default=512)
  g = ap.add_argument_group("timing")
  g.add_argument("--warmup", type=int, default=3, help="untimed calls first (one, for a slow call)")
  g.add_argument("--repeats", type=int, default=20, help="samples per timing (median)")
  g.add_argument("--case-budget-s", type=float, default=20.0,
                 help="fewer samples (at least 3) when repeats would take longer than this")
  g.add_argument("--min-sample-ms", type=float, default=2.0,
                 help="back-to-back calls per sample until a sample lasts this long (at most 64)")
  g.add_argument("--rotate-mib", type=float, default=256.0,
                 help="cycle through copies of the decode K/V totalling this much (defeats the L2 cache); 0: one")
  g.add_argument("--copy-mib", type=int, default=1024, help="buffer of the bandwidth reference")
  g.add_argument("--seed", type=int, default=0, help="of the chunkings and selections")
  smoke = ap.parse_known_args(argv)[0].smoke
  if smoke:
    ap.set_defaults(**SMOKE_DEFAULTS)
  args = ap.parse_args(argv)
  if args.out is None:
    args.out = tempfile.mkdtemp(prefix="bench_kernels_smoke_") if args.smoke else str(HERE)
  if args.smoke and pathlib.Path(args.out).resolve() == HERE:
    ap.error("--smoke never writes over bench/RESULTS.md: give --out another folder")
  return ap, args


def main(argv=None) -> dict:
  """Runs the benchmark; returns the results document (as written to RESULTS.json)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  ap, args = parse(argv)
  out = pathlib.Path(args.out)
  if args.render:
    doc = json.loads((out / "RESULTS.json").read_text())
    (out / "RESULTS.md").write_text(render_md(doc, out / "RESULTS.md"))
    plot(doc, out / "kernels_speed.png")
    return doc
  if jax.default_backend() not in ("gpu", "tpu") and not args.smoke:
    ap.error(f"no GPU or TPU here (jax backend {jax.default_backend()!r}): the benchmark needs one; "
             "use --smoke on a CPU")
  for T in set(args.contexts) | set(args.prefill_contexts or []):
    assert T % args.decode_block == 0 and T % math.lcm(args.prefill_block_q, args.prefill_block_k) == 0, T
  run = Run(args, argv)
  if args.resume:
    old = json.loads(pathlib.Path(args.resume).read_text())
    if old["device"]["kind"] != run.device["kind"]:
      ap.error(f"--resume: {args.resume} was measured on {old['device']['kind']}, this is {run.device['kind']}")
    run.cases, run.notes = old["cases"], old["notes"]
    run.notes.append(f"Resumed from an earlier run ({old['device']['date']}, `{old['command']}`).")
  print(f"device: {run.device['kind']} ({run.platform}); kernels: {run.family}"
        + (" in interpret mode" if run.interpret else "") + f"; writing to {out}", flush=True)
  a = args
  if "bandwidth" in a.only:
    run.case("bandwidth", lambda: case_bandwidth(run))
  if "checks" in a.only:
    for dtype, prec in precisions(run):
      tag = f"{dtype}/{prec or 'default'}"
      run.case(f"check/decode/{tag}", lambda: check_decode(run, dtype, prec))
      if prec is None:
        run.case(f"check/gather/{tag}", lambda: check_gather(run, dtype))
      run.case(f"check/prefill/{tag}", lambda: check_prefill(run, dtype, prec))
      run.case(f"check/distill/{tag}", lambda: check_distill(run, dtype, prec))
  if "decode" in a.only:
    for L in a.contexts:
      run.case(f"decode_dense/{L}", lambda: case_dense_decode(run, L))
      for r in a.retentions:
        run.case(f"decode/{L}/{r:g}", lambda: case_decode(run, L, r))
  if "distill" in a.only:
    for T in a.distill_contexts:
      run.case(f"distill/{T}", lambda: case_distill(run, T))
  if "prefill" in a.only:
    contexts = a.prefill_contexts or a.contexts
    for T in contexts:
      run.case(f"prefill_dense/{T}", lambda: case_dense_prefill(run, T))
    # cheapest first: the kernel unrolls one compare per selection column (~ retention x context / chunk)
    todo = sorted({(T, r, "all" if r >= 1 else mode) for mode in a.prefill_selection for T in contexts
                   for r in a.retentions}, key=lambda c: (0 if c[1] >= 1 else c[1] * c[0], c[0], c[2]))
    for T, r, mode in todo:
      m = mode if mode != "all" else a.prefill_selection[0]
      run.case(prefill_id(T, r, m), lambda: case_prefill(run, T, r, m))
  run.save()
  try:
    plot(json.loads((out / "RESULTS.json").read_text()), out / "kernels_speed.png")
  except Exception as e:  # noqa: BLE001
    run.notes.append(f"plot failed: {short(e)}")
    run.save()
  doc = json.loads((out / "RESULTS.json").read_text())
  print((out / "RESULTS.md").read_text().split("## How it was measured")[0])
  return doc


if __name__ == "__main__":
  main()
