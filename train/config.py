"""`TrainConfig`: every knob of `python -m train.run`, one frozen dataclass, with presets per model.

Every field is a command-line flag of the same name (`--seq_len 2048`); a preset (`--preset
smollm2-135m`) only changes the defaults the flags start from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from chunkllm_jax.chunk_config import ChunkRules


@dataclasses.dataclass(frozen=True)
class TrainConfig(ChunkRules):
  # Backbone: a registered name, an HF dir or a .gguf file, or "random-tiny" (tests: a tiny random
  # Llama whose vocabulary is the tokenizer's).
  model: str = "smollm2-135m"
  tokenizer: str = ""  # where the tokenizer comes from; "" -> the model's own
  dtype: str = "float32"  # of the frozen backbone; adapters and optimizer state are float32
  # Data: text files (documents are blank-line separated), or a TFDS text dataset by name.
  data: tuple[str, ...] = ()
  tfds_name: str = ""  # e.g. "pg19": any TFDS dataset with a text feature (needs network)
  tfds_text_key: str = "text"
  data_dir: str = ""  # where the packed dataset is built; "" -> <workdir>/data
  eval_fraction: float = 0.05  # documents held out for eval (text files)
  max_sequences: int = 0  # train on the first this many packed sequences only (0: all)
  seq_len: int = 2048
  batch_size: int = 2  # global, over all processes
  # Optimisation: AdamW on the adapters only, warmup then cosine decay, global-norm clipping.
  steps: int = 200
  lr: float = 1e-3
  warmup_steps: int = 20
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  seed: int = 0
  # Adapters and loss (see AdapterConfig and train.losses.LossConfig).
  d_c: int = 64
  # The layers that get QK Adapters and choose the selection at inference (stored with the export);
  # empty: every full-attention layer. `python -m train.pick_layers` measures which to use.
  selection_layers: tuple[int, ...] = ()
  kl_weight: float = 1.0
  # The distillation target (train.losses.TEACHERS): "head_max" at the selection rows (default),
  # "head_mean", or the paper's "token_mean" (every token, heads averaged; no cache).
  teacher: str = "head_max"
  score_queries: int = 16  # a row's target: the max over the last this many queries (as scorer="attention")
  # The QK Adapters score a row with the q~ of this many last tokens, the max over them; stored with
  # the export (adapter_config.score_queries), so inference scores the same way. 1: the boundary token.
  student_queries: int = 1
  # Row targets come from a cache of one frozen pass per sequence (train.teacher_cache), built once
  # in cache_dir ("" -> <workdir>/teacher_cache); false: the teacher runs inside every step.
  teacher_cache: bool = True
  cache_dir: str = ""
  # Share of the training tokens that are retrieval-mixture documents made from the text (train.mixture).
  retrieval_mix: float = 0.5
  # The chunk rules (n_sink, n_local, max_chunk_len) are ChunkRules': the n_local recent chunks that
  # inference always reads are not candidates in the KL (0: all are).
  max_chunks: int = 512
  recall_k: int = 16
  block_q: int = 256
  block_k: int = 512
  # Mesh: data x model; mesh_data 0 -> every device left after mesh_model.
  mesh_data: int = 0
  mesh_model: int = 1
  # Bookkeeping.
  workdir: str = "runs/chunkllm"
  log_every: int = 1
  eval_every: int = 50  # 0: no eval
  eval_batches: int = 4
  checkpoint_every: int = 50  # 0: no checkpoints
  max_to_keep: int = 3
  export: str = ""  # after training, write an adapters-only export here
  export_dtype: str = "float32"  # of the exported weights: float32 or bfloat16 (half the size)
  allow_untrained_export: bool = False  # --steps 0 --export is refused unless this is given
  progress: bool = True  # tqdm bar

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, TrainConfig] = {
    # ~40 minutes on 2 CPU cores; seq_len 2048 gives ~80 sentence chunks per sequence.
    # The teacher cache makes a step cheap: one frozen pass per sequence, then many steps over them.
    "smollm2-135m": TrainConfig(model="smollm2-135m", seq_len=2048, batch_size=4, steps=1500, lr=1e-3,
                                warmup_steps=50, max_chunks=256, selection_layers=(7, 15), eval_every=250,
                                eval_batches=4, checkpoint_every=250),
    "gemma3-270m": TrainConfig(model="gemma3-270m", seq_len=4096, batch_size=8, steps=2000, lr=1e-3,
                               warmup_steps=100, max_chunks=512),
    # Tests: seconds per run.
    "tiny": TrainConfig(model="random-tiny", tokenizer="smollm2-135m", seq_len=64, batch_size=4, steps=6,
                        eval_fraction=0.2,
                        lr=1e-2, warmup_steps=2, max_chunks=16, max_chunk_len=16, n_local=1, recall_k=2, block_q=32,
                        block_k=32, d_c=8, score_queries=4, retrieval_mix=0.0, eval_every=3, eval_batches=1,
                        checkpoint_every=2,
                        log_every=1, progress=False),
}


def _field_type(f: dataclasses.Field):
  hints = typing.get_type_hints(TrainConfig)
  return hints[f.name]


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes", "on"):
    return True
  if s.lower() in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per TrainConfig field, left unset (absent from the namespace) so a preset can fill them;
  --help shows the default preset's value of each."""
  shown = PRESETS["smollm2-135m"]
  for f in dataclasses.fields(TrainConfig):
    t = _field_type(f)
    value = getattr(shown, f.name)
    kw = dict(default=argparse.SUPPRESS, help=f"default {value!r} (--preset smollm2-135m; presets set their own)")
    if t == tuple[str, ...]:
      parser.add_argument(f"--{f.name}", nargs="+", metavar="PATH", **kw)
    elif t == tuple[int, ...]:
      parser.add_argument(f"--{f.name}", nargs="+", type=int, metavar="LAYER", **kw)
    elif t is bool:
      parser.add_argument(f"--{f.name}", type=_bool, metavar="BOOL", **kw)
    else:
      parser.add_argument(f"--{f.name}", type=t, **kw)


PATH_FLAGS = ("data", "data_dir", "cache_dir", "workdir", "export", "model", "tokenizer")


def from_args(args: argparse.Namespace) -> TrainConfig:
  if args.preset not in PRESETS:
    print(f"error: unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}", file=sys.stderr)
    raise SystemExit(2)  # a user error, as argparse reports one
  base = PRESETS[args.preset]
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
           if getattr(args, f.name, None) is not None}
  for name in ("data", "selection_layers"):
    if name in given:
      given[name] = tuple(given[name])
  # A "~" the shell left as it was (--workdir=~/run: none expands after "="): the user's home, for every path,
  # so that no part of the run goes to a folder named "~" under the current one.
  for name in PATH_FLAGS:
    if name in given:
      given[name] = tuple(map(os.path.expanduser, given[name])) if name == "data" else os.path.expanduser(given[name])
  if "model" in given and given["model"] != base.model and "selection_layers" not in given:
    # A preset's selection layers are its own model's (smollm2-135m's 7 and 15 do not exist in a 4-layer model);
    # another model gets a QK Adapter on every full-attention layer, unless --selection_layers names some.
    given["selection_layers"] = ()
  return base.replace(**given)
