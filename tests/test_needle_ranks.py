"""eval.needle_ranks ranks a chunk exactly as inference selects: on a tiny random model, a chunk's
vote rank is within top_chunks iff `chunk_prefill`'s first selection (made by that vote) holds it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chunkllm_jax.chunk_generation import chunk_prefill
from chunkllm_jax.selection import ChunkConfig
from eval.needle_ranks import ranks_for_prompt
from tests.tiny_models import chunk_params
from tests.tiny_models import prompts


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
