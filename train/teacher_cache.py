"""The head-max teacher at the selection rows, and a cache of it on disk.

Inference chooses what a chunk reads once, at the boundary that opens it (decode), from the
selection layers' scores of the completed chunks. The student (the QK Adapters) is therefore trained
on those rows only: row r is made at chunk r's boundary token, serves chunk r + 1, and ranks the
candidates (chunks 0 .. r - n_local, as `chunk_prefill.selection_rows` with
`prefill_selection="previous"` says). Its target is what `scorer="attention"` would choose there,
computed by the same function (`chunk_prefill.attention_rows`): per head, the attention of each of
the last `score_queries` queries over the candidates' tokens, summed within each chunk; then the max
over heads (`heads="mean"`: the mean) and over those queries; renormalised over the candidates.

Everything the student needs comes from one frozen forward pass per sequence: the selection layers'
attention inputs `h` at every position (k~ of chunk j reads its end; q~ of row r the last tokens up
to end_r, as many as the adapters score with), the chunk ends, the targets, and layer 0's output for
the Chunk Adapter. They are stored per sequence, the first time
training reads the sequence (`CachedRows`) or all at once (`build_cache`), so many training steps cost
one frozen pass per sequence; the cached and the computed step are the same function of the same
arrays (tests/test_teacher_cache.py).

A cache is a folder: `cache.json` (the fingerprint: backbone, data, rows settings) and one `.npz`
per sequence, written to a temporary name and renamed, so an interrupted build resumes where it
stopped and never leaves a half-written file that reads as done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import adapter_io, boundaries, model
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import layer0_output
from chunkllm_jax.chunk_prefill import attention_rows, selection_rows
from chunkllm_jax.params import ModelParams
from chunkllm_jax.selection import HEAD_REDUCTIONS, renormalise

CACHE_FILE = "cache.json"
FORMAT = 2  # bumped when what a shard holds changes (2: h at every position, for the adapters' query window)


class CacheError(ValueError):
  """A teacher cache that does not belong to this run (another model, data or teacher target)."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RowsConfig:
  """How sequences become selection rows and targets (the teacher's half of the training settings)."""

  layers: tuple[int, ...]  # the selection layers (QK Adapters)
  n_sink: int = 4
  n_local: int = 4
  max_chunk_len: int = 64
  max_chunks: int = 256
  score_queries: int = 16
  heads: str = "max"  # "max": the head-max target; "mean": the mean over heads

  def __post_init__(self):
    if self.heads not in HEAD_REDUCTIONS:
      raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {self.heads!r}")
    if not self.layers:
      raise ValueError("RowsConfig needs at least one selection layer")

  def chunk_config(self) -> ChunkConfig:
    return ChunkConfig(n_sink=self.n_sink, n_local=self.n_local, max_chunk_len=self.max_chunk_len,
                       max_chunks=self.max_chunks, score_queries=self.score_queries,
                       prefill="sparse", prefill_selection="previous")  # the rows a sparse prefill chooses by

  def fingerprint(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), layers=list(self.layers), format=FORMAT)


def _rows(labels_BT, lengths_B, rc: RowsConfig):
  """(chunk ends [B, C], completed chunks [B], query position [B, C], candidates [B, C]) of row r = 0..C-1."""
  B, T = labels_BT.shape
  valid = jnp.arange(T)[None] < lengths_B[:, None]
  closes = boundaries.closes_from_labels(labels_BT, rc.n_sink, rc.max_chunk_len, valid)
  ends, n_chunks = boundaries.completed_chunk_ends(closes, rc.max_chunks)
  row_end, n_cand, _, _ = selection_rows(ends, n_chunks, lengths_B - 1, rc.chunk_config())
  # selection_rows' row s serves chunk s; row 0 (before any boundary) never has a candidate
  return ends, n_chunks, row_end[:, 1:], n_cand[:, 1:]


def teacher_rows(params: ModelParams, tokens_BT, labels_BT, lengths_B, rc: RowsConfig) -> dict[str, jnp.ndarray]:
  """One frozen forward pass: what the student's loss reads, per row of the batch.

  Returns h_BLTD (selection layers' attention inputs, [B, L, T, D]), ends_BC (chunk r's end, -1 past
  the last), target_BLCC (row r's distribution over the candidate chunks, rows sum to 1 or are 0
  without a candidate), n_cand_BC, h0_BTD (layer 0's output), labels_BT and valid_BT. Row r's last
  query is chunk r's end."""
  cfg = params.config
  params = params.replace(backbone=jax.lax.stop_gradient(params.backbone), adapters=None)
  B, T = tokens_BT.shape
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  ends, _, row_end, n_cand = _rows(labels_BT, lengths_B, rc)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  dense = model.self_attend_fn(cfg, positions, valid)
  slot_of_layer = np.full((cfg.n_layers,), -1, np.int32)
  slot_of_layer[list(rc.layers)] = np.arange(len(rc.layers))
  slot_of_layer = jnp.asarray(slot_of_layer)
  C = rc.max_chunks

  def attend_fn(state, layer, q, k, v, h):
    o, state, _ = dense(state, layer, q, k, v, h)
    slot = slot_of_layer[layer["index"]]

    def record(st):
      t = attention_rows(q, k, row_end, ends, n_cand, n_sink=rc.n_sink, scale=cfg.attn_scale,
                         softcap=cfg.attn_softcap, n_queries=rc.score_queries, heads=rc.heads)
      t = renormalise(t)
      return dict(target=st["target"].at[slot].set(t), h=st["h"].at[slot].set(h.astype(st["h"].dtype)))

    return o, jax.lax.cond(slot >= 0, record, lambda st: st, state), None

  x0 = model.embed(params, tokens_BT)
  n = len(rc.layers)
  init = dict(target=jnp.zeros((n, B, C, C), jnp.float32), h=jnp.zeros((n, B, T, cfg.d_model), x0.dtype))
  _, state, _ = model.run_layers(params, x0, positions, attend_fn, init)
  out = dict(h_BLTD=jnp.moveaxis(state["h"], 0, 1), ends_BC=ends, target_BLCC=jnp.moveaxis(state["target"], 0, 1),
             n_cand_BC=n_cand,
             h0_BTD=layer0_output(params, tokens_BT, lengths_B), labels_BT=jnp.asarray(labels_BT, jnp.int8),
             valid_BT=valid)
  return jax.tree.map(jax.lax.stop_gradient, out)


# ----------------------------------------------------------------------------------------------
# The cache on disk


def cache_fingerprint(rc: RowsConfig, *, backbone: str, weights: str, data: str, seq_len: int,
                      split: str) -> dict[str, Any]:
  """What a cache's shards depend on: the backbone (adapter_io.fingerprint) and its weights
  (train.backbone.weights_fingerprint), the packed data (its dataset name, a hash of the text and
  settings), the sequence length, the split and the rows."""
  return dict(backbone=backbone, weights=weights, data=data, seq_len=seq_len, split=split, rows=rc.fingerprint())


def check_cache(path: Path, fingerprint: dict[str, Any]) -> bool:
  """True if `path` holds a cache of this fingerprint, False if it holds none; CacheError naming each
  difference if it holds another (nothing is deleted: the user chooses another --cache_dir or removes it)."""
  f = Path(path) / CACHE_FILE
  if not f.exists():
    if Path(path).exists() and any(Path(path).iterdir()):
      raise CacheError(f"{path} is not empty and holds no {CACHE_FILE}: give a folder of its own for the cache")
    return False
  try:
    have = json.loads(f.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CacheError(f"{f} cannot be read ({e}); remove the folder or give another") from None
  diff = _differences(have, fingerprint)
  if diff:
    raise CacheError(f"the teacher cache {path} was built for other settings ({'; '.join(diff)}): give another "
                     "--cache_dir, or remove this one to rebuild it")
  return True


def _differences(have, want, prefix="") -> list[str]:
  out = []
  for k in sorted(set(have) | set(want)):
    a, b = have.get(k), want.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: cache {a!r}, this run {b!r}")
  return out


SHARD_KEYS = ("h_BLTD", "ends_BC", "target_BLCC", "n_cand_BC", "h0_BTD", "labels_BT", "valid_BT")


def _shard(path: Path, i: int) -> Path:
  return Path(path) / f"{i:06d}.npz"


@functools.partial(jax.jit, static_argnames=("rc",))
def _teacher_one(params, tokens_BT, labels_BT, lengths_B, rc):
  return teacher_rows(params, tokens_BT, labels_BT, lengths_B, rc)


def open_cache(path: str | Path, fingerprint: dict[str, Any], *, write: bool = True) -> Path:
  """Checks (CacheError) or starts a cache folder for this fingerprint; returns its path."""
  path = Path(path)
  if not check_cache(path, fingerprint) and write:
    path.mkdir(parents=True, exist_ok=True)
    adapter_io.write_atomic(path / CACHE_FILE, (json.dumps(fingerprint, indent=1) + "\n").encode())
  if write:
    remove_dead_partials(path)
  return path


_PARTIAL = re.compile(r"\.(\d{6}\.npz|" + re.escape(CACHE_FILE) + r")\.tmp-(.+)-(\d+)")  # adapter_io.write_atomic's names


def remove_dead_partials(path: Path) -> list[Path]:
  """Removes the half-written files (`adapter_io.write_atomic`) that processes of this host killed while writing
  left in the cache folder; a shard is written whole again when it is next needed."""
  removed = []
  for p in Path(path).iterdir():
    m = _PARTIAL.fullmatch(p.name)
    if m and p.is_file() and not p.is_symlink() and adapter_io.written_by_gone_process(m.group(2), int(m.group(3))):
      try:
        p.unlink()
        removed.append(p)
      except OSError:  # left for its owner: the cache works beside it
        pass
  return removed


def teacher_of(params: ModelParams, source: Sequence[dict], rc: RowsConfig):
  """i -> the rows of `source[i]` (a record with `tokens`, `labels` [T]), as numpy arrays."""
  def compute(i: int) -> dict[str, np.ndarray]:
    rec = source[i]
    tokens, labels = np.asarray(rec["tokens"])[None], np.asarray(rec["labels"])[None]
    out = _teacher_one(params, tokens, labels, np.asarray([tokens.shape[1]], np.int32), rc)
    return {k: np.asarray(v)[0] for k, v in out.items()}

  return compute


def missing_shards(path: str | Path, n: int) -> list[int]:
  """The sequences among the first `n` whose shard `path` lacks."""
  return [i for i in range(n) if not _shard(Path(path), i).exists()]


def build_cache(params: ModelParams, source: Sequence[dict], path: str | Path, fingerprint: dict[str, Any],
                rc: RowsConfig, *, progress: bool = True, write: bool = True,
                todo: Sequence[int] | None = None) -> int:
  """Computes the shards `todo` (default: every shard `source` lacks, now); returns how many.

  Every process of a multi-process run computes (the frozen pass is one program over the mesh);
  only the one with `write` writes, to a folder all of them read. They must run the same programs,
  so they pass the same `todo`, the writer's list: each listing the folder for itself, a process that
  lists it after the writer has stored a shard would skip a program the others run, and the
  processes' collectives would then pair up wrongly and hang. A single process can instead let
  `CachedRows` compute each shard the first time training reads it."""
  from tqdm.auto import tqdm

  path = open_cache(path, fingerprint, write=write)
  compute = teacher_of(params, source, rc)
  todo = missing_shards(path, len(source)) if todo is None else list(todo)
  for i in tqdm(todo, desc=f"teacher cache ({path.name})", disable=not progress or not todo, dynamic_ncols=True):
    arrays = compute(i)
    if write:
      adapter_io.write_atomic(_shard(path, i), lambda f: np.savez(f, **arrays))
  return len(todo)


class CachedRows:
  """A cache as a random-access source for grain: record i is sequence i's shard (numpy arrays).

  With `compute` (`teacher_of`), a missing shard is computed and stored the first time it is read,
  so a run pays one frozen pass for each sequence it actually uses; without, every shard must exist."""

  def __init__(self, path: str | Path, n: int, compute=None):
    self.path, self.n, self.compute = Path(path), n, compute
    missing = missing_shards(self.path, n)
    if missing and compute is None:
      raise CacheError(f"the teacher cache {path} lacks {len(missing)} of its {n} shards (first: {missing[0]}); "
                       "run again to finish building it")

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    shard = _shard(self.path, int(i))
    if self.compute is not None and not shard.exists():
      return self._compute(int(i), shard)
    try:
      with np.load(shard) as z:
        return {k: z[k] for k in SHARD_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a shard the disk damaged
      why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      if self.compute is None:
        raise CacheError(f"the teacher cache's shard {shard} cannot be read ({why}); delete it and run again to "
                         "compute it anew") from None
      print(f"warning: the teacher cache's shard {shard} cannot be read ({why}); computing it again",
            file=sys.stderr, flush=True)
      return self._compute(int(i), shard)

  def _compute(self, i: int, shard: Path) -> dict[str, np.ndarray]:
    arrays = self.compute(i)
    adapter_io.write_atomic(shard, lambda f: np.savez(f, **arrays))
    return {k: arrays[k] for k in SHARD_KEYS}
