"""A TFDS builder (array_record format, so no TensorFlow): text -> packed, boundary-labelled sequences.

Each record is one training sequence: `tokens` int32 [seq_len] and `labels` int8 [seq_len] (1 on
the last token of each pySBD sentence). Documents are labelled one at a time, joined with an EOS
token between them, and cut into `seq_len` pieces (the tail that does not fill one is dropped).

Sources: text files (a file is split into documents at blank lines), or a TFDS text dataset by
name (`pg19`, `c4`, ...: its `train` split, and `validation` when it has one). For text files, the
last `eval_fraction` of the packed sequences form the `validation` split.

A config's name is a hash of everything that shapes the records (file contents, tokenizer,
`seq_len`, ...), so the same inputs find the dataset already built and new ones build anew.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from chunkllm_jax import boundaries

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class DataError(ValueError):
  """Input text that cannot become training data (empty, not UTF-8, too short)."""


@dataclasses.dataclass(eq=False)
class PackedTextConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()
  tfds_name: str = ""
  text_key: str = "text"
  tokenizer: str = ""  # a name for the tokenizer, part of the fingerprint
  seq_len: int = 2048
  eval_fraction: float = 0.05
  retrieval_mix: float = 0.0  # share of the tokens that are retrieval-mixture documents (train.mixture)
  mix_seed: int = 0


def check_text_file(path: str) -> None:
  """What `read_documents` refuses (no such file, not UTF-8, no text), read in blocks without keeping the text:
  the check a run makes at the door, before the model loads."""
  p = Path(path)
  if not p.is_file():
    raise DataError(f"{path}: no such file")
  decoder, offset, has_text = codecs.getincrementaldecoder("utf-8")(), 0, False
  with open(p, "rb") as f:
    # None: the end, where a character cut short fails
    for block in itertools.chain(iter(lambda: f.read(1 << 22), b""), [None]):
      held = len(decoder.getstate()[0])  # bytes of a character the last block cut, decoded with this one
      try:
        has_text = bool(decoder.decode(block or b"", final=block is None).strip()) or has_text
      except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {offset - held + e.start})") from None
      offset += len(block or b"")
  if not has_text:
    raise DataError(f"{path}: the file is empty (no text)")


def read_documents(path: str) -> list[str]:
  """The blank-line separated documents of a UTF-8 text file; DataError for bad input."""
  p = Path(path)
  if not p.is_file():
    raise DataError(f"{path}: no such file")
  try:
    text = p.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  docs = [d.strip() for d in _BLANK_LINE.split(text.replace("\r\n", "\n"))]
  docs = [d for d in docs if d]
  if not docs:
    raise DataError(f"{path}: the file is empty (no text)")
  return docs


def file_digest(path) -> bytes:
  """The SHA-256 of a file's bytes, read a block at a time (a corpus may not fit in memory twice)."""
  with open(path, "rb") as fh:
    return hashlib.file_digest(fh, "sha256").digest()


def make_config(*, files=(), tfds_name="", text_key="text", tokenizer: str, seq_len: int,
                eval_fraction: float, retrieval_mix: float = 0.0, mix_seed: int = 0) -> PackedTextConfig:
  """A config named by the fingerprint of its inputs."""
  fields = [tfds_name, text_key, tokenizer, seq_len, eval_fraction]
  if retrieval_mix:  # (without one, the name of a dataset built before the mixture existed)
    fields += [retrieval_mix, mix_seed]
  h = hashlib.sha256(json.dumps(fields).encode())
  for f in files:  # each file's own digest: files split elsewhere (other documents) get another name
    h.update(file_digest(f) if Path(f).is_file() else f.encode())
  return PackedTextConfig(name=f"seq{seq_len}_{h.hexdigest()[:16]}", files=tuple(str(f) for f in files),
                          tfds_name=tfds_name, text_key=text_key, tokenizer=tokenizer, seq_len=seq_len,
                          eval_fraction=eval_fraction, retrieval_mix=retrieval_mix, mix_seed=mix_seed,
                          version=PackedText.VERSION)


def pack(labelled_docs: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, eos_id: int
         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Joins (ids, labels) documents with an EOS token between them and yields full [seq_len] pieces."""
  buf_ids, buf_labels, n = [], [], 0
  for ids_T, labels_T in labelled_docs:
    buf_ids += [ids_T, np.asarray([eos_id], np.int32)]
    buf_labels += [labels_T, np.zeros(1, np.int8)]
    n += len(ids_T) + 1
    if n >= seq_len:
      ids, labels = np.concatenate(buf_ids), np.concatenate(buf_labels)
      full = (n // seq_len) * seq_len
      for s in range(0, full, seq_len):
        yield ids[s:s + seq_len].astype(np.int32), labels[s:s + seq_len].astype(np.int8)
      buf_ids, buf_labels, n = [ids[full:]], [labels[full:]], n - full


class PackedText(tfds.core.GeneratorBasedBuilder):
  """Packed, pySBD-labelled token sequences. Pass `tokenizer=` (a fast HF tokenizer) and `config=`."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, tokenizer=None, **kwargs):
    self._tokenizer = tokenizer
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    T = self.builder_config.seq_len
    return tfds.core.DatasetInfo(
        builder=self,
        description="Text packed into token sequences with pySBD sentence-end labels (ChunkLLM).",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(T,), dtype=np.int32),
            "labels": tfds.features.Tensor(shape=(T,), dtype=np.int8),
        }),
        disable_shuffling=True,  # records stay in text order; the loader shuffles
        metadata=tfds.core.MetadataDict(files=list(self.builder_config.files),
                                        tfds_name=self.builder_config.tfds_name,
                                        tokenizer=self.builder_config.tokenizer),
    )

  def _label(self, docs: Iterable[str]):
    for doc in docs:
      yield boundaries.sentence_end_labels(doc, self._tokenizer)

  def _eos(self) -> int:
    eos = self._tokenizer.eos_token_id
    return int(eos if eos is not None else 0)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if self._tokenizer is None:
      raise ValueError("PackedText needs tokenizer= to build")
    if cfg.tfds_name:
      return self._tfds_splits(cfg)
    docs = [d for f in cfg.files for d in read_documents(f)]
    if cfg.retrieval_mix:
      docs = with_mixture(docs, cfg, self._tokenizer)
    seqs = list(pack(self._label(docs), cfg.seq_len, self._eos()))
    n_eval = math.ceil(cfg.eval_fraction * len(seqs)) if cfg.eval_fraction > 0 else 0
    if len(seqs) < n_eval + 1 or (n_eval and len(seqs) < 2):
      n_tok = sum(len(self._tokenizer(d)["input_ids"]) + 1 for d in docs)
      raise DataError(f"{', '.join(cfg.files)}: {n_tok} tokens of text are too few for "
                      f"{max(2, n_eval + 1) if n_eval else 1} sequence(s) of {cfg.seq_len} tokens "
                      f"(training{' + held-out eval' if n_eval else ''})")
    splits = {"train": self._generate_examples(seqs[:len(seqs) - n_eval])}
    if n_eval:
      splits["validation"] = self._generate_examples(seqs[len(seqs) - n_eval:])
    return splits

  def _tfds_splits(self, cfg: PackedTextConfig):
    builder = tfds.builder(cfg.tfds_name, file_format="array_record")  # random access, no TensorFlow
    builder.download_and_prepare()

    def texts(split):
      for ex in builder.as_data_source(split=split):
        t = ex[cfg.text_key]
        yield t.decode("utf-8") if isinstance(t, bytes) else str(t)

    splits = {"train": self._generate_examples(pack(self._label(texts("train")), cfg.seq_len, self._eos()))}
    if "validation" in builder.info.splits:
      splits["validation"] = self._generate_examples(
          pack(self._label(texts("validation")), cfg.seq_len, self._eos()))
    return splits

  def _generate_examples(self, seqs):
    for i, (ids, labels) in enumerate(seqs):
      yield i, {"tokens": ids, "labels": labels}


def with_mixture(docs, cfg: PackedTextConfig, tokenizer) -> list[str]:
  """The documents with the retrieval mixture spread among them (`train.mixture.mix`)."""
  from train import mixture

  count = lambda lines: [len(ids) for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"]]
  return mixture.mix(docs, cfg.retrieval_mix, doc_tokens=cfg.seq_len, count_tokens=count, seed=cfg.mix_seed)[0]


def build(config: PackedTextConfig, tokenizer, data_dir: str) -> Path:
  """Builds the dataset unless already built; returns its directory (for `tfds.builder_from_directory`)."""
  builder = PackedText(config=config, tokenizer=tokenizer, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)
