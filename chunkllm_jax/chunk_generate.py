"""ChunkLLM decoding: boundary-triggered chunk selection over the static KV buffer.

Prefill lets the Chunk Adapter segment the prompt at layer 0, attends chunk-sparsely
(`chunk_prefill.py`: each layer its own top-k at every boundary; dense prefill is an option),
fills the chunk table with each chunk's k~, and runs the first vote at the last prompt token.
Each decode step then:
  1. runs every layer: dense layers read the whole buffer, sliding layers their window, and the
     other layers read only the compacted working buffer (sinks, selected and local chunks) plus
     the open chunk;
  2. runs the Chunk Adapter on layer 0's output; where the token closes a chunk (p > alpha, or the
     chunk reached `max_chunk_len`), a `lax.cond` appends it, re-selects and re-compacts.
The new selection applies from the next token; between boundaries nothing is re-scored.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import adapters as adp
from chunkllm_jax import attention as attn
from chunkllm_jax import model
from chunkllm_jax import sharding as shd
from chunkllm_jax import chunk_kernels
from chunkllm_jax import chunk_prefill as chunk_prefill_lib
from chunkllm_jax.chunk_attention import packed_decode_attention
from chunkllm_jax.chunk_cache import (ChunkState, append_chunks, compact_into, init_chunk_state,
                                      working_positions, working_size)
from chunkllm_jax.generate import Compiled, assemble_output, buffer_len, is_eos, prepare_prompts, resolve_max_len
from chunkllm_jax.kv_cache import KVCache, init_cache, write_prefix, write_token
from chunkllm_jax.params import ModelParams
from chunkllm_jax.sampling import Sampling, sample
from chunkllm_jax.selection import ChunkConfig, select

WORK_BLOCK = 128  # decode reads the working buffer in blocks of this many slots


def _layer_kinds(params: ModelParams, ccfg: ChunkConfig):
  """Per layer: QK-adapter slot (or 0) and whether attention is chunk-sparse."""
  cfg, acfg = params.config, params.adapters.config
  slot = np.zeros(cfg.n_layers, np.int32)
  sparse = np.zeros(cfg.n_layers, bool)
  for i, layer in enumerate(acfg.qk_layers):
    slot[layer] = i
    sparse[layer] = layer not in ccfg.dense_layers and not cfg.sliding_layers[layer]
  work_slot = np.zeros_like(slot) if ccfg.shared else slot
  return jnp.asarray(slot), jnp.asarray(sparse), jnp.asarray(work_slot), np.asarray(acfg.qk_layers)


def _qk(params: ModelParams, slot, h_BTD):
  p = jax.tree.map(lambda a: a[slot], params.adapters.params["qk"])
  return adp.qk_adapter_apply(p, h_BTD)


def _boundary_logits(params: ModelParams, x0_BTD, o0_BTHD):
  """The Chunk Adapter on layer 0's output (rebuilt from its attention output)."""
  layer0 = jax.tree.map(lambda w: w[0], params.backbone["layers"])
  h0 = model.finish_layer(params.config, layer0, x0_BTD, o0_BTHD)
  return adp.chunk_adapter_logits(params.adapters.params["chunk"], h0)


def _refresh_working_buffer(st: ChunkState, cache: KVCache, work_slot_L, ccfg: ChunkConfig) -> ChunkState:
  sel = st.selected[None] if ccfg.shared else st.selected
  pos, valid, used = working_positions(st, sel, ccfg, st.work_pos.shape[-1])
  if _use_kernels(ccfg):
    wk, wv = chunk_kernels.compact_kernel(st.work_k, st.work_v, cache.k, cache.v, pos, valid, work_slot_L,
                                          interpret=ccfg.interpret)
  else:
    wk, wv = compact_into(st.work_k, st.work_v, cache.k, cache.v, pos, work_slot_L)
  return st.replace(work_pos=pos, work_valid=valid, work_used=used, work_k=wk, work_v=wv)


def _use_kernels(ccfg: ChunkConfig) -> bool:
  return ccfg.attention == "pallas" and chunk_kernels.kernels_active(ccfg.interpret)


def _reselect(st: ChunkState, closes_B, q_LBd, ccfg: ChunkConfig) -> ChunkState:
  new = select(q_LBd, st.chunk_key, st.n_chunks, ccfg)
  keep = closes_B if ccfg.shared else closes_B[None]
  return st.replace(selected=jnp.where(keep[..., None], new, st.selected),
                    n_selections=st.n_selections + closes_B)


def segment(p_BT, valid_BT, tokens_BT, ccfg: ChunkConfig):
  """Boundaries of a prompt by the config's rule (the Chunk Adapter's p by default): a scan over positions."""
  B, T = p_BT.shape

  def step(open_start, t):
    closes = valid_BT[:, t] & ccfg.closes(t, open_start, tokens_BT[:, t], p_BT[:, t])
    return jnp.where(closes, t + 1, open_start), closes

  _, closes_TB = jax.lax.scan(step, jnp.full((B,), ccfg.n_sink, jnp.int32), jnp.arange(T))
  return closes_TB.T


def segment_prompts(params: ModelParams, tokens_BT, lengths_B, ccfg: ChunkConfig):
  """Where the chunks of right-padded prompts end, by the config's rule: [B, T] bool.

  The Chunk Adapter reads layer 0's output and layer 0 always prefills densely, so running that
  one layer gives exactly the segmentation `chunk_prefill` makes, at about 1/L of its cost."""
  cfg = params.config
  one = params.replace(
      backbone={**params.backbone, "layers": jax.tree.map(lambda w: w[:1], params.backbone["layers"])},
      config=cfg.replace(n_layers=1, layer_sliding=cfg.layer_sliding[:1]))
  B, T = tokens_BT.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  h0, _, _ = model.run_layers(one, model.embed(one, tokens_BT), positions, model.self_attend_fn(one.config, positions, valid))
  p = jax.nn.sigmoid(adp.chunk_adapter_logits(params.adapters.params["chunk"], h0))
  return segment(p, valid, tokens_BT, ccfg)


def chunk_prefill(params: ModelParams, tokens_BT, lengths_B, max_len: int, ccfg: ChunkConfig):
  """Prefill that segments the prompt (at layer 0), attends chunk-sparsely (or densely, by
  `ccfg.prefill`), fills the chunk table and makes the first selection by the full vote."""
  cfg = params.config
  B, T = tokens_BT.shape
  C = ccfg.max_chunks
  slot_L, sparse_L, work_slot_L, qk_layers = _layer_kinds(params, ccfg)
  sparse_L = sparse_L.at[0].set(False) & (ccfg.prefill == "sparse")  # layer 0 segments: it stays dense
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = positions < lengths_B[:, None]
  self_attend = model.self_attend_fn(cfg, positions, valid)
  last = (lengths_B - 1)[:, None, None]
  x0 = model.embed(params, tokens_BT)

  def segmentation(o0):
    closes = segment(jax.nn.sigmoid(_boundary_logits(params, x0, o0)), valid, tokens_BT, ccfg)
    ends, n = chunk_prefill_lib.chunk_ends(closes, C)
    ids = chunk_prefill_lib.chunk_ids(closes, valid, ccfg.n_sink, C)
    return closes, ids, ends, n

  def attend_fn(state, layer, q, k, v, h):
    kb, vb, seg = state
    idx = layer["index"]
    kb, vb = write_prefix(kb, idx, k), write_prefix(vb, idx, v)
    qt, kt = _qk(params, slot_L[idx], h)

    def sparse():
      closes, ids, ends, n = seg
      sel = chunk_prefill_lib.layer_selections(qt, kt, ends, n, ccfg)
      end_ok = closes if ccfg.keep == "boundary" else jnp.ones_like(closes)
      return chunk_prefill_lib.prefill_attention(q, k, v, ids, sel, end_ok, ccfg, scale=cfg.attn_scale,
                                                 softcap=cfg.attn_softcap, use_kernel=_use_kernels(ccfg))

    o = jax.lax.cond(sparse_L[idx], sparse, lambda: self_attend(None, layer, q, k, v, h)[0])
    seg = jax.lax.cond(idx == 0, lambda: segmentation(o), lambda: seg)
    return o, (kb, vb, seg), (jnp.take_along_axis(qt, last, axis=1)[:, 0], kt)

  cache = init_cache(cfg, B, max_len, params.backbone["embed"].dtype)
  seg0 = (jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32), jnp.zeros((B, C), jnp.int32),
          jnp.zeros((B,), jnp.int32))
  x, (k, v, seg), (q_last_LBd, k_LBTd) = model.run_layers(params, x0, positions, attend_fn, (cache.k, cache.v, seg0))
  logits = model.unembed(params, jnp.take_along_axis(x, last, axis=1))[:, 0]
  cache = KVCache(k=k, v=v, length=lengths_B.astype(jnp.int32))

  closes_BT = seg[0]
  acfg = params.adapters.config
  st = init_chunk_state(cfg.n_layers, len(acfg.qk_layers), B, acfg.d_c, cfg.n_kv_heads, cfg.head_dim,
                        cache.k.dtype, ccfg, working_size(ccfg, max_len, WORK_BLOCK))
  k_qk = k_LBTd[qk_layers]

  def add(st, t):
    return append_chunks(st, closes_BT[:, t], jnp.full((B,), t, jnp.int32), k_qk[:, :, t]), None

  st, _ = jax.lax.scan(add, st, jnp.arange(T))
  st = _reselect(st, jnp.ones((B,), bool), q_last_LBd[qk_layers], ccfg)
  return logits, cache, _refresh_working_buffer(st, cache, work_slot_L, ccfg)


def _recent(buf_LBSKD, layer, start_B, size: int):
  """Per-row window [start, start + size) of one layer (start clamped to fit): [B, size, K, D].

  Sliced straight out of the stacked buffer, so nothing but the window is read."""
  _, B, S, K, D = buf_LBSKD.shape
  start = jnp.clip(start_B, 0, S - size)
  win = jax.vmap(lambda b, s: jax.lax.dynamic_slice(buf_LBSKD, (layer, b, s, 0, 0), (1, 1, size, K, D))[0, 0])(
      jnp.arange(B), start)
  return win, start[:, None] + jnp.arange(size)


def chunk_decode_step(params: ModelParams, tokens_B, cache: KVCache, st: ChunkState, ccfg: ChunkConfig):
  cfg = params.config
  slot_L, sparse_L, work_slot_L, qk_layers = _layer_kinds(params, ccfg)
  pos_B = cache.length
  B, S, M = tokens_B.shape[0], cache.max_len, min(ccfg.max_chunk_len, cache.max_len)
  n_blocks = -(-jnp.max(st.work_used, axis=-1) // WORK_BLOCK)  # per selection slot, batch-wide

  def attend_fn(state, layer, q, k, v, h):
    kb, vb, o0 = state
    idx = layer["index"]
    kb, vb = write_token(kb, idx, pos_B, k[:, 0]), write_token(vb, idx, pos_B, v[:, 0])

    def dense():
      return attn.decode_attention(q, kb, vb, idx, pos_B, layer["window"], scale=cfg.attn_scale,
                                   softcap=cfg.attn_softcap)

    def sparse():
      w = work_slot_L[idx]
      k_open, open_pos = _recent(kb, idx, st.open_start, M)
      v_open, _ = _recent(vb, idx, st.open_start, M)
      open_ok = (open_pos >= st.open_start[:, None]) & (open_pos <= pos_B[:, None])
      work_ok = st.work_valid[w] & (st.work_pos[w] <= pos_B[:, None])
      if _use_kernels(ccfg):
        return chunk_kernels.decode_attention_kernel(
            q, st.work_k[idx], st.work_v[idx], work_ok, st.work_used[w], k_open, v_open, open_ok,
            scale=cfg.attn_scale, block=WORK_BLOCK, interpret=ccfg.interpret)
      return packed_decode_attention(q, st.work_k, st.work_v, idx, work_ok, n_blocks[w], k_open, v_open,
                                     open_ok, scale=cfg.attn_scale, softcap=cfg.attn_softcap, block=WORK_BLOCK)

    o = jax.lax.cond(sparse_L[idx], sparse, dense)
    o0 = jnp.where(idx == 0, o, o0)
    qt, kt = _qk(params, slot_L[idx], h)
    return o, (kb, vb, o0), (qt[:, 0], kt[:, 0])

  x0 = model.embed(params, tokens_B[:, None])
  o0 = jnp.zeros((B, 1, cfg.n_heads, cfg.head_dim), x0.dtype)
  x, (k, v, o0), (q_LBd, k_LBd) = model.run_layers(params, x0, pos_B[:, None], attend_fn, (cache.k, cache.v, o0))
  logits = model.unembed(params, x)[:, 0]
  cache = KVCache(k=k, v=v, length=pos_B + 1)

  # Retention (SepLLM): tokens a sparse layer read / tokens seen, before this step's boundary.
  w0 = st.work_valid[0] & (st.work_pos[0] <= pos_B[:, None])
  seen = pos_B + 1
  visible = jnp.sum(w0, -1) + jnp.clip(seen - st.open_start, 0, None)
  st = st.replace(retained=st.retained + jnp.minimum(visible, seen) / seen,
                  read_slots=st.read_slots + n_blocks[0] * WORK_BLOCK + M)

  p = jax.nn.sigmoid(_boundary_logits(params, x0, o0)[:, 0])
  closes = ccfg.closes(pos_B, st.open_start, tokens_B, p)

  # Optional refresh inside a long chunk: every `refresh_every` tokens of the open chunk.
  into_chunk = pos_B - st.open_start + 1
  refresh = ~closes & (pos_B >= ccfg.n_sink) & (ccfg.refresh_every > 0) & (
      into_chunk % max(ccfg.refresh_every, 1) == 0)
  reselect = closes | refresh

  def on_boundary(st):
    st = append_chunks(st, closes, pos_B, k_LBd[qk_layers])
    st = _reselect(st, reselect, q_LBd[qk_layers], ccfg)
    return _refresh_working_buffer(st, cache, work_slot_L, ccfg)

  st = jax.lax.cond(jnp.any(reselect), on_boundary, lambda s: s, st)
  return logits, cache, st


# ----------------------------------------------------------------------------------------------
# The loop and the public API


def _prefill_sample(params, tokens_BT, lengths_B, key, *, max_len, sampling, ccfg):
  logits, cache, st = chunk_prefill(params, tokens_BT, lengths_B, max_len, ccfg)
  return sample(logits, jax.random.fold_in(key, 0), sampling), cache, st


def _decode_loop(params, first_B, cache, st, key, *, max_new, sampling, eos_ids, pad_id, ccfg):
  B = first_B.shape[0]
  out = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(first_B)

  def cond(s):
    return (s[0] < max_new) & ~jnp.all(s[5])  # s[5]: done

  def body(s):
    step, tok, cache, st, out, done, live = s
    logits, cache, new = chunk_decode_step(params, tok, cache, st, ccfg)
    # A finished row still runs with its batch; its steps must not count in its own stats.
    new = new.replace(retained=jnp.where(done, st.retained, new.retained),
                      read_slots=jnp.where(done, st.read_slots, new.read_slots))
    nxt = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(key, step), sampling))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
    return step + 1, nxt, cache, new, out, done | is_eos(nxt, eos_ids), live + ~done

  step, _, _, st, out, _, live = jax.lax.while_loop(
      cond, body, (jnp.int32(1), first_B, cache, st, out, is_eos(first_B, eos_ids), jnp.zeros((B,), jnp.int32)))
  return out, step, st, live


@functools.lru_cache(maxsize=32)
def _programs(max_len, max_new, sampling, eos_ids, pad_id, ccfg):
  pre = functools.partial(_prefill_sample, max_len=max_len, sampling=sampling, ccfg=ccfg)
  loop = functools.partial(_decode_loop, max_new=max_new, sampling=sampling, eos_ids=eos_ids,
                           pad_id=pad_id, ccfg=ccfg)
  return Compiled(jax.jit(pre)), Compiled(jax.jit(loop))


def bytes_per_decode_step(params: ModelParams, ccfg: ChunkConfig, itemsize: int, sparse_slots: np.ndarray,
                          seen_tokens: np.ndarray) -> dict[str, np.ndarray]:
  """K/V bytes one decode step reads (means over the steps): sparse layers read `sparse_slots`,
  every other layer, like dense attention, the `seen_tokens` so far."""
  cfg = params.config
  _, sparse_L, _, _ = _layer_kinds(params, ccfg)
  n_sparse = int(np.sum(np.asarray(sparse_L)))
  per_token = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize
  return dict(chunk=per_token * (n_sparse * sparse_slots + (cfg.n_layers - n_sparse) * seen_tokens),
              dense=per_token * cfg.n_layers * seen_tokens)


def chunk_generate(params: ModelParams, tokens, max_new_tokens: int = 64, *, lengths=None,
                   temperature: float = 0.0, top_k_tokens: int = 0, top_p: float = 1.0, seed: int = 0,
                   eos_ids=None, pad_id=None, max_len: int | None = None, chunk_config: ChunkConfig | None = None,
                   mesh=None, **chunk_fields):
  """ChunkLLM generation. `params` must carry adapters (`with_adapters`).

  Any `ChunkConfig` field can be given by keyword (`top_k=32, n_local=4, ...`); `top_k` is the
  number of selected chunks (the sampling top-k is `top_k_tokens`). Returns a `GenerateOutput`
  whose stats add per row: kv_retention, n_chunks, n_selections, chunk_overflow, and the K/V
  bytes read per decode step by this design and by dense attention (means over the row's own
  decode steps, up to its end-of-sequence token; NaN when it had none). With `mesh`, the backbone
  and the batch are placed by `sharding.LOGICAL_TO_MESH` (adapters replicated), and the compiled
  programs follow those placements.
  """
  if params.adapters is None:
    raise ValueError("chunk_generate needs adapters: params = cj.with_adapters(params, cj.load_adapters(...))")
  cfg = params.config
  params = adp.with_adapters(params.replace(adapters=None), params.adapters)  # fits this backbone?
  ccfg = dataclasses_replace(chunk_config or ChunkConfig(), chunk_fields)
  pad_id = cfg.pad_id if pad_id is None else pad_id
  eos_ids = tuple(cfg.eos_ids if eos_ids is None else ([eos_ids] if np.isscalar(eos_ids) else eos_ids))
  prompts, lens = prepare_prompts(tokens, cfg.vocab_size, pad_id, lengths)
  max_len = resolve_max_len(cfg, lens, max_new_tokens, max_len)
  ccfg = ccfg.validate(max_len, cfg.n_layers)
  if ccfg.attention == "pallas" and cfg.attn_softcap is not None:
    raise ValueError("attention='pallas' does not support attention logit soft-capping; use 'xla'")
  sampling = Sampling(float(temperature), int(top_k_tokens or 0), float(top_p))
  pre, loop = _programs(buffer_len(max_len), max_new_tokens, sampling, eos_ids, pad_id, ccfg)
  key = jax.random.key(seed)
  prompts_dev, lens_dev = jnp.asarray(prompts), jnp.asarray(lens)
  if mesh is not None:
    params = jax.device_put(params, shd.params_sharding(params, mesh))
    prompts_dev = jax.device_put(prompts_dev, shd.batch_sharding(mesh, prompts.shape))
    lens_dev = jax.device_put(lens_dev, shd.batch_sharding(mesh, lens.shape))
    key = jax.device_put(key, shd.replicated(mesh))
  (first, cache, st), prefill_s = pre.timed(params, prompts_dev, lens_dev, key)
  (new, steps, st, live), decode_s = loop.timed(params, first, cache, st, key)
  steps = int(steps) - 1
  live = np.asarray(live)  # decode steps each row ran before its end-of-sequence token
  with np.errstate(invalid="ignore", divide="ignore"):  # NaN for a row with no decode step
    per_step = lambda x: np.where(live > 0, np.asarray(x) / np.maximum(live, 1), np.nan)
    nbytes = bytes_per_decode_step(params, ccfg, cache.k.dtype.itemsize, per_step(st.read_slots),
                                   lens + 1 + (live - 1) / 2)
  extra = dict(kv_retention=per_step(st.retained), n_chunks=np.asarray(st.n_chunks),
               n_selections=np.asarray(st.n_selections), chunk_overflow=np.asarray(st.overflow),
               bytes_per_step=nbytes["chunk"], dense_bytes_per_step=nbytes["dense"])
  return assemble_output(prompts, lens, np.asarray(new), eos_ids, pad_id, prefill_s=prefill_s,
                         decode_s=decode_s, decode_steps=steps, extra_stats=extra)


def dataclasses_replace(ccfg: ChunkConfig, fields: dict) -> ChunkConfig:
  known = {f.name for f in dataclasses.fields(ChunkConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"unknown chunk-config fields {unknown}; known: {sorted(known)}")
  return dataclasses.replace(ccfg, **fields)
