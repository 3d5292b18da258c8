"""Training checkpoints: Orbax `CheckpointManager`, async, keeping the last `max_to_keep`.

Each checkpoint holds three items:
- `state`: the `TrainState` (step, adapters, optimizer state; never the backbone), StandardSave;
- `data`: the grain iterator's state, JsonSave;
- `meta`: the backbone fingerprint and adapter config, JsonSave, checked before anything else is
  read, so a run never resumes from another model's checkpoint.

A checkpoint that fails to load stops the run with an error naming it; nothing is deleted or
written over (a fresh run there would start saving and rotating old checkpoints away).

Beside the checkpoints, `<workdir>/run_settings.json` records the settings they depend on (data,
sequence length, batch, schedule, backbone...). A run whose settings differ is refused at start-up,
before a `Checkpointer` exists, so it never resumes the other run nor rotates its checkpoints away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from chunkllm_jax import adapter_io
from train.metrics import METRICS_FILE


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be resumed from: damaged, or written for another model."""


class SettingsMismatchError(CheckpointError):
  """A workdir whose checkpoints were written with other settings than this run's."""


SETTINGS_FILE = "run_settings.json"


def has_checkpoints(directory) -> bool:
  """Whether `directory` holds any step folder, finished or not (what resuming and rotation touch)."""
  d = Path(directory)
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_settings(workdir, settings: dict[str, Any], *, describe: dict[str, str] | None = None,
                   ignore: tuple[str, ...] = ()) -> str:
  """Refuses (SettingsMismatchError) a run whose `settings` differ from those recorded with the
  checkpoints in `workdir`. Returns "same"; or "new" (no checkpoints: nothing depends on the file, so
  this run's settings may replace it) or "unrecorded" (checkpoints from before the file existed): in
  both, write the file once the run is under way.

  A workdir with no checkpoints but a metrics.jsonl holding rows is refused unless its settings file
  records these same settings (the same run, started again from step 0, logs the same rows again):
  another run's log, or a user's file, is never rewritten.

  describe: {key: other key} shown beside a differing key (the data hash -> the file names).
  ignore: keys not compared (those a caller does not know yet, such as the weights before they load).
  """
  workdir = Path(workdir)
  path = workdir / SETTINGS_FILE
  if not has_checkpoints(workdir / "checkpoints"):
    log = workdir / METRICS_FILE
    if _has_rows(log):
      same = path.exists() and not _differences(_recorded(path), settings, describe or {}, ignore)
      if not same:
        raise SettingsMismatchError(
            f"{workdir} holds a {METRICS_FILE} with rows but no checkpoint to resume from: it is another run's log "
            "(one with other settings, or with --checkpoint_every 0) or a file of yours, and a run here would "
            f"rewrite it. Give another --workdir, or move {log} aside")
    if path.exists() or path.is_symlink():
      _recorded(path)  # a file of that name that no run wrote (or a link) is refused, never replaced
    return "new"
  if not path.exists():
    return "unrecorded"
  diff = _differences(_recorded(path), settings, describe or {}, ignore)
  if diff:
    extend = ("; --steps sets the length of the learning-rate schedule, so a run cannot be extended: train a "
              "longer run in another --workdir" if any(d.startswith("steps:") for d in diff) else "")
    raise SettingsMismatchError(
        f"{workdir} holds checkpoints of a run with other settings ({'; '.join(diff)}): use another "
        f"--workdir, or restore these flags to resume that run{extend}")
  return "same"


def _recorded(path: Path) -> dict[str, Any]:
  try:
    if path.is_symlink():
      raise ValueError("a link, which a run never writes")
    settings = json.loads(path.read_text())["settings"]
    if not isinstance(settings, dict):
      raise TypeError("no settings in it")
    return settings
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)}); it records the "
                          "settings of the run beside it, and a run here would replace it: restore it, move it "
                          "aside, or use another --workdir") from None


def _differences(old: dict, new: dict, describe: dict[str, str], ignore=()) -> list[str]:
  return [_difference(k, old, new, describe) for k in sorted(old)
          if k not in describe.values() and k not in ignore and old.get(k) != new.get(k)]


def _has_rows(path: Path) -> bool:
  """Whether a metrics file holds any text (a row, or a row a kill cut short)."""
  try:
    return path.is_file() and path.stat().st_size > 0 and bool(path.read_text(errors="replace").strip())
  except OSError:
    return True  # unreadable: not ours to rewrite


def _difference(key: str, old: dict, new: dict, describe: dict[str, str]) -> str:
  def show(d):
    return f"{d.get(key)!r}" + (f" ({d.get(describe[key])})" if key in describe else "")

  return f"{key}: {show(old)} there, {show(new)} now"


def write_settings(workdir, settings: dict[str, Any]) -> None:
  """Writes the settings file whole or not at all (a reader never sees half of it)."""
  path = Path(workdir) / SETTINGS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  adapter_io.write_atomic(path, (json.dumps(dict(settings=settings), indent=2, sort_keys=True) + "\n").encode())


class Checkpointer:
  def __init__(self, directory, *, max_to_keep: int, save_every: int, meta: dict[str, Any]):
    self.directory = Path(directory).absolute()
    self._meta = meta
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=max(save_every, 1),
                                             enable_async_checkpointing=True, create=True),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_state: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an async save (when `step` is due, or `force`); returns whether one started."""
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(self._meta)), force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """(state, data_state) of checkpoint `step`; `abstract_state` gives shapes and shardings."""
    where = self.directory / str(step)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for a damaged directory
      raise CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: {_first_line(e)}). "
                            "It is left as it is: move it aside to resume from an earlier one.") from e
    for key in ("backbone_fingerprint", "adapter_config"):
      if meta.get(key) != self._meta.get(key):
        raise CheckpointError(
            f"checkpoint {where} was written for another model or adapter config ({key}: checkpoint "
            f"{meta.get(key)!r}, this run {self._meta.get(key)!r}; backbone {meta.get('backbone')!r}). "
            "Use another --workdir.")
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: {_first_line(e)}). "
                            "It is left as it is: move it aside to resume from an earlier one.") from e
    return out["state"], out["data"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def abstract_like(tree, sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _first_line(e: Exception) -> str:
  s = str(e).strip()
  return s.splitlines()[0][:300] if s else ""
