"""Adapter exports: trained adapters alone, as an Orbax checkpoint plus a `config.json`.

An export directory holds:
- `params/`: the adapter weights (Orbax `StandardCheckpointer`), float32 or bfloat16 (`weights_dtype` in
  `config.json`; loaded as float32);
- `config.json`: the `AdapterConfig`, the backbone it was trained on (a registered name or a path)
  and that backbone's `ModelConfig` with its fingerprint, so adapters are never silently attached
  to a model they were not trained for.

`load_adapters("smollm2-135m")` reads the export shipped in `chunkllm_jax/adapters_data/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from chunkllm_jax.adapters import AdapterConfig, Adapters, expected_shapes, fit_problems
from chunkllm_jax.config import ModelConfig, RopeScaling
from chunkllm_jax.params import ModelParams, leaf_shapes, shape_problems

FORMAT = "chunkllm-adapters/1"
PACKAGED = Path(__file__).parent / "adapters_data"
# Token ids do not change what the adapters compute, and differ between a model's GGUF and HF copies.
_NOT_FINGERPRINTED = ("bos_id", "eos_ids", "pad_id")


class AdapterLoadError(ValueError):
  """An export that cannot be read, or that was made for another backbone."""


def _dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"adapter weights are stored as float32 or bfloat16, not {name!r}")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_json(d: dict[str, Any]) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  for k in ("layer_sliding", "eos_ids"):
    d[k] = tuple(d.get(k) or ())
  return ModelConfig(**d)


def fingerprint(cfg: ModelConfig) -> str:
  """A short hash of the fields that make two backbones the same model."""
  fields = {k: v for k, v in config_to_json(cfg).items() if k not in _NOT_FINGERPRINTED}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class ExportTargetError(ValueError):
  """A folder an export would replace that is not an earlier export: it is refused, never emptied."""


EXPORT_ENTRIES = ("config.json", "params")  # all that an export folder holds


# What Orbax's StandardCheckpointer writes in `params/`: its metadata files, its OCDBT manifests and
# its data files (named by a hash), in one folder per process. A name outside these is not Orbax's.
_ORBAX_NAME = re.compile(r"_CHECKPOINT_METADATA|_METADATA|_sharding|commit_success\.txt|manifest\.ocdbt|d|"
                         r"_ROOT_METADATA|descriptor|array_metadatas|ocdbt\.process_\d+|[0-9a-f]{32}|process_\d+")


def _not_orbax(params: Path) -> list[Path]:
  """What in `params` Orbax did not write (a name it never writes, or a link; `params` itself if it is
  not a folder): a file the user put there is never replaced with an export."""
  if params.is_symlink() or not params.is_dir():
    return [params]
  return [p for p in params.rglob("*") if not _ORBAX_NAME.fullmatch(p.name) or p.is_symlink()]


def _is_export(directory: Path) -> bool:
  """Whether `directory` holds an export and nothing else (so replacing it loses nothing else)."""
  if not {p.name for p in directory.iterdir()} <= set(EXPORT_ENTRIES):
    return False
  if (directory / "params").exists() and _not_orbax(directory / "params"):
    return False
  return _has_export_config(directory)


def _has_export_config(directory: Path) -> bool:
  """Whether `directory` has an export's config.json (whatever else it holds)."""
  try:
    return json.loads((directory / "config.json").read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def check_export_target(directory, *, overwrite: bool = False) -> Path:
  """The absolute path an export may be written to: a new or empty folder, or (with `overwrite`)
  an earlier export. Anything else is refused with an ExportTargetError."""
  directory = Path(directory).absolute()
  above = next(p for p in directory.parents if p.exists())
  if not above.is_dir():
    raise ExportTargetError(f"cannot export to {directory}: {above} is a file, not a folder")
  if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
    raise ExportTargetError(f"cannot export to {directory}: it is not a folder (a file or a link); "
                            "give a new folder for the export")
  holder = next((p for p in directory.parents if _has_export_config(p)), None)
  if holder is not None:  # the earlier export would then hold what no export writes, and never be replaced
    raise ExportTargetError(f"cannot export to {directory}: it lies inside the adapter export {holder}, "
                            "which could then never be replaced; give a folder outside it")
  if not directory.exists() or not any(directory.iterdir()):
    return directory
  if not _is_export(directory):
    held = sorted(p.name for p in directory.iterdir())
    if set(held) <= set(EXPORT_ENTRIES) and (directory / "params").exists():  # the user's files inside params/
      held = sorted(str(p.relative_to(directory)) for p in _not_orbax(directory / "params")) or held
    raise ExportTargetError(
        f"cannot export to {directory}: it holds files that are not an adapter export "
        f"({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}), and an export only ever replaces an "
        "earlier export; give a new or empty folder for the export")
  if not overwrite:
    raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace the export there")
  return directory


def _sibling(directory: Path, tag: str) -> Path:
  """A fresh hidden name beside `directory` (not created), naming the host and process that write it."""
  return directory.with_name(f".{directory.name}.{tag}-{writer_tag()}-{uuid.uuid4().hex[:8]}")


def _remove_dead_siblings(directory: Path) -> list[Path]:
  """Removes the siblings (`_sibling`) that exports to `directory` by processes of this host that no
  longer run left behind when killed: a half-written new export ("tmp") or a replaced one ("old"). Only
  called once a new export is in place, which supersedes both; a folder holding anything an export does
  not, or of a process still running or on another host (a shared disk), is left alone."""
  pattern = re.compile(rf"\.{re.escape(directory.name)}\.(tmp|old)-(.+)-(\d+)-[0-9a-f]{{8}}")
  removed = []
  for p in directory.parent.iterdir():
    m = pattern.fullmatch(p.name)
    if not m or p.is_symlink() or not p.is_dir() or not written_by_gone_process(m.group(2), int(m.group(3))):
      continue
    try:  # a leftover that cannot be read or removed stays: the export itself is done
      if all(c.name in EXPORT_ENTRIES or c.name.startswith("params.orbax-checkpoint-tmp") for c in p.iterdir()):
        shutil.rmtree(p)
        removed.append(p)
    except OSError:
      pass
  return removed


def writer_tag() -> str:
  """What a temporary file's name says of its writer ("host-pid"), for `written_by_gone_process`."""
  return f"{socket.gethostname()}-{os.getpid()}"


def write_atomic(dest, content) -> None:
  """Writes a file whole or not at all: to a temporary sibling named by `writer_tag` (which a later run can tell
  from a live writer's), synced to disk, then renamed over `dest`, whose permissions it keeps where it replaces
  one. `content`: bytes, or a function that writes to the open binary file. The one writer of the project's
  small files (run settings, metrics, evaluation rows, teacher-cache shards, an export's config)."""
  dest = Path(dest)
  tmp = dest.with_name(f".{dest.name}.tmp-{writer_tag()}")
  try:
    with open(tmp, "wb") as f:
      content(f) if callable(content) else f.write(content)
      f.flush()
      os.fsync(f.fileno())  # on disk before the name says it is whole: a power cut leaves no short file behind it
    if dest.exists():
      shutil.copymode(dest, tmp)
    os.replace(tmp, dest)
  except BaseException:  # an error (or Ctrl-C) mid-write: nothing of it stays; a killed process's is named for
    tmp.unlink(missing_ok=True)  # `written_by_gone_process`
    raise


def written_by_gone_process(host: str, pid: int) -> bool:
  """Whether the writer named by `writer_tag` was a process of this host that no longer runs (what it
  left half-written is nobody's). Another host's (a shared disk) is never known to be gone."""
  if host != socket.gethostname():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # another user's process
    return False
  return False


def _swap_in(new: Path, directory: Path) -> None:
  """Puts the complete folder `new` at `directory`; the old content stays until the new is in place."""
  if not directory.exists():
    new.rename(directory)
    return
  if not any(directory.iterdir()):  # the user's own empty folder: filled, keeping its permissions and owner
    for name in reversed(EXPORT_ENTRIES):  # config.json last: an export is whole once it is there
      if (directory / name).exists() or (directory / name).is_symlink():  # appeared since it was checked
        raise ExportTargetError(f"cannot export to {directory}: {name} appeared there while the export was written")
      (new / name).rename(directory / name)
    new.rmdir()
    return
  old = _sibling(directory, "old")
  directory.rename(old)
  try:
    new.rename(directory)
  except BaseException:
    old.rename(directory)
    raise
  shutil.rmtree(old)


def _model_config(x, name: str, where: str) -> ModelConfig:
  """`x` as the backbone's ModelConfig (a ModelParams gives its own). A loaded `Model` is the common mix-up: it
  would fail deep in `dataclasses.asdict`, so it is named, with what to pass instead."""
  if isinstance(x, ModelConfig):
    return x
  if isinstance(x, ModelParams):
    return x.config
  if isinstance(getattr(x, "config", None), ModelConfig):
    raise TypeError(f"{where}: {name} takes the backbone's ModelConfig, not the Model: pass model.config")
  raise TypeError(f"{where}: {name} must be a ModelConfig (model.config), got {type(x).__name__}")


def save_adapters(adapters: Adapters, directory, *, model_config: ModelConfig, backbone: str,
                  dtype: str = "float32", overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
  """Writes an export. An existing export is only replaced with `overwrite`, and only once the new
  one is complete (it is written beside it, then swapped in). A folder that holds anything but an
  earlier export is never replaced (ExportTargetError). Once the export is in place, the hidden
  folders that killed exports to it left beside it are removed (`_remove_dead_siblings`).

  dtype: of the stored weights; "bfloat16" halves the size (loading gives float32 either way).
  model_config: the backbone's ModelConfig (or its ModelParams); adapters that do not fit it are refused.
  """
  import orbax.checkpoint as ocp

  model_config = _model_config(model_config, "model_config", "save_adapters")
  try:  # `with_adapters`' check: an export that names a backbone its adapters do not fit would be loaded for it
    problems = fit_problems(adapters, model_config, "model_config")
  except TypeError as e:
    raise TypeError(f"save_adapters: {e}") from None
  if problems:
    raise ValueError("save_adapters: these adapters do not fit model_config, so the export would claim the wrong "
                     f"backbone; pass the config of the model they were made for ({'; '.join(problems)})")
  acfg = adapters.config
  reserved = sorted(set(extra or {}) & {"format", "backbone", "backbone_fingerprint", "model_config",
                                         "weights_dtype", "adapter_config", "weights_sha256"})
  if reserved:
    raise ValueError(f"save_adapters: extra may not set {reserved}: the export writes them itself")
  meta = dict(format=FORMAT, backbone=backbone, backbone_fingerprint=fingerprint(model_config),
              model_config=config_to_json(model_config), weights_dtype=str(np.dtype(_dtype(dtype))),
              adapter_config=dict(d_c=acfg.d_c, chunk_hidden=acfg.chunk_hidden, qk_layers=list(acfg.qk_layers),
                                  selection_layers=None if acfg.selection_layers is None
                                  else list(acfg.selection_layers), score_queries=acfg.score_queries),
              **(extra or {}))
  directory = check_export_target(directory, overwrite=overwrite)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(directory, "tmp")
  tmp.mkdir()  # not mkdtemp: the export gets the umask's permissions, not 0700
  ckptr = None
  try:
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32).astype(_dtype(dtype)),
                          adapters.params)
    with _signals_held():  # an interrupt in orbax's save left its threads writing into tmp after its removal
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(tmp / "params", params)
      ckptr.wait_until_finished()
      ckptr.close()
    meta["weights_sha256"] = weights_digest(params)  # what `load_adapters` checks the weights it reads against
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    check_export_target(directory, overwrite=overwrite)  # it may have changed while we wrote
    _swap_in(tmp, directory)
  except BaseException:
    if ckptr is not None:  # a failed save: its threads are done before the folder goes
      try:
        ckptr.close()
      except Exception:
        pass
    shutil.rmtree(tmp, ignore_errors=True)  # ours alone; the old export is untouched
    raise
  _remove_dead_siblings(directory)
  return directory


@contextlib.contextmanager
def _signals_held():
  """Ctrl-C and SIGTERM wait until the block is done, then arrive (in the main thread; elsewhere nothing is
  held). Orbax writes from threads of its own: an interrupt in the middle of its save left them writing after
  the folder was removed, which they made again (a hidden half export, and errors at exit). Saving adapters
  takes a second or less."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  got = []
  held = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  held = {s: h for s, h in held.items() if h is not None}  # a handler set outside Python cannot be put back
  for s in held:
    signal.signal(s, lambda signum, frame: got.append(signum))
  try:
    yield
  finally:
    for s, h in held.items():
      signal.signal(s, h)
    if got:
      signal.raise_signal(got[0])  # to its own handler now: KeyboardInterrupt, or train.run's stop


def weights_digest(params) -> str:
  """SHA-256 of the adapter weights as stored: every leaf's path, dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)} {x.dtype} {x.shape};".encode())
    h.update(x.view(np.uint8).reshape(-1))
  return h.hexdigest()


def _shipped() -> list[str]:
  """The names of the exports shipped with the package."""
  return sorted(d.name for d in PACKAGED.iterdir() if d.is_dir()) if PACKAGED.is_dir() else []


def _export_dir(name_or_dir) -> Path:
  p = Path(name_or_dir)
  if isinstance(name_or_dir, str) and not p.exists() and (PACKAGED / name_or_dir).is_dir():
    return PACKAGED / name_or_dir
  if not p.is_dir():
    raise FileNotFoundError(f"no adapter export at {str(name_or_dir)!r}: give an export directory or "
                            f"a shipped name ({', '.join(_shipped()) or 'none installed'})")
  return p


def read_export_config(name_or_dir) -> dict[str, Any]:
  d = _export_dir(name_or_dir)
  try:
    meta = json.loads((d / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise AdapterLoadError(f"{d}: not a readable adapter export (config.json: {e})") from None
  if isinstance(meta, dict) and "model_type" in meta and "format" not in meta:
    # A model's own folder, given where adapters are read (`--adapters` left to default to `--model`).
    raise AdapterLoadError(f"{d} is a model folder, not an adapter export: adapters ship only for "
                           f"{', '.join(_shipped()) or 'no model'}; train some for this model (python -m train.run "
                           f"--model {d} --export DIR) and give that export (--adapters DIR on the command lines)")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise AdapterLoadError(f"{d}: config.json has format {found!r}, expected {FORMAT!r}")
  return meta


def check_backbone(meta: dict[str, Any], model_config: ModelConfig, source: str) -> None:
  want = fingerprint(model_config)
  if meta["backbone_fingerprint"] != want:
    theirs = config_from_json(meta["model_config"])
    diff = [f"{k}: export {getattr(theirs, k)!r} vs model {getattr(model_config, k)!r}"
            for k in config_to_json(model_config) if k not in _NOT_FINGERPRINTED
            and getattr(theirs, k) != getattr(model_config, k)]
    raise AdapterLoadError(
        f"{source}: these adapters were trained for backbone {meta['backbone']!r} (fingerprint "
        f"{meta['backbone_fingerprint']}), not for this model (fingerprint {want}):\n  " + "\n  ".join(diff))


def load_adapters(name_or_dir, expected_config: ModelConfig | ModelParams | None = None) -> Adapters:
  """Reads an export (a directory, or a shipped name such as "smollm2-135m").

  expected_config: the backbone's ModelConfig (or its ModelParams); an export made for another
  backbone is refused with an AdapterLoadError. Without it, `cj.with_adapters` still refuses
  adapters whose shapes do not fit.
  """
  import orbax.checkpoint as ocp

  d = _export_dir(name_or_dir)
  meta = read_export_config(d)
  try:
    model_config = config_from_json(meta["model_config"])
    a = meta["adapter_config"]
    sel = a.get("selection_layers")  # absent in exports made before selection layers existed
    acfg = AdapterConfig(d_c=a["d_c"], chunk_hidden=a["chunk_hidden"], qk_layers=tuple(a["qk_layers"]),
                         selection_layers=None if sel is None else tuple(sel),
                         score_queries=a.get("score_queries", 1)).check()  # absent before adapter windows
  except (KeyError, TypeError, AttributeError, ValueError) as e:  # a config.json edited or cut short
    raise AdapterLoadError(f"{d}: config.json is damaged ({type(e).__name__}: {e}); export the adapters "
                           "again") from None
  if expected_config is not None:  # before the weights are read
    check_backbone(meta, _model_config(expected_config, "expected_config", "load_adapters"), str(d))
  shapes = expected_shapes(acfg, model_config)
  stored = _dtype(meta.get("weights_dtype", "float32"))
  # Restored as numpy, converted there and placed once: restoring into device arrays and converting
  # each leaf there held 21 MiB more of the process for good (bench/RESULTS_memory.md).
  target = jax.tree.map(lambda s: np.zeros(s, stored), shapes, is_leaf=lambda x: isinstance(x, tuple))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore((d / "params").absolute(), target)
  except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
    raise AdapterLoadError(f"{d}: the adapter weights cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); the export is damaged or "
                           "incomplete") from None  # the storage library's chain says no more
  problems = shape_problems(leaf_shapes(shapes, is_leaf=lambda x: isinstance(x, tuple)), leaf_shapes(params),
                            "config.json")
  if problems:
    raise AdapterLoadError(f"{d}: weights do not match config.json:\n  " + "\n  ".join(problems))
  # Bytes changed on disk read back without an error from the storage library: checked against the digest the
  # export recorded (exports from before it have none), and for values no training step leaves (NaN, inf).
  recorded = meta.get("weights_sha256")
  if recorded is not None and weights_digest(params) != recorded:
    raise AdapterLoadError(f"{d}: the adapter weights are not the ones exported (their SHA-256 differs from "
                           "config.json's weights_sha256): the export is damaged; export the adapters again")
  bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(params)
         if not np.isfinite(np.asarray(x, np.float32)).all()]
  if bad:
    raise AdapterLoadError(f"{d}: the adapter weights hold NaN or infinite values ({', '.join(bad[:3])}): the "
                           "export is damaged, or came from a diverged run; export the adapters again")
  return Adapters(params=jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), params)), config=acfg)
