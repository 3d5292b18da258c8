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
