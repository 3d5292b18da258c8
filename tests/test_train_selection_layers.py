"""train.run --selection_layers: QK Adapters on those layers only, stored as the export's selection
layers, which chunk_generate then uses by default."""

import json

import pytest

import chunkllm_jax as cj
from tests import train_run_fixtures as fx
from tests.hf_fixtures import make_tiny_hf_model


def test_adapters_trained_for_the_selection_layers_only(tmp_path):
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  export = tmp_path / "export"
  out = fx.run(fx.command(tmp_path / "work", corpus, tmp_path / "data", "--steps", "2", "--eval_every", "0",
                          "--checkpoint_every", "0", "--selection_layers", "1", "--export", str(export)))
  assert out.returncode == 0, out.stderr[-2000:]
  acfg = json.loads((export / "config.json").read_text())["adapter_config"]
  assert acfg["qk_layers"] == [1] and acfg["selection_layers"] == [1]
  adapters = cj.load_adapters(str(export))
  assert adapters.config.selection_layers == (1,)
  assert adapters.params["qk"]["q"]["inner"]["kernel"].shape[0] == 1  # one stacked QK Adapter


def test_a_selection_layer_out_of_range_is_refused(tmp_path):
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  out = fx.run(fx.command(tmp_path / "work", corpus, tmp_path / "data", "--selection_layers", "5"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "out of range or not full-attention layers" in out.stderr
  assert not (tmp_path / "data").exists()  # refused before the data was built


@pytest.mark.parametrize("selection_layers", [(), ("0",)])
def test_a_model_without_full_attention_layers_is_refused(tmp_path, selection_layers):
  """A Mistral whose every layer reads a sliding window has nothing for ChunkLLM to make sparse."""
  model = make_tiny_hf_model("mistral", tmp_path, sliding_window=16)
  corpus = fx.write_corpus(tmp_path / "corpus.txt")
  flags = ("--selection_layers", *selection_layers) if selection_layers else ()
  out = fx.run(fx.command(tmp_path / "work", corpus, tmp_path / "data", "--model", str(model), *flags))
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "no full-attention layer" in out.stderr
  assert not (tmp_path / "data").exists()  # refused before the data was built


@pytest.mark.parametrize("argv, want", [
    ([], (7, 15)),  # the preset's own model: its layers
    (["--model", "path/to/my_model"], ()),  # another model: every full-attention layer
    (["--model", "path/to/my_model", "--selection_layers", "1", "3"], (1, 3)),
    (["--model", "smollm2-135m"], (7, 15)),
])
def test_a_presets_selection_layers_stay_with_its_model(argv, want):
  """--model with the default preset inherited smollm2-135m's layers 7 and 15: a 4-layer model of one's own was
  refused for a flag its user never gave."""
  from train import config, run
  assert config.from_args(run.parse_args(["--preset", "smollm2-135m", *argv])).selection_layers == want
