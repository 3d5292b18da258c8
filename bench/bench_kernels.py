"""Builds, checks and times every Pallas kernel on one accelerator, in one call.

On a GPU (or a TPU), from the repository root:

  python bench/bench_kernels.py                                  # bench/RESULTS.md, RESULTS.json, kernels_speed.png
  python bench/bench_kernels.py --out DIR                        # the same files in DIR
  python bench/bench_kernels.py --out DIR --resume DIR/RESULTS.json   # go on where an interrupted run stopped

On a CPU, `python bench/bench_kernels.py --smoke` runs everything at tiny shapes with the kernels in interpret
mode (timings meaningless, and labelled so); tests/test_bench_kernels.py runs it so the script cannot rot.

What it measures, in what order, and how it times: bench/KERNELS.md. The parts: kernel_programs.py (what runs,
its inputs), kernel_run.py (device, timer, saving), kernel_cases.py (timed cases and correctness checks),
kernel_report.py (RESULTS.md and the plot); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile

import jax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from chunkllm_jax.chunk_prefill import PREFILL_BLOCK  # noqa: E402
from kernel_cases import (  # noqa: E402
    case_bandwidth, case_decode, case_dense_decode, case_dense_prefill, case_distill, case_prefill,
    check_decode, check_distill, check_gather, check_prefill, precisions)
from kernel_programs import SMOKE_DEFAULTS  # noqa: E402
from kernel_report import plot, prefill_id, render_md  # noqa: E402
from kernel_run import Run, short  # noqa: E402


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
