"""Which implementation of a kernel runs where, and the masking constant the kernels share.

- `interpret` set (True, or a `pltpu.InterpretParams` for the TPU simulator): the Pallas kernel
  in interpret mode. Tests only.
- TPU: the Pallas kernel, compiled by Mosaic.
- CPU and GPU: the jnp reference, compiled by XLA.

Why GPU takes the XLA path for now (read from jax 0.10.2's source):
- `pl.pallas_call` on GPU lowers to Mosaic GPU by default (`jax_pallas_use_mosaic_gpu` defaults
  to True), and that path warns "Using pl.pallas_call for Mosaic GPU kernels is deprecated ...
  migrate to plgpu.kernel". Mosaic GPU kernels (`plgpu.kernel`, as in
  `ops/gpu/attention_mgpu.py`) are written per warpgroup with TMA copies and barriers: a
  separate program from these TPU-style kernels, not a port of them.
- The Triton path still exists (`compiler_params=pltriton.CompilerParams()`, used by
  `ops/gpu/decode_attention.py`), but it has no scalar prefetch, so the block lists could not
  drive the BlockSpecs.
- No GPU was available to compile or check such a kernel, and an unchecked kernel would be
  fake support.
"""

from __future__ import annotations

import jax

NEG_INF = -1e30  # as chunkllm_jax.attention: finite, so exp(NEG_INF - NEG_INF) is not NaN


def use_kernel(interpret) -> bool:
  """True where the Pallas kernel runs: interpret mode asked for, or a TPU backend."""
  return bool(interpret) or jax.default_backend() == "tpu"
