"""Test setup: offline, CPU, and 8 fake devices for the sharding tests.

The environment must be set before jax is imported anywhere, hence module level here.
"""

import getpass
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA cache for the whole run, shared by the xdist workers and by the subprocesses
# the tests start (the CLI, the notebooks' kernels): the same programs are otherwise compiled again
# in each worker and after each module's clearing (`_free_compiled_programs`). On three real-model
# test files it cut the CPU time by 8% from an empty cache, and by 45% from a warm one.
# Programs over several devices stay out of it (the `multi_device` marker, and
# `JAX_ENABLE_COMPILATION_CACHE=false` in multi-device subprocesses): XLA:CPU executables with
# collectives, loaded from the cache, deadlock in their all-gathers (jax 0.10.2, reproduced by
# running the sharded chunk_generate test twice on one cache directory).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"chunkllm-jax-test-xla-cache-{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))  # least recently used go first

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices; was jax imported before conftest?"
  config.addinivalue_line("markers", "multi_device: runs programs over several devices, so compiles "
                          "without the persistent XLA cache")
  # The tiny models' prompts of tens of tokens with budgets of a few tokens read more than the budget, and small
  # chunk tables fill, on purpose in many tests: chunk_generate's warnings about it are asserted where they are
  # the subject (tests/test_chunk_generate.py), and would only crowd every other test's output.
  for message in ("row.* of the KV against a budget", "the chunk table .* filled"):
    config.addinivalue_line("filterwarnings", f"ignore:{message}:UserWarning")


@pytest.fixture(autouse=True)
def _no_persistent_cache_across_devices(request):
  """Compiles a `multi_device` test's programs without the persistent cache (see the top of this file)."""
  if request.node.get_closest_marker("multi_device") is None:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # the cache remembers per process whether it is in use
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def smollm2():
  """The real default model, loaded once per session (float32)."""
  import chunkllm_jax as cj

  return cj.load("smollm2-135m", dtype="float32")


PROJECT_PACKAGES = ("chunkllm_jax", "pallas_kernels", "train", "eval", "tests")  # whose compiled programs are dropped


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops the project's compiled programs after each test module (`decoding.clear_compiled`).

  One pytest process compiles thousands of XLA programs; kept all at once, the whole suite aborted
  inside XLA at about 85% (in whichever test came next), while every module passed on its own."""
  yield
  from chunkllm_jax import decoding

  decoding.clear_compiled(PROJECT_PACKAGES)


@pytest.fixture(autouse=True)
def _free_compiled_programs_before_the_map_limit():
  """Drops the compiled programs after a test that leaves the process over half the kernel's limit on memory
  mappings. Every loaded XLA:CPU executable holds some; tests/test_chunk_generate.py alone reached Linux's usual
  limit of 65530 (63377 sampled just before) and the next executable loaded (from the persistent cache) crashed
  inside XLA (SIGSEGV or SIGABRT), in whichever test came next. (The library's own guard,
  `decoding.drop_compiled_near_map_limit`, runs before the compiles of generation's programs; this one also
  covers the functions tests jit and call directly, and the tests' own modules.)"""
  yield
  from chunkllm_jax import decoding

  n, limit = decoding.memory_maps()
  if limit and n > decoding.MAP_SHARE * limit:
    decoding.clear_compiled(PROJECT_PACKAGES)


@pytest.fixture(scope="session")
def bench_script():
  """Loads a script of bench/ as a module (bench/ is not a package): `bench_script("bench_kernels")`."""
  import importlib.util
  import pathlib

  def load(name: str):
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

  return load


@pytest.fixture(scope="session")
def tokenizer():
  """The real default model's tokenizer (no weights read); skips where the model is not installed."""
  from chunkllm_jax import registry, weights

  try:
    path = registry.resolve("smollm2-135m")
  except registry.ModelNotInstalledError as e:
    pytest.skip(str(e))
  return weights.load_tokenizer((str(path.parent), path.name))
