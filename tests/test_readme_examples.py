"""The README's Python examples, run as written on the real default model. They are where a user's first
code comes from: an argument, field or stat renamed in the library and not there fails here, not in a
user's session."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(first_line: str, leave_out: tuple[str, ...] = ()) -> str:
  """The README's ```python block that starts with `first_line`, without its lines holding any of `leave_out`
  (each must be there: a README that drops one fails here rather than testing less)."""
  blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith(first_line)]
  assert len(blocks) == 1, f"one README python block starts with {first_line!r}; found {len(blocks)}"
  lines = blocks[0].splitlines()
  for part in leave_out:
    assert any(part in line for line in lines), f"the README block no longer holds {part!r}"
  return "\n".join(line for line in lines if not any(part in line for part in leave_out))


@pytest.fixture
def readme_namespace(smollm2, monkeypatch):
  """The names the README's blocks share, with `cj.load` of the default model served by the session's copy."""
  import chunkllm_jax as cj

  def load(name, dtype=None, **kwargs):
    assert (name, dtype, kwargs) == ("smollm2-135m", "float32", {}), "the README loads the default model in float32"
    return smollm2

  monkeypatch.setattr(cj, "load", load)
  namespace = {}
  exec(python_block("import chunkllm_jax as cj"), namespace)
  return namespace


def test_the_python_api_and_chunk_generate_examples_run(readme_namespace):
  ns = readme_namespace
  out = ns["out"]
  assert out.tokens.shape[0] == 2 and len(out.new_tokens(0)) > 0  # the ragged, sampled batch of two rows
  assert set(out.stats) >= {"prefill_s", "decode_tok_s"}
  exec(python_block("params = cj.with_adapters("), ns)
  stats = ns["out"].stats  # the last call's: the paper's rule with the untrained scorer
  assert 0 < float(stats["kv_retention"][0]) <= 1 and int(stats["n_chunks"][0]) > 0
  assert int(stats["n_selections"][0]) > 0 and float(stats["bytes_per_step"][0]) > 0
  # the shipped adapters' lines of the export section (the first reads a training run's export)
  exec(python_block("adapters = cj.load_adapters(", leave_out=("runs/smollm2/export",)), ns)
  assert ns["params"].adapters is not None


@pytest.mark.multi_device
def test_the_sharded_generation_example_runs(readme_namespace):
  ns = readme_namespace
  ns["prompts"] = [ns["ids"], ns["ids"][:3]]  # the README's `prompts`: any batch of token lists
  exec(python_block("mesh = cj.make_mesh("), ns)
  plain = ns["cj"].generate(ns["model"].params, ns["prompts"], max_new_tokens=64)
  assert (ns["out"].tokens == plain.tokens).all()  # greedy: the mesh changes where it runs, not what it makes
