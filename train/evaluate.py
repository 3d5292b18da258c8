"""`python -m train.evaluate`: held-out metrics of adapter exports, side by side, on one packed dataset.

  python -m train.evaluate --preset smollm2-135m --data brown.txt --data_dir runs/smollm2/data \\
      --adapters smollm2-135m runs/smollm2/export --compare_n_local 0 4

The flags are train.run's (the preset, the data and the loss settings mean the same), so the
held-out batches are the ones training evaluated on. Every export is scored by the training loss's
metrics (KL, chunk recall@k, the teacher's mass on candidates for token_mean, boundary F1) once per
`--compare_n_local` value, so adapters trained under different candidate rules are compared under
the same one. With a row target (`--teacher head_max`, the default) every export is scored on its
selection layers, under that target. Prints a markdown table; `--out` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from chunkllm_jax import adapter_io, checks  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import run  # noqa: E402
from train.run import FlagError  # noqa: E402

COLUMNS = ("kl", "chunk_recall", "teacher_far_mass", "bce", "boundary_f1")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  run.add_platform_flags(ap)
  ap.add_argument("--preset", default="smollm2-135m", help=f"one of {', '.join(config_lib.PRESETS)}")
  config_lib.add_flags(ap)
  ap.add_argument("--adapters", nargs="+", required=True, help="export dirs or registered names")
  ap.add_argument("--compare_n_local", type=int, nargs="+", default=None,
                  help="score under each of these candidate rules (default: --n_local)")
  ap.add_argument("--out", default="", help="also write the rows as JSON here")
  args = ap.parse_args(argv)
  run.select_platform(args)
  return config_lib.from_args(args), args


def evaluate(cfg, names, n_locals) -> list[dict]:
  import jax

  import chunkllm_jax as cj
  from train import backbone, data, step
  from train.losses import loss_config_of
  from train.metrics import mean_metrics, to_floats

  # LossConfig is a static pytree: one compiled program per candidate rule, shared by every export.
  eval_step = jax.jit(step.eval_step, static_argnames="loss_config")

  bb = backbone.load(cfg.model, cfg.tokenizer, cfg.dtype, cfg.seed)
  splits = data.load_splits(files=cfg.data, tfds_name=cfg.tfds_name, text_key=cfg.tfds_text_key,
                            tokenizer=bb.tokenizer, tokenizer_name=cfg.tokenizer or cfg.model, seq_len=cfg.seq_len,
                            eval_fraction=cfg.eval_fraction, data_dir=cfg.data_dir or f"{cfg.workdir}/data",
                            retrieval_mix=cfg.retrieval_mix, mix_seed=cfg.seed)
  if splits["validation"] is None:
    raise FlagError("the dataset has no held-out split: raise --eval_fraction")
  batches = data.eval_batches(splits["validation"], global_batch=cfg.batch_size, n_batches=cfg.eval_batches)
  rows = []
  for name in names:
    adapters = cj.load_adapters(name, bb.config)
    if cfg.teacher != "token_mean":  # row targets score the selection layers, the ones inference reads
      adapters = selection_layers_only(adapters)
    params = cj.with_adapters(bb.params, adapters)
    for n_local in n_locals:
      loss_config = loss_config_of(dataclasses.replace(cfg, n_local=n_local))
      m = mean_metrics([to_floats(eval_step(params.adapters, params, b, loss_config=loss_config)) for b in batches])
      rows.append(dict(adapters=name, n_local=n_local, **{k: m.get(k, float("nan")) for k in COLUMNS}))
      print(f"{name}, n_local {n_local}: " + ", ".join(f"{k} {rows[-1][k]:.4f}" for k in COLUMNS if k in m),
            file=sys.stderr, flush=True)
  return rows


def selection_layers_only(adapters):
  """The adapters of the selection layers alone (an export trained on every layer stores its pick)."""
  acfg = adapters.config
  layers = acfg.selection_layers or acfg.qk_layers
  idx = [acfg.qk_layers.index(l) for l in layers]
  import jax
  import numpy as np

  qk = jax.tree.map(lambda w: w[np.asarray(idx)], adapters.params["qk"])
  return adapters.replace(params=dict(adapters.params, qk=qk),
                          config=dataclasses.replace(acfg, qk_layers=tuple(layers), selection_layers=tuple(layers)))


def check_flags(cfg, args) -> None:
  """Everything a user gives, before the backbone is loaded or the data built."""
  from chunkllm_jax import adapter_io

  run.check_common_flags(cfg)
  for name in args.adapters:
    adapter_io.read_export_config(name)  # missing, or not an export: named now
  for n_local in args.compare_n_local or []:
    if n_local < 0:
      raise FlagError(f"--compare_n_local {n_local}: give counts of 0 or more")
  if args.out:
    out = Path(args.out).expanduser().absolute()
    try:  # a file of the user's (the training text, a results file) is never replaced
      checks.check_out_file(out, "--out", "train.evaluate", is_rows_file, "rows it wrote before")
    except checks.OutFolderError as e:
      raise FlagError(str(e)) from None
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
      raise FlagError(f"--out {args.out}: {out.parent} is not a folder this user can write to")


def is_rows_file(path) -> bool:
  """Whether `path` holds JSON rows this tool wrote: a list of objects, each naming its adapters and n_local."""
  rows = json.loads(Path(path).read_text())
  return isinstance(rows, list) and all(isinstance(r, dict) and {"adapters", "n_local"} <= set(r) for r in rows)


def write_rows(rows, path) -> None:
  """The rows as strict JSON (a metric that is not a number is null), written whole or not at all."""
  clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
  text = json.dumps(clean, indent=1, allow_nan=False) + "\n"
  adapter_io.write_atomic(Path(path).expanduser(), text.encode())


def main(argv=None) -> int:
  cfg, args = parse_args(argv)
  try:
    run.check_platform(run.platform_of(args))  # selected in parse_args, before the config was read
    check_flags(cfg, args)
    rows = evaluate(cfg, args.adapters, args.compare_n_local or [cfg.n_local])
  except run.user_errors() as e:
    return run.report(e)
  # teacher_far_mass is a metric of the token_mean target alone: a column no row has is left out
  columns = [k for k in COLUMNS if any(not math.isnan(r[k]) for r in rows)]
  print("| adapters | n_local | " + " | ".join(columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  for r in rows:
    print(f"| {r['adapters']} | {r['n_local']} | " + " | ".join(f"{r[k]:.3f}" for k in columns) + " |")
  if args.out:
    write_rows(rows, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
