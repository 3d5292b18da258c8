"""Bytes-per-decode-step model on hand-made spans."""

import pytest

from pallas_kernels import bytes_model as bm

SHAPE = dict(n_kv_heads=3, head_dim=64, itemsize=2)
PER_TOKEN = 2 * 3 * 64 * 2  # K and V, bf16


def test_blocks_touched():
  assert bm.blocks_touched([], 64) == 0
  assert bm.blocks_touched([(0, 4)], 64) == 1
  assert bm.blocks_touched([(60, 8)], 64) == 2  # straddles a boundary
  assert bm.blocks_touched([(0, 4), (10, 20), (64, 1)], 64) == 2  # shared blocks count once
  assert bm.blocks_touched([(5, 0)], 64) == 0  # an empty span touches nothing
  assert bm.blocks_touched([(0, 256)], 64) == 4


def test_in_place_reads_whole_blocks():
  # sinks, two 30-token chunks in different blocks, and the open chunk
  spans = [(0, 4), (100, 30), (300, 30), (500, 10)]
  assert bm.kv_bytes_per_token(**SHAPE) == PER_TOKEN
  # blocks of 64: {0}, {1, 2}, {4, 5}, {7} -> 6 blocks
  assert bm.in_place_bytes(spans, block_size=64, **SHAPE) == 6 * 64 * PER_TOKEN
  # blocks of 512: all in block 0
  assert bm.in_place_bytes(spans, block_size=512, **SHAPE) == 512 * PER_TOKEN


def test_compaction_amortises_the_gather():
  selected = [(0, 4), (100, 30), (300, 30)]  # 64 tokens
  got = bm.compaction_bytes(selected, (500, 10), budget=80, block_size=64, tokens_per_chunk=32,
                            **SHAPE)
  # dense buffer + the open chunk's one block + (64 read + 80 written) / 32 steps
  assert got == pytest.approx((80 + 64 + (64 + 80) / 32) * PER_TOKEN)


def test_step_bytes_orders_the_designs():
  selected = [(0, 4)] + [(s, 25) for s in range(100, 2000, 200)]  # 10 scattered chunks
  step = bm.step_bytes(selected, (4000, 12), budget=256, block_size=256, tokens_per_chunk=25,
                       **SHAPE)
  assert step.retained == (4 + 250 + 12) * PER_TOKEN
  # chunks at 100, 300, ..., 1900 sit in blocks 0, 1, 1, 2, 3, 4, 5, 5, 6, 7; the open one in 15
  assert step.in_place == 9 * 256 * PER_TOKEN
  assert step.compaction == pytest.approx((256 + 256 + (254 + 256) / 25) * PER_TOKEN)
  assert step.retained < step.compaction < step.in_place
