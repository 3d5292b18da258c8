"""Tiny random Hugging Face models (torch), saved to disk, as references for the JAX side.

`make_tiny_hf_model` writes an HF directory (config.json + safetensors); `write_gguf` converts
one to GGUF the way llama.cpp's convert_hf_to_gguf.py does (names from gguf-py's own table,
Llama Q/K rows permuted, Gemma norms stored as 1 + w), so the GGUF reader can be tested without
any real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

# Small but with every feature: GQA (4 q heads on 2 kv heads), head_dim != d_model / n_heads.
_BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_hf_config(arch: str, **overrides):
  """A `transformers` config of `arch` at toy size; `overrides` are config fields."""
  import transformers as tf

  kw = dict(_BASE)
  if arch == "llama":
    cls = tf.LlamaConfig
  elif arch == "mistral":
    cls, kw["sliding_window"] = tf.MistralConfig, 32
  elif arch == "qwen2":
    cls = tf.Qwen2Config
  elif arch == "qwen3":
    cls = tf.Qwen3Config
  elif arch == "gemma3":
    cls = tf.Gemma3TextConfig
    kw.update(query_pre_attn_scalar=16, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"])
  else:
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
  kw.update(overrides)
  if "num_hidden_layers" in overrides and "layer_types" in kw and "layer_types" not in overrides:
    del kw["layer_types"]  # let the config derive the pattern for the new depth
  return cls(**kw)


def make_tiny_hf_model(arch: str, tmp_path, *, seed: int = 0, dtype: str = "float32",
                       max_shard_size: str | None = None, **overrides) -> Path:
  """Saves a random `arch` model (torch) to `tmp_path / arch` and returns that directory.

  Norm weights and biases get random offsets too, so that a swapped or missing one shows.
  `max_shard_size` (e.g. "20KB") splits the weights into shards with an index file.
  """
  import torch
  from transformers import AutoModelForCausalLM

  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides))
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype)).eval()
  path = Path(tmp_path) / arch
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kw)
  return path


def load_hf_state_dict(path) -> dict:
  """The saved model's tensors, as torch tensors keyed by HF name."""
  from safetensors.torch import load_file

  path = Path(path)
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    out.update(load_file(f))
  return out


# ----------------------------------------------------------------------------------------------
# HF directory -> GGUF, as llama.cpp converts


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute`: HF's half-split RoPE layout -> interleaved pairs."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(rs: dict, theta: float, head_dim: int) -> np.ndarray:
  """The `rope_freqs` tensor llama.cpp writes for Llama 3 RoPE scaling."""
  factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
  old = rs["original_max_position_embeddings"]
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  out = []
  for f in freqs:
    wavelen = 2 * np.pi / f
    if wavelen < old / hi:
      out.append(1.0)
    elif wavelen > old / lo:
      out.append(factor)
    else:
      smooth = (old / wavelen - lo) / (hi - lo)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def write_gguf(hf_dir, out_file, *, qtype=None, arch: str | None = None, metadata: dict | None = None) -> Path:
  """Converts a tiny HF model directory to a GGUF file, as llama.cpp does.

  qtype: a `gguf.GGMLQuantizationType` for the 2-D weights (e.g. Q8_0), or None for F32.
  arch: overrides general.architecture (to test an unsupported one).
  metadata: further keys ("{arch}." is filled in) to values: a float is written as float32, an int as uint32.
  """
  import gguf

  hf = json.loads((Path(hf_dir) / "config.json").read_text())
  model_type = hf["model_type"]
  g_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3_text": "gemma3"}[model_type]
  n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
  n_kv, head_dim = hf["num_key_value_heads"], hf["head_dim"]
  rope = hf.get("rope_parameters") or {}
  rope_full = rope.get("full_attention", rope)

  w = gguf.GGUFWriter(str(out_file), arch or g_arch)
  w.add_block_count(n_layers)
  w.add_context_length(hf["max_position_embeddings"])
  w.add_embedding_length(hf["hidden_size"])
  w.add_feed_forward_length(hf["intermediate_size"])
  w.add_head_count(n_heads)
  w.add_head_count_kv(n_kv)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_vocab_size(hf["vocab_size"])  # what transformers' GGUF loader reads, lacking a vocabulary
  w.add_rope_freq_base(rope_full.get("rope_theta", 10000.0))
  if g_arch == "llama":
    w.add_rope_dimension_count(head_dim)
  # As convert_hf_to_gguf.py's TextModel writes RoPE scaling (llama3's is the rope_freqs tensor below).
  if rope_full.get("rope_type") in ("linear", "yarn"):
    w.add_rope_scaling_type(gguf.RopeScalingType(rope_full["rope_type"]))
    w.add_rope_scaling_factor(rope_full["factor"])
  if rope_full.get("rope_type") == "yarn":
    w.add_rope_scaling_orig_ctx_len(rope_full["original_max_position_embeddings"])
    for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                     ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                     ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
      if rope_full.get(key) is not None:
        add(rope_full[key])
  for key, value in (metadata or {}).items():
    key = key.format(arch=arch or g_arch)
    if isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    else:
      w.add_string(key, value)
  w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  if g_arch == "gemma3":
    w.add_sliding_window(hf["sliding_window"])
  for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
    if isinstance(hf.get(key), int):
      add(hf[key])

  name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[g_arch.upper()], n_layers)
  for hf_name, t in sorted(load_hf_state_dict(hf_dir).items()):
    x = t.float().numpy()
    base, suffix = hf_name.rsplit(".", 1)
    name = name_map.get_name(base) + "." + suffix
    if g_arch == "llama" and ".attn_q." in name:
      x = _permute(x, n_heads)
    elif g_arch == "llama" and ".attn_k." in name:
      x = _permute(x, n_kv)
    if g_arch == "gemma3" and name.endswith("norm.weight"):
      x = x + 1.0
    if qtype is not None and x.ndim == 2:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
  if rope_full.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope_full, rope_full["rope_theta"], head_dim))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return Path(out_file)
