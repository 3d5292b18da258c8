"""The decoder forward pass: embeddings, a `lax.scan` over stacked layers, and the LM head.

The layer body is shared by every mode (full forward, prefill into the KV buffer, one decode
step, ChunkLLM's sparse paths). What differs is only how attention reads keys, so each mode
passes an `attend_fn(state, layer, q, k, v, h) -> (out, state, ys)`; `state` rides in the scan
carry (the KV buffer, updated in place), `ys` are per-layer outputs stacked by the scan. A mode that
reads a layer's output (ChunkLLM segments on layer 0's) also passes `output_fn(state, layer, x, ys)
-> (state, ys)`, called after the layer with its output and what `attend_fn` returned.
"""

from __future__ import annotations

import warnings

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import attention as attn
from chunkllm_jax import checks
from chunkllm_jax.config import ModelConfig
from chunkllm_jax.params import ModelParams
from chunkllm_jax.rope import apply_rope, layer_rope_tables

AttendFn = Callable[..., tuple[jnp.ndarray, Any, Any]]


def rms_norm(x, w, cfg: ModelConfig):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  if cfg.norm_plus_one:  # Gemma scales in float32, then casts
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w * y.astype(x.dtype)  # Llama casts first, then scales


def layer_constants(cfg: ModelConfig) -> dict[str, jnp.ndarray]:
  """Per-layer values the scan iterates over beside the weights."""
  inv_freq, mscale = layer_rope_tables(cfg)
  window = np.where(cfg.sliding_layers, cfg.sliding_window or attn.NO_WINDOW, attn.NO_WINDOW)
  return dict(index=jnp.arange(cfg.n_layers, dtype=jnp.int32), inv_freq=jnp.asarray(inv_freq),
              mscale=jnp.asarray(mscale), window=jnp.asarray(window, jnp.int32))


def embed(params: ModelParams, tokens_BT):
  cfg = params.config
  table = params.backbone["embed"]
  x = jnp.take(table, tokens_BT, axis=0)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.d_model**0.5, dtype=table.dtype)
  return x


def unembed(params: ModelParams, x_BTD):
  """Final norm and LM head; logits in float32."""
  cfg, bb = params.config, params.backbone
  h = rms_norm(x_BTD, bb["final_norm"], cfg)
  if cfg.tie_embeddings:
    logits = jnp.einsum("btd,vd->btv", h, bb["embed"], preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("btd,dv->btv", h, bb["lm_head"], preferred_element_type=jnp.float32)
  if cfg.final_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


def project_qkv(cfg: ModelConfig, lp, h_BTD, positions_BT, layer):
  q = jnp.einsum("btd,dhk->bthk", h_BTD, lp["wq"])
  k = jnp.einsum("btd,dhk->bthk", h_BTD, lp["wk"])
  v = jnp.einsum("btd,dhk->bthk", h_BTD, lp["wv"])
  if cfg.qkv_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  if cfg.qk_norm:
    q, k = rms_norm(q, lp["q_norm"], cfg), rms_norm(k, lp["k_norm"], cfg)
  q = apply_rope(q, positions_BT, layer["inv_freq"], layer["mscale"])
  k = apply_rope(k, positions_BT, layer["inv_freq"], layer["mscale"])
  return q, k, v


MLP_BLOCK = 1024  # tokens per MLP block in long prompts


def _mlp(cfg: ModelConfig, lp, h_BTD):
  """The gated MLP. A long prompt runs in blocks of `MLP_BLOCK` tokens, one after another, so its
  [T, d_ff] activations are never all live at once (they were half the KV buffer's size in a
  prefill's temporaries, bench/RESULTS_memory.md); each token's result is the same."""
  def block(h):
    gate = jnp.einsum("btd,df->btf", h, lp["w_gate"])
    up = jnp.einsum("btd,df->btf", h, lp["w_up"])
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return jnp.einsum("btf,fd->btd", act * up, lp["w_down"])

  B, T, D = h_BTD.shape
  if T <= MLP_BLOCK:
    return block(h_BTD)
  n = -(-T // MLP_BLOCK)
  h_BTD = jnp.pad(h_BTD, ((0, 0), (0, n * MLP_BLOCK - T), (0, 0)))
  h_NBtD = h_BTD.reshape(B, n, MLP_BLOCK, D).swapaxes(0, 1)
  return jax.lax.map(block, h_NBtD).swapaxes(0, 1).reshape(B, n * MLP_BLOCK, D)[:, :T]


def finish_layer(cfg: ModelConfig, lp, x_BTD, attn_BTHD):
  """Output projection, residual, MLP: everything after attention."""
  o = jnp.einsum("bthk,hkd->btd", attn_BTHD, lp["wo"])
  if cfg.o_bias:
    o = o + lp["bo"]
  if cfg.sandwich_norm:
    o = rms_norm(o, lp["post_attn_norm"], cfg)
  x = x_BTD + o
  m = _mlp(cfg, lp, rms_norm(x, lp["mlp_norm"], cfg))
  if cfg.sandwich_norm:
    m = rms_norm(m, lp["post_mlp_norm"], cfg)
  return x + m


def run_layers(params: ModelParams, x_BTD, positions_BT, attend_fn: AttendFn, state=None, output_fn=None):
  """Runs every layer under `lax.scan`. Returns (hidden, final state, stacked per-layer ys).

  `output_fn` sees each layer's output inside the scan, where the layer's weights are already at
  hand: rebuilding a layer's output outside it slices that layer's weights out of the stack, which
  XLA's CPU backend copies before the matmuls (11 MiB of layer 0's, bench/RESULTS_memory.md)."""
  cfg = params.config

  def body(carry, xs):
    x, st = carry
    lp, layer = xs
    with jax.named_scope("attention"):
      h = rms_norm(x, lp["attn_norm"], cfg)
      q, k, v = project_qkv(cfg, lp, h, positions_BT, layer)
      o, st, ys = attend_fn(st, layer, q, k, v, h)
    with jax.named_scope("mlp"):
      x = finish_layer(cfg, lp, x, o)
    if output_fn is not None:
      st, ys = output_fn(st, layer, x, ys)
    return (x, st), ys

  (x, state), ys = jax.lax.scan(body, (x_BTD, state), (params.backbone["layers"], layer_constants(cfg)))
  return x, state, ys


def self_attend_fn(cfg: ModelConfig, positions_BT, valid_BT) -> AttendFn:
  """Full causal attention over the tokens of this call (no KV buffer)."""

  def attend_fn(state, layer, q, k, v, h):
    del h
    o = attn.causal_attention(q, k, v, positions_BT, valid_BT, layer["window"],
                              scale=cfg.attn_scale, softcap=cfg.attn_softcap)
    return o, state, None

  return attend_fn


def forward(params: ModelParams, tokens_BT, lengths_B=None):
  """Logits [B, T, V] of full causal attention. `lengths_B` marks right padding (optional): one int a row
  (a list or an array), each in [1, T].

  tokens_BT: a [B, T] array or a list of equal-length token lists. Outside `jit`, ids are checked
  against the vocabulary first (past it, `take` would give NaN logits or a wrong row, silently)."""
  checks.check_params(params, "forward")
  cfg = params.config
  tokens_BT = _token_input(tokens_BT, cfg.vocab_size)
  B, T = tokens_BT.shape
  if T > cfg.max_position:  # as generate's max_len past the context: allowed, and said
    warnings.warn(f"{T} positions exceed the model's trained context ({cfg.max_position}); quality may degrade",
                  stacklevel=2)
  if lengths_B is not None:  # `generate`'s rules for its `lengths`: one int a row, in [1, T]
    lengths_B = checks.check_lengths(lengths_B, B, T, "lengths_B")
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < (jnp.full((B,), T) if lengths_B is None else lengths_B)[:, None]
  x = embed(params, tokens_BT)
  x, _, _ = run_layers(params, x, positions, self_attend_fn(cfg, positions, valid))
  return unembed(params, x)


def _token_input(tokens, vocab_size: int):
  """Lists become an int32 array; concrete ids are range-checked; traced ones only by dtype and rank."""
  if isinstance(tokens, jax.core.Tracer):
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2:
      raise TypeError(f"tokens must be [B, T] integer ids, got {tokens.dtype}{list(tokens.shape)}")
    return tokens
  if not isinstance(tokens, jax.Array):
    tokens = checks.token_array(tokens, vocab_size, lengths_name="lengths_B")
  elif not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T] (a list of equal-length token lists), got shape {tuple(tokens.shape)}")
  if tokens.size == 0:
    raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
  if isinstance(tokens, jax.Array):
    if int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size:  # one small reduction, no copy to host
      return tokens
    tokens = np.asarray(tokens)
  checks.check_token_range(tokens, vocab_size)
  return jnp.asarray(tokens, jnp.int32)
