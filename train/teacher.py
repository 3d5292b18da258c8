"""The distillation teacher: the frozen model's attention, aggregated into chunks, blockwise.

`P[t, j]` is layer l's softmax attention of query t, averaged over heads, summed over the tokens of
chunk j, and renormalised over t's candidate chunks (j < chunk_id[t], see `boundaries`): sinks and
t's own open chunk are excluded. Rows with no candidate are all zero.

No `T x T` array is ever built. Per query block, two passes over the key blocks it can see:
1. `attention.causal_attention`, the model's own tiled prefill fold, with its log-sum-exp: the
   attention output (which the next layer needs) and the normaliser of every query and head;
2. probabilities `exp(s - lse)`, summed over heads and scattered into chunk bins by a one-hot
   `[S_block, C]` matmul. Its key blocks past the causal diagonal (and before a sliding window)
   are skipped by a loop with dynamic bounds, which reverse-mode autodiff cannot cross: the
   teacher is a constant, and its inputs are wrapped in `stop_gradient` so that differentiating a
   loss around it stays legal.
This is the plain-jnp reference for the Pallas distillation-attention kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import attention as attn
from chunkllm_jax import boundaries
from chunkllm_jax import model
from chunkllm_jax import selection
from chunkllm_jax.attention import visible
from chunkllm_jax.config import ModelConfig
from chunkllm_jax.params import ModelParams
from pallas_kernels.distill_attention import distill_attention


class TeacherOutputs(NamedTuple):
  P_LBTC: jnp.ndarray  # [n_qk, B, T, C] float32: teacher distribution over candidate chunks
  h_LBTD: jnp.ndarray  # [n_qk, B, T, D]: attention inputs of the QK-adapter layers
  h0_BTD: jnp.ndarray  # [B, T, D]: layer 0's output hidden state (the Chunk Adapter's input)
  hidden_BTD: jnp.ndarray  # [B, T, D]: the last layer's output, before the final norm


def _logits(cfg: ModelConfig, q_BKGQD, k_BSKD, q_pos_BQ, k_pos_BS, k_valid_BS, window):
  """Masked scores of one (query block, key block) pair, float32 [B, K, G, Q, S], and the mask."""
  mask_BQS = visible(q_pos_BQ, k_pos_BS, k_valid_BS, window)
  return attn.scores(q_BKGQD, k_BSKD, mask_BQS[:, None, None], scale=cfg.attn_scale,
                     softcap=cfg.attn_softcap), mask_BQS


def _block_range(q_start, block_q, block_k, window):
  """Key blocks [lo, hi) that hold any key visible to queries [q_start, q_start + block_q)."""
  lo = jnp.maximum(q_start - window + 1, 0) // block_k
  hi = (q_start + block_q + block_k - 1) // block_k
  return lo, hi


def _pad_to(x, T_pad, value):
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, T_pad - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def chunk_mass(cfg: ModelConfig, q_BTHD, k_BTKD, lse_BKGT, valid_BT, window, chunk_id_BT, max_chunks: int, *,
               block_q: int, block_k: int):
  """Attention probability summed over heads and over each chunk's keys: float32 [B, T, C].

  Keys that are sinks or padding (chunk id < 0), or in chunks >= max_chunks, fall in no bin.
  """
  B, T, H, D = q_BTHD.shape
  q_BKGTD = attn.split_heads(q_BTHD, cfg.n_kv_heads)
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  onehot_BTC = jax.nn.one_hot(chunk_id_BT, max_chunks, dtype=jnp.float32)  # id -1 -> all zeros

  def query_block(i):
    qs = i * block_q
    q_blk = jax.lax.dynamic_slice_in_dim(q_BKGTD, qs, block_q, axis=3)
    q_pos = jax.lax.dynamic_slice_in_dim(pos_BT, qs, block_q, axis=1)
    lse = jax.lax.dynamic_slice_in_dim(lse_BKGT, qs, block_q, axis=3)

    def key_block(j, mass_BQC):
      ks = j * block_k
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, ks, block_k, axis=1)
      s, mask_BQS = _logits(cfg, q_blk, sl(k_BTKD), q_pos, sl(pos_BT), sl(valid_BT), window)
      p_BQS = jnp.where(mask_BQS, jnp.exp(s - lse[..., None]).sum((1, 2)), 0.0)
      return mass_BQC + jnp.einsum("bqs,bsc->bqc", p_BQS, sl(onehot_BTC))

    lo, hi = _block_range(qs, block_q, block_k, window)
    return jax.lax.fori_loop(lo, hi, key_block, jnp.zeros((B, block_q, max_chunks), jnp.float32))

  mass_NBQC = jax.lax.map(query_block, jnp.arange(T // block_q))
  return jnp.moveaxis(mass_NBQC, 0, 1).reshape(B, T, max_chunks)


def renormalise(mass_BTC, candidate_BTC):
  """Restricts each row to its candidates and makes it sum to 1 (all-zero rows stay zero)."""
  return selection.renormalise(jnp.where(candidate_BTC, mass_BTC, 0.0))


def teacher_attend_fn(cfg: ModelConfig, valid_BT, chunk_id_BT, qk_layers: tuple[int, ...], max_chunks: int, *,
                      block_q: int, block_k: int, attention: str = "xla", n_sink: int = 0, interpret=False):
  """An `attend_fn` for `model.run_layers` (inputs padded to a multiple of both block sizes).

  The state is a dict: `P` [n_qk, B, T, C] and `h` [n_qk, B, T, D], written at the QK layers'
  slots, and `o0` [B, T, H, D], layer 0's attention output. Returns (attend_fn, initial state).
  """
  B, T = valid_BT.shape
  slot_of_layer = np.full((cfg.n_layers,), -1, np.int32)
  slot_of_layer[list(qk_layers)] = np.arange(len(qk_layers))
  slot_of_layer = jnp.asarray(slot_of_layer)
  candidate_BTC = boundaries.candidate_mask(chunk_id_BT, max_chunks) & valid_BT[..., None]
  kw = dict(block_q=block_q, block_k=block_k)
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

  def dense(layer, q, k, v, return_lse=False):
    return attn.causal_attention(q, k, v, positions_BT, valid_BT, layer["window"], scale=cfg.attn_scale,
                                 softcap=cfg.attn_softcap, return_lse=return_lse, **kw)

  # The distillation kernel's convention: sinks join chunk 0 (it drops positions < n_sink itself).
  kernel_chunk_id = jnp.where(valid_BT, jnp.maximum(chunk_id_BT, 0), boundaries.NO_CHUNK)

  def attend_fn(state, layer, q, k, v, h):
    slot = slot_of_layer[layer["index"]]

    def plain(st):
      return dense(layer, q, k, v), st

    def record(st):
      if attention == "pallas":  # QK layers are full-attention layers: no window to apply
        out, P = distill_attention(q, k, v, kernel_chunk_id, scale=cfg.attn_scale, max_chunks=max_chunks,
                                   n_sink=n_sink, softcap=cfg.attn_softcap, interpret=interpret, **kw)
        P = renormalise(P, candidate_BTC)
      else:
        out, lse = dense(layer, q, k, v, return_lse=True)
        P = renormalise(chunk_mass(cfg, q, k, lse, valid_BT, layer["window"], chunk_id_BT, max_chunks, **kw),
                        candidate_BTC)
      return out, dict(st, P=st["P"].at[slot].set(P), h=st["h"].at[slot].set(h))

    out, state = jax.lax.cond(slot >= 0, record, plain, state)
    state = dict(state, o0=jnp.where(layer["index"] == 0, out, state["o0"]))
    return out, state, None

  n = len(qk_layers)

  def init_state(h_dtype):
    return dict(P=jnp.zeros((n, B, T, max_chunks), jnp.float32), h=jnp.zeros((n, B, T, cfg.d_model), h_dtype),
                o0=jnp.zeros((B, T, cfg.n_heads, cfg.head_dim), h_dtype))

  return attend_fn, init_state


def teacher_chunk_attention(params: ModelParams, tokens_BT, chunk_id_BT, *, max_chunks: int,
                            qk_layers: tuple[int, ...] | None = None, lengths_B=None,
                            block_q: int = 256, block_k: int = 512, attention: str = "xla",
                            n_sink: int | None = None, interpret=False) -> TeacherOutputs:
  """Runs the frozen model once and returns the teacher P of every QK-adapter layer (see module doc).

  Args:
    params: the model; only its backbone is read (and not differentiated).
    tokens_BT: int tokens, right-padded when `lengths_B` is given.
    chunk_id_BT: from `boundaries.chunks_from_labels`; sinks and padding are -1.
    max_chunks: C, the number of chunk bins; chunks with larger ids are ignored.
    qk_layers: the layers to compute P for; default: the adapters' layers if `params` carries
      adapters, else the model's full-attention layers.
    lengths_B: valid tokens per row (default: all).
    block_q, block_k: query and key block sizes (memory: one [B, H, block_q, block_k] tile).
    attention: "xla", or "pallas" for the distillation kernel on the QK layers (Mosaic on TPU;
      `interpret=True` runs it in interpret mode; elsewhere its dispatcher runs the jnp reference).
    n_sink: sinks at the start of every row (chunk id -1), for the kernel; derived when not traced.
  """
  if attention not in ("xla", "pallas"):
    raise ValueError(f"attention must be 'xla' or 'pallas', got {attention!r}")
  cfg = params.config
  if qk_layers is None:
    qk_layers = params.adapters.config.qk_layers if params.adapters is not None else cfg.full_attention_layers
  qk_layers = tuple(qk_layers)
  if not qk_layers:
    raise ValueError(f"{cfg.arch} model has no full-attention layer to distil (qk_layers is empty)")
  if any(cfg.sliding_layers[i] for i in qk_layers):
    raise ValueError(f"qk_layers {qk_layers} include sliding-window layers; full-attention layers are "
                     f"{cfg.full_attention_layers}")
  B, T = tokens_BT.shape
  chex.assert_shape(chunk_id_BT, (B, T))
  params = params.replace(backbone=jax.lax.stop_gradient(params.backbone), adapters=None)
  valid_BT = jnp.arange(T)[None, :] < (jnp.full((B,), T) if lengths_B is None else jnp.asarray(lengths_B))[:, None]

  # Pad to whole blocks; padded keys are invalid and padded queries are cropped away.
  step = math.lcm(block_q, block_k)
  T_pad = -(-T // step) * step
  tokens = _pad_to(jnp.asarray(tokens_BT), T_pad, 0)
  valid = _pad_to(valid_BT, T_pad, False)
  chunk_id = _pad_to(jnp.asarray(chunk_id_BT, jnp.int32), T_pad, boundaries.NO_CHUNK)
  chunk_id = jnp.where(valid, chunk_id, boundaries.NO_CHUNK)

  positions = jnp.broadcast_to(jnp.arange(T_pad, dtype=jnp.int32), (B, T_pad))
  if attention == "pallas" and n_sink is None:
    if isinstance(chunk_id_BT, jax.core.Tracer):
      raise ValueError("attention='pallas' under jit needs n_sink (the leading tokens with no chunk)")
    n_sink = int(np.argmax(np.asarray(chunk_id_BT)[0] >= 0))
  attend_fn, init_state = teacher_attend_fn(cfg, valid, chunk_id, qk_layers, max_chunks, block_q=block_q,
                                            block_k=block_k, attention=attention, n_sink=n_sink,
                                            interpret=interpret)
  x0 = model.embed(params, tokens)
  hidden, state, _ = model.run_layers(params, x0, positions, attend_fn, init_state(x0.dtype))
  layer0 = jax.tree.map(lambda w: w[0], params.backbone["layers"])
  h0 = model.finish_layer(cfg, layer0, x0, state["o0"])
  out = TeacherOutputs(P_LBTC=state["P"][:, :, :T], h_LBTD=state["h"][:, :, :T], h0_BTD=h0[:, :T],
                       hidden_BTD=hidden[:, :T])
  return jax.tree.map(jax.lax.stop_gradient, out)
