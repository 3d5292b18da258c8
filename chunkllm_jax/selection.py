"""Chunk selection: which completed chunks the sparse layers read.

Two rules (`ChunkConfig.selection`). The default, "kv_head", has each KV head of each sparse layer choose
at every decode step from an estimate of its own query's attention over the chunks (`chunk_mass`,
`sparq_chunk_mass`, `lowrank_chunk_mass` here; the decode side in `head_selection.py`). The paper's
rule, "shared", chooses only at chunk boundaries, as follows. At a boundary the *selection layers*
score the candidate chunks (every completed chunk but the `n_local` most recent, which are always
read), each layer gives a distribution over the candidates, the layers vote (`vote="sum"` or
`"max"`), and one selection serves every sparse layer. Two scorers give the per-layer distributions:

- `scorer="adapter"`: the QK Adapters, softmax_j(q~ . k~_j / sqrt(d_c)) over the candidates, for the
  q~ of each of the last `score_queries` tokens (as the adapters were trained: 1, the boundary token
  alone, unless their export says more); then the max over those queries;
- `scorer="attention"`: the frozen model's own attention, with no training: for each of the last
  `score_queries` tokens' queries and each head, the softmax over the candidates' tokens, summed
  within each chunk; then the max over queries and heads. The max over heads keeps the few
  retrieval heads from being drowned by the many that look at sinks and recent text; the max over
  the recent queries lets the tokens that ask (a question, a name) choose, not only the boundary
  token, whose own attention is mostly local (docs/selection.md has the measurements). It reads
  the selection layers' K once per boundary.

What is kept is set either by a chunk count (`top_chunks`, the paper's rule) or by a KV budget
(`kv_budget`, a fraction of the tokens seen, or `kv_budget_tokens`): chunks are taken in score
order while the sinks, the local chunks, the open chunk and the taken chunks fit the budget (then a
few passes over the chunks left out fill what remains), so the measured retention lands within a
chunk under the target instead of following chunk lengths.

Rows of scores are "boundary rows": decode has one per sequence (the boundary token's query), the
prefill one per chunk of the prompt. Both go through the same functions below.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from chunkllm_jax import attention as attn
from chunkllm_jax.adapters import chunk_scores
from chunkllm_jax.chunk_config import SKETCH_ESTIMATES, SKETCH_WORD, ChunkConfig

# ----------------------------------------------------------------------------------------------
# Per-layer distributions over the candidates, for rows of boundary queries


def adapter_probs(q_BRd, chunk_key_BCd, n_cand_BR, *, chunk_end_BC=None, q_pos_BR=None):
  """QK-Adapter distribution: softmax_j(q~ . k~_j / sqrt(d_c)) over chunks j < n_cand. [B, R, C].
  With `q_pos_BR`, a query scores only the chunks that end at or before it (a row with a negative
  position, no such query, scores 0), as the attention scorer's queries read no later key."""
  cand = jnp.arange(chunk_key_BCd.shape[1]) < n_cand_BR[..., None]
  if q_pos_BR is not None:
    cand = cand & (chunk_end_BC[:, None, :] <= q_pos_BR[..., None])
  return jnp.where(cand, jax.nn.softmax(chunk_scores(q_BRd, chunk_key_BCd, cand), axis=-1), 0.0)


def adapter_window_probs(q_BRQd, chunk_key_BCd, chunk_end_BC, n_cand_BR, q_pos_BRQ):
  """The adapter scorer over a window of queries: per row, `adapter_probs` of each of its Q queries
  (at positions `q_pos_BRQ`, < 0 where there is none), then the max over them. [B, R, C].
  With one query at the row's boundary this is `adapter_probs`."""
  B, R, Q, d = q_BRQd.shape
  p = adapter_probs(q_BRQd.reshape(B, R * Q, d), chunk_key_BCd, jnp.repeat(n_cand_BR, Q, axis=1),
                    chunk_end_BC=chunk_end_BC, q_pos_BR=q_pos_BRQ.reshape(B, R * Q))
  return p.reshape(B, R, Q, -1).max(2)


HEAD_REDUCTIONS = ("max", "mean")


KEY_BLOCK = 512  # keys per step of the chunk-mass fold: one block's scores are live, not the whole buffer's


def chunk_mass(q_BKGQD, k_BTKD, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, softcap: float | None = None,
               key_block: int = KEY_BLOCK, layer=None):
  """Per query head, each query's softmax over the keys [n_sink, hi] summed within each chunk (the
  chunks ending at `ends_BC`, contiguous from `n_sink`): float32 [B, K, G, Q, C]; a query with no key
  (hi < n_sink) gives zeros. `hi_BKGQ` broadcasts to [B, K, G, Q].

  An online softmax over key blocks, as `attention.fold`: a chunk's mass is a difference of the
  running prefix sum of the probabilities, taken at the chunk ends inside each block and rescaled
  with the softmax as it goes. Only the blocks up to the largest `hi` are read, and only one block's
  scores are live (the whole buffer's, at 32K tokens and 16 queries, were 19 MiB a copy). The last
  block is clamped inside the buffer, its already folded keys masked, so the keys are never padded
  (a copy of a layer's K). With `layer`, `k_BTKD` is the stacked buffer [L, B, T, K, D] and the
  blocks are sliced straight out of it: `buf[layer]` would be a copy of the layer (25 MiB at 32K)."""
  if layer is None:
    k_BTKD, layer = k_BTKD[None], 0
  B, K, G, Q, D = q_BKGQD.shape
  T, C = k_BTKD.shape[2], ends_BC.shape[1]
  kb = min(key_block, T)
  hi = jnp.broadcast_to(hi_BKGQ, (B, K, G, Q))
  top = hi.max()
  n_blocks = jnp.where(top >= n_sink, top // kb + 1, 0)

  def fold_keys(j, carry):
    m, l, run, at_end = carry
    start = jnp.minimum(j * kb, T - kb)
    t = start + jnp.arange(kb)
    ok = (t >= j * kb) & (t >= n_sink) & (t <= hi[..., None])
    k_blk = jax.lax.dynamic_slice(k_BTKD, (layer, 0, start, 0, 0), (1, B, kb, K, D))[0]
    s = attn.scores(q_BKGQD, k_blk, ok, scale=scale, softcap=softcap)
    m, corr, p, l = attn.softmax_step(m, l, s, ok)
    cum = run[..., None] * corr[..., None] + jnp.cumsum(p, axis=-1)  # prefix sums from position 0
    e = ends_BC - start  # [B, C]: chunk ends, relative to this block
    here = ((ends_BC >= j * kb) & (e < kb))[:, None, None, None, :]
    got = jnp.take_along_axis(cum, jnp.clip(e, 0, kb - 1)[:, None, None, None, :], axis=-1)
    return m, l, cum[..., -1], at_end * corr[..., None] + jnp.where(here, got, 0.0)

  zeros = jnp.zeros((B, K, G, Q), jnp.float32)
  _, l, _, at_end = jax.lax.fori_loop(0, n_blocks, fold_keys, (jnp.full((B, K, G, Q), attn.NEG_INF, jnp.float32),
                                                               zeros, zeros, jnp.zeros((B, K, G, Q, C), jnp.float32)))
  at_end = at_end / jnp.where(l > 0, l, 1.0)[..., None]
  return at_end - jnp.pad(at_end[..., :-1], [(0, 0)] * 4 + [(1, 0)])


CACHE_LINE = 64  # bytes: what memory moves at a time, on CPUs and (as 32-byte sectors, pairs of them) GPUs


def key_read_share(head_dim: int, itemsize: int, rank: int | None = None) -> float:
  """The share of K's bytes that a score reading `rank` of each key's dimensions (None: all) moves
  from memory. Keys lie [S, K, D], a key's dimensions in a few cache lines, and SparQ's dimensions
  (chosen by |q|, anywhere in the row) touch up to `rank` of them: counted as min(rank, lines) of
  the lines. At 64-dimension float32 keys (4 lines) 16 dimensions read every line, so on this
  layout SparQ saves the multiply-adds, not the reads (SparQ keeps a second, dimension-major copy of
  K for that)."""
  lines = max(head_dim * itemsize // CACHE_LINE, 1)
  return 1.0 if rank is None else min(rank, lines) / lines


def score_read_share(head_dim: int, itemsize: int, rank: int | None, estimate: str = "sparq",
                     sketch_bits: int = 0) -> float:
  """What a per-head step reads to score, as a share of the KV of the tokens it scores: all of K
  (exact), the cache lines of K that SparQ's dimensions touch (`key_read_share`), or the low-rank
  keys (rank + 1 of D coordinates a key, contiguous) and their `sketch_bits` of residual sketch."""
  if rank is not None and estimate == "lowrank":
    return (rank + 1) / (2 * head_dim) + sketch_bits / 8 / (2 * head_dim * itemsize)
  return 0.5 * key_read_share(head_dim, itemsize, rank)


def sparq_chunk_mass(q_BKGQD, k_BTKD, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, rank: int, layer=None,
                     key_chunk_BT=None):
  """SparQ's estimate of `chunk_mass` from `rank` of K's dimensions: per KV head and query, the
  dimensions where the query heads that read it are largest in |q| summed (one slice of K serves the
  group); each head's logits over those dimensions at SparQ's temperature (`scale` over the square
  root of the share of its |q|_1 they keep); the softmax over the keys [n_sink, hi], summed within
  each chunk (0 for chunks ending before n_sink or past the keys). float32 [B, K, G, Q, C].
  With one query and `layer` (decode: `k_BTKD` is the stacked buffer) only those dimensions of K are
  read; otherwise the others are zeroed in q. The soft cap is not applied: the estimate ranks chunks,
  and the cap keeps the order of logits. `key_chunk_BT`: as `_mass_of_logits`'s."""
  q = q_BKGQD.astype(jnp.float32)
  B, K, G, Q, D = q.shape
  T = k_BTKD.shape[-3]
  strength_BKQD = jnp.abs(q).sum(2)
  total = jnp.maximum(jnp.abs(q).sum(-1), 1e-30)  # B K G Q
  if Q == 1 and layer is not None:
    dims_BKr = jax.lax.top_k(strength_BKQD[:, :, 0], rank)[1]
    q_r = jnp.take_along_axis(q[:, :, :, 0], dims_BKr[:, :, None], -1)  # B K G r
    k_r = k_BTKD[layer, jnp.arange(B)[:, None, None, None], jnp.arange(T)[None, :, None, None],
                 jnp.arange(K)[None, None, :, None], dims_BKr[:, None]]  # B T K r: the chosen dimensions only
    temp = scale / jnp.sqrt(jnp.maximum(jnp.abs(q_r).sum(-1) / total[..., 0], 1e-6))
    s = (jnp.einsum("bkgr,btkr->bkgt", q_r, k_r.astype(jnp.float32)) * temp[..., None])[:, :, :, None]
  else:
    if layer is not None:
      k_BTKD = k_BTKD[layer]
    kth = jax.lax.top_k(strength_BKQD, rank)[0][..., -1:]
    q_r = jnp.where((strength_BKQD >= kth)[:, :, None], q, 0.0)
    temp = scale / jnp.sqrt(jnp.maximum(jnp.abs(q_r).sum(-1) / total, 1e-6))
    s = jnp.einsum("bkgqd,btkd->bkgqt", q_r, k_BTKD.astype(jnp.float32)) * temp[..., None]
  return _mass_of_logits(s, hi_BKGQ, ends_BC, n_sink, key_chunk_BT)


def mass_by_segments() -> bool:
  """Whether decode sums each chunk's keys by a segment sum over their chunk ids (`_mass_of_logits` given
  `key_chunk_BT`: on the CPU, where the running sum over the keys took 3x as long, 3.1 ms against 1.0 ms
  for 9 rows of 32K keys) rather than as a difference of a running sum at the chunk ends (accelerators,
  whose scatter-adds serialise or race)."""
  return jax.default_backend() == "cpu"


def _mass_of_logits(s_BKGQT, hi_BKGQ, ends_BC, n_sink: int, key_chunk_BT=None):
  """Each query's softmax of estimated logits over the keys [n_sink, hi], summed within each chunk (0 for
  chunks ending before n_sink or past the keys; a query with no key gives zeros). [B, K, G, Q, C].
  With `key_chunk_BT` (`boundaries.chunk_ids_from_ends` of the table) a segment sum over the keys' chunk
  ids, else a running sum read at the chunk ends."""
  T, C = s_BKGQT.shape[-1], ends_BC.shape[-1]
  t = jnp.arange(T)
  ok = (t >= n_sink) & (t <= jnp.broadcast_to(hi_BKGQ, s_BKGQT.shape[:-1])[..., None])
  top = jnp.max(jnp.where(ok, s_BKGQT, -jnp.inf), -1, keepdims=True)
  e = jnp.where(ok, jnp.exp(s_BKGQT - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  total = jnp.sum(e, -1, keepdims=True)  # the softmax's denominator: divided once per chunk, not per key
  if key_chunk_BT is not None:
    segment = jnp.where(key_chunk_BT >= 0, key_chunk_BT, C)  # sinks into the dropped segment C
    in_chunks = lambda e_T, seg_T: jax.ops.segment_sum(e_T, seg_T, num_segments=C + 1, indices_are_sorted=False)
    rows = e.reshape(e.shape[0], -1, T)
    mass = jax.vmap(jax.vmap(in_chunks, (0, None)))(rows, segment)[..., :C].reshape(*e.shape[:-1], C)
  else:
    cum = jax.lax.associative_scan(jnp.add, e, axis=-1)  # a parallel prefix sum
    at_end = jnp.take_along_axis(cum, jnp.clip(ends_BC, 0, T - 1)[:, None, None, None, :], -1)
    mass = at_end - jnp.pad(at_end[..., :-1], [(0, 0)] * 4 + [(1, 0)])
  mass = mass / jnp.where(total > 0, total, 1.0)
  return jnp.where(((ends_BC >= n_sink) & (ends_BC < T))[:, None, None, None, :], mass, 0.0)


def key_gram(k_BTKD, valid_BT):
  """Per KV head, sum_t k k^T over the valid tokens: [B, K, D, D] float32 (sums of blocks add up)."""
  k = jnp.where(valid_BT[:, :, None, None], k_BTKD.astype(jnp.float32), 0.0)
  return jnp.einsum("btkd,btke->bkde", k, k)


def key_basis(k_BTKD, valid_BT, rank: int):
  """Per KV head, the `rank` directions that hold most of its keys' energy (the top eigenvectors of
  sum_t k k^T over the valid tokens): [B, K, D, rank] float32, orthonormal columns, each with its
  largest component positive."""
  return gram_basis(key_gram(k_BTKD, valid_BT), rank)


def gram_basis(gram_BKDD, rank: int):
  """`key_basis` from the keys' `key_gram` (summed over blocks of keys where they are read a block at a time)."""
  # One matrix per eigh call: XLA's CPU LAPACK call splits a batch over the thread pool that also runs each
  # device's program, and over several CPU devices that split waits for threads held by collectives
  # (a deadlock, from 64 x 64 matrices up; tests/test_chunk_generate.py::test_sharded_per_head_over_eight_devices).
  # The B x K matrices are eigendecomposed once per prompt and layer, so the loop costs nothing that counts.
  flat = gram_BKDD.reshape(-1, *gram_BKDD.shape[-2:])
  vecs = jax.lax.map(lambda g: jnp.linalg.eigh(g)[1], flat).reshape(gram_BKDD.shape)  # ascending eigenvalues
  vecs = vecs[..., ::-1][..., :rank]
  # An eigenvector's sign is arbitrary, and rounding flips it between equal keys computed two ways (a
  # prompt read in blocks or whole): fixed, the basis and every key's coordinates follow from K alone.
  top = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), axis=-2, keepdims=True), axis=-2)
  return vecs * jnp.where(top < 0, -1.0, 1.0)


def _split_by_basis(x_BKND, basis_BKDr):
  """A vector's coordinates in the basis [B, K, N, r] and what the basis misses [B, K, N, D], float32."""
  x = x_BKND.astype(jnp.float32)
  coords = jnp.einsum("bknd,bkdr->bknr", x, basis_BKDr)
  return coords, x - jnp.einsum("bknr,bkdr->bknd", coords, basis_BKDr)  # no cancellation in its length


def lowrank_coords(x_BKND, basis_BKDr):
  """A vector's coordinates in the basis and the length of what the basis misses: [B, K, N, rank + 1]
  float32. For a key k and a query q with these, (q P) . (k P) + |q_out| |k_out| >= q . k (Cauchy-Schwarz
  on what the basis misses), with equality where the basis holds either one."""
  coords, missed = _split_by_basis(x_BKND, basis_BKDr)
  return jnp.concatenate([coords, jnp.linalg.norm(missed, axis=-1, keepdims=True)], -1)


@functools.lru_cache(maxsize=None)
def sketch_matrix(head_dim: int, bits: int):
  """`residual_sketch`'s projection: [D, bits] float32, iid standard normal from a fixed seed, so the
  prompt's keys, decode's keys and every query meet the same one. Drawn once, at trace time: a
  constant of the compiled step (traced, its random bits were drawn again in every layer of every step)."""
  with jax.ensure_compile_time_eval():
    return jax.random.normal(jax.random.key(0), (head_dim, bits), jnp.float32)


def _pack_signs(missed_BKND, bits: int):
  """The signs of `missed` projected on `sketch_matrix`, packed `SKETCH_WORD` to a uint32, bit i of
  word w for projection 32 w + i: [B, K, N, bits // 32]."""
  signs = (missed_BKND @ sketch_matrix(missed_BKND.shape[-1], bits)) > 0
  signs = signs.reshape(*signs.shape[:-1], bits // SKETCH_WORD, SKETCH_WORD).astype(jnp.uint32)
  return jnp.sum(signs << jnp.arange(SKETCH_WORD, dtype=jnp.uint32), -1, dtype=jnp.uint32)  # distinct bits: or


def residual_sketch(x_BKND, basis_BKDr, bits: int):
  """The signs of what the basis misses, projected on `sketch_matrix` (QJL's 1-bit sketch), packed
  `SKETCH_WORD` to a uint32, bit i of word w for projection 32 w + i: [B, K, N, bits // 32]."""
  return _pack_signs(_split_by_basis(x_BKND, basis_BKDr)[1], bits)


def hamming(words_BKNw, words_BKwT):
  """Bits that differ between each query's packed signs and every key's: [B, K, N, T] int32 (one xor
  and popcount per word, the keys' words read as they lie). Summed over the words as a reduction, which
  XLA computes once into a buffer: as a sum of per-word terms it was fused into each of the softmax's
  passes over the logits and recomputed there, and in the decode step's scan over the layers the score
  ran 2.6x slower (runs of `selection.lowrank_chunk_mass` at 16K keys: 8.5 against 3.3 ms a layer)."""
  differ = jax.lax.population_count(words_BKNw[..., :, None] ^ words_BKwT[:, :, None])  # B K N w T
  return jnp.sum(differ.astype(jnp.int32), -2)


def _sketch_signs(words_BKwT):
  """`residual_sketch` words laid out [B, K, bits // 32, T] as signs +-1.0: [B, K, bits, T] float32."""
  B, K, n_words, T = words_BKwT.shape
  bits = (words_BKwT[:, :, :, None] >> jnp.arange(SKETCH_WORD, dtype=jnp.uint32)[:, None]) & 1
  return bits.reshape(B, K, n_words * SKETCH_WORD, T).astype(jnp.float32) * 2.0 - 1.0


SKETCH_BLOCK = 512  # keys unpacked at a time: their signs stay in cache (all at once ran 7x slower at 32K keys)


def sketch_dot(x_BKNm, words_BKwT):
  """sum_i x_i sign_i against every key's sketch: [B, K, N, T] float32. The signs are unpacked
  `SKETCH_BLOCK` keys at a time (the keys padded to whole blocks), each block one matmul."""
  B, K, n_words, T = words_BKwT.shape
  n = -(-T // SKETCH_BLOCK)
  words = jnp.pad(words_BKwT, [(0, 0)] * 3 + [(0, n * SKETCH_BLOCK - T)])
  blocks = jnp.moveaxis(words.reshape(B, K, n_words, n, SKETCH_BLOCK), 3, 0)
  out = jax.lax.map(lambda w: jnp.einsum("bknm,bkmt->bknt", x_BKNm, _sketch_signs(w)), blocks)  # n B K N block
  return jnp.moveaxis(out, 0, 3).reshape(*x_BKNm.shape[:3], n * SKETCH_BLOCK)[..., :T]


def cos_pi(u):
  """cos(pi u) for u in [0, 1], as -sin(z), z = pi (u - 1/2), by its Taylor polynomial to z^11 (within 2e-7
  of cos in float32): multiplies and adds only. XLA's CPU cos took 3.4 ms for one sparse layer's 9 x 32K
  SimHash angles, about as long as the rest of the score together; the polynomial 0.4 ms."""
  z = math.pi * (u - 0.5)
  z2 = z * z
  return -z * (1 - z2 / 6 * (1 - z2 / 20 * (1 - z2 / 42 * (1 - z2 / 72 * (1 - z2 / 110)))))


def lowrank_chunk_mass(q_BKGQD, k_low_BKcT, basis_BKDr, hi_BKGQ, ends_BC, *, n_sink: int, scale: float, layer=None,
                       k_sketch_BKwT=None, sketch_estimate: str = SKETCH_ESTIMATES[0], key_chunk_BT=None):
  """`chunk_mass` estimated from the keys' `lowrank_coords` (Loki's low-rank keys, with the length of
  what the basis misses), laid out [B, K, rank + 1, T] (each coordinate contiguous over the
  positions, so the scores are one plain matmul per KV head: [B, T, K, rank] ran 5x slower on the
  CPU at 32K keys), or with `layer` the stacked [L, B, K, rank + 1, T]. A key's logit is
  scale * ((q P) . (k P) + r), r the part the basis misses: without a sketch the bound |q_out| |k_out|
  (a key in a direction the prompt's keys rarely take, a needle's, keeps a logit as high as its
  length allows instead of losing it, and so do keys that merely lie off the basis); with
  `k_sketch_BKwT` (`residual_sketch` words [B, K, bits // 32, T], stacked with `layer`) an estimate
  from the sketch (`ChunkConfig.sketch_estimate`): "simhash", |q_out| |k_out| cos(pi h / bits) from
  the Hamming distance h of both sides' signs, or "qjl", QJL's unbiased sqrt(pi / 2) / bits |k_out|
  (S q_out) . sign(S k_out); the error of both shrinks as 1 / sqrt(bits). Softmax over the keys
  [n_sink, hi], summed within each chunk (`key_chunk_BT`: as `_mass_of_logits`'s). float32 [B, K, G, Q, C]."""
  if layer is not None:
    k_low_BKcT = jax.lax.dynamic_index_in_dim(k_low_BKcT, layer, 0, keepdims=False)
    if k_sketch_BKwT is not None:
      k_sketch_BKwT = jax.lax.dynamic_index_in_dim(k_sketch_BKwT, layer, 0, keepdims=False)
  B, K, G, Q, D = q_BKGQD.shape
  k_low = k_low_BKcT.astype(jnp.float32)
  if k_sketch_BKwT is None:
    q_low = lowrank_coords(q_BKGQD.reshape(B, K, G * Q, D), basis_BKDr).reshape(B, K, G, Q, -1)
    s = jnp.einsum("bkgqc,bkct->bkgqt", q_low, k_low)
  else:
    r = basis_BKDr.shape[-1]
    bits = k_sketch_BKwT.shape[-2] * SKETCH_WORD
    coords, missed = _split_by_basis(q_BKGQD.reshape(B, K, G * Q, D), basis_BKDr)
    k_out = k_low[:, :, None, r]  # [B, K, 1, T]
    if sketch_estimate == "simhash":
      h = hamming(_pack_signs(missed, bits), k_sketch_BKwT)
      residual = jnp.linalg.norm(missed, axis=-1, keepdims=True) * k_out * cos_pi(h * (1.0 / bits))
    else:
      residual = sketch_dot(missed @ sketch_matrix(D, bits), k_sketch_BKwT) * (math.sqrt(math.pi / 2) / bits) * k_out
    coords = jnp.pad(coords, [(0, 0)] * 3 + [(0, 1)])  # against all of k_low: its first r rows alone were a copy
    s = jnp.einsum("bkgqc,bkct->bkgqt", coords.reshape(B, K, G, Q, r + 1), k_low) + residual.reshape(B, K, G, Q, -1)
  return _mass_of_logits(s * scale, hi_BKGQ, ends_BC, n_sink, key_chunk_BT)


def attention_probs(q_BRHD, k_BTKD, chunk_end_BC, n_cand_BR, *, n_sink: int, scale: float,
                    softcap: float | None = None, q_pos_BR=None, heads: str = "max", key_block: int = KEY_BLOCK,
                    layer=None):
  """Frozen-attention distribution: per head, the softmax of one query over the candidate chunks'
  tokens, summed within each chunk (`chunk_mass`); then the max over heads (`heads="mean"`: the
  mean, the teacher's other option). [B, R, C] float32.

  Chunks are contiguous from `n_sink` on, so the candidates' tokens are the positions
  [n_sink, end of chunk n_cand - 1]. With `q_pos_BR`, a query reads no key after its own position
  (causality), and a row with a negative position (no such query) scores 0. With `layer`, `k_BTKD`
  is the stacked buffer [L, B, T, K, D] (`chunk_mass`)."""
  K = k_BTKD.shape[-2]
  last = jnp.take_along_axis(chunk_end_BC, jnp.maximum(n_cand_BR - 1, 0), axis=1)  # [B, R]
  hi = jnp.where(n_cand_BR > 0, last, -1)
  if q_pos_BR is not None:
    hi = jnp.minimum(hi, q_pos_BR)
  mass = chunk_mass(attn.split_heads(q_BRHD, K), k_BTKD, hi[:, None, None, :], chunk_end_BC, n_sink=n_sink,
                    scale=scale, softcap=softcap, key_block=key_block, layer=layer)  # [B, K, G, R, C]
  score = mass.max(axis=(1, 2)) if heads == "max" else mass.mean(axis=(1, 2))
  cand = jnp.arange(chunk_end_BC.shape[1]) < n_cand_BR[..., None]
  return jnp.where(cand, score, 0.0)


def renormalise(p, axis: int = -1):
  """`p` divided by its sum over `axis` (0 stays 0): chunk mass as a distribution over the candidates.
  The one renormalisation of the teachers, the student's window and the evaluation's ranks."""
  return p / jnp.maximum(jnp.sum(p, axis=axis, keepdims=True), 1e-30)


def vote_scores(probs_S, vote: str):
  """One score per chunk from the selection layers' distributions (leading axis): "sum" or "max"."""
  return {"sum": jnp.sum, "max": jnp.max}[vote](probs_S, axis=0)


# ----------------------------------------------------------------------------------------------
# From scores to a selection


def order_by_score(score_BRC):
  """Indices of the last axis, best score first; ties by position (the oldest first). [B, R, C] int32.

  One sort of int32 keys: the score's order-preserving bits over the index's bits. XLA's sort of
  floats, or of a key with the index beside it, is 4-7x slower on the CPU (C = 1024 to 4096, `choose`'s
  time with a per-head selection at every step). The index takes the key's low ceil(log2 C) bits, so
  scores within 2^-(23 - that) of each other (relative; 1.2e-4 at C = 1024) count as tied."""
  C = score_BRC.shape[-1]
  idx_bits = max((C - 1).bit_length(), 1)
  bits = jax.lax.bitcast_convert_type(score_BRC.astype(jnp.float32), jnp.int32)
  ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # as signed ints, in the floats' order
  key = ((ordered >> idx_bits) << idx_bits) | (C - 1 - jnp.arange(C, dtype=jnp.int32))
  return C - 1 - (jnp.sort(key, axis=-1)[..., ::-1] & ((1 << idx_bits) - 1))


FILL_PASSES = 4  # passes of the budgeted selection over the chunks it has left out (`choose`)


def choose(score_BRC, n_cand_BR, chunk_len_BC, fixed_BR, seen_BR, cfg: ChunkConfig):
  """Which candidates each row keeps: [B, R, C] bool.

  With a KV budget, chunks are taken in score order while they fit in what the budget leaves after
  `fixed` (sinks, local chunks, open chunk); then, in up to FILL_PASSES - 1 more passes, the best of
  those left out that still fit what remains, again in score order. One pass stops at the first
  chunk that does not fit, which can leave a long chunk's worth of budget unused (50 tokens at 2K,
  2.4 mean chunks); the passes fill it with shorter chunks. With `boundary_tokens` the last tokens of
  the chunks left out are paid for first, as many as `last_token_count` allows. Where that is every
  candidate's, a chunk costs the rest of it, and where they leave no candidate room, the best by score is
  read in place of the oldest of them (`_best_in_place_of_last_tokens`); where it is fewer, they take
  their share and the chunks cost their whole length. Without a budget, the `top_chunks` best are kept."""
  C = score_BRC.shape[-1]
  cand = jnp.arange(C) < n_cand_BR[..., None]
  score = jnp.where(cand, score_BRC, -1.0)
  if not cfg.budgeted:
    k = min(cfg.top_chunks, C)
    if k == 0:
      return jnp.zeros(score.shape, bool)
    val, idx = jax.lax.top_k(score, k)
    picked = jnp.zeros(score.shape, bool)
    put = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v >= 0.0)))
    return put(picked, idx, val)
  cost = jnp.ones_like(chunk_len_BC) if cfg.keep == "boundary" else chunk_len_BC
  cost = jnp.broadcast_to(cost[:, None], score.shape)
  budget = cfg.budget_tokens(seen_BR)
  held = jnp.zeros_like(fixed_BR)  # [B, R]: last tokens paid for only while that many chunks are left out
  if cfg.reads_boundary_tokens:
    n_last = last_token_count(n_cand_BR, budget - fixed_BR, cfg)
    every = n_last >= n_cand_BR  # [B, R]: every candidate's last token is read anyway: a chunk costs the rest
    cost = jnp.where(every[..., None], jnp.maximum(cost - 1, 0), cost)
    held = jnp.where(every, 0, n_last)
    fixed_BR = fixed_BR + n_last
  if cfg.recent_share > 0.0:
    # The most recent candidates come first while they, with what is always read, fit the recent
    # share: a window in tokens, not in chunks, whatever the chunk lengths.
    cost_BRC = jnp.where(cand, cost, 0)
    newer_BRC = jnp.cumsum(cost_BRC[..., ::-1], -1)[..., ::-1]  # tokens from candidate j to the newest
    recent = cand & (newer_BRC + fixed_BR[..., None] <= jnp.floor(cfg.recent_share * budget)[..., None])
    score = jnp.where(recent, jnp.inf, score)
  order = order_by_score(score)
  cost_sorted = jnp.take_along_axis(cost, order, -1)
  cand_sorted = jnp.take_along_axis(cand, order, -1)
  left = budget - fixed_BR  # [B, R]: tokens the chosen chunks may still take
  taken = jnp.zeros(score.shape, bool)
  if cfg.reads_boundary_tokens:
    recent_sorted = jnp.take_along_axis(score == jnp.inf, order, -1)
    taken = _best_in_place_of_last_tokens(cand_sorted, cost_sorted, recent_sorted, left) & every[..., None]
  holds = cfg.reads_boundary_tokens and cfg.boundary_share < 1.0  # static: only then can `held` be nonzero
  for _ in range(FILL_PASSES):
    # Under a share of last tokens, each chunk taken leaves one chunk fewer out: once fewer than `held` are
    # left, the last tokens held for them go back to the chunks (so a budget of every token reads them all).
    n_out = (n_cand_BR - jnp.sum(taken, -1))[..., None]  # [B, R, 1]: the candidates still left out
    freed = (lambda k: held[..., None] - jnp.minimum(held[..., None], n_out - k)) if holds else (lambda k: 0)
    open_ = cand_sorted & ~taken & (cost_sorted <= left[..., None] + freed(1))
    # (Each chunk costs a token or more and frees at most one: the running sum stays a prefix test.)
    fits = open_ & (jnp.cumsum(jnp.where(open_, cost_sorted, 0), -1) <= left[..., None] + freed(jnp.cumsum(open_, -1)))
    taken = taken | fits
    left = left - jnp.sum(jnp.where(fits, cost_sorted, 0), -1)
  put = jax.vmap(jax.vmap(lambda row, i, v: row.at[i].set(v)))
  return put(jnp.zeros(score.shape, bool), order, taken)


def last_token_count(n_cand, room, cfg: ChunkConfig):
  """How many chunks left out give their last token (`boundary_tokens` under a budget), the newest of them:
  all `n_cand` candidates', or under `boundary_share` < 1 at most that share of `room`, what the budget
  leaves after the sinks, local and open chunk. `choose` pays for them and `working_positions` reads them,
  both with this count, so the two agree on what the budget holds."""
  if cfg.boundary_share >= 1.0:
    return n_cand
  most = jnp.floor(cfg.boundary_share * jnp.maximum(room, 0)).astype(jnp.int32)
  return jnp.minimum(n_cand, most)


def _best_in_place_of_last_tokens(cand_sorted, cost_sorted, recent_sorted, left_BR):
  """`choose`'s start with `boundary_tokens`, in score order: [B, R, C] bool, only the best candidate by
  score, and only where no candidate outside the recent share fits what the last tokens leave of the
  budget, but the best one, whole, fits what it leaves without them. `working_positions` then drops the
  oldest last tokens to make its room.

  Under a budget of a few tokens a chunk (6.25% of the tokens seen, chunks of 27: 1.7 a chunk) the last
  tokens fill what the sinks, local and open chunks leave, and nothing would be read by score. Only the
  best chunk is made room for: with chunks of one token each costs nothing past its last token, and
  letting every such candidate in would read them all whatever the budget."""
  scored = cand_sorted & ~recent_sorted
  n_recent = jnp.sum(recent_sorted, -1)  # the recent share's come first in score order: the best scored next
  room = left_BR - jnp.sum(jnp.where(recent_sorted, cost_sorted, 0), -1)  # after them and the last tokens
  cheapest = jnp.min(jnp.where(scored, cost_sorted, jnp.iinfo(jnp.int32).max), -1)
  best = (jnp.arange(cost_sorted.shape[-1]) == n_recent[..., None]) & scored
  # Without the last tokens of the candidates not read whole, what the budget leaves for one of them.
  whole_room = room + jnp.sum(scored, -1)
  fits_whole = jnp.sum(jnp.where(best, cost_sorted + 1, 0), -1) <= whole_room
  return best & ((cheapest > room) & fits_whole)[..., None]


def local_tokens(chunk_end_BC, n_chunks_BR, n_local, n_sink: int):
  """Tokens in the `n_local` (an int, or one per row: [B, 1] or [B, R]) most recent completed chunks: [B, R] int32."""
  return _end_of(chunk_end_BC, n_chunks_BR - 1, n_sink) - _end_of(chunk_end_BC, n_chunks_BR - 1 - n_local, n_sink)


def _end_of(chunk_end_BC, i_BR, n_sink: int):
  """The position just after chunk i (n_sink for "before chunk 0"): [B, R]."""
  e = jnp.take_along_axis(chunk_end_BC, jnp.maximum(i_BR, 0), axis=1)
  return jnp.where(i_BR >= 0, e + 1, n_sink)


def local_count(chunk_end_BC, n_chunks_B, pos_B, cfg: ChunkConfig):
  """How many of the most recent completed chunks the token at `pos_B` always reads: [B] int32.

  `n_local` of them (fewer where fewer exist). Under a budget with a recent share, only as many as fit the recent
  share with the sinks and the open chunk, and at least the newest: the older local chunks become candidates
  and are read as far as their scores earn them the rest of the budget. Without that cap, text whose chunks
  run long (tables, lists, code: chunks closed by force at `max_chunk_len`) fills a small budget with its local
  chunks alone and leaves nothing to choose by score."""
  n_B = jnp.minimum(cfg.n_local, n_chunks_B)
  if not (cfg.budgeted and cfg.recent_share > 0.0) or cfg.n_local <= 1:
    return n_B
  open_B = jnp.maximum(pos_B + 1 - _end_of(chunk_end_BC, (n_chunks_B - 1)[:, None], cfg.n_sink)[:, 0], 0)
  room_B = jnp.floor(cfg.recent_share * cfg.budget_tokens(pos_B + 1)).astype(jnp.int32) - cfg.n_sink - open_B
  m = jnp.arange(1, cfg.n_local + 1)[None, :]  # [1, n_local]: candidate counts, each within the table
  tokens_BM = local_tokens(chunk_end_BC, jnp.broadcast_to(n_chunks_B[:, None], (n_B.shape[0], cfg.n_local)),
                           jnp.minimum(m, n_chunks_B[:, None]), cfg.n_sink)
  fits_B = jnp.sum(tokens_BM <= room_B[:, None], axis=-1)  # the tokens grow with m: the count of those that fit
  return jnp.minimum(jnp.maximum(fits_B, 1), n_B).astype(jnp.int32)


def chunk_lengths(start_BC, end_BC, n_chunks_B):
  """Tokens in each completed chunk, 0 past the last: [B, C]."""
  return jnp.where(jnp.arange(end_BC.shape[1]) < n_chunks_B[:, None], end_BC - start_BC + 1, 0)
