"""Bytes of KV read per decode step, per row and layer, for the two ways to read a selection.

Semantic chunks (20 to 40 tokens) do not line up with kernel blocks (64 to 512 tokens), so reading
the selection in place reads whole blocks; compaction reads a dense buffer but pays a gather at
each boundary (docs/design.md, section 7, "Working buffer"). Spans are (start, length) in
tokens. Plain Python: use it on recorded spans, or to pick a design before running anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


def kv_bytes_per_token(*, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
  """K and V of one token in one layer."""
  return 2 * n_kv_heads * head_dim * itemsize


def blocks_touched(spans: Iterable[tuple[int, int]], block_size: int) -> int:
  """Distinct blocks holding any token of the spans."""
  blocks = set()
  for start, length in spans:
    if length > 0:
      blocks.update(range(start // block_size, (start + length - 1) // block_size + 1))
  return len(blocks)


def tokens_in(spans: Iterable[tuple[int, int]]) -> int:
  """Distinct tokens covered by the spans."""
  return len({t for start, length in spans for t in range(start, start + length)})


def in_place_bytes(spans, *, block_size: int, n_kv_heads: int, head_dim: int,
                   itemsize: int) -> int:
  """Reading the visible spans from the static buffer: every touched block, whole."""
  per_token = kv_bytes_per_token(n_kv_heads=n_kv_heads, head_dim=head_dim, itemsize=itemsize)
  return blocks_touched(spans, block_size) * block_size * per_token


def compaction_bytes(gathered_spans, open_span: tuple[int, int], *, budget: int,
                     block_size: int, tokens_per_chunk: float, n_kv_heads: int, head_dim: int,
                     itemsize: int) -> float:
  """Reading a compacted working buffer, per step.

  - the whole buffer, `budget` tokens, densely;
  - the tokens appended since the last boundary (`open_span`), in place, by blocks;
  - the gather at the boundary (read the gathered tokens, write `budget` slots), spread over
    the `tokens_per_chunk` decode steps until the next boundary.
  """
  per_token = kv_bytes_per_token(n_kv_heads=n_kv_heads, head_dim=head_dim, itemsize=itemsize)
  dense = budget * per_token
  fresh = blocks_touched([open_span], block_size) * block_size * per_token
  gather = (tokens_in(gathered_spans) + budget) * per_token / tokens_per_chunk
  return dense + fresh + gather


@dataclasses.dataclass(frozen=True)
class StepBytes:
  retained: int  # the visible tokens alone: what the retention rate counts
  in_place: int
  compaction: float


def step_bytes(selected_spans, open_span: tuple[int, int], *, budget: int, block_size: int,
               tokens_per_chunk: float, n_kv_heads: int, head_dim: int,
               itemsize: int) -> StepBytes:
  """Both designs for one step. `selected_spans`: sinks, selected and local chunks (not open)."""
  shape = dict(n_kv_heads=n_kv_heads, head_dim=head_dim, itemsize=itemsize)
  visible = list(selected_spans) + [open_span]
  return StepBytes(
      retained=tokens_in(visible) * kv_bytes_per_token(**shape),
      in_place=in_place_bytes(visible, block_size=block_size, **shape),
      compaction=compaction_bytes(selected_spans, open_span, budget=budget,
                                  block_size=block_size, tokens_per_chunk=tokens_per_chunk,
                                  **shape))
