"""The command line, run as a user would (a subprocess), on the real default model."""

import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "chunkllm_jax", *args], capture_output=True, text=True,
                        env=env, timeout=timeout)


@pytest.mark.real_model
def test_generate_streams_text_and_reports_speed(tmp_path):
  prompt = tmp_path / "prompt.txt"
  prompt.write_text("The capital of France is", encoding="utf-8")
  res = run_cli("generate", "--model", "smollm2-135m", "--prompt-file", str(prompt), "--max-new-tokens", "8")
  assert res.returncode == 0, res.stderr
  assert "Paris" in res.stdout
  assert "tok/s" in res.stderr


def test_bad_model_path_is_a_clear_error(tmp_path):
  res = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
  assert res.returncode != 0
  assert "no model at" in res.stderr and "smollm2-135m" in res.stderr


def test_non_utf8_prompt_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\xff\xfe\x00bad")
  res = run_cli("generate", "--prompt-file", str(bad))
  assert res.returncode != 0 and "is not UTF-8 text" in res.stderr


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
  """Untrained adapters for smollm2-135m, exported: enough to drive the command line."""
  import jax

  import chunkllm_jax as cj
  from chunkllm_jax import weights

  cfg, _, _ = weights.load_backbone("smollm2-135m")
  out = tmp_path_factory.mktemp("adapters") / "export"
  cj.save_adapters(cj.init_adapters(jax.random.key(0), cfg), out, model_config=cfg, backbone="smollm2-135m")
  return out


@pytest.mark.real_model
def test_generate_chunk_prints_text_and_stats(random_export):
  res = run_cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--chunk",
                "--adapters", str(random_export))
  assert res.returncode == 0, res.stderr
  assert "kv retention" in res.stderr and "selections" in res.stderr


@pytest.mark.real_model
def test_demo_answers_with_both_rules(random_export):
  res = run_cli("demo", "--context", "512", "--adapters", str(random_export))
  assert res.returncode == 0, res.stderr
  assert "vanilla:" in res.stdout and "ChunkLLM:" in res.stdout and "shared rule:" in res.stdout
  assert res.stdout.count("of the KV cache") == 3  # ChunkLLM at 25% and 50%, the shared rule at 25%
  assert "25% budget" in res.stdout and "50% budget" in res.stdout


def test_adapters_for_another_model_are_refused(tmp_path):
  import jax

  import chunkllm_jax as cj

  other = cj.ModelConfig(arch="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                         d_ff=64)
  cj.save_adapters(cj.init_adapters(jax.random.key(0), other), tmp_path / "x", model_config=other, backbone="tiny")
  res = run_cli("generate", "--prompt", "hi", "--chunk", "--adapters", str(tmp_path / "x"))
  # refused before the backbone loads: the error is the first and only line
  assert res.returncode == 2 and res.stderr.startswith("error: ") and "vs model" in res.stderr


@pytest.mark.parametrize("flags, want", [
    ([], {}),  # each setting left out keeps its ChunkConfig default
    (["--kv-budget", "0.25", "--recent-share", "0", "--no-boundary-tokens"],
     dict(kv_budget=0.25, recent_share=0.0, boundary_tokens=False)),
    (["--top-k-chunks", "8", "--boundary-tokens"], dict(top_chunks=8, kv_budget=None, boundary_tokens=True)),
    (["--kv-budget", "0.125", "--boundary-share", "0.25"], dict(kv_budget=0.125, boundary_share=0.25)),
    (["--selection", "kv_head", "--score-rank", "16"], dict(selection="kv_head", score_rank=16)),
    (["--selection", "kv_head", "--score-rank", "16", "--score-estimate", "lowrank"],
     dict(selection="kv_head", score_rank=16, score_estimate="lowrank")),
    (["--selection", "kv_head", "--score-rank", "16", "--score-estimate", "lowrank", "--score-sketch", "64"],
     dict(selection="kv_head", score_rank=16, score_estimate="lowrank", score_sketch=64)),
    (["--selection", "kv_head", "--score-rank", "16", "--score-estimate", "lowrank", "--score-sketch", "64",
      "--sketch-estimate", "qjl"],
     dict(selection="kv_head", score_rank=16, score_estimate="lowrank", score_sketch=64, sketch_estimate="qjl")),
    (["--selection", "kv_head", "--head-refresh", "4"], dict(selection="kv_head", head_refresh=4)),
])
def test_chunk_flags_reach_the_chunk_config(flags, want):
  from chunkllm_jax import cli

  args = cli._parser().parse_args(["generate", "--prompt", "hi", "--chunk", *flags])
  assert cli._chunk_settings(args) == want


@pytest.mark.parametrize("flags, message", [
    (["--kv-budget", "0.5", "--score-sketch", "64"], "--kv-budget, --score-sketch: ChunkLLM settings"),
    (["--top-k-chunks", "3"], "--top-k-chunks: ChunkLLM settings"),
    (["--adapters", "smollm2-135m"], "--adapters: ChunkLLM settings, which dense generation ignores; add --chunk"),
    (["--chunk", "--kv-budget", "1.5"], "--kv-budget is a fraction"),  # named by its flag
    (["--chunk", "--kv-budget", "0.25", "--boundary-share", "2"], r"--boundary-share is a share of what the budget"),
    (["--chunk", "--score-sketch", "33"], "multiple of 32"),
    (["--chunk", "--scorer", "attention"], "--scorer='attention' makes the shared rule's selections; it needs "
                                           "--selection='shared'"),  # the per-head rule never reads it
    (["--seed", str(2**70)], "seed must fit in 64 bits"),
    (["--chunk", "--prompt", "  "], "the prompt is empty"),
    (["--chunk", "--kv-budget", "0.25", "--top-k-chunks", "4"], "with --kv-budget=0.25 it would be unused"),
    (["--chunk", "--adapters", "/nonexistent/export"], "no adapter export at"),  # read before the backbone
    (["--prompt", "word " * 9000], "more than smollm2-135m's context of 8192: shorten the prompt"),  # tokenized only
    (["--prompt", "word " * 8000, "--max-new-tokens", "500"], "give --max-new-tokens"),
])
def test_generate_flags_are_judged_before_the_model_loads(flags, message, monkeypatch, capsys):
  """ChunkLLM settings without --chunk (dense generation would ignore them), bad chunk settings, a seed jax cannot
  take and an empty prompt: refused with exit 2 and one line, before any weights are read."""
  import chunkllm_jax as cj
  from chunkllm_jax import cli

  monkeypatch.setattr(cj, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  argv = ["generate", "--prompt", "hi", *flags] if "--prompt" not in flags else ["generate", *flags]
  with pytest.raises(SystemExit) as exit_:
    cli.main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--context", "8000"], "makes a prompt of"),  # the document's real length, with the question and the template
    (["--context", "9000"], "does not fit smollm2-135m's 8192 positions"),
    (["--kv-budget", "0"], "--kv-budget is a fraction"),
    (["--seed", "-1"], "--seed picks the demo's document"),
    (["--adapters", "/nonexistent/export"], "no adapter export at"),
])
def test_demo_flags_are_judged_before_the_model_loads(flags, message, monkeypatch, capsys):
  """The demo's settings, its prompt's real length and its adapters are judged before the backbone's weights."""
  import chunkllm_jax as cj
  from chunkllm_jax import cli

  monkeypatch.setattr(cj, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  with pytest.raises(SystemExit) as exit_:
    cli.main(["demo", *flags])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
  if "makes a prompt of" in message:  # the advice fits: that context's prompt and answer are within the model's
    fits = int(err.split("give --context ")[1].split()[0])
    from chunkllm_jax import haystack, prompts, weights
    tok = weights.load_tokenizer(weights.tokenizer_source("smollm2-135m"))
    ids = prompts.encode_prompt(tok, haystack.passkey_prompt(tok, fits, 0.5)[0])
    assert len(ids) + cli.DEMO_NEW_TOKENS <= 8192


@pytest.mark.parametrize("flags, want, rule", [
    ([], [(None, None), (None, None), ("shared", "attention")],  # the defaults, then the shared rule's run
     "shared rule: the paper's, one selection at each chunk boundary by the frozen model's own attention"),
    (["--selection", "shared"], [("shared", "attention"), ("shared", "attention")],
     "ChunkLLM (selection='shared', the paper's rule): the Chunk Adapter cuts the text into chunks, and one "
     "selection at each chunk boundary, by the frozen model's own attention"),
])
def test_demo_gives_the_scorer_to_the_shared_rules_runs(monkeypatch, capsys, flags, want, rule):
  """--scorer is the shared rule's: it reaches every run of that rule (it was once dropped for the QK Adapters'),
  and not the per-head rule's, which refuses it; the closing line describes the rules that ran."""
  import numpy as np

  import chunkllm_jax as cj
  from chunkllm_jax import cli

  class Output:  # what the demo prints from a run
    stats = {k: np.array([v]) for k, v in dict(kv_retention=0.25, bytes_per_step=1.0, dense_bytes_per_step=4.0,
                                                decode_tok_s=1.0, prefill_s=1.0).items()}

    def new_tokens(self, row):
      return np.array([28, 29])

  seen = []
  monkeypatch.setattr(cj, "chunk_generate", lambda *a, **k: seen.append((k.get("selection"), k.get("scorer"))) or Output())
  monkeypatch.setattr(cli, "_load_backbone", lambda args, tok: cj.Model(*cj.load("smollm2-135m", tokenizer=False)[:2], tok))
  monkeypatch.setattr(cj, "generate", lambda *a, **k: Output())
  cli.main(["demo", "--context", "512", "--scorer", "attention", *flags])
  assert seen == want
  assert rule in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("a, b, want", [(3.0, 2.0, "1.50x"), (1.0, 0.0, "n/a"), (0.0, 2.0, "n/a"),
                                        (float("nan"), 2.0, "n/a")])
def test_demo_speed_ratio_of_a_run_without_decode_steps_is_not_a_number(a, b, want):
  """A run whose first new token ends it has no decode speed (0): the demo says so rather than print inf."""
  from chunkllm_jax import cli

  assert cli._times(a, b) == want


@pytest.mark.parametrize("max_new_tokens, why", [(1, "(--max-new-tokens 1)"), (64, "(the first new token ended the answer)")])
def test_a_run_without_decode_steps_says_why(capsys, max_new_tokens, why):
  """No decode step ran: one new token was all that was asked for, or the first one ended the answer."""
  import numpy as np

  from chunkllm_jax import cli

  stats = dict(kv_retention=np.array([np.nan]), n_chunks=np.array([3]), prefill_s=np.array([0.5]))
  cli._print_stats(stats, max_new_tokens=max_new_tokens)
  assert f"3 chunks, no decode step {why}, prefill 0.50s" in capsys.readouterr().err
