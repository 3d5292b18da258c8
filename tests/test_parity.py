"""JAX logits against transformers (torch, float32) on the same weights.

Bound: relative error max|jax - torch| / max|torch| <= 1e-4, on tiny random models of every
architecture (with sliding windows and RoPE scalings exercised) and on the real smollm2-135m.
"""

import json

import numpy as np
import pytest

import chunkllm_jax as cj
from tests.hf_fixtures import make_tiny_hf_model, write_gguf

REL_TOL = 1e-4


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def torch_logits(model_dir_or_model, ids, **load_kw):
  import torch
  from transformers import AutoModelForCausalLM

  model = model_dir_or_model
  if not hasattr(model, "forward"):
    model = AutoModelForCausalLM.from_pretrained(model_dir_or_model, dtype=torch.float32, **load_kw)
  model.eval()
  with torch.inference_mode():
    return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


CASES = [
    ("llama", {}),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=32))),
    ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    ("mistral", {}),  # sliding window 32 < sequence length
    ("qwen2", {}),
    ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                        original_max_position_embeddings=32))),
    ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                        original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.5))),
    ("qwen3", {}),
    ("qwen3", dict(attention_bias=True)),  # on q, k, v and o
    ("mistral", dict(attention_bias=True)),  # which transformers' Mistral ignores (it has no biases)
    ("llama", dict(hidden_act="gelu_pytorch_tanh")),  # the MLP's activation read from config.json
    ("gemma3", {}),  # sliding window 8, local and global RoPE bases
    ("gemma3", dict(hidden_activation="silu")),  # Gemma 3's MLP activation field
    ("gemma3", dict(attention_bias=True)),  # on q, k, v and o
]


@pytest.mark.parametrize("arch, overrides", CASES, ids=lambda c: str(c)[:40])
def test_tiny_model_logits_match_transformers(arch, overrides, tmp_path):
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  model = cj.load(str(path), tokenizer=False)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 48))
  err = rel_err(cj.forward(model.params, ids), torch_logits(path, ids))
  assert err <= REL_TOL, f"{arch}: relative error {err:.2e}"


_YARN = dict(type="yarn", factor=4.0)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
_LEGACY = dict(rope_parameters=None, rope_theta=10000.0)
_YARN_PARAMETERS = dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=32))
# config.json as other tools write it (fields None here are left out). transformers fills in
# original_max_position_embeddings when it saves: absent, it is max_position_embeddings, and a
# top-level one wins. A field left out takes its config class's default (Gemma 3: RoPE base 1e6,
# query_pre_attn_scalar 256; Qwen3: head_dim 128), not this reader's fallback. Holding both RoPE
# forms, a RoPE dict's own rope_theta wins over the top-level one, and rope_scaling over rope_parameters.
EDITED_CONFIGS = [
    ("llama", {}, dict(_LEGACY, rope_scaling=_YARN)),
    ("llama", {}, dict(_LEGACY, rope_scaling=_LLAMA3)),
    ("llama", {}, dict(_LEGACY, rope_scaling=_YARN, original_max_position_embeddings=32)),
    ("gemma3", {}, dict(rope_parameters=None, query_pre_attn_scalar=None)),
    ("qwen3", dict(head_dim=128), dict(head_dim=None)),
    ("llama", _YARN_PARAMETERS, dict(rope_theta=500.0)),
    ("llama", _YARN_PARAMETERS, dict(rope_scaling=dict(rope_type="linear", factor=3.0))),
    ("gemma3", {}, dict(rope_theta=500.0, rope_local_base_freq=50.0)),
]


@pytest.mark.parametrize("arch, overrides, fields", EDITED_CONFIGS,
                         ids=["yarn", "llama3", "yarn-top-level-original", "gemma3-defaults", "qwen3-head_dim",
                              "yarn-and-rope_theta", "yarn-and-rope_scaling", "gemma3-both-forms"])
def test_edited_config_logits_match_transformers(arch, overrides, fields, tmp_path):
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  hf = json.loads((path / "config.json").read_text())
  hf.update(fields)
  (path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
  model = cj.load(str(path), tokenizer=False)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 48))
  err = rel_err(cj.forward(model.params, ids), torch_logits(path, ids))
  assert err <= REL_TOL, f"relative error {err:.2e}"


_YARN_32 = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)
_GEMMA3_LINEAR = dict(full_attention=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
                      sliding_attention=dict(rope_type="default", rope_theta=10000.0))
# A GGUF file converted from a tiny HF model as llama.cpp converts, against that HF model (transformers' own GGUF
# reader drops RoPE scaling, and its Qwen3 head_dim and Gemma 3 query_pre_attn_scalar are the config defaults).
# `metadata`: keys added to the file; `reference`: the RoPE fields of the HF model that computes the same.
GGUF_CASES = [
    ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), {}, {}),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)), {}, {}),
    ("qwen2", dict(rope_parameters=_YARN_32), {}, {}),
    ("qwen3", dict(rope_parameters=dict(_YARN_32, beta_fast=16.0, beta_slow=2.0)), {}, {}),
    # the HF attention_factor, which convert_hf_to_gguf.py writes as rope.scaling.yarn_attn_factor
    ("qwen2", dict(rope_parameters=dict(_YARN_32, attention_factor=0.8)), {}, {}),
    # llama.cpp's rope.scaling.attn_factor multiplies YaRN's default factor, 1 + 0.1 ln 4
    ("qwen2", dict(rope_parameters=_YARN_32), {"{arch}.rope.scaling.attn_factor": 0.9},
     dict(attention_factor=0.9 * (1 + 0.1 * np.log(4.0)))),
    ("gemma3", dict(num_hidden_layers=6, rope_parameters=_GEMMA3_LINEAR), {}, {}),
]


@pytest.mark.parametrize("arch, overrides, metadata, reference", GGUF_CASES,
                         ids=["linear", "llama3-rope_freqs", "yarn", "yarn-betas", "yarn-attention_factor",
                              "yarn-attn_factor", "gemma3-linear"])
def test_tiny_gguf_logits_match_transformers(arch, overrides, metadata, reference, tmp_path):
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  model = cj.load(str(write_gguf(path, tmp_path / "t.gguf", metadata=metadata)), tokenizer=False)
  hf = json.loads((path / "config.json").read_text())
  hf["rope_parameters"].update(reference)
  (path / "config.json").write_text(json.dumps(hf))
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 48))
  err = rel_err(cj.forward(model.params, ids), torch_logits(path, ids))
  assert err <= REL_TOL, f"relative error {err:.2e}"


def test_tiny_gguf_yarn_without_original_context_reads_the_trained_context(tmp_path):
  """A YaRN file without rope.scaling.original_context_length: llama.cpp takes the trained context length, as
  transformers takes max_position_embeddings for a config.json without original_max_position_embeddings."""
  path = make_tiny_hf_model("qwen2", tmp_path, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0))
  hf = json.loads((path / "config.json").read_text())
  del hf["rope_parameters"]["original_max_position_embeddings"]  # transformers wrote it in: the file leaves it out
  (path / "config.json").write_text(json.dumps(hf))
  model = cj.load(str(write_gguf(path, tmp_path / "t.gguf")), tokenizer=False)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 48))
  err = rel_err(cj.forward(model.params, ids), torch_logits(path, ids))
  assert err <= REL_TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_logits_match_transformers_gguf_loader(arch, tmp_path):
  """Where transformers' GGUF reader reads every field that matters (no RoPE scaling), it is the reference."""
  gguf_file = write_gguf(make_tiny_hf_model(arch, tmp_path), tmp_path / "t.gguf")
  model = cj.load(str(gguf_file), tokenizer=False)
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, 48))
  err = rel_err(cj.forward(model.params, ids), torch_logits(tmp_path, ids, gguf_file="t.gguf"))
  assert err <= REL_TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_fields_left_out_read_as_transformers_fills_them(model_type):
  """A config.json with only the required fields reads as the one transformers' config class fills in
  (token ids aside: they change no logits); Mistral's window, left out, is 4096, and null is no window."""
  import transformers

  required = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=32)
  filled = transformers.AutoConfig.for_model(model_type, **required).to_dict()
  ours, theirs = cj.from_hf_config(dict(required, model_type=model_type)), cj.from_hf_config(filled)
  ids = dict(bos_id=None, eos_ids=())
  assert ours.replace(**ids) == theirs.replace(**ids)
  if model_type == "mistral":
    assert ours.sliding_window == 4096 and cj.from_hf_config({**filled, "sliding_window": None}).sliding_window is None


@pytest.mark.parametrize("mlp_block", [None, 256])
def test_blocked_prefill_attention_matches_transformers(tmp_path, monkeypatch, mlp_block):
  """Sequences longer than one query block take the blocked causal path; with `mlp_block`, the MLP
  runs in blocks of tokens too (700 tokens: two whole blocks and a padded one)."""
  if mlp_block is not None:
    import jax

    from chunkllm_jax import model as model_module

    monkeypatch.setattr(model_module, "MLP_BLOCK", mlp_block)
    jax.clear_caches()  # the jitted forward was traced with the other block size
  path = make_tiny_hf_model("gemma3", tmp_path, max_position_embeddings=1024)
  model = cj.load(str(path), tokenizer=False)
  ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (1, 700))
  err = rel_err(cj.forward(model.params, ids), torch_logits(path, ids))
  assert err <= REL_TOL, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def smollm2_torch():
  import torch
  from transformers import AutoModelForCausalLM

  from chunkllm_jax import registry

  gguf = registry.resolve("smollm2-135m")
  return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.mark.real_model
def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
  text = ("The Brown corpus was compiled in the 1960s at Brown University. It holds about one million "
          "words of American English, drawn from 500 samples of text.")
  ids = np.asarray([smollm2.tokenizer(text)["input_ids"]])
  err = rel_err(cj.forward(smollm2.params, ids), torch_logits(smollm2_torch, ids))
  assert err <= REL_TOL, f"relative error {err:.2e}"


@pytest.mark.real_model
def test_smollm2_greedy_32_tokens_match_transformers(smollm2, smollm2_torch):
  import torch

  prompt = smollm2.tokenizer("Once upon a time, in a small village by the sea,")["input_ids"]
  ours = cj.generate(smollm2.params, [prompt], max_new_tokens=32, eos_ids=())
  with torch.inference_mode():
    ref = smollm2_torch.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
  assert ours.new_tokens(0).tolist() == ref[0, len(prompt):].tolist()
