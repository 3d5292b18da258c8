"""eval.package_docs: the installed packages' READMEs as a one-sentence-a-line filler text."""

import pytest

from eval import niah, package_docs


@pytest.mark.parametrize("text, lines", [
    ("One sentence. Two sentences!  Three?\n\nA  line   of    code: x = f(1.5)",
     ["One sentence.", "Two sentences!", "Three?", "A line of code: x = f(1.5)"]),
    ("version 1.2.3 of the API. then lower case. Upper", ["version 1.2.3 of the API. then lower case.", "Upper"]),
    ("   \n\t\n", []),
])
def test_sentence_lines(text, lines):
  assert package_docs.sentence_lines(text) == lines


def test_the_text_is_a_filler_of_the_installed_readmes(tmp_path):
  out = tmp_path / "docs.txt"
  assert package_docs.main(["--out", str(out)]) == 0
  docs = niah.read_sentences(out)
  found = package_docs.descriptions()
  assert len(docs) == len(found) > 0
  assert "chunkllm-jax" not in found and all(len(body) >= package_docs.MIN_CHARS for body in found.values())
  first = sorted(found)[0]
  assert docs[0] == package_docs.sentence_lines(found[first])  # one document a package, in the order of names


def test_an_existing_out_is_refused_and_kept(tmp_path, capsys):
  out = tmp_path / "mine.txt"
  out.write_text("a user's file\n")
  assert package_docs.main(["--out", str(out)]) == 2
  assert out.read_text() == "a user's file\n"
  assert "exists" in capsys.readouterr().err


def test_no_description_long_enough_is_said(tmp_path, capsys):
  out = tmp_path / "docs.txt"
  assert package_docs.main(["--out", str(out), "--min_chars", str(10**9)]) == 2
  assert not out.exists() and "no installed distribution" in capsys.readouterr().err
