"""`load`: a registered name, an HF safetensors directory or a .gguf file -> config, params, tokenizer."""

from __future__ import annotations

from typing import Any, NamedTuple

from chunkllm_jax.config import ModelConfig
from chunkllm_jax.params import ModelParams


class Model(NamedTuple):
  config: ModelConfig
  params: ModelParams
  tokenizer: Any  # a transformers tokenizer


def load(name_or_path: str, dtype: str = "float32", *, tokenizer: bool = True) -> Model:
  """Loads frozen weights (no torch) and the tokenizer. See `weights.load_backbone` for sources."""
  from chunkllm_jax import weights  # imported lazily: gguf/safetensors are only needed here
  from chunkllm_jax.decoding import release_free_heap

  cfg, params, tok_source = weights.load_backbone(name_or_path, dtype=dtype)
  model = Model(cfg, params, weights.load_tokenizer(tok_source) if tokenizer else None)
  release_free_heap()  # the conversion's freed blocks: 35-70 MiB otherwise held for the whole run
  return model
