"""Training data: the TFDS builder packs labelled text; grain batches it deterministically and resumably."""

import functools

import numpy as np
import pytest

from chunkllm_jax import boundaries
from train import backbone, data, tfds_builder

SENTENCES = [f"Sentence number {i} talks about the {w} of the day." for i, w in
             enumerate(["weather", "news", "markets", "games", "food", "roads", "songs", "books"] * 4)]


@functools.lru_cache(maxsize=None)
def tokenizer():
  return backbone.load_tokenizer("smollm2-135m")


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_bytes(text if isinstance(text, bytes) else text.encode())
  return str(p)


def _splits(tmp_path, files, seq_len=32, eval_fraction=0.2):
  return data.load_splits(files=files, tokenizer=tokenizer(), tokenizer_name="smollm2-135m", seq_len=seq_len,
                          eval_fraction=eval_fraction, data_dir=str(tmp_path / "data"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("corpus")
  docs = [" ".join(SENTENCES[:16]), " ".join(SENTENCES[16:])]
  a = _write(tmp, "a.txt", docs[0] + "\n\n  \n" + docs[1] + "\n")
  b = _write(tmp, "b.txt", "\n".join(SENTENCES[:12]))
  return tmp, [a, b], docs + ["\n".join(SENTENCES[:12])]


def test_builder_packs_documents_with_eos_and_labels(corpus):
  tmp, files, docs = corpus
  splits = _splits(tmp, files)
  train, val = splits["train"], splits["validation"]
  assert len(val) >= 1 and len(train) >= 4
  rec = train[0]
  assert rec["tokens"].dtype == np.int32 and rec["labels"].dtype == np.int8 and rec["tokens"].shape == (32,)
  # The records, in order, are the documents' labelled tokens joined by EOS, cut into 32-token pieces.
  tok = tokenizer()
  ids, labels = [], []
  for d in docs:
    i, l = boundaries.sentence_end_labels(d, tok)
    ids += list(i) + [tok.eos_token_id]
    labels += list(l) + [0]
  n = len(train) + len(val)
  got = np.concatenate([train[i]["tokens"] for i in range(len(train))] + [val[i]["tokens"] for i in range(len(val))])
  got_labels = np.concatenate([train[i]["labels"] for i in range(len(train))] + [val[i]["labels"] for i in range(len(val))])
  assert n == len(ids) // 32
  np.testing.assert_array_equal(got, ids[:n * 32])
  np.testing.assert_array_equal(got_labels, labels[:n * 32])
  assert got_labels.sum() >= 40  # one per sentence
  # Building again with the same inputs reuses the dataset; other inputs get another one.
  assert _splits(tmp, files)["train"][3]["tokens"].tolist() == train[3]["tokens"].tolist()
  assert len(_splits(tmp, files, seq_len=64)["train"]) < len(train)


def test_files_split_elsewhere_build_another_dataset(tmp_path):
  # The same bytes in other files are other documents (a file is split into documents at blank lines, and
  # documents never span files), so they are another dataset, not the one built before.
  text = " ".join(SENTENCES)
  cut = len(text) // 2
  one = [_write(tmp_path, "a.txt", text[:cut]), _write(tmp_path, "b.txt", text[cut:])]
  other = [_write(tmp_path, "c.txt", text[:cut + 7]), _write(tmp_path, "d.txt", text[cut + 7:])]
  config = lambda files: tfds_builder.make_config(files=files, tokenizer="smollm2-135m", seq_len=32, eval_fraction=0.2)
  assert config(one).name != config(other).name
  assert config(one).name == config([_write(tmp_path, "e.txt", text[:cut]), one[1]]).name  # content, not paths
  first, second = (_splits(tmp_path, files)["train"] for files in (one, other))
  assert [first[i]["tokens"].tolist() for i in range(len(first))] != [
      second[i]["tokens"].tolist() for i in range(len(second))]


def test_grain_order_is_seeded_resumable_and_split_by_process(corpus):
  tmp, files, _ = corpus
  source = _splits(tmp, files)["train"]
  it = data.train_iterator(source, global_batch=4, seed=3)
  first = [next(it)["tokens"] for _ in range(2)]
  state = it.get_state()
  later = [next(it)["tokens"] for _ in range(3)]  # crosses an epoch boundary
  again = data.train_iterator(source, global_batch=4, seed=3)
  np.testing.assert_array_equal(next(again)["tokens"], first[0])
  again.set_state(state)
  for want in later:
    np.testing.assert_array_equal(next(again)["tokens"], want)
  other_seed = data.train_iterator(source, global_batch=4, seed=4)
  assert any((next(other_seed)["tokens"] != f).any() for f in first)
  # Two processes each read half of every global batch; together they read the same batches.
  halves = [data.train_iterator(source, global_batch=4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for want in first + later:
    got = [next(h)["tokens"] for h in halves]
    assert got[0].shape == (2, 32)
    np.testing.assert_array_equal(np.concatenate(got), want)


def test_eval_batches_are_the_held_out_split_in_order(corpus):
  tmp, files, _ = corpus
  val = _splits(tmp, files)["validation"]
  rows = np.stack([val[i % len(val)]["tokens"] for i in range(4)])
  batches = data.eval_batches(val, global_batch=2, n_batches=10)
  assert len(batches) == max(1, len(val) // 2)  # a split shorter than one batch wraps around
  np.testing.assert_array_equal(batches[0]["tokens"], rows[:2])
  halves = [data.eval_batches(val, global_batch=2, n_batches=1, process_index=p, process_count=2) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h[0]["tokens"] for h in halves]), rows[:2])


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"\n \n\n", "empty"),
    (b"caf\xe9 au lait. Bad bytes.", "not UTF-8"),
    (b"Too short. Only two sentences.", "too few"),
])
def test_bad_text_gives_an_error_naming_the_file(tmp_path, content, message):
  f = _write(tmp_path, "bad.txt", content)
  with pytest.raises(tfds_builder.DataError, match=message) as e:
    _splits(tmp_path, [f])
  assert f in str(e.value)


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty"),
    (b"\n \n\n", "the file is empty"),
    (b"caf\xe9 au lait. Bad bytes.", "not UTF-8 text \\(invalid continuation byte at byte 3\\)"),
    (b"a" * ((1 << 22) + 5) + b"\xff", f"not UTF-8 text \\(invalid start byte at byte {(1 << 22) + 5}\\)"),
    (b"text, then half a character \xc3", "not UTF-8 text \\(unexpected end of data at byte 28\\)"),
    (b"a" * ((1 << 22) - 1) + "é".encode() + b" fine", None),  # a character across two blocks
])
def test_the_door_check_refuses_what_reading_refuses(tmp_path, content, message):
  """`check_text_file` (the run's check before the model loads, in blocks) and `read_documents` agree."""
  f = _write(tmp_path, "t.txt", content)
  if message is None:
    tfds_builder.check_text_file(f)
    assert tfds_builder.read_documents(f)
    return
  for check in (tfds_builder.check_text_file, tfds_builder.read_documents):
    with pytest.raises(tfds_builder.DataError, match=f"^{f}: {message}"):
      check(f)


def test_no_data_and_missing_file(tmp_path):
  with pytest.raises(tfds_builder.DataError, match="no training data"):
    _splits(tmp_path, [])
  with pytest.raises(tfds_builder.DataError, match="nope.txt"):
    _splits(tmp_path, [str(tmp_path / "nope.txt")])
