"""Token sampling: greedy, temperature, top-k and top-p (nucleus), all jit-friendly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static sampling settings. temperature == 0 means greedy (and ignores the rest)."""

  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k cut
  top_p: float = 1.0  # 1.0: no nucleus cut

  def __post_init__(self):
    if not self.temperature >= 0:  # NaN too: it would sample token 0 every step
      raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
    if self.temperature == float("inf"):
      raise ValueError("temperature must be a finite number >= 0 (0 is greedy), got inf")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @classmethod
  def of(cls, temperature, top_k, top_p) -> "Sampling":
    """The settings as the compiled programs are keyed by them: greedy ignores top_k and top_p, so every
    greedy call shares one program (one with a top_k or top_p left beside temperature 0 compiled again)."""
    given = cls(float(temperature), int(top_k or 0), float(top_p))  # checked as given, greedy or not
    return cls() if given.temperature == 0.0 else given


def sample(logits_BV: jnp.ndarray, keys_B: jax.Array, s: Sampling) -> jnp.ndarray:
  """Returns token ids [B] int32; row b draws with its own key `keys_B[b]` (what it draws depends on no other
  row)."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  # Shifted by the row's maximum before the division: softmax is the same, and a tiny temperature cannot
  # overflow the leading logits to +inf (several infinite logits would tie, and any of them could be drawn).
  logits = logits_BV.astype(jnp.float32)
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < s.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32)
