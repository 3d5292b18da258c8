"""Perplexity on long text as a function of position: ChunkLLM and the baselines against vanilla.

For every chunk method a short prefix is prefilled, then the rest of the text is teacher-forced one
token at a time, and the log-probability of each true next token is kept. The steps are the very
ones generation runs (`chunk_prefill` + `chunk_decode_step`), inside one jitted `lax.scan`, so a
method's perplexity is what its decoding sees: the selection changes only at boundaries and the KV
it reads is its budget. Vanilla reads every key at every position, so its log-probs come from one
blocked prefill of the whole text, the same attention in block matmuls. Under a selection that
covers every chunk the log-probs are vanilla's within float32 rounding (tests/test_eval_harness.py).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chunkllm_jax import haystack, model
from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import chunk_decode_step, chunk_prefill
from chunkllm_jax.decoding import Compiled, buffer_len
from chunkllm_jax.kv_cache import init_cache, observed_prefill
from eval import methods as M
from eval import niah


_HEAD_PIECE = 256  # tokens per LM-head call in vanilla's log-probs: [B, 256, V] float32 logits
PROGRESS_REPORTS = 10  # lines a chunk method's teacher-forced decode prints to stderr as it runs
_started: dict[int, float] = {}  # the wall clock at each run's first report, by its number of steps


def _report_progress(done, total: int):
  """A progress line from inside the jitted decode (`jax.debug.callback`): one run is one long XLA
  program (8 texts of 4K: most of an hour on 2 cores), and nothing else would show it is moving."""
  done = int(done)
  now = time.perf_counter()
  if done == 0:
    _started[total] = now
  elapsed = now - _started.get(total, now)
  eta = f", about {elapsed * (total - done) / done:.0f} s left" if done else ""
  print(f"[perplexity] {done}/{total} tokens decoded, {elapsed:.0f} s{eta}", file=sys.stderr, flush=True)


def _true_logprob(logits_BtV, target_Bt):
  """log p of each target under its logits, for any leading axes ([B] or [B, t])."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BtV.astype(jnp.float32), -1), target_Bt[..., None], -1)[..., 0]


def _vanilla_logprobs(params, tokens_BN, *, prefix: int, max_len: int):
  """Vanilla's log-probs from one blocked prefill of the whole text (`kv_cache.observed_prefill`):
  the same exact attention over the same positions as teacher-forced decode, in block matmuls
  rather than N one-token steps (8 texts of 8K: minutes rather than most of an hour on 2 cores).
  The LM head runs at the last layer only, on pieces of `_HEAD_PIECE` tokens."""
  B, N = tokens_BN.shape
  last = params.config.n_layers - 1
  targets_BN = jnp.concatenate([tokens_BN[:, 1:], tokens_BN[:, :1]], axis=1)  # column p: token p + 1

  def observe_output(logp_BN, layer, start, tokens_Bt, x_BtD, handed):
    del handed
    t = tokens_Bt.shape[1]

    def score(logp_BN):
      for lo in range(0, t, _HEAD_PIECE):
        hi = min(lo + _HEAD_PIECE, t)
        target = jax.lax.dynamic_slice_in_dim(targets_BN, start + lo, hi - lo, axis=1)
        logits = model.unembed(params, x_BtD[:, lo:hi])
        logp_BN = jax.lax.dynamic_update_slice_in_dim(logp_BN, _true_logprob(logits, target), start + lo, axis=1)
      return logp_BN

    return jax.lax.cond(layer["index"] == last, score, lambda o: o, logp_BN)

  cache = init_cache(params.config, B, max_len, params.backbone["embed"].dtype)
  _, _, logp_BN = observed_prefill(params, tokens_BN, jnp.full((B,), N, jnp.int32), cache,
                                   observe_output=observe_output, observed=jnp.zeros((B, N), jnp.float32))
  return logp_BN[:, prefix - 1:N - 1], {}


def _chunk_logprobs(params, tokens_BN, *, prefix: int, max_len: int, ccfg: ChunkConfig):
  B, N = tokens_BN.shape
  logits, cache, st = chunk_prefill(params, tokens_BN[:, :prefix], jnp.full((B,), prefix, jnp.int32), max_len, ccfg)
  first = _true_logprob(logits, tokens_BN[:, prefix])

  steps = max(N - prefix - 1, 1)
  every = max(1, -(-steps // PROGRESS_REPORTS))

  def step(carry, io):
    cache, st = carry
    i, token_B, target_B = io
    report = functools.partial(_report_progress, total=steps)
    jax.lax.cond(i % every == 0, lambda: jax.debug.callback(report, i), lambda: None)
    logits, cache, st = chunk_decode_step(params, token_B, cache, st, ccfg)
    return (cache, st), _true_logprob(logits, target_B)

  (_, st), rest = jax.lax.scan(step, (cache, st), (jnp.arange(N - prefix - 1), tokens_BN[:, prefix:N - 1].T,
                                                   tokens_BN[:, prefix + 1:].T))
  stats = dict(kv_retention=st.retained / steps, n_chunks=st.n_chunks, n_selections=st.n_selections,
               chunk_overflow=st.overflow)
  return jnp.concatenate([first[:, None], rest.T], axis=1), stats


@functools.lru_cache(maxsize=16)
def _program(prefix: int, max_len: int, ccfg: ChunkConfig | None) -> Compiled:
  if ccfg is None:
    return Compiled(jax.jit(functools.partial(_vanilla_logprobs, prefix=prefix, max_len=max_len)))
  return Compiled(jax.jit(functools.partial(_chunk_logprobs, prefix=prefix, max_len=max_len, ccfg=ccfg)))


def token_logprobs(method: str, params, docs: Sequence[Sequence[int]], prefix: int, retention: float | None,
                   settings: M.MethodSettings, overrides: dict | None = None) -> tuple[np.ndarray, list[dict]]:
  """log p of every true next token after the prefix: [B, N - prefix] (column i is position prefix + i),
  and per row the stats (measured kv_retention, the knobs, seconds per token). Docs share one length N.
  `overrides`: ChunkConfig fields replaced in the method's configuration (an ablation)."""
  lengths = {len(d) for d in docs}
  if len(lengths) != 1:
    raise ValueError(f"docs must share one length, got {sorted(lengths)}")
  N = lengths.pop()
  if not 0 < prefix < N:
    raise ValueError(f"prefix must be in (0, {N}), got {prefix}")
  max_len = M._round_up(N, 128)
  groups = [(None, {}, list(range(len(docs))))]
  if method != "vanilla":
    seg = M.segmentation_for(method, params, docs, settings)  # the whole text: every chunk it will make
    ccfg, info = M.method_config(method, retention, [prefix] * len(docs), N - prefix, max_len, settings, seg)
    # A window method's knob fitted to each text, as generation fits it to each prompt (`row_windows`).
    groups = M.row_windows(method, ccfg, info, retention, seg, [prefix] * len(docs), N - prefix, settings)
  logp = np.zeros((len(docs), N - prefix), np.float32)
  rows: list = [None] * len(docs)
  total = 0.0
  for ccfg, info, group in groups:
    extra: dict = dict(batch_size=len(group))
    if ccfg is not None:
      ccfg = dataclasses.replace(ccfg, **(overrides or {})).validate(max_len, params.config.n_layers)
      extra.update(M.config_summary(ccfg), **info)
    tokens = jnp.asarray(np.asarray([docs[b] for b in group], np.int32))
    (lp, stats), seconds = _program(prefix, buffer_len(max_len), ccfg).timed(params, tokens)
    logp[group] = np.asarray(lp)
    total += seconds
    for j, b in enumerate(group):
      row = {k: np.asarray(v)[j].item() for k, v in stats.items()}
      row.setdefault("kv_retention", 1.0)
      rows[b] = {**row, **extra}
  for row in rows:  # the whole call's time, over its groups
    row.update(seconds=total, tok_s=len(docs) * (N - prefix) / max(total, 1e-9))
  return logp, rows


def position_bins(prefix: int, n_tokens: int, n_bins: int) -> np.ndarray:
  """Bin edges over the scored positions [prefix, n_tokens): n_bins + 1 ints."""
  return np.unique(np.linspace(prefix, n_tokens, n_bins + 1).round().astype(int))


def binned_nll(logp_N: np.ndarray, prefix: int, edges: np.ndarray) -> tuple[list[float], list[int]]:
  """Sums of -log p and token counts per position bin (column i of logp_N is position prefix + i)."""
  pos = prefix + np.arange(len(logp_N))
  sums, counts = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (pos >= lo) & (pos < hi)
    sums.append(float(-logp_N[sel].sum()))
    counts.append(int(sel.sum()))
  return sums, counts


# ----------------------------------------------------------------------------------------------
# The text


def text_windows(tokenizer, n_docs: int, n_tokens: int, text_path: str | Path | None = None,
                 seed: int = 0) -> list[list[int]]:
  """`n_docs` windows of exactly `n_tokens` tokens of running text: from the documents of
  `text_path` in order (each window starts at a document's start and runs on into the next ones),
  or from generated filler when no path is given."""
  if text_path is None:
    docs = [" ".join(haystack.filler_sentences(400, seed + i)) for i in range(n_docs * (1 + n_tokens // 4000))]
  else:
    docs = [" ".join(sentences) for sentences in niah.eval_documents(niah.read_sentences(text_path))]
  windows, stream, i = [], [], 0
  while len(windows) < n_docs:
    if i >= len(docs):
      raise ValueError(f"not enough text for {n_docs} windows of {n_tokens} tokens")
    # A window's later documents run on without the tokenizer's BOS: one mid-text would be scored as text.
    stream += tokenizer(docs[i] + "\n\n", add_special_tokens=not stream)["input_ids"]
    i += 1
    if len(stream) >= n_tokens:
      windows.append(stream[:n_tokens])
      stream = []
  return windows


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str) -> None:
  """NLL per position bin: curves maps a label to (bin centres, mean NLL per token)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, (x, y) in curves.items():
    style = dict(color="black", linewidth=2.2) if label.startswith("vanilla") else {}
    ax.plot(x, y, marker="o", markersize=3, label=label, **style)
  ax.set_xlabel("position (tokens)")
  ax.set_ylabel("NLL per token (nats)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
