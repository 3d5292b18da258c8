"""train.pick_layers: ranks against a numpy reference, the greedy pick on synthetic scores, --write
touching only selection_layers (and nothing where it refuses), calibration prompts that share no
wording with the evaluation's needles, one whole run on a tiny random model, and --out refused where it
holds files that pick_layers did not write."""

import ast
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkllm_jax as cj
from chunkllm_jax import adapter_io, adapters as adp, model, weights
from chunkllm_jax.chunk_config import ChunkConfig
from tests.tiny_models import chunk_params
from tests.tiny_models import prompts, tiny_params
from tests.out_folder_fixtures import assert_refused_untouched, users_folder
from train import pick_layers as pl

SHIPPED = Path(cj.__file__).parent / "adapters_data" / "smollm2-135m"


@pytest.fixture
def text_file(tmp_path):
  docs = [" ".join(f"Document {d} sentence {s} tells of the weather and the fields." for s in range(3))
          for d in range(6)]
  path = tmp_path / "train.txt"
  path.write_text("\n\n".join("\n".join(f"Line {i} of doc {d}: {doc}" for i in range(8)) for d, doc in enumerate(docs)))
  return path


def numpy_init(make, seed=0):
  """The model `make()` builds, filled by numpy (jax's random initialisers take seconds to compile):
  gains near 1, weights N(0, 0.3)."""
  rng = np.random.default_rng(seed)
  fill = lambda s: (1 + 0.1 * rng.standard_normal(s.shape)) if len(s.shape) == 1 else 0.3 * rng.standard_normal(s.shape)
  return jax.tree.map(lambda s: jnp.asarray(fill(s), s.dtype), jax.eval_shape(make))


@jax.jit
def qk_by_layer(params, toks, lens):
  """Each layer's q and k at every position, rebuilt from the first l layers' output: a path apart from
  capture_qk's attend_fn."""
  cfg = params.config
  T = toks.shape[1]
  pos = jnp.arange(T)[None]
  consts = model.layer_constants(cfg)
  out = []
  for l in range(cfg.n_layers):
    x = model.embed(params, toks)
    if l:  # a model of the first l layers: a config of zero layers is refused
      first = jax.tree.map(lambda w: w[:l], params.backbone["layers"])
      sub = params.replace(backbone={**params.backbone, "layers": first},
                           config=cfg.replace(n_layers=l, layer_sliding=cfg.layer_sliding[:l]))
      x, _, _ = model.run_layers(sub, x, pos, model.self_attend_fn(sub.config, pos, pos < lens[:, None]))
    lp = jax.tree.map(lambda w: w[l], params.backbone["layers"])
    q, k, _ = model.project_qkv(cfg, lp, model.rms_norm(x, lp["attn_norm"], cfg), pos,
                                jax.tree.map(lambda c: c[l], consts))
    out.append((q[0], k[0], model.rms_norm(x, lp["attn_norm"], cfg)[0]))
  return out


def numpy_probs(q_HD, k_TKD, ends, n_cand, n_sink, scale):
  """Per head, softmax over the candidates' tokens, summed per chunk; max over heads."""
  H, K = q_HD.shape[0], k_TKD.shape[1]
  toks = np.arange(n_sink, ends[n_cand - 1] + 1)
  s = np.einsum("hd,thd->ht", q_HD, np.repeat(k_TKD[toks], H // K, axis=1)) * scale
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  starts = np.r_[n_sink, ends[:-1] + 1]
  mass = np.stack([p[:, starts[j] - n_sink:ends[j] + 1 - n_sink].sum(-1) for j in range(n_cand)], -1)
  return mass.max(0)


@pytest.mark.parametrize("score_queries", [1, 3])
def test_ranks_match_a_numpy_reference(score_queries):
  params = numpy_init(lambda: chunk_params(seed=3), seed=3)
  ids = [int(t) for t in prompts([100], seed=5)[0]]
  ccfg = ChunkConfig(n_local=2, max_chunk_len=6, alpha=0.9, score_queries=score_queries)
  toks, lens = jnp.asarray([ids + [0] * 28], jnp.int32), jnp.asarray([100])
  ends = np.flatnonzero(np.asarray(pl.segment_prompts(params, toks, lens, ccfg)[0]))
  n_cand = len(ends) - ccfg.n_local
  ref_qk = jax.tree.map(np.asarray, qk_by_layer(params, toks, lens))
  for needle in (0, n_cand // 2, n_cand - 1):
    r = pl.prompt_ranks(params, ids, int(ends[needle]), ccfg)
    assert (r["needle_chunk"], r["n_candidates"], r["n_chunks"]) == (needle, n_cand, len(ends))
    for l, (q, k, _) in enumerate(ref_qk):
      # the max over the last `score_queries` queries (the candidates all precede them)
      ref = np.max([numpy_probs(q[t], k, ends, n_cand, ccfg.n_sink, params.config.attn_scale)
                    for t in range(100 - score_queries, 100)], axis=0)
      np.testing.assert_allclose(r["probs"][l], ref, rtol=1e-4, atol=1e-6)
      assert r["ranks"][l] == pl.rank_of(ref, needle)
  assert pl.prompt_ranks(params, ids, int(ends[-1]), ccfg) is None  # a local chunk: not ranked
  assert pl.rank_of(np.asarray([0.2, 0.5, 0.5, 0.1]), 1) == 2  # ties count against the target


@pytest.mark.parametrize("window, vote", [(1, "sum"), (3, "max")])
def test_student_ranks_match_a_numpy_reference(window, vote):
  """The adapters' vote at the prompt's end: per selection layer, each of the last `window` q~'s
  softmax over the candidates' k~ (at the chunk ends), the max over the window, then the vote."""
  params = numpy_init(lambda: chunk_params(seed=3), seed=3)
  ids = [int(t) for t in prompts([100], seed=5)[0]]
  ccfg = ChunkConfig(n_local=2, max_chunk_len=6, alpha=0.9)
  student = ChunkConfig(n_local=2, score_queries=window, vote=vote, selection_layers=(0, 2)).resolve(
      params.config.full_attention_layers, params.adapters.config.qk_layers)
  toks, lens = jnp.asarray([ids + [0] * 28], jnp.int32), jnp.asarray([100])
  ends = np.flatnonzero(np.asarray(pl.segment_prompts(params, toks, lens, ccfg)[0]))
  n_cand = len(ends) - ccfg.n_local
  h_by_layer = [np.asarray(h) for _, _, h in qk_by_layer(params, toks, lens)]
  per_layer = []
  for l in student.selection_layers:
    p = jax.tree.map(lambda w: w[params.adapters.config.qk_layers.index(l)], params.adapters.params["qk"])
    qt, kt = (np.asarray(x) for x in adp.qk_adapter_apply(p, jnp.asarray(h_by_layer[l])[None]))
    probs = []
    for t in range(100 - window, 100):
      s = kt[0, ends[:n_cand]] @ qt[0, t] / np.sqrt(qt.shape[-1])
      probs.append(np.exp(s - s.max()) / np.exp(s - s.max()).sum())
    per_layer.append(np.max(probs, axis=0))
  ref = np.sum(per_layer, 0) if vote == "sum" else np.max(per_layer, 0)
  for needle in (0, n_cand - 1):
    r = pl.prompt_ranks(params, ids, int(ends[needle]), ccfg, student)
    # Candidates whose reference scores tie within float32 noise may fall either way in the jnp vote.
    near = np.abs(ref - ref[needle]) <= 1e-5 * np.abs(ref).max()
    lo, hi = int(np.sum((ref > ref[needle]) & ~near)) + 1, int(np.sum((ref >= ref[needle]) | near))
    assert lo <= r["student_rank"] <= hi
  chunk_end = np.full((1, 128), -1, np.int32)
  chunk_end[0, :len(ends)] = ends
  got = pl.student_scores(params, toks, lens, jnp.asarray(chunk_end), jnp.asarray([n_cand]),
                          selection_layers=student.selection_layers, n_queries=window, vote=vote)
  np.testing.assert_allclose(np.asarray(got)[0, :n_cand], ref, rtol=1e-4, atol=1e-6)


def synthetic_probs(seed=0):
  """5 layers, 10 prompts, 6 candidates, the needle is chunk 0. Layer 1 finds it in prompts 0-5 (but
  then layer 3 leans on a wrong chunk), layer 3 in prompts 6-9; the others are faint noise."""
  rng = np.random.default_rng(seed)
  probs = []
  for i in range(10):
    p = rng.uniform(0, 0.005, (5, 6))
    if i < 6:
      p[1, 0], p[1, 1], p[3, 0], p[3, 1] = 0.6, 0.4, 0.1, 0.55
    else:
      p[1, 0], p[1, 2], p[3, 0], p[3, 2] = 0.2, 0.6, 0.9, 0.05
    probs.append(p)
  return probs, [0] * 10


def test_greedy_pick_on_synthetic_scores():
  probs, needles = synthetic_probs()
  votes, vote = pl.pick(probs, needles, [0, 4, 8, 12, 16])
  # layer 4 alone: MRR (6 + 4/2) / 10; adding 12 under "sum" drops prompts 0-5 to rank 2 (no gain),
  # under "max" puts the needle first everywhere
  assert votes["sum"] == dict(layers=[4], mrr=pytest.approx(0.8), top8=1.0, ranks=[1] * 6 + [2] * 4)
  assert votes["max"] == dict(layers=[4, 12], mrr=pytest.approx(1.0), top8=1.0, ranks=[1] * 10)
  assert vote == "max"
  one = [p[[1]] for p in probs]  # one layer: nothing to add, both votes agree, "sum" is kept
  votes, vote = pl.pick(one, needles, [7])
  assert votes["sum"]["layers"] == votes["max"]["layers"] == [7] and vote == "sum"
  rng = np.random.default_rng(1)  # never more than MAX_LAYERS
  noisy = [rng.uniform(size=(8, 6)) for _ in range(20)]
  assert all(len(v["layers"]) <= pl.MAX_LAYERS for v in pl.pick(noisy, [0] * 20, list(range(8)))[0].values())


def export_copy(tmp_path, **adapter_config):
  d = tmp_path / "export"
  shutil.copytree(SHIPPED, d)
  if adapter_config:
    meta = json.loads((d / "config.json").read_text())
    meta["adapter_config"].update(adapter_config)
    (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
  return d


def test_write_changes_only_selection_layers(tmp_path):
  d = export_copy(tmp_path)
  before = json.loads((d / "config.json").read_text())
  pl.write_choice(d, [15])  # the shipped adapters sit on layers 7 and 15: a choice among those
  after = json.loads((d / "config.json").read_text())
  assert after == {**before, "adapter_config": {**before["adapter_config"], "selection_layers": [15]}}
  assert sorted(p.name for p in d.iterdir()) == ["config.json", "params"]  # no temporary file left
  assert cj.load_adapters(d).config.selection_layers == (15,)
  pl.write_choice(d, [7])  # a second write replaces the field
  assert json.loads((d / "config.json").read_text())["adapter_config"]["selection_layers"] == [7]


@pytest.mark.parametrize("case", ["hf_config", "no_config", "not_json", "no_qk_adapter"])
def test_write_refuses_and_leaves_the_directory_unchanged(tmp_path, case):
  d = tmp_path / "target"
  if case == "no_qk_adapter":
    d = export_copy(tmp_path, qk_layers=[5, 11, 17])
  else:
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00\x01")
    if case != "no_config":
      (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 30}' if case == "hf_config"
                                     else "not json {")
  snapshot = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="QK Adapter" if case == "no_qk_adapter" else "not an adapter export"):
    pl.write_choice(d, [11, 29])
  assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == snapshot


def eval_fragments():
  """The fixed wording of every needle kind of eval/niah.py (its numbers and names cut out)."""
  from eval import niah

  needles, names = niah._needles, niah._NAMES  # pylint: disable=protected-access
  frags = set()
  cut = "|".join([r"\d+"] + [re.escape(n) for n in names])
  for kind in niah.KINDS:
    for seed in range(5):
      target, others, question, _, lead = needles(kind, np.random.default_rng(seed))
      frags |= {f.strip(" .,:?") for s in [target, *others, question, lead] for f in re.split(cut, s)}
  return {f for f in frags if len(f) >= 8}


@pytest.mark.parametrize("chat", [True, False], ids=["chat_template", "plain_text"])
def test_calibration_prompts_use_our_own_wording(tokenizer, text_file, monkeypatch, chat):
  if not chat:
    monkeypatch.setattr(tokenizer, "chat_template", None)
  frags = eval_fragments()
  assert {"The pass key is", "Answer with the number only", "The secret number of the"} <= frags  # the cut worked
  lines = pl.read_lines([text_file])
  seen = set()
  for seed in range(24):
    p = pl.calibration_prompt(tokenizer, lines, 400, np.random.default_rng(seed))
    text = p["text"]
    assert not [f for f in frags if f in text], seed
    assert not re.search(r"pass ?key|secret|magic number|special number", text, re.I)
    assert 250 < len(p["ids"]) <= 410 and p["fact"] in text  # whole lines, counted one by one
    value = re.search(r"\d{5}", p["fact"]).group()
    assert value.startswith(tokenizer.decode(p["ids"][p["needle_pos"]]).strip())  # the value's first token
    if not chat:
      assert text.endswith(p["fact"].split(value)[0].rstrip())  # ends with the answer's lead
    seen.add(p["template"])
  assert len(seen) >= 4  # the templates vary
  src = ast.parse(Path(pl.__file__).read_text())
  imported = {n.module for n in ast.walk(src) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(src) if isinstance(n, ast.Import) for a in n.names}
  assert not [m for m in imported if m and (m.startswith("eval") or "haystack" in m)]


@pytest.mark.parametrize("args, says", [
    (["--data", "no/such/file.txt"], "no such file"),
    (["--data", "TEXT", "--tokens", "2048", "100"], "at least 256"),
    (["--data", "TEXT", "--model", "no-such-model"], "no model at"),
    (["--data", "TEXT", "--write", "DIR"], "not an adapter export"),  # before loading any model
    (["--data", "TEXT", "--tokens", "100000"], "--tokens 100000 is past smollm2-135m's context (8192 positions)"),
    (["--data", "SHORT", "--tokens", "256"], "fewer than a prompt of --tokens 256: the prompt would repeat the text"),
])
def test_bad_input_is_one_line_and_exit_code_2(text_file, tmp_path, capsys, args, says):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
  (tmp_path / "short.txt").write_text("One line of seven tokens here.\n")
  given = {"TEXT": str(text_file), "DIR": str(tmp_path / "hf"), "SHORT": str(tmp_path / "short.txt")}
  assert pl.main([given.get(a, a) for a in args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and says in err and "Traceback" not in err and err.count("\n") == 1
  assert (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_whole_run_on_a_tiny_model(tokenizer, text_file, tmp_path, monkeypatch):
  def make():  # the real tokenizer's vocabulary
    p = tiny_params(n_layers=3, vocab_size=len(tokenizer))
    return p, adp.init_adapters(jax.random.key(1), p.config, adp.AdapterConfig(d_c=8))

  params, adapters = numpy_init(make)
  cfg = params.config
  monkeypatch.setattr(cj, "load", lambda name, dtype: cj.Model(cfg, params, tokenizer))
  monkeypatch.setattr(weights, "load_config", lambda name: cfg)
  monkeypatch.setattr(cj, "load_adapters", lambda name, config: adapters)
  export = tmp_path / "export"
  export.mkdir()
  (export / "config.json").write_text(json.dumps(dict(
      format=adapter_io.FORMAT, backbone="tiny", backbone_fingerprint=adapter_io.fingerprint(cfg),
      model_config=adapter_io.config_to_json(cfg), adapter_config=dict(d_c=8, chunk_hidden=8, qk_layers=[0, 1, 2])),
      indent=2) + "\n")
  out = tmp_path / "out"
  argv = ["--model", "tiny", "--data", str(text_file), "--tokens", "300", "--n_prompts", "3", "--out", str(out),
          "--write", str(export)]
  assert pl.main(argv) == 0
  res = json.loads((out / "pick_layers.json").read_text())
  assert (out / "pick_layers.png").stat().st_size > 0
  assert pl.is_pick_layers(out / "pick_layers.json")  # the mark of its own folder, which a rerun rewrites
  (out / "pick_layers.png").write_bytes(b"stale")
  assert pl.main(argv) == 0 and (out / "pick_layers.png").read_bytes() != b"stale"
  assert res["layers"] == [0, 1, 2] and len(res["prompts"]) == 3 and res["chosen"]["vote"] in ("sum", "max")
  assert all(len(p["ranks"]) == 3 and 1 <= min(p["ranks"]) for p in res["prompts"])
  stored = json.loads((export / "config.json").read_text())["adapter_config"]["selection_layers"]
  assert stored == res["chosen"]["layers"]
  assert res["command"].endswith(" ".join(argv))
  # an export with QK Adapters on some layers: the choice is among those, and stored (it was refused at the end)
  meta = json.loads((export / "config.json").read_text())
  meta["adapter_config"]["qk_layers"] = [1]
  (export / "config.json").write_text(json.dumps(meta))
  assert pl.main(argv) == 0
  assert json.loads((out / "pick_layers.json").read_text())["chosen"]["layers"] == [1]
  assert json.loads((export / "config.json").read_text())["adapter_config"]["selection_layers"] == [1]
  meta["adapter_config"]["qk_layers"] = [7]  # none of the model's layers: refused before any prompt is scored
  (export / "config.json").write_text(json.dumps(meta))
  monkeypatch.setattr(pl, "prompt_ranks", lambda *a: pytest.fail("measured before refusing"))
  assert pl.main(argv) == 2


def test_the_shipped_smollm2_choice_is_the_recorded_run():
  """docs/selection/pick_layers.json records the run that chose the shipped selection layers."""
  run = json.loads((Path(__file__).parents[1] / "docs" / "selection" / "pick_layers.json").read_text())
  assert "--write chunkllm_jax/adapters_data/smollm2-135m" in run["command"]
  assert cj.load_adapters("smollm2-135m").config.selection_layers == tuple(run["chosen"]["layers"])


# --out: a new or empty folder, or pick_layers' own; never a folder of the user's files

USERS_FOLDERS = {  # what the user's folder holds (name -> bytes)
    "json_and_png": {"pick_layers.json": b'{"command": "my own notes"}\n', "pick_layers.png": b"\x89PNG mine"},
    "damaged_json": {"pick_layers.json": b'{"command": "python -m train.pick_layers'},
    "png_alone": {"pick_layers.png": b"\x89PNG mine"},
    "other_files": {"notes.txt": b"mine\n"},
    "an_export": {"config.json": b'{"format": "x"}\n'},  # e.g. --out the same folder as --write
}


class Loaded(Exception):
  """The run got past its checks to loading the model."""


def _load(*a, **k):
  raise Loaded


@pytest.mark.parametrize("held", list(USERS_FOLDERS))
def test_a_folder_pick_layers_did_not_make_is_refused_untouched(text_file, tmp_path, monkeypatch, capsys, held):
  out = users_folder(tmp_path / "out", USERS_FOLDERS[held])
  assert_refused_untouched(lambda: pl.main(["--data", str(text_file), "--out", str(out)]), out, USERS_FOLDERS[held],
                           "train.pick_layers", monkeypatch, capsys)


@pytest.mark.parametrize("folder", ["new", "empty", "own", "own_with_other_files"])
def test_a_new_empty_or_own_folder_is_taken(text_file, tmp_path, monkeypatch, folder):
  """Past the folder check to the model (a whole run into an own folder: test_a_whole_run_on_a_tiny_model)."""
  out = tmp_path / "out"
  if folder != "new":
    out.mkdir()
  if folder.startswith("own"):  # the run that chose the shipped layers, as an earlier run's output
    shutil.copy(Path(__file__).parents[1] / "docs" / "selection" / "pick_layers.json", out)
    (out / "pick_layers.png").write_bytes(b"\x89PNG")
  if folder == "own_with_other_files":
    (out / "notes.txt").write_text("mine\n")
  monkeypatch.setattr(cj, "load", _load)
  with pytest.raises(Loaded):
    pl.main(["--data", str(text_file), "--out", str(out)])
