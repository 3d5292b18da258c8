"""bench_kernels: one invocation's state (device, compiled programs, timer) and the cases saved as they
finish."""

from __future__ import annotations

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
import time
import traceback

import jax

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from kernel_report import render_md  # noqa: E402


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
    dirty = git("status", "--porcelain", "--", "pallas_kernels", "chunkllm_jax", "bench/bench_kernels.py",
                "bench/kernel_programs.py", "bench/kernel_run.py", "bench/kernel_cases.py", "bench/kernel_report.py")
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
