"""How many keys each step of the dense decode loop should fold (`attention.DECODE_BLOCKS`).

  python bench/decode_block.py --contexts 8192 32768 --blocks batched:256 256 1024,256 2048,256 4096,256

Each candidate is a list of block sizes, largest first (the loop takes the largest blocks that fit
and then smaller ones). `batched:N` is the loop decode ran before the packed query: blocks of N
keys, each folded by the batched `attention.scores` / `attention.fold`, which put the kv-head
axis in front of the keys; it is kept here so that before and after run side by side.
`headmajor:N` is a candidate layout, not the buffer's: K/V stored [L, B, K, S, D] (each kv head's
keys contiguous), blocks of N keys, each head's G queries times its [N, D] keys in one batched
matmul, no transpose and no packed zeros; it answers whether another buffer layout would pay.
One decode query per layer over a stacked K/V buffer of smollm2-135m's shape (30 layers, 9 heads /
3 KV heads, head_dim 64, float32), as `kv_cache.decode_step` reads it: `attention.decode_attention`
under a scan over the layers. Each block size is its own compiled program; the programs run
interleaved, and the medians are printed with the K/V bytes read per second. Small blocks keep a
tile of scores and its keys in cache; large ones run fewer loop steps and larger matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chunkllm_jax import attention  # noqa: E402

N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def batched_decode(q_B1HD, k_LBSKD, v_LBSKD, layer, pos_B, block: int):
  """Decode attention as it ran before the packed query: blocks of `block` keys, batched fold."""
  B, S, K, D = k_LBSKD.shape[1:]
  q = attention.split_heads(q_B1HD, K)

  def body(i, carry):
    kb = jax.lax.dynamic_slice(k_LBSKD, (layer, 0, i * block, 0, 0), (1, B, block, K, D))[0]
    vb = jax.lax.dynamic_slice(v_LBSKD, (layer, 0, i * block, 0, 0), (1, B, block, K, D))[0]
    ok = (i * block + jnp.arange(block)[None] <= pos_B[:, None])[:, None, None, None]
    return attention.fold(carry, attention.scores(q, kb, ok, scale=HEAD_DIM**-0.5), ok, vb)

  carry = jax.lax.fori_loop(0, jnp.max(pos_B) // block + 1, body, attention.fold_init(*q.shape))
  return attention.merge_heads(attention.fold_finish(carry)[0])


def headmajor_decode(q_B1HD, k_LBKSD, v_LBKSD, layer, pos_B, block: int):
  """Decode attention over a head-major buffer [L, B, K, S, D]: blocks of `block` keys, each folded
  by the project's online softmax (`attention.softmax_step`) with its two products on that layout."""
  B, K, S, D = k_LBKSD.shape[1:]
  q = attention.split_heads(q_B1HD, K)  # [B, K, G, 1, D]

  def body(i, carry):
    kb = jax.lax.dynamic_slice(k_LBKSD, (layer, 0, 0, i * block, 0), (1, B, K, block, D))[0]
    vb = jax.lax.dynamic_slice(v_LBKSD, (layer, 0, 0, i * block, 0), (1, B, K, block, D))[0]
    ok = (i * block + jnp.arange(block) <= pos_B[:, None])[:, None, None, None]
    s = jnp.where(ok, jnp.einsum("bkgqd,bksd->bkgqs", q, kb) * HEAD_DIM**-0.5, attention.NEG_INF)
    m_new, corr, p, l_new = attention.softmax_step(carry.m, carry.l, s, ok)
    return attention.Fold(m_new, l_new, carry.acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p, vb))

  carry = jax.lax.fori_loop(0, jnp.max(pos_B) // block + 1, body, attention.fold_init(*q.shape))
  return attention.merge_heads(attention.fold_finish(carry)[0])


@contextlib.contextmanager
def decode_blocks_set(blocks):
  """`attention.DECODE_BLOCKS` set to `blocks` while a program is traced (None: left as it is)."""
  old = attention.DECODE_BLOCKS
  attention.DECODE_BLOCKS = blocks or old
  try:
    yield
  finally:
    attention.DECODE_BLOCKS = old


def program(blocks, context: int):
  """Decode attention of every layer at position context - 1, reading keys in blocks of `blocks`
  (or by `batched_decode` for ("batched", N))."""
  pos = jnp.array([context - 1])

  def run(q, k, v):
    def layer(carry, i):
      if blocks[0] == "batched":
        out = batched_decode(q + carry, k, v, i, pos, blocks[1])
      elif blocks[0] == "headmajor":
        out = headmajor_decode(q + carry, k, v, i, pos, blocks[1])
      else:
        out = attention.decode_attention(q + carry, k, v, i, pos, attention.NO_WINDOW, scale=HEAD_DIM**-0.5)
      return carry + 0.0 * out.sum(), out

    with decode_blocks_set(blocks if isinstance(blocks[0], int) else None):  # read while tracing only
      return jax.lax.scan(layer, jnp.zeros(()), jnp.arange(N_LAYERS))[1]

  return jax.jit(run)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
  ap.add_argument("--blocks", nargs="+", default=["batched:256", "256", "1024,256", "2048,256", "4096,256"],
                  help="candidates: block sizes, comma-separated, largest first; batched:N the loop before; "
                       "headmajor:N a [L, B, K, S, D] buffer")
  ap.add_argument("--rounds", type=int, default=7)
  args = ap.parse_args(argv)
  try:
    args.blocks = [(c.split(":")[0], int(c.split(":")[1])) if ":" in c else tuple(int(b) for b in c.split(","))
                   for c in args.blocks]
  except ValueError:
    ap.error(f"--blocks takes block sizes (2048,256), batched:N or headmajor:N; got {' '.join(args.blocks)}")
  if any(b[0] not in ("batched", "headmajor") for b in args.blocks if isinstance(b[0], str)) or \
      min(n for b in args.blocks for n in b if isinstance(n, int)) < 1:
    ap.error(f"--blocks takes positive block sizes (2048,256), batched:N or headmajor:N; got {args.blocks}")
  if min(args.contexts) < 1 or args.rounds < 1:
    ap.error(f"--contexts and --rounds must be >= 1; got {args.contexts}, {args.rounds}")
  name = lambda b: f"{b[0]} {b[1]}" if isinstance(b[0], str) else ",".join(map(str, b))
  print(f"| context | blocks | ms per step (30 layers) | K/V GiB/s | vs {name(args.blocks[0])} |")
  print("|---:|---:|---:|---:|---:|")
  for context in args.contexts:
    shape = (N_LAYERS, 1, context, N_KV_HEADS, HEAD_DIM)
    k = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    v = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    q = jax.random.normal(jax.random.key(2), (1, 1, N_HEADS, HEAD_DIM), jnp.float32)
    kv_head_major = (jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3))  # the same keys, [L, B, K, S, D]
    inputs = {b: (q, *kv_head_major) if b[0] == "headmajor" else (q, k, v) for b in args.blocks}
    progs = {b: program(b, context) for b in args.blocks}
    ref = progs[args.blocks[0]](*inputs[args.blocks[0]])
    for b, f in progs.items():  # every candidate computes the same attention
      err = float(jnp.max(jnp.abs(f(*inputs[b]) - ref)))
      assert err < 1e-4, (name(b), err)
    times = {b: [] for b in args.blocks}
    for _ in range(args.rounds):
      for b, f in progs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*inputs[b]))
        times[b].append(time.perf_counter() - t0)
    first = statistics.median(times[args.blocks[0]])
    for b in args.blocks:
      m = statistics.median(times[b])
      print(f"| {context} | {name(b)} | {m * 1e3:.1f} | {2 * k.nbytes / m / 2**30:.1f} | {first / m:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
