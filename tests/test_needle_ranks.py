"""eval.needle_ranks ranks a chunk exactly as inference selects: on a tiny random model, a chunk's
vote rank is within top_chunks iff `chunk_prefill`'s first selection (made by that vote) holds it. Its
--out is refused where it holds files that needle_ranks did not write."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax.chunk_config import ChunkConfig
from chunkllm_jax.chunk_generation import chunk_prefill
from eval.needle_ranks import ranks_for_prompt
from tests.tiny_models import chunk_params
from tests.tiny_models import prompts
from tests.out_folder_fixtures import assert_refused_untouched, users_folder


@pytest.mark.parametrize("vote", ["sum", "max"])
def test_vote_rank_agrees_with_the_selection(vote):
  params = chunk_params(seed=2)
  qk = jax.tree.map(lambda w: 4 * w, params.adapters.params["qk"])  # sharper scores, clearer ranks
  params = params.replace(adapters=params.adapters.replace(params={**params.adapters.params, "qk": qk}))
  ids = list(prompts([100], seed=9)[0])
  ccfg = ChunkConfig(top_chunks=3, n_local=1, max_chunk_len=6, alpha=0.9, vote=vote, prefill="dense",
                     prefill_scorer="adapter", selection="shared")
  T = len(ids)
  _, _, st = chunk_prefill(
      params, jnp.asarray([ids + [0] * (128 - T)], jnp.int32), jnp.asarray([T]), 128, ccfg.validate(128, 3))
  selected = set(np.flatnonzero(np.asarray(st.selected[0])).tolist())
  ends = np.asarray(st.chunk_end[0, :int(st.n_chunks[0])])
  seen_in, seen_out = 0, 0
  for needle in range(len(ends) - ccfg.n_local):
    r = ranks_for_prompt(params, ids, int(ends[needle]), ccfg)
    assert r["needle_chunk"] == needle and 1 <= min(r["teacher_rank"]) <= r["n_candidates"]
    inside = r["student_vote_rank"][vote] <= ccfg.top_chunks
    assert inside == (needle in selected), (needle, r["student_vote_rank"], selected)
    seen_in += inside
    seen_out += not inside
  assert seen_in == len(selected) == ccfg.top_chunks and seen_out > 0


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat", "base model"])
def test_needle_prompt_places_the_key_with_or_without_a_chat_template(tokenizer, chat_template):
  import copy

  from eval.needle_ranks import needle_prompt

  tok = copy.deepcopy(tokenizer)
  if not chat_template:
    tok.chat_template = None  # as gemma3-270m's tokenizer: it once raised here
  ids, key, pos = needle_prompt(tok, 400, 0.5, seed=1)
  assert tok.decode(ids[pos:pos + 8]).lstrip().startswith(key[:2])
  assert ("<|im_start|>" in tok.decode(ids)) == chat_template


# --out: a new or empty folder, or needle_ranks' own; never a folder of the user's files

ROW = dict(n_chunks=4, needle_chunk=1, n_candidates=3, teacher_rank=[1, 2], student_rank=[2, 1], oracle_rank=[1],
           teacher_vote_rank=dict(sum=1, max=1), student_vote_rank=dict(sum=2, max=1),
           oracle_vote_rank=dict(sum=1, max=1), layers=[0, 1], full_layers=[0], selection_layers=[0])


@pytest.fixture
def stubbed(monkeypatch):
  """needle_ranks' main with the model, the adapters and the ranks stubbed out: a run takes a plot's time."""
  from chunkllm_jax import adapter_io, weights
  from eval import needle_ranks as nr

  monkeypatch.setattr(weights, "load_config", lambda model: types.SimpleNamespace(max_position=4096))
  monkeypatch.setattr(adapter_io, "read_export_config", lambda name: {})
  monkeypatch.setattr(nr.cj, "load", lambda *a, **k: types.SimpleNamespace(params=None, config=None, tokenizer=None))
  monkeypatch.setattr(nr.cj, "load_adapters", lambda *a, **k: None)
  monkeypatch.setattr(nr.cj, "with_adapters", lambda params, adapters: params)
  monkeypatch.setattr(nr, "needle_prompt", lambda tok, n, depth, seed: ([0] * n, "12345", 5))
  monkeypatch.setattr(nr, "ranks_for_prompt", lambda *a, **k: dict(ROW))
  return lambda out: nr.main(["--tokens", "300", "--depths", "0.5", "--out", str(out)])


USERS_FOLDERS = {  # what the user's folder holds (name -> bytes)
    "json_and_png": {"needle_ranks.json": b'{"mine": true}\n', "needle_ranks.png": b"\x89PNG mine"},
    "other_rows": {"needle_ranks.json": b'[{"rank": 3}]\n'},
    "damaged_json": {"needle_ranks.json": b"[{"},
    "png_alone": {"needle_ranks.png": b"\x89PNG mine"},
    "other_files": {"notes.txt": b"mine\n"},
}


@pytest.mark.parametrize("held", list(USERS_FOLDERS))
def test_a_folder_needle_ranks_did_not_make_is_refused_untouched(stubbed, tmp_path, monkeypatch, capsys, held):
  out = users_folder(tmp_path / "o", USERS_FOLDERS[held])
  assert_refused_untouched(lambda: stubbed(out), out, USERS_FOLDERS[held], "eval.needle_ranks", monkeypatch, capsys)


@pytest.mark.parametrize("folder", ["new", "empty", "own", "own_with_other_files"])
def test_a_new_empty_or_own_folder_is_written(stubbed, tmp_path, folder):
  import json

  out = tmp_path / "o"
  if folder != "new":
    out.mkdir()
  if folder.startswith("own"):
    assert stubbed(out) == 0
    (out / "needle_ranks.json").write_text(json.dumps([dict(ROW, n_chunks=9)]))  # an earlier run's: rewritten
  if folder == "own_with_other_files":
    (out / "notes.txt").write_text("mine\n")  # next to the tool's files: kept, untouched
  assert stubbed(out) == 0
  assert json.loads((out / "needle_ranks.json").read_text()) == [dict(ROW, tokens=300, depth=0.5)]
  assert (out / "needle_ranks.png").stat().st_size > 1000
  assert folder != "own_with_other_files" or (out / "notes.txt").read_text() == "mine\n"


def test_every_needle_ranks_folder_in_docs_is_recognised_as_its_own():
  from pathlib import Path

  from eval.needle_ranks import is_needle_ranks
  found = sorted((Path(__file__).parents[1] / "docs").glob("needle_ranks*/needle_ranks.json"))
  assert found and [f for f in found if not is_needle_ranks(f)] == []
