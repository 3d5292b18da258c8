"""chunkllm-jax: ChunkLLM (arXiv 2510.02361) in JAX: chunk-selective long-context generation."""

from chunkllm_jax.adapter_io import load_adapters, save_adapters
from chunkllm_jax.adapters import AdapterConfig, Adapters, init_adapters, with_adapters
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import chunk_generate
from chunkllm_jax.config import ConfigError, ModelConfig, RopeScaling, from_hf_config
from chunkllm_jax.decoding import GenerateOutput
from chunkllm_jax.dense_generation import generate, stream
from chunkllm_jax.kv_cache import KVCache, init_cache
from chunkllm_jax.loader import Model, load
from chunkllm_jax.model import forward
from chunkllm_jax.params import ModelParams, init_backbone
from chunkllm_jax.sharding import make_mesh, shard_params

__all__ = [
    "AdapterConfig", "Adapters", "ChunkConfig", "chunk_generate", "init_adapters", "with_adapters",
    "load_adapters", "save_adapters",
    "ConfigError", "GenerateOutput", "KVCache", "Model", "ModelConfig", "ModelParams", "RopeScaling",
    "forward", "from_hf_config", "generate", "init_backbone", "init_cache", "load", "make_mesh",
    "shard_params", "stream",
]
