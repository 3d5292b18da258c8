"""Random chunkings and selections for the kernel tests (interpret mode and on the GPU), and the lowering
of a kernel or program for a TPU or a GPU from this CPU-only install."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh

# Interpret mode runs a kernel's semantics, not Mosaic's rules: a kernel can pass every interpret test and
# still fail to lower on a TPU (the compaction kernel's DMA into a squeezed block did). Lowering with
# `lowering_platforms=("tpu",)` runs Pallas' Mosaic lowering and the module's verifier here, for an abstract
# TPU v5e (what a lowering rule asks of the chip, e.g. `sign`'s native bf16, comes from it). Libtpu's own
# compile (layouts, VMEM) is left to a TPU.
TPU_V5E = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                    platform="tpu"))
TPU_HEADS = {"smollm2": (3, 3, 64), "gemma3": (1, 4, 256)}  # the real models' K, G, D
# The Triton lowering asks the GPU's compute capability. jax 0.10 assumes 9.0 where it sees no GPU; from jax
# 0.11 it reads an abstract device's kind and refuses without one, so the CUDA lowerings name the H100.
H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                                                 platform="cuda"))


def lower_for_tpu(fn, *args) -> str:
  """The StableHLO text of `jax.jit(fn)` lowered for a TPU (shapes or arrays as `args`)."""
  with jax.sharding.use_abstract_mesh(TPU_V5E):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def lower_for_gpu(fn, *args) -> str:
  """The StableHLO text of `jax.jit(fn)` lowered for an NVIDIA H100 (shapes or arrays as `args`)."""
  with jax.sharding.use_abstract_mesh(H100):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def tpu_kernels(hlo: str) -> int:
  """The Pallas calls in a TPU lowering: each is a `tpu_custom_call` holding its Mosaic module."""
  return hlo.count("stablehlo.custom_call @tpu_custom_call")


def gpu_kernels(hlo: str) -> int:
  """The Pallas calls in a CUDA lowering: each is a Triton custom call."""
  return hlo.count("stablehlo.custom_call @__gpu$xla.gpu.triton")


@contextlib.contextmanager
def planning_for(monkeypatch, backend: str):
  """The kernels' dispatch (`pallas_kernels.dispatch.implementation`) plans for `backend` ("tpu", "gpu")
  while lowering here."""
  from pallas_kernels import dispatch
  with monkeypatch.context() as m:
    m.setattr(dispatch, "jax", type("DeviceJax", (), {"default_backend": staticmethod(lambda: backend)}))
    yield


def selection_mask(rng, lengths, S, *, n_sink=4, p_select=0.3):
  """Per row: sinks, random whole chunks, and the open (last) chunk, below the row's length."""
  mask = np.zeros((len(lengths), S), bool)
  for b, L in enumerate(lengths):
    if L == 0:
      continue
    bounds = np.sort(rng.choice(np.arange(1, L), size=min(L - 1, L // 20), replace=False))
    chunk = np.searchsorted(bounds, np.arange(L), side="right")
    picked = rng.random(chunk.max() + 1) < p_select
    picked[-1] = True
    mask[b, :L] = picked[chunk] | (np.arange(L) < n_sink)
  return jnp.asarray(mask)


def decode_case_mask(case, rng, lengths, S):
  """The decode kernels' selection for a named case: "ragged" (and "cut_list", whose block list the test
  cuts) `selection_mask`, "empty_row" its first row empty, "nothing" every row empty, "every_block" all."""
  B = len(lengths)
  if case == "nothing":
    return jnp.zeros((B, S), bool)
  if case == "every_block":
    return jnp.ones((B, S), bool)
  mask = selection_mask(rng, lengths, S)
  return mask.at[0].set(False) if case == "empty_row" else mask


def chunking(rng, lengths, T, *, n_sel, mean_chunk=12):
  """Random chunk ids (-1 past the row's length) and, per token, its chunk's selected chunks."""
  B = len(lengths)
  chunk_id = np.full((B, T), -1, np.int32)
  for b, L in enumerate(lengths):
    if L:
      bounds = np.sort(rng.choice(np.arange(1, L), size=max(L // mean_chunk, 1), replace=False))
      chunk_id[b, :L] = np.searchsorted(bounds, np.arange(L), side="right")
  C = T // mean_chunk + 2
  # chunk c selects up to n_sel earlier chunks; -1 fills empty slots
  sel_BCN = rng.integers(-1, C, size=(B, C, n_sel)).astype(np.int32)
  sel_BCN = np.where(sel_BCN < np.arange(C)[None, :, None] - 1, sel_BCN, -1)
  sel_BTN = np.where(chunk_id[..., None] >= 0,
                     sel_BCN[np.arange(B)[:, None], np.maximum(chunk_id, 0)], -1)
  return jnp.asarray(chunk_id), jnp.asarray(sel_BTN), C


def chunk_ids(rng, lengths, T, *, mean_chunk=10):
  out = np.full((len(lengths), T), -1, np.int32)
  for b, L in enumerate(lengths):
    if L:
      bounds = np.sort(rng.choice(np.arange(1, L), size=max(L // mean_chunk, 1), replace=False))
      out[b, :L] = np.searchsorted(bounds, np.arange(L), side="right")
  return jnp.asarray(out)
