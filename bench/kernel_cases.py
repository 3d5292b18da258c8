"""bench_kernels: the timed cases (bandwidth, decode, prefill, distill) and the correctness checks."""

from __future__ import annotations

import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from chunkllm_jax.chunk_generation import WORK_BLOCK  # noqa: E402
from pallas_kernels import chunk_decode_attention as cda  # noqa: E402
from pallas_kernels import chunk_prefill_attention as cpa  # noqa: E402
from pallas_kernels import distill_attention as dsa  # noqa: E402
from kernel_programs import (  # noqa: E402
    FLAG_BOUND, TOL, causal_block_pairs, decode_compacted, decode_inplace, decode_per_head, decode_per_head_gathered,
    decode_selection, dense_decode_model, dense_decode_nn, dense_prefill, distill, gather, normal, open_window,
    per_head_slots, prefill, prefill_layout, rel_err)
from kernel_run import Run, n_copies, short  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Cases


def case_bandwidth(run: Run) -> dict:
  """Copy and read bandwidth of one large float32 buffer. Device time where CUPTI sees a kernel (a copy may be
  a memcpy, which it does not: wall clock then, over milliseconds, where dispatch is negligible)."""
  n = run.args.copy_mib * 2**20 // 4
  x = normal(1, (n,), jnp.float32)
  res = dict(bytes=4 * n)
  for name, fn, moved in (("copy", jnp.copy, 8 * n), ("negate", jnp.negative, 8 * n), ("read", jnp.sum, 4 * n)):
    exe, cs = run.compile("bw_" + name, fn, (x,))
    m = run.measure(exe, [(x,)])
    t = m["time_s"]
    res[name] = dict(time_s=t, wall_s=m["wall_s"], timer=m["timer"], bytes_moved=moved, bandwidth=moved / t,
                     compile_s=cs)
    print(f"  {name}: {moved / t / 1e9:.1f} GB/s", flush=True)
  # a copy XLA elided, or slower than an elementwise kernel: the faster of the two is what HBM allows
  res["copy_bandwidth"] = max(res["copy"]["bandwidth"], res["negate"]["bandwidth"])
  res["read_bandwidth"] = res["read"]["bandwidth"]
  return res


def decode_inputs(run: Run, L: int, retention: float, dtype, *, copies: int = 1, seed: int = 0):
  """Selections of every row, block lists, and `copies` sets of fresh q/K/V at context L."""
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  rng = np.random.default_rng([a.seed, L, round(retention * 1000)])
  sels = [decode_selection(rng, L, retention, a) for _ in range(B)]
  mask = np.stack([s["mask"] for s in sels])
  bs = a.decode_block
  touched = mask.reshape(B, L // bs, bs).any(-1)
  n = touched.sum(-1).astype(np.int32)
  ids = np.zeros((B, max(1, int(n.max()))), np.int32)
  for b in range(B):
    nz = np.nonzero(touched[b])[0]
    ids[b, :len(nz)] = nz
  Ns = max(len(s["span_len"]) for s in sels)
  span_start = np.zeros((B, Ns), np.int32)
  span_len = np.zeros((B, Ns), np.int32)
  for b, s in enumerate(sels):
    span_start[b, :len(s["span_len"])] = s["span_start"]
    span_len[b, :len(s["span_len"])] = s["span_len"]
  used = span_len.sum(-1).astype(np.int32)
  base = 1000 * seed + 10
  q = normal(base, (B, H, D), dtype)
  kv = [(normal(base + 2 * i + 1, (B, L, K, D), dtype), normal(base + 2 * i + 2, (B, L, K, D), dtype))
        for i in range(copies)]
  return dict(sels=sels, mask=jnp.asarray(mask), ids=jnp.asarray(ids), n=jnp.asarray(n), n_listed=int(n.sum()),
              span_start=jnp.asarray(span_start), span_len=jnp.asarray(span_len), used=jnp.asarray(used),
              W=int(-(-int(used.max()) // WORK_BLOCK) * WORK_BLOCK),
              open_start=jnp.asarray([s["open_start"] for s in sels], jnp.int32),
              open_ok=jnp.asarray(np.arange(a.chunk_max)[None] < np.array([s["open_len"] for s in sels])[:, None]),
              retention=float(mask.sum() / mask.size), top_k=int(np.mean([s["top_k"] for s in sels])), q=q, kv=kv)


def compacted_inputs(run: Run, d: dict, copy: int):
  """The working buffer (gathered by the gather under test) and the open chunk's window, for one K/V copy."""
  k, v = d["kv"][copy]
  gexe, _ = run.compile("gather", gather, (k, v, d["span_start"], d["span_len"]), budget=d["W"],
                        interpret=run.interpret)
  wk, wv, wok = gexe(k, v, d["span_start"], d["span_len"])
  oexe, _ = run.compile("open_window", open_window, (k, v, d["open_start"]), size=run.args.chunk_max)
  ok_, ov = oexe(k, v, d["open_start"])
  return (d["q"], wk, wv, wok, d["used"], ok_, ov, d["open_ok"])


def case_dense_decode(run: Run, L: int) -> dict:
  """Dense decode of one query per row over all L keys, each baseline on its own (a failure is recorded)."""
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  copies = n_copies(run, 2 * B * L * K * D * dt.itemsize)
  q = normal(7, (B, H, D), dt)
  kv = [(normal(8 + 2 * i, (B, L, K, D), dt), normal(9 + 2 * i, (B, L, K, D), dt)) for i in range(copies)]
  pos = jnp.full((B,), L - 1, jnp.int32)
  scale = D ** -0.5
  baselines = [("decode_attention", dense_decode_model, dict(scale=scale), True),
               ("jax.nn xla", dense_decode_nn, dict(scale=scale, implementation="xla"), False)]
  if run.platform == "gpu":
    baselines.append(("jax.nn cudnn", dense_decode_nn, dict(scale=scale, implementation="cudnn"), False))
  res = dict(context=L, bytes=2 * B * L * K * D * dt.itemsize, baselines={})
  ref = None
  for name, fn, kw, with_pos in baselines:
    try:
      extra = (pos,) if with_pos else ()
      exe, cs = run.compile(name, fn, (q, *kv[0], *extra), **kw)
      m = run.measure(exe, [(q, k, v, *extra) for k, v in kv])
      out = exe(q, *kv[0], *extra)
      ref = out if ref is None else ref
      m.update(compile_s=cs, err_vs_decode_attention=float(rel_err(out, ref)))
      res["baselines"][name] = m
      print(f"  dense {name}: {m['time_s'] * 1e6:.1f} us ({m['timer']})", flush=True)
    except Exception as e:  # noqa: BLE001
      res["baselines"][name] = dict(error=short(e))
      run.notes.append(f"dense decode {name} at {L}: {short(e)}")
  return res


def case_decode(run: Run, L: int, retention: float) -> dict:
  """The chunk decode paths at context L and one retention, every n_splits; gather; bytes and bandwidth."""
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, K, D = a.batch, a.kv_heads, a.head_dim
  tok_bytes = 2 * K * D * dt.itemsize  # K and V of one token
  d = decode_inputs(run, L, retention, dt, copies=n_copies(run, B * L * tok_bytes))
  scale = D ** -0.5
  res = dict(context=L, target_retention=retention, retention=d["retention"], top_k=d["top_k"],
             listed_blocks=d["n_listed"], all_blocks=B * L // a.decode_block, W=d["W"],
             used=float(np.mean(np.asarray(d["used"]))),
             bytes_inplace=d["n_listed"] * a.decode_block * tok_bytes,
             bytes_compacted=B * (d["W"] + a.chunk_max) * tok_bytes,
             bytes_gather=int(np.asarray(d["used"]).sum() + B * d["W"]) * tok_bytes,
             bytes_dense=B * L * tok_bytes, inplace={}, compacted={})
  base = (d["q"],)
  where = f"{L}/{retention:.0%}"
  for ns in a.n_splits:
    res["inplace"][str(ns)] = timed_path(
        run, f"in place n_splits={ns}", where, "decode_inplace", decode_inplace,
        [(*base, k, v, d["ids"], d["n"], d["mask"]) for k, v in d["kv"]], res["bytes_inplace"], scale=scale,
        block_size=a.decode_block, n_splits=ns, interpret=run.interpret, backend=run.backend)
  # the per-head rule: each KV head's slots read in place (the kernel on GPU), against the XLA gather of them
  slots = per_head_slots(d["mask"], K, WORK_BLOCK)
  res.update(bytes_per_head=int(np.asarray(slots[2]).sum()) * tok_bytes // K, per_head={})
  per_head_calls = [(*base, k, v, *slots) for k, v in d["kv"]]
  for ns in a.n_splits:
    res["per_head"][str(ns)] = timed_path(
        run, f"per head n_splits={ns}", where, "decode_per_head", decode_per_head, per_head_calls,
        res["bytes_per_head"], scale=scale, block_size=WORK_BLOCK, n_splits=ns, interpret=run.interpret,
        backend=run.backend)
  res["per_head_gathered"] = timed_path(run, "per head, XLA gather", where, "decode_per_head_gathered",
                                        decode_per_head_gathered, per_head_calls, res["bytes_per_head"], scale=scale)
  k0, v0 = d["kv"][0]
  gexe, gcs = run.compile("gather", gather, (k0, v0, d["span_start"], d["span_len"]), budget=d["W"],
                          interpret=run.interpret)
  g = run.measure(gexe, [(k, v, d["span_start"], d["span_len"]) for k, v in d["kv"]])
  g.update(compile_s=gcs, bandwidth=res["bytes_gather"] / g["time_s"])
  res["gather"] = g
  print(f"  gather (budget {d['W']}): {g['time_s'] * 1e6:.1f} us", flush=True)
  work = [compacted_inputs(run, d, i) for i in range(len(d["kv"]))]
  del d["kv"]
  for ns in a.n_splits:
    res["compacted"][str(ns)] = timed_path(
        run, f"compacted n_splits={ns}", where, "decode_compacted", decode_compacted, work, res["bytes_compacted"],
        scale=scale, block=WORK_BLOCK, n_splits=ns, interpret=run.interpret, backend=run.backend)
  return res


def timed_path(run: Run, label: str, where: str, name: str, fn, calls: list, nbytes: int, **kw) -> dict:
  """One decode path compiled (on `calls[0]`) and timed over `calls`, with its bandwidth (`nbytes` / time); a
  failure is recorded (and noted) rather than ending the case, so that the other paths are still measured."""
  try:
    exe, cs = run.compile(name, fn, calls[0], **kw)
    m = run.measure(exe, calls)
  except Exception as e:  # noqa: BLE001
    run.notes.append(f"decode {label} at {where}: {short(e)}")
    return dict(error=short(e))
  print(f"  {label}: {m['time_s'] * 1e6:.1f} us", flush=True)
  return dict(m, compile_s=cs, bandwidth=nbytes / m["time_s"])


def prefill_inputs(run: Run, T: int, retention: float, mode: str, dtype, seed: int = 0):
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  lay = prefill_layout(np.random.default_rng([a.seed, T, round(retention * 1000), mode == "random"]), T,
                       retention, mode, a)
  chunk_id = jnp.asarray(np.broadcast_to(lay["chunk_id"], (B, T)))
  sel = jnp.asarray(lay["sel"])[chunk_id]  # [B, T, N]: each token's chunk's selections
  kw = dict(block_q=a.prefill_block_q, block_k=a.prefill_block_k, n_sink=a.n_sink, n_local=lay["n_local"])
  lexe, _ = run.compile("prefill_block_lists", cpa.prefill_block_lists, (chunk_id, sel), **kw,
                        max_chunks=lay["n_chunks"] + 1)
  ids, n = lexe(chunk_id, sel)
  base = 1000 * seed + 500
  q, k, v = (normal(base, (B, T, H, D), dtype), normal(base + 1, (B, T, K, D), dtype),
             normal(base + 2, (B, T, K, D), dtype))
  return lay, kw, (q, k, v, ids, n, chunk_id, sel)


def case_prefill(run: Run, T: int, retention: float, mode: str) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  lay, kw, args = prefill_inputs(run, T, retention, mode, dt)
  lexe, _ = run.compile("prefill_block_lists", cpa.prefill_block_lists, (args[5], args[6]), **kw,
                        max_chunks=lay["n_chunks"] + 1)
  lists = run.measure(lexe, [(args[5], args[6])])
  exe, cs = run.compile("prefill", prefill, args, scale=a.head_dim ** -0.5, **kw, interpret=run.interpret,
                        backend=run.backend)
  print(f"  compiled in {cs:.1f} s ({lay['n_sel']} selection columns)", flush=True)
  m = run.measure(exe, [args])
  pairs = a.batch * causal_block_pairs(T, a.prefill_block_q, a.prefill_block_k)
  print(f"  prefill kernel: {m['time_s'] * 1e3:.2f} ms, block lists {lists['time_s'] * 1e3:.2f} ms", flush=True)
  return dict(context=T, target_retention=retention, selection=mode if retention < 1 else "all",
              retention=lay["retention"], n_chunks=lay["n_chunks"], n_sel=lay["n_sel"], n_local=lay["n_local"],
              blocks_read=float(np.asarray(args[4]).sum() / pairs), kernel=dict(m, compile_s=cs), lists=lists)


def dense_prefill_impl(run: Run) -> str:
  return {"gpu": "cudnn", "tpu": "pallas_tpu_flash"}.get(run.platform, "xla")


def case_dense_prefill(run: Run, T: int) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  q, k, v = normal(21, (B, T, H, D), dt), normal(22, (B, T, K, D), dt), normal(23, (B, T, K, D), dt)
  impl = dense_prefill_impl(run)
  exe, cs = run.compile("dense_prefill", dense_prefill, (q, k, v), scale=D ** -0.5, implementation=impl)
  m = run.measure(exe, [(q, k, v)])
  print(f"  dense flash ({impl}): {m['time_s'] * 1e3:.2f} ms", flush=True)
  return dict(context=T, implementation=impl, dense=dict(m, compile_s=cs))


def distill_inputs(run: Run, T: int, dtype, seed: int = 0):
  a = run.args
  B, H, K, D = a.batch, a.heads, a.kv_heads, a.head_dim
  lay = prefill_layout(np.random.default_rng([a.seed, T, 7]), T, 1.0, "consistent", a)
  chunk_id = jnp.asarray(np.broadcast_to(lay["chunk_id"], (B, T)))
  base = 1000 * seed + 700
  q, k, v = (normal(base, (B, T, H, D), dtype), normal(base + 1, (B, T, K, D), dtype),
             normal(base + 2, (B, T, K, D), dtype))
  kw = dict(scale=D ** -0.5, max_chunks=lay["n_chunks"] + 1, n_sink=a.n_sink, block_q=a.distill_block_q,
            block_k=a.distill_block_k)
  return kw, (q, k, v, chunk_id)


def case_distill(run: Run, T: int) -> dict:
  a = run.args
  dt = jnp.dtype(a.dtype)
  kw, args = distill_inputs(run, T, dt)
  exe, cs = run.compile("distill", distill, args, **kw, interpret=run.interpret, backend=run.backend)
  m = run.measure(exe, [args])
  impl = dense_prefill_impl(run)
  res = dict(context=T, max_chunks=kw["max_chunks"], kernel=dict(m, compile_s=cs), implementation=impl)
  print(f"  distill kernel: {m['time_s'] * 1e3:.2f} ms", flush=True)
  try:
    dexe, dcs = run.compile("dense_prefill", dense_prefill, args[:3], scale=kw["scale"], implementation=impl)
    res["dense"] = dict(run.measure(dexe, [args[:3]]), compile_s=dcs)
  except Exception as e:  # noqa: BLE001
    res["dense"] = dict(error=short(e))
    run.notes.append(f"dense flash at {T} (distill baseline): {short(e)}")
  return res


# ---------------------------------------------------------------------------------------------------------------
# Correctness


def precisions(run: Run):
  """(dtype, matmul precision) pairs to check. On a CPU f32 dots are exact at the default precision."""
  if run.interpret:
    return [("float32", None), ("bfloat16", None)]
  return [("float32", None), ("float32", "highest"), ("bfloat16", None)]


def judge(err: float, dtype: str, precision, run: Run) -> tuple[str, str]:
  bound = TOL[dtype]
  if err <= bound:
    return "pass", ""
  if dtype == "float32" and precision is None and not run.interpret and err <= FLAG_BOUND:
    why = "TF32 dots (Triton's default f32 precision)" if run.family == "gpu" else "bf16-pass f32 dots (TPU default)"
    return "flag", f"above {bound:g} at the default precision: {why}; the 'highest' row decides"
  return "fail", ""


def check_record(run, kernel, dtype, precision, shape, parts: dict) -> dict:
  err = max(parts.values())
  status, why = judge(err, dtype, precision, run)
  return dict(kernel=kernel, impl=run.impl(kernel), dtype=dtype, precision=precision or "default", shape=shape,
              err=err, parts=parts, bound=TOL[dtype], verdict=status, why=why)


def check_decode(run: Run, dtype: str, precision) -> dict:
  """In place (every n_splits) and compacted against the reference over the same visible tokens."""
  a = run.args
  L, r = max(a.contexts), min(a.retentions)
  d = decode_inputs(run, L, r, dtype, seed=1)
  k, v = d["kv"][0]
  scale = a.head_dim ** -0.5
  args = (d["q"], k, v, d["ids"], d["n"], d["mask"])
  rexe, _ = run.compile("decode_reference", cda.chunk_decode_attention_reference, args, precision="highest",
                        scale=scale, block_size=a.decode_block)
  ref = rexe(*args)
  parts = {}
  work = compacted_inputs(run, d, 0)
  for ns in a.n_splits:
    exe, _ = run.compile("decode_inplace", decode_inplace, args, precision=precision, scale=scale,
                         block_size=a.decode_block, n_splits=ns, interpret=run.interpret, backend=run.backend)
    parts[f"in place, n_splits={ns}"] = float(rel_err(exe(*args), ref))
    exe, _ = run.compile("decode_compacted", decode_compacted, work, precision=precision, scale=scale,
                         block=WORK_BLOCK, n_splits=ns, interpret=run.interpret, backend=run.backend)
    parts[f"compacted, n_splits={ns}"] = float(rel_err(exe(*work), ref))
    per_head = (*args[:3], *per_head_slots(d["mask"], a.kv_heads, WORK_BLOCK))
    exe, _ = run.compile("decode_per_head", decode_per_head, per_head, precision=precision, scale=scale,
                         block_size=WORK_BLOCK, n_splits=ns, interpret=run.interpret, backend=run.backend)
    parts[f"per head, n_splits={ns}"] = float(rel_err(exe(*per_head), ref))
  shape = f"B={a.batch} S={L} H={a.heads} K={a.kv_heads} D={a.head_dim}, {d['retention']:.0%} visible"
  return check_record(run, "decode", dtype, precision, shape, parts)


def check_gather(run: Run, dtype: str) -> dict:
  """The gather against numpy: span by span, token rows copied in order, zeros after."""
  a = run.args
  L, r = max(a.contexts), min(a.retentions)
  d = decode_inputs(run, L, r, dtype, seed=2)
  k, v = d["kv"][0]
  exe, _ = run.compile("gather", gather, (k, v, d["span_start"], d["span_len"]), budget=d["W"],
                       interpret=run.interpret)
  gk, gv, valid = exe(k, v, d["span_start"], d["span_len"])
  kn, vn = np.asarray(k, np.float32), np.asarray(v, np.float32)
  want_k = np.zeros((a.batch, d["W"], *kn.shape[2:]), np.float32)
  want_v = np.zeros_like(want_k)
  want_valid = np.zeros((a.batch, d["W"]), bool)
  for b, s in enumerate(d["sels"]):
    idx = np.concatenate([np.arange(st, st + ln) for st, ln in zip(s["span_start"], s["span_len"])])[:d["W"]]
    want_k[b, :len(idx)], want_v[b, :len(idx)], want_valid[b, :len(idx)] = kn[b, idx], vn[b, idx], True
  parts = {"k": float(rel_err(gk, jnp.asarray(want_k))), "v": float(rel_err(gv, jnp.asarray(want_v))),
           "valid": float(np.any(np.asarray(valid) != want_valid))}
  shape = f"B={a.batch} S={L} K={a.kv_heads} D={a.head_dim}, budget {d['W']}"
  return check_record(run, "gather", dtype, None, shape, parts)


def check_prefill(run: Run, dtype: str, precision) -> dict:
  a = run.args
  T, r, mode = check_context(run, a.prefill_block_q, a.prefill_block_k), min(a.retentions), a.prefill_selection[0]
  lay, kw, args = prefill_inputs(run, T, r, mode, dtype, seed=3)
  scale = a.head_dim ** -0.5
  rexe, _ = run.compile("prefill_reference", cpa.chunk_prefill_attention_reference, args, precision="highest",
                        scale=scale, **kw)
  exe, _ = run.compile("prefill", prefill, args, precision=precision, scale=scale, **kw, interpret=run.interpret,
                       backend=run.backend)
  shape = (f"B={a.batch} T={T} H={a.heads} K={a.kv_heads} D={a.head_dim}, {mode} {lay['retention']:.0%}, "
           f"{lay['n_sel']} selection columns")
  return check_record(run, "prefill", dtype, precision, shape, {"o": float(rel_err(exe(*args), rexe(*args)))})


def check_distill(run: Run, dtype: str, precision) -> dict:
  a = run.args
  T = check_context(run, a.distill_block_q, a.distill_block_k)
  kw, args = distill_inputs(run, T, dtype, seed=4)
  rexe, _ = run.compile("distill_reference", dsa.distill_attention_reference, args, precision="highest", **kw)
  exe, _ = run.compile("distill", distill, args, precision=precision, **kw, interpret=run.interpret,
                       backend=run.backend)
  (o, p), (ro, rp) = exe(*args), rexe(*args)
  shape = f"B={a.batch} T={T} H={a.heads} K={a.kv_heads} D={a.head_dim}, {kw['max_chunks']} chunks"
  return check_record(run, "distill", dtype, precision, shape, {"o": float(rel_err(o, ro)), "P": float(rel_err(p, rp))})


def check_context(run: Run, bq: int, bk: int) -> int:
  """--check-context, cut to the largest benchmarked context and rounded to whole blocks."""
  a = run.args
  T = min(a.check_context, max(a.prefill_contexts or a.contexts))
  step = math.lcm(bq, bk)
  return max(step, T // step * step)
