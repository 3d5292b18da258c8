"""Regenerates every CPU results page of bench/ in one command, then the summary against the targets.

  python bench/regenerate.py                  # all benchmarks, about three hours on 2 cores
  python bench/regenerate.py --only memory    # some of them; the summary is rebuilt from every .json
  python bench/regenerate.py --summary        # only RESULTS_summary.md and summary.png, from the .json files
  python bench/regenerate.py --quick --out /tmp/b   # tiny shapes into another folder: checks the pipeline

Each benchmark runs in its own process (one's compiled programs and allocations cannot slow or
inflate the next), in the order of `STEPS`, and writes bench/RESULTS_<name>.md and .json; the
hand-written part of each page, below its marker, is kept (results_md.py). A benchmark that fails
is reported and the others go on. Then RESULTS_summary.md and summary.png set each figure beside
its target (the performance targets of the project: dense prefill against transformers, decode
against the machine's floor, chunk-sparse prefill, peak memory, training cost). The GPU kernels
have their own command, bench/bench_kernels.py (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import results_md  # noqa: E402
import summary  # noqa: E402

BROWN = ROOT.parent / "shared" / "data" / "brown.txt"  # the evaluation's default text (eval.run --brown)


@dataclasses.dataclass(frozen=True)
class Step:
  name: str  # the page is RESULTS_<name>.md
  command: tuple[str, ...]  # after `python`; {out}: the page's path without its suffix; {text}: --text
  quick: tuple[str, ...]  # arguments replacing the full run's, for --quick
  minutes: float  # about, on 2 cores, for the progress line


STEPS = (
    # bench_bytes' cases start in the text's first half: 1.4M characters of Brown (about 300K tokens) leave the 128K
    # case a second half that holds it
    Step("bytes", ("bench/bench_bytes.py", "--text", "{text}", "--chars", "1400000", "--out", "{out}.md"),
         ("--chars", "60000", "--contexts", "4096"), 1),  # 60000 characters hold about 12K tokens
    Step("decode_step", ("bench/decode_step.py", "--out", "{out}.md"),
         ("--models", "smollm2-135m", "--cases", "512:300"), 4),
    Step("generate", ("bench/bench_generate.py", "--lengths", "2048", "8192", "16384", "--repeats", "2",
                      "--out", "{out}.md"), ("--lengths", "256", "--new-tokens", "4", "--repeats", "1"), 25),
    Step("chunk", ("bench/bench_chunk.py", "--selection", "shared", "--lengths", "8192", "32768", "--ratios", "0.5",
                   "0.25", "--prefill-lengths", "4096", "16384", "--prefill-selection", "consistent",
                   "--prefill-repeats", "1", "--out", "{out}.md"),
         ("--lengths", "1024", "--ratios", "0.5", "--rounds", "2", "--prefill-lengths", "1024",
          "--prefill-selection", "consistent", "--prefill-repeats", "1"), 45),
    # The library's default rule (per-head) decodes from a dense prefill: its page has no prefill section.
    Step("chunk_defaults", ("bench/bench_chunk.py", "--lengths", "8192", "32768", "--ratios", "0.5", "0.25",
                            "--rounds", "10", "--prefill-lengths", "--budget", "--out", "{out}.md"),
         ("--lengths", "1024", "--ratios", "0.5", "--rounds", "2"), 35),
    Step("prefill_scorer", ("bench/bench_prefill_scorer.py", "--context", "16384", "--repeats", "1",
                            "--out", "{out}.md"), ("--context", "512", "--repeats", "1"), 40),
    Step("memory", ("bench/bench_memory.py", "--contexts", "8192", "32768", "--out", "{out}.md"),
         ("--contexts", "1024",), 40),
    Step("train", ("-m", "train.throughput", "--seq_len", "2048", "--out", "{out}.json"),
         ("--seq_len", "256", "--repeats", "1"), 3),
    Step("compile_time", ("bench/compile_time.py", "--out", "{out}.md"), ("--prompt-tokens", "256"), 1),
)


def argv_for(step: Step, out_dir: pathlib.Path, quick: bool, text=BROWN) -> list[str]:
  """The step's command line; with `quick`, its full-run options that --quick also names are replaced."""
  out = out_dir / f"RESULTS_{step.name}"
  out = str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)  # commands run from the repository root
  text = os.path.relpath(pathlib.Path(text).resolve(), ROOT)
  args = [a.replace("{out}", out).replace("{text}", text) for a in step.command]
  if quick:
    names = {a for a in step.quick if a.startswith("--")}
    kept, skip = [], False
    for a in args:
      if a.startswith("--"):
        skip = a in names
      if not skip:
        kept.append(a)
    args = kept + list(step.quick)
  return [sys.executable, *args]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None, help="default: every step")
  ap.add_argument("--quick", action="store_true", help="tiny shapes (timings meaningless); needs --out")
  ap.add_argument("--out", default=str(HERE), help="folder of the pages (default: bench/)")
  ap.add_argument("--summary", action="store_true", help="only rebuild the summary from the .json files")
  ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
  ap.add_argument("--text", default=str(BROWN), help="English text that bench_bytes segments into sentences")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  if args.quick and out == HERE:
    ap.error("--quick never writes over bench/'s pages: give --out another folder")
  if not args.summary and not pathlib.Path(args.text).is_file() and (args.only is None or "bytes" in args.only):
    ap.error(f"bench_bytes segments an English text: --text {args.text} is not a file")
  steps = [] if args.summary else [s for s in STEPS if args.only is None or s.name in args.only]
  out.mkdir(parents=True, exist_ok=True)
  failed = []
  total = sum(s.minutes for s in steps)
  done = 0.0
  for i, step in enumerate(steps, 1):
    cmd = argv_for(step, out, args.quick, args.text)
    shown = " ".join(["python", *cmd[1:]])
    eta = "" if args.quick else f"  (about {step.minutes:g} of {total - done:g} minutes left)"
    print(f"[{i}/{len(steps)}] {step.name}: {shown}{eta}", flush=True)
    if args.dry_run:
      continue
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    done += step.minutes
    print(f"[{i}/{len(steps)}] {step.name}: exit {rc} after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if rc:
      failed.append(f"{step.name} (exit {rc})")
  if args.dry_run:
    return 0
  page = summary.write(out, quick=args.quick)
  print(page.read_text().split(results_md.KEEP)[0])
  if failed:
    print("failed: " + ", ".join(failed), file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
