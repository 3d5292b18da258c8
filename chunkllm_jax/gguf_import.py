"""GGUF import: config from the metadata, weights dequantised by the `gguf` package (no torch).

What llama.cpp's converter changed, undone here (as `transformers`' GGUF loader does):
- Llama-family Q/K projections (weights and biases) had their rows permuted per head for
  llama.cpp's interleaved RoPE; Qwen2/Qwen3/Gemma 3 use the HF (NEOX) layout and were not.
- Gemma norms were stored as (1 + w); the model here applies the + 1 itself, so 1 is subtracted.
- ggml lists dimensions fastest first: a [out, in] matrix has GGUF shape [in, out].
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from chunkllm_jax.config import ConfigError, ModelConfig, yarn_mscale, from_hf_config
from chunkllm_jax.params import ModelParams
from chunkllm_jax.weights import Key, SourceTensor, assemble

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_TOP = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_output.weight": "wo",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv", "attn_output.bias": "bo",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm",
    "ffn_norm.weight": "mlp_norm",
    "post_ffw_norm.weight": "post_mlp_norm",
    "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
}
_NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm", "final_norm")
_REQUIRED = object()


def _reader_class():
  import gguf

  class Reader(gguf.GGUFReader):
    """Parses from a plain ndarray view of the memmap: 3x faster on big vocabularies, whose
    every token is a separate slice, and np.memmap's per-slice bookkeeping dominates."""

    @property
    def data(self):
      return self._data

    @data.setter
    def data(self, value):
      self._data = np.asarray(value)

  return Reader


def open_gguf(path: Path):
  """A `gguf.GGUFReader`, with a clear error for a truncated or corrupt file."""
  size = path.stat().st_size
  try:
    reader = _reader_class()(path)
  except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is truncated or corrupt: not a readable GGUF file of {size} bytes "
                     f"({type(e).__name__}: {e})") from e
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise ValueError(f"{path} is truncated or corrupt: tensor {t.name} ends at byte "
                       f"{t.data_offset + t.n_bytes}, the file has {size}")
  return reader


def _meta(reader, key: str, default=_REQUIRED):
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ConfigError(f"GGUF metadata lacks {key!r}")
    return default
  return field.contents()


def _uniform(value, what: str) -> int:
  """A per-model int; some GGUFs store per-layer arrays."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise ConfigError(f"{what} varies by layer ({value}), which is not supported")
    value = value[0]
  return int(value)


def _llama3_rope_scaling(freq_factors: np.ndarray, theta: float, head_dim: int) -> dict:
  """Recovers Llama 3.x RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor.

  The factors come from four numbers; the released models use all but `factor` at their
  defaults, so `factor` is read off and the whole tensor is checked against it.
  """
  rs = dict(rope_type="llama3", factor=float(freq_factors.max()), low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192)
  inv_freq = theta ** -(np.arange(0, head_dim, 2) / head_dim)
  wavelen = 2 * np.pi / inv_freq
  old, lo, hi, f = rs["original_max_position_embeddings"], 1.0, 4.0, rs["factor"]
  smooth = (old / wavelen - lo) / (hi - lo)
  want = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, f, 1 / ((1 - smooth) / f + smooth)))
  if want.shape != freq_factors.shape or not np.allclose(want, freq_factors, rtol=1e-3):
    raise ConfigError("rope_freqs tensor does not match Llama 3 RoPE scaling with default parameters")
  return rs


def _rope_scaling(reader, arch: str) -> dict | None:
  def m(key, default=_REQUIRED):
    return _meta(reader, f"{arch}.rope.scaling.{key}", default)

  kind = m("type", None)
  # llama.cpp multiplies cos and sin by attn_factor whatever the scaling; of the kinds here only YaRN has such a factor.
  attn_factor = float(m("attn_factor", 1.0))
  if kind != "yarn" and attn_factor != 1.0:
    raise ConfigError(f"rope.scaling.attn_factor={attn_factor:g} with RoPE scaling {kind or 'none'} is not supported")
  if kind in (None, "none"):
    return None
  rs = {"rope_type": kind, "factor": m("factor")}
  if kind == "yarn":
    # convert_hf_to_gguf.py writes the HF config's attention_factor here, as transformers applies it (llama.cpp's
    # runtime recomputes 1 + 0.1 ln factor instead); absent, it is that default.
    # llama.cpp mixes the interpolated and kept frequencies by ext_factor times YaRN's ramp (HF: the ramp
    # itself; -1 is llama.cpp's "unset", read as 1), and DeepSeek's attention scaling takes a log multiplier.
    ext_factor, log_multiplier = float(m("yarn_ext_factor", 1.0)), float(m("yarn_log_multiplier", 0.0))
    if ext_factor not in (1.0, -1.0):
      raise ConfigError(f"rope.scaling.yarn_ext_factor={ext_factor:g}: YaRN's ramp scaled by other than 1 "
                        "is not supported")
    if log_multiplier != 0.0:
      raise ConfigError(f"rope.scaling.yarn_log_multiplier={log_multiplier:g} (DeepSeek's YaRN attention "
                        "scaling) is not supported")
    attention_factor = m("yarn_attn_factor", None)
    if attention_factor is None and attn_factor != 1.0:
      attention_factor = yarn_mscale(float(rs["factor"]))
    rs.update(
        # absent: the trained context, as llama.cpp reads it (and transformers a config.json without it)
        original_max_position_embeddings=m("original_context_length", None) or _meta(reader, f"{arch}.context_length"),
        attention_factor=None if attention_factor is None else float(attention_factor) * attn_factor,
        beta_fast=m("yarn_beta_fast", 32.0),
        beta_slow=m("yarn_beta_slow", 1.0))
  return rs  # other kinds: from_hf_config names them as unsupported


def gguf_config(reader, path: Path) -> ModelConfig:
  """A `ModelConfig` from GGUF metadata, through the HF config fields it corresponds to."""
  try:
    return _gguf_config(reader, path)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from e


def _gguf_config(reader, path: Path) -> ModelConfig:
  arch = _meta(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ConfigError(f"GGUF architecture {arch!r} is not supported; "
                      f"supported: {', '.join(ARCHITECTURES)}")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise ValueError(f"{path} has no token_embd.weight tensor")

  def m(key, default=_REQUIRED):  # this architecture's own keys
    return _meta(reader, f"{arch}.{key}", default)

  n_heads = _uniform(m("attention.head_count"), "attention.head_count")
  if n_heads < 1:  # checked here: head_dim below divides by it
    raise ConfigError(f"metadata {arch}.attention.head_count must be >= 1, got {n_heads}")
  d_model = int(m("embedding_length"))
  head_dim = m("attention.key_length", None)
  if head_dim is None and "blk.0.attn_q.weight" in tensors:  # rows of Q are heads * head_dim
    head_dim = int(tensors["blk.0.attn_q.weight"].shape[-1]) // n_heads
  eos = [_meta(reader, k, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
  hf = dict(
      model_type=ARCHITECTURES[arch],
      vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml order: [d_model, vocab]
      hidden_size=d_model,
      num_hidden_layers=int(m("block_count")),
      num_attention_heads=n_heads,
      num_key_value_heads=_uniform(m("attention.head_count_kv", n_heads), "attention.head_count_kv"),
      head_dim=head_dim or d_model // n_heads,
      intermediate_size=_uniform(m("feed_forward_length"), "feed_forward_length"),
      rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")),
      rope_theta=float(m("rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(reader, arch),
      max_position_embeddings=int(m("context_length", 8192)),
      tie_word_embeddings="output.weight" not in tensors,
      bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id", None),
      eos_token_id=list(dict.fromkeys(e for e in eos if e is not None)),
      pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id", 0),
  )
  rope_dims = m("rope.dimension_count", None)
  if rope_dims is not None and int(rope_dims) != hf["head_dim"]:  # llama.cpp rotates only the first rope_dims
    raise ConfigError(f"rope.dimension_count={rope_dims}, RoPE on part of each head of {hf['head_dim']}, "
                      "is not supported")
  if "rope_freqs.weight" in tensors:
    if hf["rope_scaling"]:
      raise ConfigError("both rope scaling metadata and a rope_freqs tensor")
    freqs = np.asarray(tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
    hf["rope_scaling"] = _llama3_rope_scaling(freqs, hf["rope_theta"], hf["head_dim"])
  if arch == "gemma3":
    pattern = m("attention.sliding_window_pattern", 6)  # llama.cpp: 5 local layers, then 1 global
    if isinstance(pattern, list):
      hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
      hf["sliding_window_pattern"] = int(pattern)
    n_layers = hf["num_hidden_layers"]
    hf.update(
        sliding_window=int(m("attention.sliding_window")),
        rope_local_base_freq=float(m("rope.freq_base_swa", 10000.0)),
        # As llama.cpp: the 27B model (62 layers) scales by d_model / n_heads, the others by head_dim.
        query_pre_attn_scalar=d_model // n_heads if n_layers == 62 else hf["head_dim"],
    )
  cfg = from_hf_config(hf)
  # Which biases exist is read off the tensors, not the architecture name.
  return cfg.replace(qkv_bias="blk.0.attn_q.bias" in tensors, o_bias="blk.0.attn_output.bias" in tensors)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `LlamaModel.permute` on the rows (output features) of Q or K."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _source(t, key: Key | None, cfg: ModelConfig, arch: str) -> SourceTensor:
  from gguf.quants import dequantize

  shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
  leaf = key[0] if key else None

  def read() -> np.ndarray:
    w = dequantize(t.data, t.tensor_type).reshape(shape)
    if arch == "llama" and leaf in ("wq", "bq"):
      w = _unpermute(w, cfg.n_heads)
    elif arch == "llama" and leaf in ("wk", "bk"):
      w = _unpermute(w, cfg.n_kv_heads)
    elif arch == "gemma3" and leaf in _NORMS:
      w = w - 1.0
    return w

  return SourceTensor(t.name, shape, read)


def _key(name: str) -> Key | None:
  if name in _TOP:
    return (_TOP[name], None)
  if name == "rope_freqs.weight":  # turned into the config's rope scaling
    return None
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if m and m.group(2) in _LAYER:
    return (_LAYER[m.group(2)], int(m.group(1)))
  return (name, None)  # unknown: `assemble` reports it as unexpected


def load_gguf(path: Path, dtype="float32") -> tuple[ModelConfig, ModelParams]:
  reader = open_gguf(path)
  cfg = gguf_config(reader, path)
  arch = _meta(reader, "general.architecture")
  tensors = {}
  for t in reader.tensors:
    key = _key(t.name)
    if key is not None:
      tensors[key] = _source(t, key, cfg, arch)
  return cfg, assemble(cfg, tensors, dtype, str(path), desc=f"dequantising {path.name}")


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _cache_root() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "chunkllm_jax" / "tokenizers"


def tokenizer_cache_dir(path: Path) -> Path:
  """Cache folder for the tokenizer converted from a GGUF file.

  Keyed by the file's size and a hash of its first 32 MiB, which hold the whole metadata
  (vocabulary included) of the files we use: cheap, and a changed file gets a fresh entry.
  """
  digest = hashlib.sha256(str(path.stat().st_size).encode())
  with open(path, "rb") as f:
    digest.update(f.read(32 << 20))
  return _cache_root() / f"{path.stem}-{digest.hexdigest()[:16]}"


def _converter():
  """transformers' GGUF tokenizer converter module, or None where this transformers has none."""
  try:
    from transformers.integrations.gguf import gguf_tokenizer_mapping
  except ImportError:
    return None
  needed = ("GGUF_TOKENIZER_MAPPING", "_SPECIAL_TOKENS", "convert_gguf_tokenizer")
  return gguf_tokenizer_mapping if all(hasattr(gguf_tokenizer_mapping, n) for n in needed) else None


def convert_gguf_tokenizer(path: Path):
  """The tokenizer a GGUF file describes, built by transformers' converter from metadata read here.

  transformers' own GGUF reader imports torch (`AutoTokenizer.from_pretrained(gguf_file=...)` fails
  without it), and a user's install has none: the metadata is read with `gguf`, as the weights are,
  and handed to the same converter, with the fields and special tokens as transformers picks them.
  tests/test_weights.py checks the result against transformers' own path, token for token."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  mapping = _converter()
  if mapping is None:  # a transformers of another layout: its own path, which may need torch
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
  reader = open_gguf(path)
  meta = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
  architecture = _meta(reader, "general.architecture")
  tokenizer, config = ({name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
                       for renames in (mapping.GGUF_TOKENIZER_MAPPING["tokenizer"],
                                       mapping.GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
  if tokenizer.get("tokenizer_type") == "llama":
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise, as transformers does
    config.setdefault("add_bos_token", True)
  for name, key in mapping._SPECIAL_TOKENS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  backend, extra = mapping.convert_gguf_tokenizer(architecture, tokenizer)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def load_gguf_tokenizer(path: Path):
  """The tokenizer of a GGUF file (`convert_gguf_tokenizer`); the conversion takes tens of seconds, so
  it is cached."""
  from transformers import AutoTokenizer

  cache = tokenizer_cache_dir(path)
  if (cache / "tokenizer_config.json").is_file():
    return AutoTokenizer.from_pretrained(cache, local_files_only=True)
  tok = convert_gguf_tokenizer(path)
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-"))
  tmp.chmod(0o755)  # mkdtemp makes it private
  tok.save_pretrained(tmp)
  try:
    os.replace(tmp, cache)  # atomic: a concurrent process sees all of it or nothing
  except OSError:  # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)
  return tok
