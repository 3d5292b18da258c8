"""Training checkpoints: Orbax `CheckpointManager`, async, keeping the last `max_to_keep`.

Each checkpoint holds three items:
- `state`: the `TrainState` (step, adapters, optimizer state; never the backbone), StandardSave;
- `data`: the grain iterator's state, JsonSave;
- `meta`: the backbone fingerprint and adapter config, JsonSave, checked before anything else is
  read, so a run never resumes from another model's checkpoint.

A checkpoint that fails to load stops the run with an error naming it; nothing is deleted or
written over (a fresh run there would start saving and rotating old checkpoints away).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be resumed from: damaged, or written for another model."""


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
