"""Checks of the public API's arguments, shared by `forward`, `generate`, `stream` and `chunk_generate`,
and of the output folders of the command-line tools (`check_out_folder`).

Each runs on the host before anything is allocated or compiled, and names what is wrong and how to
fix it: a bad argument costs nothing, instead of failing deep inside jax (or, worse, not failing:
an id past the vocabulary gives NaN logits, a float id would be truncated).
"""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from chunkllm_jax.params import ModelParams


def check_params(params, where: str) -> None:
  """`params` must be a `ModelParams`; a loaded `Model` is the common mix-up."""
  if isinstance(params, ModelParams):
    return
  if isinstance(getattr(params, "params", None), ModelParams):
    raise TypeError(f"{where} takes the model's parameters, not the Model: pass model.params "
                    f"(e.g. {where}(model.params, ...))")
  raise TypeError(f"{where} takes a ModelParams (model.params, or cj.init_backbone(...)), "
                  f"got {type(params).__name__}")


def check_mesh(mesh) -> None:
  """None, or a `jax.sharding.Mesh` (a wrong object failed inside the placement code with an AttributeError)
  with the axes the sharding table names (a mesh without them failed there with a bare KeyError: 'model'),
  each device once."""
  if mesh is None:
    return
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (cj.make_mesh(data=..., model=...)) or None, "
                    f"got {type(mesh).__name__}")
  from chunkllm_jax.sharding import MESH_AXES  # here, not at the top: sharding imports this module

  missing = [a for a in MESH_AXES if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}, but the sharding table places on {MESH_AXES} "
                     f"(missing {tuple(missing)}): build it with cj.make_mesh(data=..., model=...), or name a size-1 "
                     "axis for the one you do not use")
  ids = [d.id for d in mesh.devices.flat]
  if len(set(ids)) < len(ids):  # jax builds such a mesh, then fails to place on it with a bare AssertionError
    raise ValueError(f"mesh lists a device more than once (device ids {ids}): give each device once")


def check_key(key, where: str) -> None:
  """A JAX PRNG key: a typed one (`jax.random.key(0)`) or a raw uint32 pair (`jax.random.PRNGKey(0)`). An int
  seed failed inside jax's PRNG code."""
  if isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                     or (key.dtype == np.uint32 and key.shape == (2,))):
    return
  raise TypeError(f"{where} takes a PRNG key, e.g. jax.random.key(0), got {type(key).__name__} {key!r:.40}")


def check_float_dtype(dtype, where: str) -> np.dtype:
  """A floating dtype for weights or a cache (float32, bfloat16, float16), as a numpy dtype; float64 only in
  jax's 64-bit mode (without it jnp makes float32 of it without a word)."""
  try:
    dt = np.dtype(dtype)
  except TypeError:  # a name numpy does not know
    dt = None
  if dt is None or not jax.dtypes.issubdtype(dt, np.floating):
    raise ValueError(f"{where}: dtype must be a floating type such as float32 or bfloat16, not {dtype!r}")
  if dt.itemsize == 8 and not jax.config.jax_enable_x64:
    raise ValueError(f"{where}: dtype {dtype!r} needs jax's 64-bit mode (jax.config.update('jax_enable_x64', "
                     "True)); or use float32 or bfloat16")
  return dt


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
  """A real number, numpy's scalars included; a bool is not one (True would be read as 1)."""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_count(name: str, v, minimum: int = 1) -> int:
  """A whole number >= minimum: 2.5, "3" and True are refused rather than converted."""
  if not is_int(v):
    raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
  if v < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {v}")
  return int(v)


def check_sampling(temperature, top_k, top_p) -> None:
  """Types and ranges of the sampling settings (NaN compares false to everything: asked explicitly)."""
  for name, v in (("temperature", temperature), ("top_p", top_p)):
    if not is_number(v):
      raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
  if not (0.0 < top_p <= 1.0):  # also false for NaN
    raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
  if top_k is not None:
    check_count("top_k", top_k, minimum=0)


def token_array(tokens, vocab_size: int, where: str = "tokens", lengths_name: str = "lengths") -> np.ndarray:
  """A host array of token ids, its dtype checked: floats are refused, never truncated. `lengths_name`: the
  caller's argument for row lengths, which the ragged rows' message names."""
  try:
    arr = np.asarray(tokens)
  except ValueError:  # numpy refuses ragged nesting
    raise ValueError(f"{where}: rows of different lengths; pad them to one length and pass each row's length "
                     f"as {lengths_name}=") from None
  if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float; an empty row is named later
    arr = arr.astype(np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{where} must be integer token ids, got dtype {arr.dtype}: convert them with "
                    "np.asarray(ids, np.int32) if they are whole numbers")
  if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:  # would wrap in an int64 copy
    raise ValueError(f"{where} has token id {int(arr.max())}, outside the vocabulary [0, {vocab_size})")
  return arr


def check_on_host(where: str, *values) -> None:
  """`generate`, `stream` and `chunk_generate` compile and run their own programs from the host; under the
  caller's `jax.jit`, `vmap` or `grad` they failed deep inside jax ("Cannot apply JAX transformations to a
  function lowered and compiled ...")."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values)):
    raise TypeError(f"{where} runs its own compiled programs from the host and cannot be traced (it was called "
                    f"under jax.jit, vmap or grad): call it outside them; cj.forward is the model as a function "
                    "to trace")


def check_lengths(lengths, batch: int, width: int, where: str = "lengths"):
  """Row lengths for tokens of shape [batch, width], as `prepare_prompts` takes them: one integer a row, each in
  [1, width]; a list or any array. Returns an int32 numpy array (`generate`'s `prepare_prompts` and `forward`
  both take them through here). Traced lengths (under `jit`) are checked by dtype
  and shape alone. Past these checks a wrong length is no error at all: a float is truncated, 0 leaves a row with
  no key to attend to, a length past the width reads padding as real tokens, a wrong count fails inside attention."""
  if isinstance(lengths, jax.core.Tracer):
    arr = lengths
  else:
    try:
      arr = np.asarray(lengths)
    except ValueError:  # numpy refuses ragged nesting
      raise ValueError(f"{where} must be one length per row, shape ({batch},); got {lengths!r}") from None
  if tuple(arr.shape) != (batch,):
    raise ValueError(f"{where} must be one length per row: shape ({batch},) for tokens of shape ({batch}, {width}), "
                     f"got shape {tuple(arr.shape)}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{where} must be integer row lengths, got dtype {arr.dtype}: give whole numbers "
                    "(np.asarray(lengths, np.int32))")
  if isinstance(lengths, jax.core.Tracer):
    return lengths
  bad = np.flatnonzero((arr < 1) | (arr > width))
  if bad.size:
    b = int(bad[0])
    raise ValueError(f"{where}[{b}] is {int(arr[b])}: each row's length (its real tokens) must be in [1, {width}], "
                     f"{width} being the width of tokens")
  return arr.astype(np.int32)


def check_token_range(tokens_BT, vocab_size: int, lengths_B=None) -> None:
  """Every id (within each row's length) in [0, vocab_size); the first bad one is named."""
  tokens_BT = np.asarray(tokens_BT)
  valid = np.ones(tokens_BT.shape, bool)
  if lengths_B is not None:
    valid = np.arange(tokens_BT.shape[1])[None] < np.asarray(lengths_B).reshape(-1, 1)
  bad = valid & ((tokens_BT < 0) | (tokens_BT >= vocab_size))
  if bad.any():
    b, t = (int(i) for i in np.argwhere(bad)[0])
    ids = tokens_BT[b][bad[b]]
    raise ValueError(f"prompt {b} has token ids outside the vocabulary [0, {vocab_size}): {ids[:8].tolist()} "
                     f"(first at position {t}); ids must come from this model's tokenizer")


def memory_limit() -> tuple[int, str]:
  """(bytes, what): the memory of the local accelerators, or the host's RAM for the CPU."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) * len(devices), f"{len(devices)} {devices[0].platform} device(s)"
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"


def check_kv_memory(cfg, batch: int, buffer_len: int, itemsize: int, state_bytes: int = 0) -> None:
  """The KV buffer's bytes (and `state_bytes` kept beside it: ChunkLLM's per-key state) must fit the memory
  there is, or the allocator fails (or the process aborts inside XLA, or the host swaps)."""
  need = 2 * cfg.n_layers * batch * buffer_len * cfg.n_kv_heads * cfg.head_dim * itemsize + state_bytes
  limit, what = memory_limit()
  if need > limit:
    beside = f" and ChunkLLM's per-key state ({state_bytes / 2**30:.1f} GiB)" if state_bytes else ""
    raise ValueError(f"the KV buffer{beside} for {batch} row(s) x {buffer_len} positions needs {need / 2**30:.1f} "
                     f"GiB, more than the {limit / 2**30:.1f} GiB of {what}: use fewer rows, shorter prompts or "
                     "fewer max_new_tokens" + (" (or a smaller score_sketch / score_rank)" if state_bytes else ""))


class OutFolderError(ValueError):
  """An output folder that holds files its tool did not write: refused before the tool starts, never written into."""


def check_out_folder(folder, flag: str, tool: str, marker: str, owned: Callable[[Path], bool],
                     names: Sequence[str] | None = None, owned_as: str | None = None) -> Path:
  """`folder` as the output folder of a tool that writes fixed file names into it (results.md, summary.json,
  ...): a new or empty folder, or one that holds the tool's own earlier output, told by its `marker` file
  (`owned(folder / marker)` is true: a file the tool writes with a recognisable content), which a rerun resumes
  or rewrites. Anything else raises an OutFolderError before the tool does any work, since its fixed names would
  replace the user's files. `names`: the only names (glob patterns) the tool writes, where it shares a folder
  with other files (those are never touched, so they are no reason to refuse); None: the tool fills the
  folder, and anything already there that is not its own is refused. `owned_as`: how the error names the
  tool's own folders (default: by the marker it wrote)."""
  folder = Path(folder)
  if folder.exists() and not folder.is_dir():
    raise OutFolderError(f"{flag} {folder} is a file; give a folder")
  try:
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  except OSError as e:  # a folder this user may not list: what it holds cannot be judged
    raise OutFolderError(f"{flag} {folder} cannot be read ({e.strerror}); give a folder of your own") from None
  if names is not None:
    held = [n for n in held if any(fnmatch.fnmatchcase(n, pattern) for pattern in names)]
  if not held or _owns(owned, folder / marker):
    return folder
  shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
  writes, other = ("fixed file names", "a new or empty folder") if names is None else \
      (" and ".join(names), f"a folder without {' or '.join(names)}")
  raise OutFolderError(
      f"{flag} {folder} holds files that {tool} did not write ({shown}), and {tool} writes {writes} there: give "
      f"{other}, or one {tool} made itself ({owned_as or f'with the {marker} it wrote'}), which it resumes or rewrites")


def check_out_file(path, flag: str, tool: str, owned: Callable[[Path], bool], what: str) -> Path:
  """`path` as the one output file of a tool: new, or a file the tool wrote before (`owned(path)` is true),
  which it replaces. A link, a folder or any other file raises an OutFolderError before the tool does any
  work (the user's file would be replaced). `what`: how the error names the tool's own files ("rows it wrote
  before")."""
  path = Path(path)
  if path.is_symlink():
    raise OutFolderError(f"{flag} {path} is a link; give the path of a new file (or of {what})")
  if path.is_dir():
    raise OutFolderError(f"{flag} {path} is a folder; give a file name")
  if path.exists() and not _owns(owned, path):
    raise OutFolderError(f"{flag} {path} is a file that {tool} did not write, and {tool} would replace it: give the "
                         f"path of a new file (or of {what})")
  return path


def _owns(owned: Callable[[Path], bool], marker: Path) -> bool:
  """Whether `marker` is a file that `owned` recognises; unreadable or malformed means not the tool's."""
  try:
    return marker.is_file() and bool(owned(marker))
  except (OSError, ValueError, TypeError, AttributeError):  # json.JSONDecodeError and UnicodeError are ValueErrors
    return False
