"""`python -m train.run`: train ChunkLLM's adapters on a frozen backbone.

    python -m train.run --cpu --preset smollm2-135m --data corpus.txt --workdir runs/smollm2 \
        --export runs/smollm2/export

Every `TrainConfig` field is a flag. Started again with the same command, a run resumes from its
last checkpoint in `<workdir>/checkpoints` (same later losses as a run never stopped); started with
other settings than its checkpoints' (`<workdir>/run_settings.json`), it is refused. `--export`
replaces only an earlier export, never the workdir or what it holds. Multi-host:
`--tpu` initialises `jax.distributed` itself; elsewhere give `--coordinator HOST:PORT
--num_processes N --process_id I` to each process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_platform_flags(p)
  p.add_argument("--preset", default="smollm2-135m", help="defaults to start from (train/config.py PRESETS)")
  p.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)
  from train import config  # no jax backend touched yet

  config.add_flags(p)
  return p.parse_args(argv)


def add_platform_flags(p: argparse.ArgumentParser) -> None:
  platform = p.add_mutually_exclusive_group()
  platform.add_argument("--cpu", action="store_true", help="run on the CPU")
  platform.add_argument("--gpu", action="store_true", help="run on GPUs")
  platform.add_argument("--tpu", action="store_true", help="run on TPUs (multi-host: jax.distributed)")


def platform_of(args: argparse.Namespace) -> str | None:
  """jax's name of the platform --cpu / --gpu / --tpu asks for (None: jax's own choice)."""
  return "tpu" if args.tpu else "cuda" if args.gpu else "cpu" if args.cpu else None


def select_platform(args: argparse.Namespace) -> str | None:
  """--cpu / --gpu / --tpu (None: jax's own choice); must run before any computation."""
  platform = platform_of(args)
  if platform:
    jax.config.update("jax_platforms", platform)
  return platform


def setup_platform(args: argparse.Namespace) -> None:
  """Selects the platform and joins the process group; must run before any computation."""
  given = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f) is not None]
  if given and len(given) < 3:
    raise FlagError(f"--{', --'.join(given)}: a process group needs --coordinator HOST:PORT, --num_processes N and "
                    "--process_id I together")
  if given and not 0 <= args.process_id < args.num_processes:
    raise FlagError(f"--process_id {args.process_id} is not one of the --num_processes {args.num_processes} "
                    f"(0 to {args.num_processes - 1})")
  platform = select_platform(args)
  if args.coordinator or args.num_processes:
    if platform in (None, "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.tpu:
    try:
      jax.distributed.initialize()  # finds the other hosts of a TPU slice by itself
    except (RuntimeError, ValueError) as e:  # no TPU metadata here: not a TPU VM
      raise FlagError(f"--tpu: this machine is not a TPU host jax can join ({_first_line(e)}); give --gpu or "
                      "--cpu, or run on a TPU VM") from None
  check_platform(platform)


PLATFORM_FLAGS = {"tpu": "--tpu", "cuda": "--gpu", "cpu": "--cpu"}


def check_platform(platform: str | None) -> None:
  """The backend --cpu / --gpu / --tpu asked for must exist here: said now as a flag's error, not as a
  traceback from deep in jax at the first computation."""
  if platform is None:
    return
  try:
    jax.devices()
  except (RuntimeError, AssertionError, ValueError) as e:  # jax's CUDA plugin asserts with no message
    need, hint = {"tpu": ("a TPU", "a TPU needs libtpu (pip install 'jax[tpu]') on a TPU VM; "),
                  "cuda": ("a CUDA GPU", "a GPU needs jax installed with CUDA (pip install 'jax[cuda12]'); "),
                  "cpu": ("the CPU", "")}[platform]
    raise FlagError(f"{PLATFORM_FLAGS[platform]}: jax cannot use {need} on this machine ({_first_line(e)}); {hint}"
                    "give the flag of a platform it has, e.g. --cpu") from None


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class FlagError(ValueError):
  """A flag that cannot work, refused before any work starts."""


class DivergedError(ValueError):
  """A step whose loss or adapters are not finite (nan, inf): the run stops before saving or exporting it."""


# What a run's checkpoints depend on, besides the data and the backbone: resuming with another value
# would not continue the same run (train/checkpoint.py SETTINGS_FILE).
SETTINGS = ("tokenizer", "dtype", "eval_fraction", "seq_len", "batch_size", "seed", "steps", "lr",
            "warmup_steps", "end_lr_ratio", "weight_decay", "clip_norm", "d_c", "kl_weight", "n_sink",
            "n_local", "max_chunk_len", "max_chunks", "recall_k", "teacher", "score_queries", "retrieval_mix",
            "max_sequences", "student_queries", "selection_layers")
DESCRIBE = {"data_sha256": "data", "backbone_fingerprint": "model", "backbone_weights": "model"}  # shown beside a difference


# Counts and their least sane value: a zero batch or sequence fails only after the data is built.
MINIMUM = dict(seq_len=2, batch_size=1, steps=0, max_sequences=0, warmup_steps=0, d_c=1, n_sink=0, n_local=0,
               max_chunk_len=1, max_chunks=1, recall_k=1, score_queries=1, student_queries=1, block_q=1, block_k=1, mesh_data=0,
               mesh_model=1, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0)
DTYPES = ("float32", "bfloat16")


def check_flags(cfg) -> None:
  """Refuses every flag that cannot work or would destroy files (FlagError, ExportTargetError), before any
  work: a wrong flag costs nothing, not a data build or a whole training run."""
  if cfg.max_to_keep < 1:
    raise FlagError(f"--max_to_keep {cfg.max_to_keep} would delete each checkpoint as soon as it is written; "
                    "give 1 or more")
  _check_writable("--workdir", Path(cfg.workdir))  # before --data_dir, which is in it by default
  check_workdir_files(Path(cfg.workdir))
  check_common_flags(cfg)
  from train.checkpoint import has_checkpoints

  if not cfg.checkpoint_every and has_checkpoints(Path(cfg.workdir) / "checkpoints"):
    raise FlagError(f"--checkpoint_every 0 would train from step 0 beside the checkpoints in {cfg.workdir}: leave "
                    "it out to resume from them, or give another --workdir")
  if cfg.max_sequences and cfg.max_sequences < cfg.batch_size:
    raise FlagError(f"--max_sequences {cfg.max_sequences} is fewer than one batch (--batch_size {cfg.batch_size})")
  if uses_cache(cfg):
    _check_writable("--cache_dir", cache_dir(cfg))
    from train.teacher_cache import CACHE_FILE
    for split in ("train", "validation"):  # the folders the cache fills: another's files there are refused now
      held = cache_dir(cfg) / split
      if held.is_dir() and any(held.iterdir()) and not (held / CACHE_FILE).is_file():
        raise FlagError(f"--cache_dir {cfg.cache_dir or cache_dir(cfg)}: {held} is not empty and holds no "
                        f"{CACHE_FILE} (it is not a teacher cache): give a folder of its own for the cache")
  if cfg.export:
    if cfg.steps == 0 and not cfg.allow_untrained_export:
      raise FlagError(f"--steps 0 --export {cfg.export} would export untrained (random) adapters: give --steps "
                      "1 or more, or --allow_untrained_export true if that is what you want")
    check_export_path(cfg)
  import chunkllm_jax as cj

  try:  # the devices are known once the platform is set
    cj.make_mesh(data=cfg.mesh_data or None, model=cfg.mesh_model)
  except ValueError as e:
    raise FlagError(f"--mesh_data {cfg.mesh_data} / --mesh_model {cfg.mesh_model}: {e}") from None


def check_common_flags(cfg) -> None:
  """The flags train.run and train.evaluate share: ranges, dtypes, the data files, the data folder, the model."""
  for name, least in MINIMUM.items():
    if getattr(cfg, name) < least:
      raise FlagError(f"--{name} {getattr(cfg, name)} is too small: give {least} or more")
  for name in ("dtype", "export_dtype"):
    if getattr(cfg, name) not in DTYPES:
      raise FlagError(f"--{name} {getattr(cfg, name)} is not supported: give one of {', '.join(DTYPES)}")
  from train.losses import TEACHERS

  if cfg.teacher not in TEACHERS:
    raise FlagError(f"--teacher {cfg.teacher} is not a teacher target: give one of {', '.join(TEACHERS)}")
  if cfg.score_queries > cfg.seq_len or cfg.student_queries > cfg.seq_len:
    raise FlagError(f"--score_queries {cfg.score_queries} / --student_queries {cfg.student_queries}: a sequence "
                    f"has {cfg.seq_len} tokens (--seq_len); give at most that many")
  if cfg.student_queries > 1 and cfg.teacher == "token_mean":
    raise FlagError(f"--student_queries {cfg.student_queries} scores the selection rows: give --teacher head_max "
                    "or head_mean, or --student_queries 1 with token_mean (every token scores alone)")
  from chunkllm_jax.decoding import check_seed

  try:
    check_seed(cfg.seed)  # what decoding.seed_key takes
  except ValueError:
    raise FlagError(f"--seed {cfg.seed} does not fit in 64 bits: give one from -2**63 to 2**63 - 1") from None
  if not 0 <= cfg.retrieval_mix <= 1:  # also refuses nan
    raise FlagError(f"--retrieval_mix {cfg.retrieval_mix} is not a fraction: give a value in [0, 1] (the share of "
                    "training tokens in retrieval-mixture documents)")
  if cfg.retrieval_mix and cfg.tfds_name:
    raise FlagError("--retrieval_mix mixes into text files (--data): give --retrieval_mix 0 with --tfds_name")
  for name, ok in (("lr", 0 < cfg.lr < float("inf")), ("eval_fraction", 0 <= cfg.eval_fraction < 1),
                   ("end_lr_ratio", 0 <= cfg.end_lr_ratio <= 1), ("weight_decay", cfg.weight_decay >= 0),
                   ("clip_norm", cfg.clip_norm > 0), ("kl_weight", 0 <= cfg.kl_weight < float("inf"))):
    if not ok:  # also refuses nan; a negative kl_weight would train the QK Adapters away from the teacher
      raise FlagError(f"--{name} {getattr(cfg, name)} is out of range (lr > 0, eval_fraction in [0, 1), "
                      "end_lr_ratio in [0, 1], weight_decay >= 0, clip_norm > 0, kl_weight >= 0)")
  if cfg.n_sink >= cfg.seq_len - 1:  # no chunk after the sinks: no KL row, the QK Adapters would not train
    raise FlagError(f"--n_sink {cfg.n_sink} leaves no tokens to chunk in a sequence of --seq_len {cfg.seq_len}: "
                    "give an --n_sink well below --seq_len (default 4)")
  if cfg.batch_size % jax.process_count():
    raise FlagError(f"--batch_size {cfg.batch_size} is global: give a multiple of the {jax.process_count()} processes")
  check_data_flags(cfg)
  _check_writable("--data_dir", Path(cfg.data_dir or Path(cfg.workdir) / "data"))
  check_model_flag(cfg)  # the model's context first: a --seq_len past it is the error to name
  if cfg.max_chunks * cfg.max_chunk_len < cfg.seq_len - cfg.n_sink:  # every sequence would pass the table
    raise FlagError(f"--max_chunks {cfg.max_chunks} chunks of at most --max_chunk_len {cfg.max_chunk_len} tokens cannot "
                    f"hold a sequence of --seq_len {cfg.seq_len}: the chunks past the table would go undistilled; give "
                    f"--max_chunks of at least {-(-(cfg.seq_len - cfg.n_sink) // cfg.max_chunk_len)}")


def check_data_flags(cfg) -> None:
  from train import tfds_builder

  if not cfg.data and not cfg.tfds_name:
    raise FlagError("no training text: give --data FILE... (text files) or --tfds_name NAME")
  given_as = {}  # a file (its resolved path) -> the name first given for it
  for f in cfg.data:
    p = Path(f)
    real = p.resolve()
    if p.is_file() and real in given_as:
      again = "twice" if given_as[real] == f else f"twice (also as {given_as[real]})"
      raise FlagError(f"--data {f} is given {again}: its text would count twice; give each file once")
    given_as.setdefault(real, f)
    if p.is_dir():
      raise FlagError(f"--data {f} is a folder: give the text files in it (e.g. --data {p / '*.txt'})")
    if not p.is_file():
      raise FlagError(f"--data {f} does not exist (or is not a file): give UTF-8 text files")
    tfds_builder.check_text_file(f)  # empty or not text: said now, not after the model loads


def _check_writable(flag: str, path: Path) -> None:
  """The folder, or the nearest existing folder above it, must let us create files (nothing is created now)."""
  path = path.expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise FlagError(f"{flag} {path} is a file; give a folder")
  existing = next(p for p in [path, *path.parents] if p.exists())
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise FlagError(f"{flag} {path} cannot be written ({existing} does not let this user create files); "
                    "give a folder you can write to")


def check_workdir_files(workdir: Path) -> None:
  """What a run keeps in its workdir must be of its kind there: a file where the checkpoints go (or a folder
  where the metrics log goes) failed only at the first save, after the data build and the first steps."""
  from train.checkpoint import SETTINGS_FILE

  for name, is_folder in (("checkpoints", True), ("tensorboard", True), ("metrics.jsonl", False),
                          (SETTINGS_FILE, False), (LOCK_FILE, False)):
    p = workdir / name
    if p.exists() and p.is_dir() != is_folder:
      kind = "a file" if is_folder else "a folder"
      raise FlagError(f"--workdir {workdir}: {p} is {kind}, where a run keeps its {name}: move it aside or give "
                      "another --workdir")


def uses_cache(cfg) -> bool:
  """Row targets are cached unless --teacher_cache false; the paper's token_mean target has no cache."""
  return cfg.teacher != "token_mean" and cfg.teacher_cache


def cache_dir(cfg) -> Path:
  return Path(cfg.cache_dir or Path(cfg.workdir) / "teacher_cache")


def check_model_flag(cfg) -> None:
  """The backbone's config only (weights are loaded later): a missing or malformed model is named now."""
  from chunkllm_jax import weights
  from train.backbone import RANDOM_TINY

  if cfg.tokenizer:
    try:
      weights.tokenizer_source(cfg.tokenizer)
    except FileNotFoundError as e:
      raise FlagError(f"--tokenizer: {e}") from None
  if cfg.model == RANDOM_TINY:
    if not cfg.tokenizer:
      raise FlagError(f"--model {RANDOM_TINY} needs --tokenizer (e.g. smollm2-135m)")
    return
  try:
    model_config = weights.load_config(cfg.model)
  except ValueError as e:  # not a GGUF file, a config.json that is not JSON: named as the flag's
    raise FlagError(f"--model {cfg.model}: {e}") from None
  check_selection_layers(cfg, model_config)
  if cfg.seq_len > model_config.max_position:
    raise FlagError(f"--seq_len {cfg.seq_len} is past {cfg.model}'s context ({model_config.max_position} positions): "
                    f"give at most {model_config.max_position}")


def check_selection_layers(cfg, model_config) -> None:
  full = model_config.full_attention_layers
  if not full:  # else refused only by the teacher, after the backbone and the data
    raise FlagError(f"{cfg.model} has no full-attention layer (every layer reads a sliding window of "
                    f"{model_config.sliding_window} tokens): ChunkLLM has no layer to make sparse, so no "
                    "QK Adapters to train")
  bad = [i for i in cfg.selection_layers or () if i not in full]
  if bad:
    raise FlagError(f"--selection_layers {bad} are out of range or not full-attention layers of {cfg.model}; "
                    f"choose among {full}")


def check_export_path(cfg) -> None:
  """An export replaces its folder: never the workdir, a folder above it, or what the run keeps."""
  from chunkllm_jax import adapter_io
  from train.checkpoint import SETTINGS_FILE

  export, workdir = Path(cfg.export).resolve(), Path(cfg.workdir).resolve()
  fix = f"give the export a folder of its own, e.g. --export {workdir / 'export'}"
  if export == workdir or export in workdir.parents:
    raise adapter_io.ExportTargetError(f"--export {cfg.export} is the workdir or a folder above it: {fix}")
  kept = [workdir / n for n in ("checkpoints", "tensorboard", "metrics.jsonl", SETTINGS_FILE, LOCK_FILE)]
  for p in kept + [Path(cfg.data_dir or workdir / "data").resolve(), cache_dir(cfg).resolve()]:
    if export == p or p in export.parents or export in p.parents:
      raise adapter_io.ExportTargetError(f"--export {cfg.export} would replace {p}, which the run keeps: {fix}")
  _check_writable(f"--export {cfg.export}: the folder", Path(cfg.export).absolute().parent)  # written beside it, then moved
  adapter_io.check_export_target(Path(cfg.export), overwrite=True)  # as given: a link is refused, as at the end


def run_settings(cfg, *, backbone_fingerprint: str, backbone_weights: str) -> dict:
  """The settings recorded with the checkpoints (the data and the backbone's weights by content, so
  they may move)."""
  from train import tfds_builder

  h = hashlib.sha256(json.dumps([cfg.tfds_name, cfg.tfds_text_key]).encode())
  for f in cfg.data:
    if not Path(f).is_file():  # load_splits names it later
      h.update(f"missing {f}".encode())
      continue
    h.update(tfds_builder.file_digest(f))
  listed = lambda v: list(v) if isinstance(v, tuple) else v  # as JSON gives it back from the file
  return dict({k: listed(getattr(cfg, k)) for k in SETTINGS}, data_sha256=h.hexdigest()[:16],
              data=list(cfg.data) or f"tfds:{cfg.tfds_name}", backbone_fingerprint=backbone_fingerprint,
              backbone_weights=backbone_weights, model=cfg.model)


def train(cfg) -> dict[str, float]:
  """Runs (or resumes) training; returns the last train metrics. The workdir is locked to this run throughout."""
  check_flags(cfg)
  lock = WorkdirLock(Path(cfg.workdir)) if jax.process_index() == 0 else None
  try:
    return _train(cfg)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg) -> dict[str, float]:
  from jax.experimental import multihost_utils
  from tqdm.auto import tqdm

  import chunkllm_jax as cj
  from chunkllm_jax import adapter_io
  from chunkllm_jax.decoding import seed_key
  from chunkllm_jax.sharding import params_sharding, replicated
  from train import backbone, checkpoint, data, metrics as metrics_lib, step as step_lib
  from train.losses import loss_config_of

  pi, pc = jax.process_index(), jax.process_count()
  workdir = Path(cfg.workdir)
  # The settings known before the model loads (flags, data) are compared first; the backbone's once it has.
  settings = run_settings(cfg, backbone_fingerprint="", backbone_weights="")
  checkpoint.check_settings(workdir, settings, describe=DESCRIBE, ignore=("backbone_fingerprint", "backbone_weights"))
  bb = backbone.load(cfg.model, cfg.tokenizer, cfg.dtype, cfg.seed)
  # Before the data is built and before any Checkpointer exists (rotation deletes old checkpoints).
  weights = backbone.weights_fingerprint(bb.params)
  settings = dict(settings, backbone_fingerprint=adapter_io.fingerprint(bb.config), backbone_weights=weights)
  recorded = checkpoint.check_settings(workdir, settings, describe=DESCRIBE)
  if recorded == "unrecorded" and pi == 0:
    print(f"{workdir} has checkpoints but no {checkpoint.SETTINGS_FILE} (they predate it): recording this "
          "run's settings there once it has resumed", file=sys.stderr)
  layers = cfg.selection_layers or None  # None: every full-attention layer, chosen at inference
  check_selection_layers(cfg, bb.config)  # again for a random backbone, whose config is made with its weights
  acfg = cj.AdapterConfig(d_c=cfg.d_c, qk_layers=layers, selection_layers=layers,
                          score_queries=cfg.student_queries).resolve(bb.config)
  loss_config = loss_config_of(cfg)
  mesh = cj.make_mesh(data=cfg.mesh_data or None, model=cfg.mesh_model)

  # Data: process 0 builds the packed dataset, the others then open it.
  def open_splits():
    return data.load_splits(files=cfg.data, tfds_name=cfg.tfds_name, text_key=cfg.tfds_text_key,
                            tokenizer=bb.tokenizer, tokenizer_name=cfg.tokenizer or cfg.model,
                            seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction,
                            data_dir=cfg.data_dir or str(workdir / "data"), retrieval_mix=cfg.retrieval_mix,
                            mix_seed=cfg.seed)

  splits = open_splits() if pi == 0 else None
  if pc > 1:
    multihost_utils.sync_global_devices("packed dataset built")
    splits = splits or open_splits()
  if cfg.max_sequences:
    splits = dict(splits, train=data.FirstN(splits["train"], cfg.max_sequences))
  params = jax.device_put(bb.params, params_sharding(bb.params, mesh))
  if uses_cache(cfg):  # one frozen pass per sequence, once; training then reads the rows
    splits = dict(splits, **build_caches(cfg, splits, params, bb, weights, acfg, loss_config))
  train_it = data.train_iterator(splits["train"], global_batch=cfg.batch_size, seed=cfg.seed,
                                 process_index=pi, process_count=pc)
  eval_set = []
  if cfg.eval_every and splits["validation"] is not None:
    eval_set = data.eval_batches(splits["validation"], global_batch=cfg.batch_size, n_batches=cfg.eval_batches,
                                 process_index=pi, process_count=pc)

  # State: adapters and optimizer replicated, backbone sharded over `model`.
  schedule = step_lib.make_schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.end_lr_ratio)
  if 0 < cfg.steps <= cfg.warmup_steps and pi == 0:  # a short run of a preset's recipe: warming up throughout
    print(f"warning: the learning rate warms up from 0 over --warmup_steps {cfg.warmup_steps} steps, so a run of "
          f"--steps {cfg.steps} never reaches --lr {cfg.lr:g} (its last step: {float(schedule(cfg.steps - 1)):.3g}); "
          "lower --warmup_steps for a short run", file=sys.stderr, flush=True)
  optimizer = step_lib.make_optimizer(schedule, cfg.weight_decay, cfg.clip_norm)
  rep = replicated(mesh)
  state = step_lib.init_state(cj.init_adapters(seed_key(cfg.seed), bb.config, acfg), optimizer)
  state = jax.device_put(state, rep)

  meta = dict(backbone=bb.name, backbone_fingerprint=adapter_io.fingerprint(bb.config),
              adapter_config=dict(d_c=acfg.d_c, chunk_hidden=acfg.chunk_hidden, qk_layers=list(acfg.qk_layers),
                                  # only when set, so checkpoints from before the flag still resume
                                  **({"selection_layers": list(layers)} if layers else {}),
                                  **({"score_queries": acfg.score_queries} if acfg.score_queries > 1 else {})))
  ckpt = None
  start = 0
  if cfg.checkpoint_every:
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.max_to_keep,
                                   save_every=cfg.checkpoint_every, meta=meta)
    latest = ckpt.latest_step()
    if latest is not None:
      state, data_state = ckpt.restore(latest, checkpoint.abstract_like(state, rep))
      train_it.set_state(data_state)
      start = latest
      if pi == 0:
        print(f"resumed from {ckpt.directory / str(latest)}", file=sys.stderr)

  local_B = cfg.batch_size // pc
  first = splits["train"][0]
  shapes = {k: (cfg.batch_size, *v.shape) for k, v in first.items()}
  train_fn, eval_fn = step_lib.compile_steps(mesh, state, params, shapes, optimizer=optimizer,
                                             schedule=schedule, loss_config=loss_config)
  shardings = step_lib.batch_shardings(mesh, shapes)

  def to_global(local):
    assert all(local[k].shape == (local_B, *shapes[k][1:]) for k in shapes), {k: v.shape for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], local[k], shapes[k]) for k in shapes}

  if start >= cfg.steps and pi == 0:
    print(f"the run in {workdir} is finished (step {start} of --steps {cfg.steps}): nothing left to train",
          file=sys.stderr)
  if recorded != "same" and pi == 0:
    checkpoint.write_settings(workdir, settings)  # only now: a refused or failed start records nothing
  writer = metrics_lib.MetricWriter(str(workdir), enabled=pi == 0, resume_step=start)
  bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress or pi != 0,
             desc="train", dynamic_ncols=True)
  last = {}
  warned_no_rows = warned_past_table = False
  stop = StopRequest(enabled=ckpt is not None and pc == 1)
  try:
    for i in bar:
      t0 = time.perf_counter()  # the batch included: with the teacher cache its first read is the frozen pass
      batch = to_global(next(train_it))
      state, m = train_fn(state, params, batch)
      last = metrics_lib.to_floats(m)  # waits for the step
      dt = time.perf_counter() - t0
      step = i + 1
      last["tokens_per_s"] = cfg.batch_size * cfg.seq_len / dt
      last["step_s"] = dt
      if last.get("n_kl_queries") == 0 and not warned_no_rows and pi == 0:  # e.g. every chunk in the sinks
        warned_no_rows = True
        print(f"warning: step {step}: its batch has no distillation rows (n_kl_queries 0), so the QK Adapters learn "
              "nothing from it: check --n_sink, --n_local and --max_chunk_len against --seq_len", file=sys.stderr)
      if last.get("chunks_past_table", 0) > 0 and not warned_past_table and pi == 0:
        warned_past_table = True
        print(f"warning: step {step}: {last['chunks_past_table']:.1%} of its batch's chunks lie past --max_chunks "
              f"{cfg.max_chunks}, where distillation has no rows, so the QK Adapters never learn to choose them: raise "
              "--max_chunks (the text closes more chunks a sequence than that)", file=sys.stderr)
      diverged = not math.isfinite(last["loss"]) or not bool(step_lib.all_finite(state.adapters).addressable_data(0))
      if step % cfg.log_every == 0 or step == cfg.steps or diverged:
        writer.write(step, "train", last)
      if diverged:  # before it is saved: the checkpoints kept are the last finite adapters, not rotated away
        kept = f"the checkpoints in {ckpt.directory} are kept" if ckpt else "no checkpoint was written"
        raise DivergedError(
            f"step {step}: the loss ({last['loss']}) or the adapters are not finite: training diverged. This step "
            f"is not saved and nothing is exported ({kept}). Lower --lr (or raise --warmup_steps) and give "
            "another --workdir")
      bar.set_postfix(loss=f"{last['loss']:.4f}", kl=f"{last['kl']:.4f}", bce=f"{last['bce']:.4f}",
                      tok_s=f"{last['tokens_per_s']:.0f}")
      if eval_set and (step % cfg.eval_every == 0 or step == cfg.steps):
        ev = [metrics_lib.to_floats(eval_fn(state.adapters, params, to_global(b))) for b in eval_set]
        writer.write(step, "eval", metrics_lib.mean_metrics(ev))
      stopping = stop.requested and step < cfg.steps  # read once: a later request waits for the next step
      if ckpt is not None:
        ckpt.save(step, state, train_it.get_state(), force=step == cfg.steps or stopping)
      if stopping:
        print(f"\n{stop.requested}: stopped after step {step}, which is checkpointed", file=sys.stderr)
        raise Stopped(signal.Signals[stop.requested])
  finally:
    stop.close()
    bar.close()
    writer.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()

  if cfg.export:
    adapters = jax.tree.map(lambda x: x.addressable_data(0), state.adapters)  # replicated: any copy
    if pi == 0:
      adapter_io.save_adapters(adapters, cfg.export, model_config=bb.config, backbone=bb.name,
                               dtype=cfg.export_dtype, overwrite=True,
                               extra=dict(trained_steps=int(state.step.addressable_data(0))))
      print(f"exported adapters to {cfg.export}", file=sys.stderr)
  return last


class Stopped(KeyboardInterrupt):
  """A stop by a signal: the run exits with 128 + its number, as a shell reports a process the signal ended
  (130 for Ctrl-C, 143 for SIGTERM)."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = int(signum)


class StopRequest:
  """Ctrl-C or SIGTERM during the training loop: the step under way finishes and is checkpointed before
  the run stops, so no finished step is lost; a second one interrupts at once. Only with checkpoints, a
  single process (the others would wait for it in a collective) and in the main thread (where Python
  runs signal handlers); elsewhere the signals act as before."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, enabled: bool):
    self.requested = ""  # the signal's name, once one came
    self._previous = {}
    if enabled and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}

  def _request(self, signum, frame):
    if self.requested:
      raise Stopped(signum)
    self.requested = signal.Signals(signum).name  # printed by the loop: a handler writing to stderr could cut into a write

  def close(self) -> None:
    for s, handler in self._previous.items():
      if handler is not None:  # None: not installed from Python, cannot be put back
        signal.signal(s, handler)
    self._previous = {}


def _is_lock_record(path: Path) -> bool:
  try:
    text = path.read_text().strip()
  except (OSError, UnicodeError):
    return False
  return text == "" or text.isdigit()


LOCK_FILE = ".train.lock"


class WorkdirLock:
  """An exclusive lock on `<workdir>/.train.lock` for the life of the process, so that two runs never write
  one workdir's checkpoints and log at once. The kernel releases it when the process ends, however it ends."""

  def __init__(self, workdir: Path):
    self._file = None
    try:
      import fcntl
    except ImportError:  # no POSIX locks on this system: nothing to hold
      return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    if path.is_symlink() or (path.exists() and not _is_lock_record(path)):  # never a file of the user's
      raise FlagError(f"{path} is not a lock a train.run wrote (it holds a process id, or nothing), and a run here "
                      "would replace it: move it aside, or give another --workdir")
    self._file = open(path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      raise FlagError(f"another train.run (pid {holder}) is using --workdir {workdir}: wait for it to end, or "
                      "give another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the file releases the lock
      self._file = None


def build_caches(cfg, splits, params, bb, weights, acfg, loss_config) -> dict:
  """The teacher cache of each split: {"train": CachedRows, "validation": ...}. One process computes a
  sequence's rows when a step first reads it; several build every missing shard first."""
  import numpy as np
  from jax.experimental import multihost_utils

  from chunkllm_jax import adapter_io
  from train import teacher_cache
  from train.losses import rows_config_of

  rc = rows_config_of(loss_config, acfg.qk_layers)
  out = {}
  for split, source in splits.items():
    if split not in ("train", "validation") or source is None:
      continue
    path = cache_dir(cfg) / split
    fp = teacher_cache.cache_fingerprint(rc, backbone=adapter_io.fingerprint(bb.config), weights=weights,
                                         data=splits["name"], seq_len=cfg.seq_len, split=split)
    if jax.process_count() == 1:  # each sequence's rows computed the first time a step reads it
      teacher_cache.open_cache(path, fp)
      out[split] = teacher_cache.CachedRows(path, len(source), compute=teacher_cache.teacher_of(params, source, rc))
      continue
    # Several processes: the frozen pass is one program over all of them, so they build it in lockstep,
    # over the shards that process 0 (the writer) finds missing before any of them writes.
    teacher_cache.check_cache(path, fp)  # every process refuses a cache of other settings, before any writes
    multihost_utils.sync_global_devices(f"teacher cache {split} checked")
    missing = np.zeros(len(source), np.int32)
    if jax.process_index() == 0:
      teacher_cache.open_cache(path, fp)
      missing[teacher_cache.missing_shards(path, len(source))] = 1
    missing = multihost_utils.broadcast_one_to_all(missing)  # also waits until the cache folder exists
    n = teacher_cache.build_cache(params, source, path, fp, rc, progress=cfg.progress,
                                  write=jax.process_index() == 0, todo=np.flatnonzero(missing).tolist())
    multihost_utils.sync_global_devices(f"teacher cache {split} built")
    if n and jax.process_index() == 0:
      print(f"teacher cache: {n} sequences of {split} added to {path}", file=sys.stderr)
    out[split] = teacher_cache.CachedRows(path, len(source))
  return out


def user_errors() -> tuple[type[Exception], ...]:
  """What a user's input can raise: reported as one line and exit code 2, never a traceback."""
  from chunkllm_jax.adapter_io import AdapterLoadError, ExportTargetError
  from chunkllm_jax.config import ConfigError
  from train.checkpoint import CheckpointError
  from train.teacher_cache import CacheError
  from train.tfds_builder import DataError

  return (FlagError, DivergedError, ExportTargetError, DataError, CheckpointError, AdapterLoadError, ConfigError,
          CacheError, OSError)  # FileNotFoundError, FileExistsError, a folder that cannot be written


def report(e: Exception) -> int:
  print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)  # one line
  return 2


def _interrupt(signum, frame):
  raise Stopped(signum)


def main(argv=None) -> int:
  args = parse_args(argv)
  from train import config

  previous = cfg = None
  try:
    setup_platform(args)
    alone = not (args.coordinator or args.num_processes or args.tpu)  # as setup_platform decides
    if alone and threading.current_thread() is threading.main_thread():
      # SIGTERM (a scheduler's stop, `timeout`, `kill`) as Ctrl-C: checkpoints being written are finished and
      # a half-written export is removed, rather than the process dying where it stands. Not beside other
      # processes: one waiting for its checkpoint's writes while the others wait for it in a step would hang.
      previous = signal.signal(signal.SIGTERM, _interrupt)
    cfg = config.from_args(args)
    train(cfg)
  except user_errors() as e:
    return report(e)
  except KeyboardInterrupt as e:  # Ctrl-C outside the loop raises a plain one
    from train.checkpoint import has_checkpoints

    if cfg is not None and not cfg.checkpoint_every:
      how = "no checkpoint is written (--checkpoint_every 0): the same command starts again from step 0"
    elif cfg is None:  # stopped before the flags were read
      how = "the same command resumes from the last checkpoint, where there is one"
    elif has_checkpoints(Path(cfg.workdir) / "checkpoints"):
      how = "the same command resumes from the last checkpoint"
    else:
      how = "nothing was checkpointed yet: the same command starts from step 0"
    print("interrupted: " + how, file=sys.stderr)
    return 128 + getattr(e, "signum", signal.SIGINT)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return 0


if __name__ == "__main__":
  sys.exit(main())
