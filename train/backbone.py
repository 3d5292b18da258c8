"""The frozen model a run trains adapters for: a real one by name or path, or a tiny random one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import chunkllm_jax as cj
from chunkllm_jax import registry, weights
from chunkllm_jax.decoding import seed_key

RANDOM_TINY = "random-tiny"
# A 2-layer Llama: seconds per train step, for tests and smoke runs.
TINY_SIZES = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


class Backbone(NamedTuple):
  name: str  # what exports record: a registered name, a path, or "random-tiny"
  config: cj.ModelConfig
  params: cj.ModelParams
  tokenizer: Any


def load_tokenizer(name_or_path: str):
  """Only the tokenizer of a model (no weights read)."""
  path = registry.resolve(name_or_path) if name_or_path in registry.REGISTRY else Path(name_or_path)
  if path.suffix == ".gguf":
    return weights.load_tokenizer((str(path.parent), path.name))
  return weights.load_tokenizer((str(path), None))


def load(model: str, tokenizer: str = "", dtype: str = "float32", seed: int = 0) -> Backbone:
  if model == RANDOM_TINY:
    if not tokenizer:
      raise ValueError(f"--model {RANDOM_TINY} needs --tokenizer (e.g. smollm2-135m)")
    tok = load_tokenizer(tokenizer)
    cfg = cj.ModelConfig(arch="llama", vocab_size=len(tok), eos_ids=(tok.eos_token_id or 0,), **TINY_SIZES)
    params = cj.init_backbone(seed_key(seed), cfg, dtype=dtype)
    return Backbone(RANDOM_TINY, cfg, params, tok)
  m = cj.load(model, dtype=dtype, tokenizer=not tokenizer)
  return Backbone(model, m.config, m.params, load_tokenizer(tokenizer) if tokenizer else m.tokenizer)


def weights_fingerprint(params: cj.ModelParams) -> str:
  """A short hash of the backbone's weights as loaded (values, dtype and shapes). The config's
  fingerprint is the architecture's: a fine-tuned copy, another seed of random-tiny or another --dtype
  share it, but not the teacher's targets and hidden states."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params.backbone)[0]:
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape};".encode())
    h.update(a.view(np.uint8).reshape(-1))
  return h.hexdigest()[:16]
