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
    if "original_max_position_embeddings" in rope_full:  # left out, readers take the context length
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


# ----------------------------------------------------------------------------------------------
# Tokenizer metadata, as llama.cpp writes it

_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Passkeys are numbers: 4821, 12345 and 777. Don't forget them, we'll ask again!",
    "  Indented lines\n\tand tabs\n\nkeep their whitespace. héllo wörld, naïve café.",
]
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # gguf.TokenType


def write_tokenizer_gguf(out_file, arch: str, model: str, pre: str = "default") -> Path:
  """A GGUF file holding only a tokenizer, trained on a few lines with `tokenizers`.

  model "gpt2": a byte-level BPE vocabulary with its merges, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as
  control tokens and `<think>` as a user-defined one; `pre` is tokenizer.ggml.pre. model "llama": a
  sentencepiece-style vocabulary (`<unk>`, `<s>`, `</s>`, 256 byte tokens, then pieces with ▁ for spaces) with
  scores and no merges, as llama.cpp writes a Llama 2 or Gemma vocabulary.
  """
  import gguf
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  w = gguf.GGUFWriter(str(out_file), arch)
  w.add_block_count(1)  # what transformers' GGUF config reader wants to find
  if model == "gpt2":
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    state = json.loads(tok.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    types = [_CONTROL if t in specials[:3] else _USER_DEFINED if t == "<think>" else _NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(pre == "llama-bpe")  # Llama 3 adds BOS, Qwen2 does not
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
  elif model == "llama":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    state = json.loads(tok.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256 + [_NORMAL] * len(pieces)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])  # sentencepiece BPE: rank order
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(True)
  else:
    raise ValueError(f"unknown tokenizer model {model!r}")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return Path(out_file)
