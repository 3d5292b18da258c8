"""Training data: the packed TFDS dataset, read with `tfds` data sources and fed through `grain`.

The order of sequences is a function of the seed alone: a grain `MapDataset`, shuffled per epoch
and repeated. Global batch `s` is the sequences `[s*G, (s+1)*G)` of that order; process `p` of `n`
reads only its rows `[p*G/n, (p+1)*G/n)` of each, so any number of processes sees the same global
batches. The iterator's state (`get_state`/`set_state`) is one index, saved with each checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from train import tfds_builder


class ProcessRows(grain.MapDataset):
  """Element `i` is row `i % local` of global batch `i // local`, for this process."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} is not a multiple of the {process_count} processes")
    self._global, self._local = global_batch, global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def _parent_index(self, i: int) -> int:
    return (i // self._local) * self._global + self._offset + i % self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access


def _local_batches(source, global_batch: int, process_index: int, process_count: int,
                   seed: int | None) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat()
  local = global_batch // process_count
  return ProcessRows(ds, global_batch, process_index, process_count).batch(local, drop_remainder=True)


def train_iterator(source, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
  """An endless iterator of this process's share of each global batch: dict(tokens, labels) numpy.

  It has `get_state()` / `set_state(state)`, a small JSON-able dict.
  """
  if len(source) < global_batch:
    raise tfds_builder.DataError(f"the training split has {len(source)} sequences, fewer than one batch "
                                 f"of {global_batch}")
  # A small read-ahead: a teacher-cache source computes a missing record when it is read, and should
  # compute only what the run uses, one at a time (the frozen pass already uses every core).
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  return iter(_local_batches(source, global_batch, process_index, process_count, seed).to_iter_dataset(read))


def eval_batches(source, *, global_batch: int, n_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `n_batches` batches of the held-out split, in order: fewer if it is short, but at least
  one (a split smaller than a batch wraps around)."""
  ds = _local_batches(source, global_batch, process_index, process_count, seed=None)
  return [ds[i] for i in range(max(1, min(n_batches, len(source) // global_batch)))]


def load_splits(*, files: Sequence[str] = (), tfds_name: str = "", text_key: str = "text", tokenizer,
                tokenizer_name: str, seq_len: int, eval_fraction: float, data_dir: str, retrieval_mix: float = 0.0,
                mix_seed: int = 0) -> dict[str, Any]:
  """Builds (once) and opens the packed dataset: {"train": source, "validation": source or None, "name":
  the dataset's fingerprinted name}. `retrieval_mix`: the share of retrieval-mixture tokens (text files)."""
  if not files and not tfds_name:
    raise tfds_builder.DataError("no training data: give --data FILE [FILE ...] or --tfds_name NAME")
  for f in files:  # fail on bad input before anything is built (a text too short for the mixture: at the build)
    tfds_builder.read_documents(f)
  config = tfds_builder.make_config(files=files, tfds_name=tfds_name, text_key=text_key,
                                    tokenizer=tokenizer_name, seq_len=seq_len, eval_fraction=eval_fraction,
                                    retrieval_mix=retrieval_mix, mix_seed=mix_seed)
  path = tfds_builder.build(config, tokenizer, data_dir)
  builder = tfds.builder_from_directory(str(path))
  splits = builder.info.splits
  return {"name": config.name, "train": builder.as_data_source(split="train"),
          "validation": builder.as_data_source(split="validation") if "validation" in splits else None}


class FirstN:
  """The first `n` records of a random-access source (a training run on part of a dataset)."""

  def __init__(self, source, n: int):
    if n > len(source):
      raise tfds_builder.DataError(f"--max_sequences {n} is more than the {len(source)} training sequences")
    self.source, self.n = source, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]
