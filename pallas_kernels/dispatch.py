"""Which implementation of a kernel runs where, and the masking constant the kernels share.

- GPU backend, or `backend="gpu"` (with `interpret` set, to test it on CPU): the kernel's GPU
  version where it has one, lowered through Triton. The attention kernels have one, each in a
  `*_gpu` module beside its TPU kernel: `chunk_decode_attention_gpu`,
  `chunk_prefill_attention_gpu`, `distill_attention_gpu`. `gather_chunks` has none (it is a DMA
  copy; on GPU its jnp reference, a gather, runs). `head_decode_attention` has a GPU version only
  (its gathered row loads are pointer arithmetic in Triton): it runs that in interpret mode too, and
  its jnp reference on TPU and CPU.
- `interpret` set (True, or a `pltpu.InterpretParams` for the TPU simulator): the Pallas kernel
  in interpret mode. Tests only.
- TPU: the Pallas kernel, compiled by Mosaic.
- CPU, and GPU for the kernels without a GPU version: the jnp reference, compiled by XLA.

Why the GPU kernels are Triton-lowered `pl.pallas_call`s (read from jax 0.10.2's source):
- `pl.pallas_call` with `compiler_params=pltriton.CompilerParams()` picks the Triton backend, is
  current, and warns nothing (`ops/gpu/decode_attention.py` is written so). Without compiler
  params it lowers to Mosaic GPU (`jax_pallas_use_mosaic_gpu` defaults to True) and warns
  "Using ``pl.pallas_call`` for Mosaic GPU kernels is deprecated ... Please migrate to
  ``plgpu.kernel``".
- `interpret=True` runs a Triton-style `pallas_call` on CPU, so the GPU kernels are tested
  without a GPU. `plgpu.kernel` needs the Mosaic GPU simulator (`InterpretGPUParams`), which jax
  exports from `_src` only. Its kernels are warpgroup programs ("warpgroups on Hopper and
  Blackwell GPUs"; TMA copies, barriers, WGMMA in `ops/gpu/attention_mgpu.py`), and Mosaic GPU
  refuses ROCm ("Use ``compiler_params=pltriton.CompilerParams()`` for ROCm").
- Triton has no scalar prefetch, so a GPU kernel reads its block lists as ordinary int32 inputs
  and slices K/V with `pl.ds` inside the kernel instead of through BlockSpec index maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # as chunkllm_jax.attention: finite, so exp(NEG_INF - NEG_INF) is not NaN


IMPLEMENTATIONS = ("gpu", "pallas", "xla")


def implementation(interpret=False, backend: str | None = None, *, gpu_version: bool = True,
                   tpu_version: bool = True) -> str:
  """The one rule above, for every kernel and every caller: "gpu" (the kernel's Triton-lowered GPU
  version), "pallas" (the Pallas kernel: Mosaic on TPU, or interpret mode) or "xla" (its jnp
  reference). `backend`: the backend to plan for (default: jax's); `gpu_version`, `tpu_version`:
  whether the kernel has one. A kernel with a GPU version only runs it in interpret mode too."""
  backend = backend or jax.default_backend()
  if backend == "gpu" and gpu_version:
    return "gpu"
  if not tpu_version:
    return "gpu" if interpret and gpu_version else "xla"
  if interpret or backend == "tpu":
    return "pallas"
  return "xla"


def check_operands(kernel: str, *, floats=(), same_dtype=(), masks=(), ints=()) -> None:
  """What every kernel and its reference read, named at the door (each argument: (name, array) pairs):
  floating `floats`, `same_dtype` of one dtype (K and V: the kernels load both into one tile type),
  bool `masks` (an int mask of 2 was visible to a kernel and `&`-ed away by its reference) and integer
  `ints` (block ids, chunk ids, counts)."""
  for name, x in floats:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{kernel}: {name} must be a floating array, not {x.dtype}")
  if len({x.dtype for _, x in same_dtype}) > 1:
    raise TypeError(f"{kernel}: {' and '.join(n for n, _ in same_dtype)} must share a dtype, not "
                    f"{' and '.join(str(x.dtype) for _, x in same_dtype)}")
  for name, x in masks:
    if x.dtype != jnp.bool_:
      raise TypeError(f"{kernel}: {name} must be a bool mask, not {x.dtype} (compare it, e.g. `mask != 0`)")
  for name, x in ints:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{kernel}: {name} must be an integer array, not {x.dtype}")


def require(ok: bool, message: str) -> None:
  """A shape rule of a kernel's inputs, refused with a ValueError (an `assert` is gone under `python -O`)."""
  if not ok:
    raise ValueError(message)
