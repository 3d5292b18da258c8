"""bench/profile_decode_step.py at a tiny context: a per-head ChunkLLM step is traced and its operations
listed with their times and what they fuse."""

import dataclasses
import re


def test_a_decode_step_is_traced_and_its_operations_listed(bench_script, capsys, monkeypatch):
  profile = bench_script("profile_decode_step")
  # smollm2-135m's layers, 4 of them and a small vocabulary: the 30 layers' random weights alone took 30 s
  monkeypatch.setattr(profile.bc, "CFG", dataclasses.replace(profile.bc.CFG, n_layers=4, vocab_size=1024))
  profile.main(["--context", "256", "--steps", "1", "--top", "6", "--selection", "kv_head", "--score_rank", "8",
                "--score_estimate", "lowrank", "--score_sketch", "64"])
  out = capsys.readouterr().out
  assert re.search(r"kv_head decode step at 256 keys: [\d.]+ ms a step", out), out
  rows = [line for line in out.splitlines() if re.match(r"\s*\d+\.\d\d\s+\d+\s+\S", line)]
  assert len(rows) == 6, out
  times = [float(r.split()[0]) for r in rows]
  assert times == sorted(times, reverse=True) and times[0] > 0


def test_a_loop_is_named_by_its_body(bench_script):
  """A while loop's row says what its body does (its largest fusions, dots and gathers), so that the loops of a
  step can be told apart."""
  import jax
  import jax.numpy as jnp

  profile = bench_script("profile_decode_step")
  x = jnp.ones((64, 64), jnp.float32)
  hlo = jax.jit(lambda x: jax.lax.fori_loop(0, jnp.int32(x[0, 0]) + 2, lambda i, c: jnp.tanh(c @ x), x)).lower(
      x).compile().as_text()
  loops = re.findall(r"%(while[\w.-]*) = ", hlo)
  assert loops, hlo
  described = profile._fused_ops(hlo, loops[0])
  assert described.startswith("loop over: ") and "[64,64]" in described, described
