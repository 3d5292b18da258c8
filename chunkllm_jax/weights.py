"""Weight import: an HF safetensors directory, a GGUF file or a registered name -> `ModelParams`.

Both readers produce the same thing: for every backbone leaf (and layer) one lazily read source
tensor in the HF/torch layout (`Linear` weights are [out, in]). `assemble` checks every shape
against the config before reading anything, then converts each tensor into this library's layout
(see `params.backbone_spec`) and stacks the layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from chunkllm_jax import checks, registry
from chunkllm_jax.config import ConfigError, ModelConfig, from_hf_config
from chunkllm_jax.params import ModelParams, backbone_spec, check_backbone_shapes

# (dir, gguf file name or None): what `transformers.AutoTokenizer.from_pretrained` needs.
TokenizerSource = tuple[str, "str | None"]


class SourceTensor(NamedTuple):
  """A tensor in a weights file: its name there, its shape in the HF layout, and a reader."""

  name: str
  shape: tuple[int, ...]
  read: Callable[[], np.ndarray]


# Where a source tensor goes: (leaf name, layer index or None for the non-layer leaves).
Key = tuple[str, "int | None"]

_LINEAR = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")
_HEAD_BIAS = ("bq", "bk", "bv")


def _hf_shape(leaf: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of a leaf whose shape in our layout (without the layer axis) is `ours`."""
  if leaf in _LINEAR:  # ours is (in..., out...), HF is [prod(out), prod(in)]
    n_in = 2 if leaf == "wo" else 1
    return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))
  if leaf in _HEAD_BIAS:
    return (math.prod(ours),)
  return ours


def _to_ours(leaf: str, x: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
  return (x.T if leaf in _LINEAR else x).reshape(ours)


def assemble(cfg: ModelConfig, tensors: dict[Key, SourceTensor], dtype, source: str,
             desc: str | None = None) -> ModelParams:
  """Checks, converts and stacks source tensors into a `ModelParams` of `dtype`.

  Raises a ValueError naming every missing, unexpected or misshapen tensor.
  """
  np_dtype = checks.check_float_dtype(dtype, "load")
  spec = backbone_spec(cfg)
  want: dict[Key, tuple[int, ...]] = {}
  for leaf, s in spec.items():
    if leaf != "layers":
      want[(leaf, None)] = s.shape
  for leaf, s in spec["layers"].items():
    for i in range(cfg.n_layers):
      want[(leaf, i)] = s.shape[1:]

  problems = []
  for key in sorted(want.keys() - tensors.keys(), key=str):
    where = "" if key[1] is None else f" of layer {key[1]}"
    problems.append(f"missing {key[0]}{where} (expected HF shape {_hf_shape(key[0], want[key])})")
  for key in sorted(tensors.keys() - want.keys(), key=str):
    problems.append(f"{tensors[key].name}: unexpected tensor for a {cfg.arch} model with "
                    f"{cfg.n_layers} layers")
  for key in sorted(want.keys() & tensors.keys(), key=str):
    t, hf = tensors[key], _hf_shape(key[0], want[key])
    if tuple(t.shape) != hf:
      problems.append(f"{t.name}: shape {tuple(t.shape)}, but the config implies {hf}")
  if problems:
    raise ValueError(f"weights in {source} do not match their config:\n  " + "\n  ".join(problems))

  bar = tqdm(total=len(want), desc=desc, file=sys.stderr, disable=desc is None or not sys.stderr.isatty())

  def read(key: Key) -> np.ndarray:
    x = _to_ours(key[0], np.asarray(tensors[key].read()), want[key])
    bar.update()
    return x

  backbone: dict = {}
  for leaf, s in spec.items():
    if leaf != "layers":
      backbone[leaf] = jnp.asarray(read((leaf, None)).astype(np_dtype))
  layers = {}
  for leaf, s in spec["layers"].items():
    out = np.empty(s.shape, np_dtype)  # filled layer by layer: no second full-size copy
    for i in range(cfg.n_layers):
      out[i] = read((leaf, i))
    layers[leaf] = jnp.asarray(out)
  backbone["layers"] = layers
  bar.close()
  check_backbone_shapes(backbone, cfg, source)
  return ModelParams(backbone=backbone, config=cfg)


# ----------------------------------------------------------------------------------------------
# HF safetensors directories

_HF_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_HF_IGNORED = re.compile(r"(vision_tower|multi_modal_projector)\.|.*rotary_emb\.inv_freq$")
_HF_TOP = {"embed_tokens.weight": "embed", "norm.weight": "final_norm", "lm_head.weight": "lm_head"}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv", "self_attn.o_proj.bias": "bo",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "pre_feedforward_layernorm.weight": "mlp_norm",  # Gemma 3
    "post_feedforward_layernorm.weight": "post_mlp_norm",  # Gemma 3
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
}
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}


def _hf_key(name: str, cfg: ModelConfig) -> Key | None:
  """Where an HF tensor goes; None for tensors that are not part of the text backbone."""
  for prefix in _HF_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  if _HF_IGNORED.match(name):
    return None
  if name in _HF_TOP:
    return (_HF_TOP[name], None)
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
  if m and m.group(2) == "post_attention_layernorm.weight":
    # Gemma 3 norms the attention output with it; the others norm the MLP input.
    return ("post_attn_norm" if cfg.sandwich_norm else "mlp_norm", int(m.group(1)))
  if m and m.group(2) in _HF_LAYER:
    return (_HF_LAYER[m.group(2)], int(m.group(1)))
  return (name, None)  # unknown: `assemble` reports it as unexpected


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
  """Reads a .safetensors header; tensors are memory-mapped and read on demand.

  Parsed by hand because safetensors' numpy backend cannot represent bfloat16.
  """
  size = path.stat().st_size
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or n > size - 8:
      raise ValueError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
    header = _json(f.read(n), f"the header of {path}", "is not a safetensors file, or is damaged")
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object; the file is damaged")
  start = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
      raise ValueError(f"{path}: the header entry of tensor {name} lacks dtype, shape or data_offsets; "
                       "the file is damaged")
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    if start + hi > size:
      raise ValueError(f"{path} is truncated: tensor {name} ends at byte {start + hi}, the file at {size}")
    shape, dt = tuple(info["shape"]), _ST_DTYPES[info["dtype"]]
    out[name] = SourceTensor(name, shape, lambda lo=lo, hi=hi, shape=shape, dt=dt:
                             mm[start + lo:start + hi].view(dt).reshape(shape))
  return out


def _safetensors_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _json(index.read_bytes(), str(index), "is damaged").get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no weight_map object; the index is damaged")
    files = [directory / f for f in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return files
  if (directory / "model.safetensors").is_file():
    return [directory / "model.safetensors"]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory} has a config.json but no *.safetensors weights")
  return files


def _json(raw: bytes, what: str, fix: str):
  """Parsed JSON, or a ValueError naming the file and where the text stops being JSON."""
  try:
    return json.loads(raw)
  except UnicodeDecodeError:
    raise ValueError(f"{what} is not UTF-8 JSON: it {fix}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): it {fix}") from None


def read_hf_config(config_file: Path) -> ModelConfig:
  """config.json -> ModelConfig; every error names the file (and the field)."""
  hf = _json(config_file.read_bytes(), str(config_file), "must be an HF config.json")
  if not isinstance(hf, dict):
    raise ConfigError(f"{config_file} holds a JSON {type(hf).__name__}, not an object: it must be an HF config.json")
  try:
    return from_hf_config(hf)
  except ConfigError as e:
    raise ConfigError(f"{config_file}: {e}") from None


def load_hf_dir(directory: Path, dtype="float32") -> tuple[ModelConfig, ModelParams]:
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory} has no config.json: expected an HF model directory "
                            "(config.json and *.safetensors) or a .gguf file")
  cfg = read_hf_config(config_file)
  tensors: dict[Key, SourceTensor] = {}
  for file in _safetensors_files(directory):
    for name, t in _safetensors_tensors(file).items():
      key = _hf_key(name, cfg)
      if key is None:
        continue
      if key in tensors:
        raise ValueError(f"{directory}: {name} and {tensors[key].name} both map to {key}")
      tensors[key] = t
  if cfg.tie_embeddings:  # the one matrix may be stored under either name, or under both
    head = tensors.pop(("lm_head", None), None)
    # safetensors.torch.save_model keeps one name of shared tensors, here lm_head.weight (transformers
    # reads such a checkpoint); a copy beside the embedding is dropped.
    if head is not None and ("embed", None) not in tensors:
      tensors[("embed", None)] = head
  return cfg, assemble(cfg, tensors, dtype, str(directory))


# ----------------------------------------------------------------------------------------------
# Public entry points


def _not_found(path) -> FileNotFoundError:
  return FileNotFoundError(
      f"no model at {str(path)!r}: give an HF directory (config.json + *.safetensors), a .gguf file, "
      f"or a registered name ({', '.join(registry.names())})")


def load_backbone(path_or_name, dtype="float32") -> tuple[ModelConfig, ModelParams, TokenizerSource]:
  """Loads a model's config and backbone weights.

  Args:
    path_or_name: a registered name (see `registry.REGISTRY`), an HF directory with config.json and
      safetensors weights, or a .gguf file.
    dtype: of every returned array, e.g. "float32" or "bfloat16".

  Returns:
    (config, params, tokenizer_source); pass the last to `load_tokenizer`.
  """
  from chunkllm_jax import gguf_import  # only GGUF needs the gguf package

  path = _model_path(path_or_name)
  cfg, params = load_hf_dir(path, dtype) if path.is_dir() else gguf_import.load_gguf(path, dtype)
  return cfg, params, tokenizer_source(path)


def tokenizer_source(path_or_name) -> TokenizerSource:
  """What `load_tokenizer` reads for a model `load_backbone` accepts, without reading its weights: the
  command lines tokenize a prompt and check its length before they load anything large."""
  path = _model_path(path_or_name)
  return (str(path), None) if path.is_dir() else (str(path.parent), path.name)


def _model_path(path_or_name) -> Path:
  """An HF directory or a .gguf file, from what `load_backbone` accepts."""
  if not isinstance(path_or_name, (str, os.PathLike)):
    raise TypeError(f"load takes a registered name ({', '.join(registry.REGISTRY)}), an HF safetensors folder or a "
                    f".gguf file, got {type(path_or_name).__name__}")
  if isinstance(path_or_name, str) and path_or_name in registry.REGISTRY:
    path = registry.resolve(path_or_name)
  else:
    path = Path(path_or_name).expanduser()
  if not path.exists():
    raise _not_found(path_or_name)
  if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
    path = path.parent  # a file inside an HF directory: load the directory
  if path.is_dir() and not (path / "config.json").is_file():
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return ggufs[0]
    if len(ggufs) > 1:
      raise ValueError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): give the "
                       f"one to load, e.g. {ggufs[0]}")
  return path


def load_config(path_or_name) -> ModelConfig:
  """Only the config of what `load_backbone` would load (no weights read): for checks up front."""
  from chunkllm_jax import gguf_import

  path = _model_path(path_or_name)
  if path.is_dir():
    config_file = path / "config.json"
    if not config_file.is_file():
      raise FileNotFoundError(f"{path} has no config.json: expected an HF model directory "
                              "(config.json and *.safetensors) or a .gguf file")
    return read_hf_config(config_file)
  return gguf_import.gguf_config(gguf_import.open_gguf(path), path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: TokenizerSource):
  """A `transformers` tokenizer from `load_backbone`'s tokenizer_source, offline.

  A tokenizer converted from GGUF (slow) is cached with `save_pretrained`, see `gguf_import`.
  """
  from chunkllm_jax import gguf_import

  directory, gguf_file = source
  if gguf_file is not None:
    return gguf_import.load_gguf_tokenizer(Path(directory) / gguf_file)
  if not any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"{directory} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} "
                            "beside config.json (copy them from the model's repository, or load with "
                            "tokenizer=False)")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory, local_files_only=True)

