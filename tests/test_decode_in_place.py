"""The decode loops update the stacked KV buffer in place: their compiled programs hold no copy of it.

A copy per layer is invisible in the tokens and costs a whole-buffer write per layer per step: with
a 2048-slot buffer (one decode block spanning it) XLA copied the buffer twice a layer, and decode
ran 2.9x (gemma3-270m) to 8.2x (smollm2-135m) slower (bench/RESULTS_generate.md)."""

import json
import os
import re
import subprocess
import sys

import pytest

import chunkllm_jax as cj
from chunkllm_jax import attention, decoding
from chunkllm_jax.chunk_generation import chunk_generate
from tests.tiny_models import chunk_params, prompts

# Buffer lengths: one smallest block, exactly one largest block, two of them, and one in between.
LENGTHS = [attention.DECODE_BLOCKS[-1], attention.DECODE_BLOCKS[0], 2 * attention.DECODE_BLOCKS[0],
           attention.DECODE_BLOCKS[0] + attention.DECODE_BLOCKS[-1]]


def _buffer_copies(hlo_text: str, shape: tuple[int, ...]) -> list[str]:
  """Lines of an optimized HLO module that copy an f32 array of `shape` (any layout)."""
  pattern = re.compile(r"= f32\[" + ",".join(map(str, shape)) + r"\]\S* copy\(")
  return [line.strip()[:160] for line in hlo_text.splitlines() if pattern.search(line)]


@pytest.fixture
def captured_programs(monkeypatch):
  """The `decoding.Programs` each generation call builds, in order (none kept from earlier tests: their
  executables would count here)."""
  seen, build = [], decoding.programs
  build.cache_clear()

  def capture(*args, **kw):
    progs = build(*args, **kw)
    seen.append(progs)
    return progs

  monkeypatch.setattr(decoding, "programs", capture)
  return seen


@pytest.mark.parametrize("buffer_len", LENGTHS)
@pytest.mark.parametrize("path", ["generate", "chunk_generate", "chunk_generate_half"])
def test_decode_loop_never_copies_the_kv_buffer(path, buffer_len, captured_programs):
  """(chunk_generate_half: each head's read half the buffer, so the per-head gathers take their largest blocks
  where the buffer is long enough.)"""
  params = chunk_params("gemma3")  # a sliding layer, a full one, sandwich norms
  cfg = params.config
  rows = prompts([30], seed=1)
  if path == "generate":
    cj.generate(params, rows, max_new_tokens=3, eos_ids=(), max_len=buffer_len)
  else:
    budget = dict(kv_budget=0.5) if path == "chunk_generate_half" else dict(top_chunks=2)
    chunk_generate(params, rows, max_new_tokens=3, eos_ids=(), max_len=buffer_len, max_chunks=buffer_len // 8,
                   max_chunk_len=8, n_local=1, **budget)
  (progs,) = captured_programs
  (loop,) = progs.loop.executables.values()
  shape = (cfg.n_layers, 1, buffer_len, cfg.n_kv_heads, cfg.head_dim)
  assert _buffer_copies(loop.as_text(), shape) == []


def test_bench_decode_step_times_a_step_and_refuses_a_context_outside_the_buffer(bench_script):
  """Also: block-size candidates timed side by side, and candidates that compile to one program refused."""
  bench = bench_script("decode_step")
  params = chunk_params("gemma3").replace(adapters=None)
  assert bench.step_ms(params, buffer_len=256, context=100, rounds=1, steps=2)[0] > 0
  # candidates for the block sizes, side by side: one time each
  ms = bench.step_ms(params, buffer_len=1024, context=700, blocks=[(2048, 256), (2048, 1024, 512, 256)], rounds=1,
                     steps=2)
  assert len(ms) == 2 and min(ms) > 0
  with pytest.raises(SystemExit, match="the same program"):  # both read a 1024-slot buffer in blocks of 256
    bench.step_ms(params, buffer_len=1024, context=700, blocks=[(2048, 256), (4096, 256)], rounds=1, steps=2)
  for cases in (["256:300"], ["256"], ["256:100:1"], ["abc:1"]):  # each refused with one error line, no traceback
    with pytest.raises(SystemExit):
      bench.main(["--models", "smollm2-135m", "--cases", *cases])
  for blocks in (["256,2048"], ["x"], ["0"]):
    with pytest.raises(SystemExit):
      bench.main(["--models", "smollm2-135m", "--blocks", *blocks])


_FREED_BLOCKS = """
import ctypes, json
from chunkllm_jax import decoding

def rss_mib():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
decoding.release_free_heap()
before = rss_mib()
blocks = [libc.malloc(16384) for _ in range(8192)]  # 128 MiB, each below the mmap threshold
for b in blocks:
  ctypes.memset(b, 1, 16384)  # touched: resident
keep = libc.malloc(64)  # in use above them, so the heap's top cannot shrink by itself
for b in blocks:
  libc.free(b)
held = rss_mib()
released = decoding.release_free_heap()
print(json.dumps(dict(before=before, held=held, after=rss_mib(), released=bool(released))))
"""


@pytest.mark.skipif(decoding._malloc_trim() is None, reason="not glibc: release_free_heap does nothing")
def test_release_free_heap_returns_freed_small_blocks_to_the_os():
  """What compiling leaves behind: many small blocks freed below one still in use, which glibc keeps
  mapped (they are not at the top of the heap) until `release_free_heap` hands them back. In a fresh
  process: a test worker's heap, after other tests, may already hold free resident pages that the
  blocks reuse, so they would not raise its RSS."""
  run = subprocess.run([sys.executable, "-c", _FREED_BLOCKS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  m = json.loads(run.stdout.strip().splitlines()[-1])
  assert m["released"]
  assert m["held"] - m["before"] > 100 and m["held"] - m["after"] > 100, m


@pytest.mark.parametrize("path", ["generate", "chunk_generate", "stream"])
def test_the_decode_program_compiles_before_the_prefill_runs_and_once(path, captured_programs, monkeypatch):
  """The loop (`stream`: the single step) is compiled from the prefill's output signature before the
  prefill allocates the KV buffer, so a compile's memory never comes on top of it; the real call then
  finds that compile (one executable per program)."""
  ready_at_prefill = []
  timed, call = decoding.Compiled.timed, decoding.Compiled.__call__

  def note(compiled):
    progs = captured_programs[-1]
    if compiled is progs.prefill:
      ready_at_prefill.append(len((progs.step if path == "stream" else progs.loop).executables))

  monkeypatch.setattr(decoding.Compiled, "timed", lambda self, *a: (note(self), timed(self, *a))[1])
  monkeypatch.setattr(decoding.Compiled, "__call__", lambda self, *a: (note(self), call(self, *a))[1])
  params = chunk_params("llama", seed=3)
  rows = prompts([21, 9], seed=4)
  if path == "generate":
    cj.generate(params, rows, max_new_tokens=4, eos_ids=())
  elif path == "stream":
    assert len(list(cj.stream(params, rows, max_new_tokens=4, eos_ids=()))) == 4
  else:
    chunk_generate(params, rows, max_new_tokens=4, eos_ids=(), top_chunks=2, max_chunk_len=8, n_local=1)
  (progs,) = captured_programs
  assert ready_at_prefill == [1]
  used = progs.step if path == "stream" else progs.loop
  assert len(progs.prefill.executables) == len(used.executables) == 1


def test_stream_of_one_token_compiles_no_step(captured_programs):
  params = chunk_params("llama", seed=3)
  assert len(list(cj.stream(params, prompts([13], seed=5), max_new_tokens=1, eos_ids=()))) == 1
  (progs,) = captured_programs
  assert (len(progs.prefill.executables), len(progs.step.executables), len(progs.loop.executables)) == (1, 0, 0)


@pytest.mark.skipif(decoding.memory_maps() == (0, 0), reason="no /proc: no count of memory mappings")
def test_compiled_programs_are_dropped_near_the_map_limit(monkeypatch):
  """Each loaded XLA:CPU executable holds memory mappings; a process past the kernel's limit aborts inside
  XLA. Past the share, the compiled programs are dropped and their mappings go with them; under it, kept."""
  monkeypatch.setattr(decoding, "_maps_after_drop", 0)
  params = chunk_params("llama", seed=4)
  new = chunk_generate(params, prompts([40]), max_new_tokens=3, top_chunks=2).tokens
  before, limit = decoding.memory_maps()
  assert not decoding.drop_compiled_near_map_limit(share=(before + 100) / limit)
  assert decoding.programs.cache_info().currsize > 0
  with pytest.warns(UserWarning, match="vm.max_map_count"):  # a share of 0 is never met: said so
    assert decoding.drop_compiled_near_map_limit(share=0.0)
  after, _ = decoding.memory_maps()
  assert decoding.programs.cache_info().currsize == 0 and after < before - 200, (before, after)
  again = chunk_generate(params, prompts([40]), max_new_tokens=3, top_chunks=2).tokens  # compiled anew: the same
  assert (again == new).all()


@pytest.mark.skipif(decoding.memory_maps() == (0, 0), reason="no /proc: no count of memory mappings")
def test_every_compile_looks_at_the_map_limit_first(monkeypatch):
  """`Compiled` drops the programs before it compiles, where the process is past the share: the programs of
  the call under way are dropped from the cache too (and compile again at the next call)."""
  params = chunk_params("llama", seed=5)
  monkeypatch.setattr(decoding, "MAP_SHARE", 0.0)
  monkeypatch.setattr(decoding, "_maps_after_drop", 0)
  with pytest.warns(UserWarning, match="vm.max_map_count"):
    chunk_generate(params, prompts([40]), max_new_tokens=3, top_chunks=3)
  assert decoding.programs.cache_info().currsize == 0


def test_a_drop_that_cannot_get_under_the_share_raises_the_next_trigger(monkeypatch):
  """Where mappings held outside the project's caches keep the count over the share after a drop, the next
  drop waits until the project's programs fill `share` of the headroom left, instead of coming at every
  compile; a drop that gets under the share brings the trigger back to the share of the limit."""
  limit, held = 1000, [0]
  drops = []
  monkeypatch.setattr(decoding, "memory_maps", lambda: (held[0], limit))
  monkeypatch.setattr(decoding, "clear_compiled", lambda: drops.append(held[0]) or held.__setitem__(0, floor[0]))
  monkeypatch.setattr(decoding, "_maps_after_drop", 0)
  floor = [700]  # what the drops leave: 700 of 1000, over half
  held[0] = 500
  assert not decoding.drop_compiled_near_map_limit(0.5)  # at the share: kept
  held[0] = 520
  with pytest.warns(UserWarning, match="waits until 850"):
    assert decoding.drop_compiled_near_map_limit(0.5)
  assert held[0] == 700 and decoding.map_trigger(0.5, limit) == 850
  held[0] = 840  # compiles since: past the share, under the raised trigger
  assert not decoding.drop_compiled_near_map_limit(0.5)
  held[0], floor[0] = 860, 300  # past it; the outside holder is gone meanwhile
  assert decoding.drop_compiled_near_map_limit(0.5)
  assert decoding.map_trigger(0.5, limit) == 500 and drops == [520, 860]
