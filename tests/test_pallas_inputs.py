"""Every kernel's dispatcher names bad operands at the door, on each of its paths (the jnp reference, the
Pallas kernel and the GPU kernel, interpreted): each path refuses what the others refuse, where a kernel
and its reference used to disagree (an int mask of 2 was visible to the kernel and `&`-ed away by the
reference) or fail deep in lowering (K and V of two dtypes)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import chunk_decode_attention as cda
from pallas_kernels import chunk_prefill_attention as cpa
from pallas_kernels import distill_attention as da
from pallas_kernels import gather_chunks as gc
from pallas_kernels import head_decode_attention as hda

PATHS = {"xla": dict(), "pallas": dict(interpret=True), "gpu": dict(interpret=True, backend="gpu")}
B, S, K, G, D, BS = 2, 64, 2, 2, 16, 16


def decode(bad, path):
  q, k = jnp.ones((B, K * G, D)), jnp.ones((B, S, K, D))
  mask = jnp.ones((B, S), bool)
  ids, n = cda.decode_block_list(mask, block_size=BS)
  args = dict(q=q, k=k, v=k, ids=ids, n=n, mask=mask)
  args.update(bad)
  return cda.chunk_decode_attention(args["q"], args["k"], args["v"], args["ids"], args["n"], args["mask"],
                                    scale=0.25, block_size=BS, **PATHS[path])


def prefill(bad, path):
  q, k = jnp.ones((B, S, K * G, D)), jnp.ones((B, S, K, D))
  cid = jnp.broadcast_to(jnp.arange(S) // 8, (B, S)).astype(jnp.int32)
  sel = jnp.zeros((B, S, 1), jnp.int32)
  blocks, n = cpa.prefill_block_lists(cid, sel, block_q=BS, block_k=BS, n_sink=4, n_local=1, max_chunks=8)
  args = dict(q=q, k=k, v=k, blocks=blocks, n=n, cid=cid, sel=sel)
  args.update(bad)
  return cpa.chunk_prefill_attention(*args.values(), scale=0.25, block_q=BS, block_k=BS, n_sink=4, n_local=1,
                                     **PATHS[path])


def distill(bad, path):
  q, k = jnp.ones((B, S, K * G, D)), jnp.ones((B, S, K, D))
  args = dict(q=q, k=k, v=k, cid=jnp.broadcast_to(jnp.arange(S) // 8, (B, S)).astype(jnp.int32))
  args.update(bad)
  return da.distill_attention(*args.values(), scale=0.25, max_chunks=8, n_sink=4, block_q=BS, block_k=BS,
                              **PATHS[path])


def head(bad, path):
  W = 8
  args = dict(q=jnp.ones((B, K, G, D)), k=jnp.ones((B * S * K, D)), v=jnp.ones((B * S * K, D)),
              rows=jnp.zeros((B, K, W), jnp.int32), ok=jnp.ones((B, K, W), bool), used=jnp.full((B, K), W, jnp.int32))
  args.update(bad)
  return hda.head_decode_partials(*args.values(), scale=0.25, **PATHS[path])


def gather(bad, path):
  args = dict(k=jnp.ones((B, S, K, D)), v=jnp.ones((B, S, K, D)), src=jnp.zeros((B, 16), jnp.int32))
  args.update(bad)
  return gc.gather_rows(*args.values(), interpret=path != "xla")


RUN_HEAD, RUN_GATHER = ("xla", "gpu"), ("xla", "pallas")  # head: a GPU kernel alone; gather: none
CASES = [  # kernel, its paths, the bad operands, what the error names
    (decode, PATHS, dict(mask=jnp.full((B, S), 2, jnp.int32)), "token_mask must be a bool mask, not int32"),
    (decode, PATHS, dict(v=jnp.ones((B, S, K, D), jnp.bfloat16)),
     "k and v must share a dtype, not float32 and bfloat16"),
    (decode, PATHS, dict(ids=jnp.zeros((B, S // BS), jnp.float32)), "block_ids must be an integer array, not float32"),
    (decode, PATHS, dict(q=jnp.ones((B, K * G, D), jnp.int32)), "q must be a floating array, not int32"),
    (decode, PATHS, dict(q=jnp.ones((B, 3, D))), "3 query heads do not group over 2 KV heads"),
    (prefill, PATHS, dict(v=jnp.ones((B, S, K, D), jnp.bfloat16)), "k and v must share a dtype"),
    (prefill, PATHS, dict(sel=jnp.zeros((B, S, 1), jnp.float32)), "sel must be an integer array, not float32"),
    (distill, PATHS, dict(cid=jnp.zeros((B, S), jnp.float32)), "chunk_id must be an integer array, not float32"),
    (distill, PATHS, dict(k=jnp.ones((B, S, K, D), jnp.int8), v=jnp.ones((B, S, K, D), jnp.int8)),
     "k must be a floating array, not int8"),
    (head, RUN_HEAD, dict(ok=jnp.ones((B, K, 8), jnp.int32)), "ok must be a bool mask, not int32"),
    (head, RUN_HEAD, dict(v=jnp.ones((B * S * K, D), jnp.bfloat16)), "k and v must share a dtype"),
    (gather, RUN_GATHER, dict(src=jnp.zeros((B, 16), jnp.float32)), "src must be an integer array"),
    (gather, RUN_GATHER, dict(v=jnp.ones((B, S, K, D), jnp.bfloat16)), "k and v must share a dtype"),
]


BAD = [pytest.param(call, path, bad, says, id=f"{call.__name__}-{path}-{says.split()[0]}")
       for call, paths, bad, says in CASES for path in paths]
RUNS = {decode: PATHS, prefill: PATHS, distill: PATHS, head: RUN_HEAD, gather: RUN_GATHER}


@pytest.mark.parametrize("call, path, bad, says", BAD)
def test_bad_operands_are_named_on_every_path(call, path, bad, says):
  with pytest.raises((TypeError, ValueError), match=says):
    call(bad, path)


@pytest.mark.parametrize("call, path", [(call, path) for call, paths in RUNS.items() for path in paths],
                         ids=lambda x: getattr(x, "__name__", x))
def test_the_same_calls_run_with_good_operands(call, path):
  """The cases above differ from a call every path runs in the bad operands alone."""
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(call({}, path)))
