"""ChunkLLM's training loss: `L = BCE(p, y) + lambda * KL(P || S)`, differentiable in the adapters only.

- BCE: the Chunk Adapter's p_t against the sentence-end labels y, over valid (non-pad) tokens.
- KL: per QK-adapter layer, the teacher P (frozen attention aggregated into chunks, see
  `train/teacher.py`) against the student S = softmax over the same candidate chunks of
  s[t, j] = q~_t . k~_{e_j} / sqrt(d_c). Averaged over queries with at least one candidate, and
  over layers.
- Candidates are the chunks inference can choose between: completed, and older than the `n_local`
  most recent (those are always read, so ranking them teaches the student nothing it uses). P is
  renormalised over them. With `n_local=0` every completed chunk is a candidate (the literal
  rule: docs/design.md, section 8); see train/RESULTS.md for why the default follows inference instead.
- Chunks come from the labels (teacher forcing), see `chunkllm_jax.boundaries`.

The backbone is an ordinary argument, but the teacher wraps it in `stop_gradient`, so
`jax.grad(chunkllm_loss)` (argument 0: the adapters) is the only gradient there is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from chunkllm_jax import boundaries
from chunkllm_jax.adapters import Adapters, chunk_adapter_logits, chunk_keys, chunk_scores, qk_adapter_apply
from chunkllm_jax.chunk_config import ChunkRules
from chunkllm_jax.params import ModelParams
from chunkllm_jax.selection import adapter_window_probs, renormalise

if TYPE_CHECKING:  # for the annotation alone: rows_config_of imports it when it runs
  from train import teacher_cache
from train.teacher import TeacherOutputs, teacher_chunk_attention


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LossConfig(ChunkRules):
  """kl_weight: lambda. The chunk rules (n_sink, max_chunk_len) and max_chunks: how labels become
  chunks (boundaries); n_local: recent completed chunks left out of the candidates, as at inference.
  alpha: boundary threshold of the metrics. recall_k: k of the chunk recall@k metric.
  block_q, block_k: the teacher's block sizes."""

  kl_weight: float = 1.0
  teacher: str = "token_mean"  # TEACHERS: the target the QK Adapters are distilled on
  score_queries: int = 16  # head_max / head_mean: a row's target is the max over this many last queries
  student_queries: int = 1  # head_max / head_mean: the QK Adapters score a row with the q~ of this many
  #                           last tokens, the max over them (stored with the export, used at inference)
  max_chunks: int = 512
  alpha: float = 0.5
  recall_k: int = 16
  block_q: int = 256
  block_k: int = 512


# The distillation targets. "head_max" and "head_mean" are taken at the selection rows (a chunk's
# boundary token, where inference selects; train.teacher_cache): per head over the candidates, then
# the max (or mean) over heads and over the last `score_queries` queries. "token_mean" is the
# paper's: every token's query, the attention averaged over heads before it is summed into chunks.
TEACHERS = ("head_max", "head_mean", "token_mean")


def loss_config_of(cfg) -> LossConfig:
  """The LossConfig of a `train.config.TrainConfig`."""
  return LossConfig(kl_weight=cfg.kl_weight, teacher=cfg.teacher, score_queries=cfg.score_queries,
                    student_queries=cfg.student_queries,
                    n_sink=cfg.n_sink, n_local=cfg.n_local,
                    max_chunk_len=cfg.max_chunk_len or None, max_chunks=cfg.max_chunks, recall_k=cfg.recall_k,
                    block_q=cfg.block_q, block_k=cfg.block_k)


def _masked_mean(x, mask):
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def boundary_metrics(logit_BT, labels_BT, valid_BT, alpha: float) -> dict[str, jnp.ndarray]:
  """Precision, recall and F1 of `p > alpha` against the labels, over valid tokens."""
  pred = (jax.nn.sigmoid(logit_BT) > alpha) & valid_BT
  gold = (labels_BT > 0) & valid_BT
  tp = jnp.sum(pred & gold)
  n_pred, n_gold = jnp.sum(pred), jnp.sum(gold)
  return dict(boundary_precision=tp / jnp.maximum(n_pred, 1), boundary_recall=tp / jnp.maximum(n_gold, 1),
              boundary_f1=2 * tp / jnp.maximum(n_pred + n_gold, 1))


def _layer_terms(p_layer, h_BTD, P_BTC, chunk_end_BC, candidate_BTC, recall_k: int):
  """One QK layer: summed KL over queries, and recall@k hits summed over eligible queries."""
  q_BTd, k_BTd = qk_adapter_apply(p_layer, h_BTD)
  s_BTC = chunk_scores(q_BTd, chunk_keys(k_BTd, chunk_end_BC), candidate_BTC)
  log_S_BTC = jax.nn.log_softmax(s_BTC, axis=-1)
  kl_BT = jnp.sum(jnp.where(candidate_BTC, jax.scipy.special.xlogy(P_BTC, P_BTC) - P_BTC * log_S_BTC, 0.0), -1)
  # recall@k: how many of the teacher's top-k chunks are among the student's top-k
  _, top_P = jax.lax.top_k(jnp.where(candidate_BTC, P_BTC, -1.0), recall_k)
  _, top_S = jax.lax.top_k(jax.lax.stop_gradient(s_BTC), recall_k)
  hits_BT = (top_P[..., :, None] == top_S[..., None, :]).any(-1).sum(-1) / recall_k
  eligible_BT = candidate_BTC.sum(-1) > recall_k
  return jnp.sum(kl_BT), jnp.sum(jnp.where(eligible_BT, hits_BT, 0.0))


def chunks_past_table(labels_BT, valid_BT, config: "LossConfig"):
  """The share of the batch's chunks past the table's `max_chunks`: no KL row serves them (the teacher's bins and
  rows stop at the table), so where it is above 0 part of every such sequence goes undistilled."""
  closes_BT = boundaries.closes_from_labels(labels_BT, config.n_sink, config.max_chunk_len or None, valid_BT)
  n_B = jnp.sum(closes_BT, axis=1).astype(jnp.float32)
  return jnp.sum(jnp.maximum(n_B - config.max_chunks, 0.0)) / jnp.maximum(jnp.sum(n_B), 1.0)


def student_loss(adapters: Adapters, teacher: TeacherOutputs, chunk_id_BT, labels_BT, valid_BT,
                 config: LossConfig = LossConfig()) -> tuple[jnp.ndarray, dict[str, Any]]:
  """The loss given the teacher's outputs (so a training loop may compute or cache them apart)."""
  C = config.max_chunks
  teacher = jax.tree.map(jax.lax.stop_gradient, teacher)

  logit_BT = chunk_adapter_logits(adapters.params["chunk"], teacher.h0_BTD)
  y_BT = (labels_BT > 0).astype(jnp.float32)
  bce = _masked_mean(optax.sigmoid_binary_cross_entropy(logit_BT, y_BT), valid_BT)

  candidate_BTC = boundaries.candidate_mask(chunk_id_BT - config.n_local, C) & valid_BT[..., None]
  # The teacher is normalised over every completed chunk; renormalise over the candidates. The
  # mass kept is how much of the teacher's non-sink, non-current attention selection decides.
  P_LBTC = jnp.where(candidate_BTC, teacher.P_LBTC, 0.0)
  far_mass_LBT = jnp.sum(P_LBTC, -1)
  P_LBTC = renormalise(P_LBTC)
  chunk_end_BC = boundaries.chunk_ends(chunk_id_BT, C)
  k = min(config.recall_k, C)
  # One layer at a time, rematerialised: only one [B, T, C] score array is alive.
  terms = jax.checkpoint(lambda xs: _layer_terms(*xs, chunk_end_BC, candidate_BTC, k))
  kl_L, hits_L = jax.lax.map(terms, (adapters.params["qk"], teacher.h_LBTD, P_LBTC))
  n_layers = kl_L.shape[0]
  has_candidate_BT = candidate_BTC.any(-1)
  n_queries = jnp.sum(has_candidate_BT)
  n_eligible = jnp.sum(candidate_BTC.sum(-1) > k)
  kl = jnp.sum(kl_L) / jnp.maximum(n_layers * n_queries, 1)
  far_mass = jnp.sum(jnp.where(has_candidate_BT, far_mass_LBT, 0.0)) / jnp.maximum(n_layers * n_queries, 1)

  loss = bce + config.kl_weight * kl
  metrics = dict(loss=loss, bce=bce, kl=kl,
                 chunk_recall=jnp.sum(hits_L) / jnp.maximum(n_layers * n_eligible, 1),
                 teacher_far_mass=far_mass, n_kl_queries=n_queries, n_recall_queries=n_eligible,
                 chunks_past_table=chunks_past_table(labels_BT, valid_BT, config),
                 **boundary_metrics(logit_BT, labels_BT, valid_BT, config.alpha))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def batch_chunks(batch: dict[str, Any], config: LossConfig):
  """(chunk_id [B, T], valid [B, T]) of a batch: its own `chunk_id`, or one from its labels."""
  B, T = batch["tokens"].shape
  lengths = batch.get("lengths")
  valid_BT = jnp.ones((B, T), bool) if lengths is None else jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]
  chunk_id_BT = batch.get("chunk_id")
  if chunk_id_BT is None:
    chunk_id_BT = boundaries.chunks_from_labels(batch["labels"], config.n_sink, config.max_chunk_len, valid_BT)
  return jnp.where(valid_BT, chunk_id_BT, boundaries.NO_CHUNK), valid_BT


def chunkllm_loss(adapters: Adapters, params: ModelParams, batch: dict[str, Any],
                  config: LossConfig = LossConfig()) -> tuple[jnp.ndarray, dict[str, Any]]:
  """`L = BCE(p, y) + lambda * KL(P || S)` and metrics; differentiate in `adapters` (argument 0).

  batch: `tokens` [B, T] int, `labels` [B, T] (1 at sentence ends), optional `lengths` [B] (right
  padding) and `chunk_id` [B, T] (default: from the labels).
  metrics: loss, bce, kl, chunk_recall (recall@k of the teacher's top-k chunks in the student's,
  over queries with more than k candidates, averaged over layers), teacher_far_mass (the share of
  the teacher's chunk attention on candidates, not on the local chunks), boundary precision/recall/F1
  at `alpha`, and the query counts behind the averages.
  """
  chunk_id_BT, valid_BT = batch_chunks(batch, config)
  teacher = teacher_chunk_attention(params, batch["tokens"], chunk_id_BT, max_chunks=config.max_chunks,
                                    qk_layers=adapters.config.qk_layers, lengths_B=batch.get("lengths"),
                                    block_q=config.block_q, block_k=config.block_k)
  return student_loss(adapters, teacher, chunk_id_BT, batch["labels"], valid_BT, config)


def rows_config_of(config: LossConfig, layers) -> teacher_cache.RowsConfig:
  """The teacher's rows settings for a row target (`head_max`, `head_mean`) on these layers."""
  from train import teacher_cache

  return teacher_cache.RowsConfig(layers=tuple(layers), n_sink=config.n_sink, n_local=config.n_local,
                                  max_chunk_len=config.max_chunk_len or 1 << 30, max_chunks=config.max_chunks,
                                  score_queries=config.score_queries, heads=config.teacher.removeprefix("head_"))


def _row_terms(p_layer, h_BTD, P_BRC, ends_BC, n_cand_BR, n_queries: int, recall_k: int):
  """One QK layer at the selection rows: summed KL over rows, and recall@k hits summed over eligible rows.

  Row r's student is what `scorer="adapter"` computes at chunk r's end (`selection.adapter_window_probs`):
  per query of the `n_queries` tokens up to the end, the softmax over the candidates of
  q~ . k~(end_j) / sqrt(d_c); the max over those queries, renormalised (with one query, the softmax)."""
  q_BTd, k_BTd = qk_adapter_apply(p_layer, h_BTD)
  q_pos_BRQ = ends_BC[..., None] - jnp.arange(n_queries)
  q_BRQd = jnp.take_along_axis(q_BTd[:, :, None], jnp.maximum(q_pos_BRQ, 0)[..., None], axis=1)
  S_BRC = adapter_window_probs(q_BRQd, chunk_keys(k_BTd, ends_BC), ends_BC, n_cand_BR, q_pos_BRQ)
  candidate_BRC = jnp.arange(P_BRC.shape[-1]) < n_cand_BR[..., None]
  log_S_BRC = jnp.log(jnp.maximum(renormalise(S_BRC), 1e-30))
  kl_BR = jnp.sum(jnp.where(candidate_BRC, jax.scipy.special.xlogy(P_BRC, P_BRC) - P_BRC * log_S_BRC, 0.0), -1)
  _, top_P = jax.lax.top_k(jnp.where(candidate_BRC, P_BRC, -1.0), recall_k)
  _, top_S = jax.lax.top_k(jax.lax.stop_gradient(jnp.where(candidate_BRC, S_BRC, -1.0)), recall_k)
  hits_BR = (top_P[..., :, None] == top_S[..., None, :]).any(-1).sum(-1) / recall_k
  return jnp.sum(kl_BR), jnp.sum(jnp.where(n_cand_BR > recall_k, hits_BR, 0.0))


def rows_loss(adapters: Adapters, rows: dict[str, Any], config: LossConfig = LossConfig()
              ) -> tuple[jnp.ndarray, dict[str, Any]]:
  """`L = BCE(p, y) + lambda * KL(P || S)` at the selection rows (`train.teacher_cache.teacher_rows`).

  Row r's student S is what `scorer="adapter"` computes at chunk r's boundary with a window of
  `config.student_queries` queries (`_row_terms`). KL is averaged over rows with a candidate and
  over layers; recall@k over rows with more than k."""
  rows = jax.tree.map(jax.lax.stop_gradient, rows)
  valid_BT = rows["valid_BT"].astype(bool)
  logit_BT = chunk_adapter_logits(adapters.params["chunk"], rows["h0_BTD"])
  labels_BT = rows["labels_BT"]
  y_BT = (labels_BT > 0).astype(jnp.float32)
  bce = _masked_mean(optax.sigmoid_binary_cross_entropy(logit_BT, y_BT), valid_BT)

  n_cand_BR = rows["n_cand_BC"]
  R = n_cand_BR.shape[1]
  k = min(config.recall_k, R)
  terms = jax.checkpoint(lambda xs: _row_terms(*xs, rows["ends_BC"], n_cand_BR, config.student_queries, k))
  kl_L, hits_L = jax.lax.map(terms, (adapters.params["qk"], jnp.moveaxis(rows["h_BLTD"], 1, 0),
                                     jnp.moveaxis(rows["target_BLCC"], 1, 0)))
  n_layers = kl_L.shape[0]
  n_rows = jnp.sum(n_cand_BR > 0)
  n_eligible = jnp.sum(n_cand_BR > k)
  kl = jnp.sum(kl_L) / jnp.maximum(n_layers * n_rows, 1)
  loss = bce + config.kl_weight * kl
  metrics = dict(loss=loss, bce=bce, kl=kl, chunk_recall=jnp.sum(hits_L) / jnp.maximum(n_layers * n_eligible, 1),
                 n_kl_queries=n_rows, n_recall_queries=n_eligible,
                 chunks_past_table=chunks_past_table(labels_BT, valid_BT, config),
                 **boundary_metrics(logit_BT, labels_BT, valid_BT, config.alpha))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def training_loss(adapters: Adapters, params: ModelParams, batch: dict[str, Any],
                  config: LossConfig = LossConfig()) -> tuple[jnp.ndarray, dict[str, Any]]:
  """The loss of `config.teacher` on a batch: token batches (`tokens`, `labels`), or, for a row
  target, rows already computed by the teacher cache (`h_BLTD`, ...), whose loss is the same."""
  if config.teacher == "token_mean":
    return chunkllm_loss(adapters, params, batch, config)
  if "h_BLTD" not in batch:
    from train import teacher_cache

    B, T = batch["tokens"].shape
    lengths = batch.get("lengths", jnp.full((B,), T, jnp.int32))
    batch = teacher_cache.teacher_rows(params, batch["tokens"], batch["labels"], lengths,
                                       rows_config_of(config, adapters.config.qk_layers))
  return rows_loss(adapters, batch, config)
