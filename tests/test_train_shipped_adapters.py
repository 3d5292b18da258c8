"""The adapters shipped for smollm2-135m and gemma3-270m: small, readable, and for that backbone only."""

import pytest

import chunkllm_jax as cj
from chunkllm_jax import adapter_io
from tests.tiny_models import tiny_config


def test_shipped_smollm2_adapters_load_and_refuse_other_backbones():
  d = adapter_io.PACKAGED / "smollm2-135m"
  assert sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) < 5_000_000
  meta = adapter_io.read_export_config("smollm2-135m")
  assert meta["backbone"] == "smollm2-135m"
  model_config = adapter_io.config_from_json(meta["model_config"])
  assert (model_config.n_layers, model_config.d_model, model_config.n_heads) == (30, 576, 9)
  adapters = cj.load_adapters("smollm2-135m", expected_config=model_config)
  # trained for the layers inference selects with, which the export stores as its default choice
  assert adapters.config.d_c == 64 and adapters.config.qk_layers == adapters.config.selection_layers == (7, 15)
  assert meta["trained_steps"] >= 600
  with pytest.raises(adapter_io.AdapterLoadError, match="trained for backbone 'smollm2-135m'"):
    cj.load_adapters("smollm2-135m", expected_config=tiny_config())


def test_shipped_gemma3_adapters_sit_on_its_full_attention_layers():
  meta = adapter_io.read_export_config("gemma3-270m")
  model_config = adapter_io.config_from_json(meta["model_config"])
  assert meta["backbone"] == "gemma3-270m" and meta["weights_dtype"] == "bfloat16"
  adapters = cj.load_adapters("gemma3-270m", expected_config=model_config)
  assert adapters.config.qk_layers == model_config.full_attention_layers == (5, 11, 17)
  assert meta["trained_steps"] >= 600  # the head-max run (train/RESULTS.md), not the first 150-step one
  with pytest.raises(adapter_io.AdapterLoadError, match="trained for backbone 'gemma3-270m'"):
    cj.load_adapters("gemma3-270m", expected_config=tiny_config("gemma3"))


@pytest.mark.real_model
def test_shipped_adapters_fit_the_real_model(smollm2):
  params = cj.with_adapters(smollm2.params, cj.load_adapters("smollm2-135m", expected_config=smollm2.params))
  assert params.adapters.config.d_c == 64
