"""What docs/results.md carries: every measurement's folder, the command that fills it and what its rows
change from the defaults (`MEASUREMENTS`), and the checks of today's defaults (`DEFAULT_CHECKS`). A
declaration a section; `eval.results_page` renders them from the folders' rows."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Measurement:
  name: str
  title: str
  folder: str  # under docs/
  kind: str  # "eval" (eval.run rows), "needle_ranks" (before/after JSON), "held_out" (train.evaluate JSON)
  commands: tuple[str, ...]  # what fills the folder, run from the repository root
  rerun: bool = True  # False: needs files outside the repository (`outside`); kept as measured
  outside: str = "the training run's data and an earlier export"  # what a rerun needs, where rerun is False
  before: str | None = None  # needle_ranks: the folder of the earlier adapters' ranks
  labels: tuple[str, ...] = ()  # held_out: what each row's adapters are, in the file's order
  note: str = ""
  variant: str = ""  # eval: what the `hybrid` rows change from the default settings (the flags given)
  others: str | None = None  # eval: a folder (under docs/) whose rows of the methods this one lacks are shown too

  def __post_init__(self):
    # The per-head rule became the default in the twenty-seventh session: the eval runs that name no
    # selection rule were made with the shared one, and their re-runs must name it.
    pinned = tuple(c.replace(" --out ", f" {SHARED} --out ") if c.startswith("python -m eval.run ")
                   and "--selection" not in c else c for c in self.commands)
    # Needles were placed at their depth's share of the sentences until 6 December 2026: the NIAH runs
    # that name no placement were made so, and their re-runs must name it.
    pinned = tuple(c.replace(" --out ", f" {SENTENCES} --out ") if c.startswith("python -m eval.run ")
                   and "--suites niah" in c and "--needle_placement" not in c else c for c in pinned)
    # The chunks' last tokens were read every one until the forty-sixth session: the runs that name no share
    # (and read them) were made so, and their re-runs must name it.
    pinned = tuple(c.replace(" --out ", f" {EVERY_LAST_TOKEN} --out ") if c.startswith("python -m eval.run ")
                   and "--boundary_share" not in c and "--no-boundary_tokens" not in c else c for c in pinned)
    object.__setattr__(self, "commands", pinned)


SHARED = "--selection shared"  # one selection a chunk boundary for every layer and head (the paper's rule)
SENTENCES = "--needle_placement sentences"  # the target needle at its depth's share of the sentences
EVERY_LAST_TOKEN = "--boundary_share 1"  # the last token of every chunk left out, whatever it leaves the chunks
LAST_SHARE_NAME = ("the chunks' last tokens taking at most a quarter of what the budget leaves after the sinks, "
                   "local and open chunk, the newest first (`--boundary_share 0.25`)")


NIAH_2K = ("--suites niah --niah_kinds single multikey --niah_lengths 2048 --niah_depths 0.1 0.3 0.5 0.7 0.9 "
           "--niah_samples 3 --filler brown")
NIAH_CODE_4K_10 = ("--suites niah --niah_kinds single --niah_lengths 4096 --niah_depths 0.1 0.3 0.5 0.7 0.9 "
                   "--niah_samples 2 --filler python")  # 10 passkeys in 4K tokens of numpy and jax source
NIAH_8K = ("--suites niah --niah_kinds single --niah_lengths 8192 --niah_depths 0.1 0.3 0.5 0.7 0.9 "
           "--niah_samples 2 --filler brown")
NIAH_16K = ("--suites niah --niah_kinds single --niah_lengths 16384 --niah_depths 0.1 0.3 0.5 0.7 0.9 "
            "--niah_samples 2 --filler brown")
NIAH_REPEATED_2K = ("--suites niah --niah_kinds single multikey --niah_lengths 2048 --niah_depths 0.1 0.3 0.5 0.7 "
                    "0.9 --niah_samples 3 --filler repeated")  # the passkey test's own haystack
NIAH_PACKAGE_DOCS_2K = ("--suites niah --niah_kinds single multikey --niah_lengths 2048 --niah_depths 0.1 0.3 0.5 0.7 "
                        "0.9 --niah_samples 3 --filler brown --brown package_docs.txt --needle_placement tokens "
                        "--selection kv_head --boundary_share 0.25")  # `python -m eval.package_docs --out package_docs.txt`
NIAH_CODE_4K_15 = ("--suites niah --niah_kinds single --niah_lengths 4096 --niah_depths 0.1 0.3 0.5 0.7 0.9 "
                   "--niah_samples 3 --filler python")  # 15 passkeys in 4K tokens of numpy and jax source

OFF = "--recent_share 0 --no-boundary_tokens"  # the first defaults: budget by score alone, chunks read whole
FIRST = "the first defaults, no recent share and no boundary tokens (`" + OFF + "`)"
PPL2K = "--suites ppl --ppl_tokens 2048 --ppl_docs 8 --batch_size 8 --filler brown"
PPL4K = "--suites ppl --ppl_tokens 4096 --ppl_docs 8 --batch_size 8 --filler brown"
PPL8K = "--suites ppl --ppl_tokens 8192 --ppl_docs 8 --batch_size 8 --filler brown"
PER_HEAD = "--selection kv_head --score_rank 16 --score_estimate sparq"  # each KV head, at every step, SparQ's 16
PER_HEAD_NAME = f"decode's selections made instead by each KV head at every step (`{PER_HEAD}`)"
LOWRANK_KEYS = "--selection kv_head --score_rank 16 --score_estimate lowrank"  # the same rule, from low-rank keys
LOWRANK = LOWRANK_KEYS + " --score_sketch 0"  # and the bound on what they miss
LOWRANK_NAME = f"decode's selections made instead by each KV head at every step, scored from low-rank keys (`{LOWRANK}`)"
LOWRANK_NOTE = ("Decode's selections made by each KV head of each sparse layer at every step, scored from every "
                "key's coordinates in a basis of its KV head's prompt keys and the length of what the basis misses "
                "(`score_estimate=\"lowrank\"`, kept beside the cache: {} of K's {} coordinates, {} of the KV's "
                "bytes, read besides the KV shown).")
SKETCH = LOWRANK_KEYS + " --score_sketch 128 --sketch_estimate qjl"  # or QJL's estimate from a 1-bit sketch
SKETCH_NAME = (f"decode's selections made instead by each KV head at every step, scored from low-rank keys and a "
               f"sketch of what they miss (`{SKETCH}`)")
SKETCH_NOTE = ("Decode's selections made by each KV head of each sparse layer at every step, scored from every "
               "key's coordinates in a basis of its KV head's prompt keys and QJL's estimate of the rest from a "
               "128-bit sketch of the signs of what the basis misses (`score_sketch=128`, kept beside the cache: "
               "{} of K's {} coordinates, the length of the rest and 16 bytes, {} of the KV's bytes, read besides "
               "the KV shown).")
SIMHASH = LOWRANK_KEYS + " --score_sketch 128 --sketch_estimate simhash"  # the same sketch, read as SimHash's angle
SIMHASH_NAME = (f"decode's selections made instead by each KV head at every step, scored from low-rank keys and the "
                f"angle of what they miss from a sketch of its signs (`{SIMHASH}`)")
# Gemma 3's defaults: the same rule with a quarter of its 256 dimensions (SIMHASH names smollm2-135m's 16).
GEMMA3_DEFAULTS_NAME = ("decode's selections made instead by each KV head at every step, scored from low-rank keys (a "
                        "quarter of the head dimension: 64 of gemma3-270m's 256) and the angle of what they miss from "
                        "a sketch of its signs (`--selection kv_head`; the defaults `score_estimate=\"lowrank\"`, "
                        "`score_sketch=128`, `sketch_estimate=\"simhash\"`)")
SIMHASH_NOTE = ("The same rule and the same 128-bit sketch of the signs of what each key's basis misses as the "
                "section before, read as SimHash's angle instead of QJL's estimate: |q_out| |k_out| "
                "cos(pi h / 128), h the number of signs that differ between the query's sketch and the key's "
                "(`sketch_estimate=\"simhash\"`: xor and popcount of the packed words, nothing unpacked; the same "
                "{} of the KV's bytes read).")
COPIED = "Vanilla's rows are those of the {}, copied into the folder before the run."
PER_HEAD_DEFAULTS = "today's defaults (`--selection kv_head`: each KV head chooses the chunks it reads)"
RECENT_HALF = "half the budget to the most recent tokens (`--recent_share 0.5`; the default 0.75)"
RECENT_QUARTER = "a quarter of the budget to the most recent tokens (`--recent_share 0.25`; the default 0.75)"
RECENT_SWEEP_NOTE = ("`ChunkConfig.recent_share` (0.75) was chosen while the shared rule was the default; this sweep "
                     "asks whether the per-head rule, which scores with each KV head's own query, needs as much. Vanilla's "
                     "rows are copied from the folder of today's defaults on the same needles (`--vanilla_from`), "
                     "and the baselines' rows are read from the folder they were measured in. The comparison of the "
                     "settings, and the "
                     "perplexity at the same shares, are in the history (forty-ninth session).")

PACKAGE_DOCS = ("python -m eval.package_docs --out package_docs.txt",)
PACKAGE_DOCS_OUTSIDE = ("the text that `python -m eval.package_docs` writes, which follows the installed packages' "
                        "versions")
DEFAULT_FLAGS = "--selection kv_head --boundary_share 0.25 --needle_placement tokens"  # today's defaults as flags
# (name, the needles and their haystack, the set's flags, the defaults' folder (vanilla's rows), the baselines'
# folder, the shares measured)
RECENT_SWEEPS = (
    ("niah_smollm2_package_docs", "30 passkeys in the packages' READMEs", NIAH_PACKAGE_DOCS_2K, "package_docs",
     "eval_niah_package_docs_smollm2", "eval_niah_package_docs_smollm2", 0.5),
    ("niah_smollm2_package_docs", "30 passkeys in the packages' READMEs", NIAH_PACKAGE_DOCS_2K, "package_docs",
     "eval_niah_package_docs_smollm2", "eval_niah_package_docs_smollm2", 0.25),
    ("niah_smollm2", "30 passkeys in Brown", f"{NIAH_2K} {DEFAULT_FLAGS}", "brown",
     "eval_budget_sweep_bshare_smollm2_30", "eval_budget_sweep_smollm2_30", 0.5),
    ("niah_smollm2", "30 passkeys in Brown", f"{NIAH_2K} {DEFAULT_FLAGS}", "brown",
     "eval_budget_sweep_bshare_smollm2_30", "eval_budget_sweep_smollm2_30", 0.25),
    ("niah_smollm2_repeated", "30 passkeys in the passkey test's haystack", f"{NIAH_REPEATED_2K} {DEFAULT_FLAGS}",
     "repeated", "eval_niah_repeated_bshare_smollm2_30", "eval_niah_repeated_smollm2_30", 0.25),
    ("niah_smollm2_python", "15 passkeys at 4K tokens of Python source", f"{NIAH_CODE_4K_15} {DEFAULT_FLAGS}", "python",
     "eval_niah_python_bshare_smollm2_15", "eval_niah_python_smollm2_15", 0.25),
)


def recent_share_sweep(name: str, needles: str, flags: str, label: str, defaults: str, baselines: str,
                       share: float) -> "Measurement":
  """One folder of the `recent_share` sweep: today's defaults with another share, vanilla's rows copied from
  the defaults' folder of the same needles."""
  part = {0.5: ("half", "half the budget", RECENT_HALF),
          0.25: ("quarter", "a quarter of the budget", RECENT_QUARTER)}[share]
  folder = f"eval_recent_share_sweep_smollm2/{label}_rs{share:g}"
  run = (f"python -m eval.run --model smollm2-135m {flags} --methods vanilla hybrid --retention 0.5 0.25 "
         f"--recent_share {share:g} --vanilla_from docs/{defaults} --out docs/{folder}")
  outside = label == "package_docs"  # its text is written from the installed packages, outside the repository
  return Measurement(f"{name}_recent_{part[0]}",
                     f"NIAH, smollm2-135m: the same {needles}, {part[1]} to the most recent tokens (a sweep of "
                     "`recent_share`)", folder, "eval",
                     (*PACKAGE_DOCS, run) if outside else (run,), rerun=not outside, outside=PACKAGE_DOCS_OUTSIDE,
                     others=baselines, variant=f"{PER_HEAD_DEFAULTS} with {part[2]}", note=RECENT_SWEEP_NOTE)

MEASUREMENTS = (
    Measurement("niah_smollm2_local_share",
                "NIAH, smollm2-135m: the same 30 passkeys at their depth in tokens, the local chunks within the "
                "budget's recent share (the defaults before the forty-sixth session: every chunk's last token)",
                "eval_defaults_local_in_recent_share_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid "
                 "--retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_defaults_local_in_recent_share_smollm2_30",),
                others="eval_niah_tokens_smollm2_30",
                variant=f"the defaults then (`--selection kv_head`): {SIMHASH_NAME}; the local chunks always read "
                        "are as many as fit the budget's recent share (`selection.local_count`), every chunk's last "
                        "token read",
                note="The grid of the next section, run again after the local chunks took the recent share (6 "
                     "December 2026, fortieth session). Vanilla was run again in the folder; the baselines' rows "
                     "are read from the next section."),
    Measurement("niah_smollm2_budgets",
                "NIAH, smollm2-135m: the same 30 passkeys from a 50% budget down to 6.25% (the defaults before the "
                "forty-sixth session: every chunk's last token)",
                "eval_budget_sweep_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid streamingllm sepllm "
                 "--retention 0.5 0.25 0.125 0.0625 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_budget_sweep_smollm2_30",),
                variant=f"the defaults then (`--selection kv_head`): {SIMHASH_NAME}, every chunk's last token read",
                note="How far the budget goes down: the grid of the section above at 12.5% and 6.25% besides 50% and "
                     "25%, with the baselines at each budget. Vanilla's rows and the defaults' at 50% and 25% are "
                     "those of the section above, and StreamingLLM's and SepLLM's at 50% and 25% those of the "
                     "section after it (the same settings and examples), copied into the folder before the run; the "
                     "command fills the folder whole from nothing. At 6.25% the chunks' last tokens "
                     "(`boundary_tokens`, paid for first) fill what the sinks, newest and open chunks leave; where no "
                     "chunk fits beside them, the best one by score is read whole in place of the oldest of them "
                     "(the defaults' rows at 12.5% and 6.25% are of that rule; before it they found none at 6.25%: "
                     "the history below, forty-fourth and forty-fifth sessions). The plot is the folder's "
                     "`tradeoff.png`."),
    Measurement("niah_smollm2_tokens",
                "NIAH, smollm2-135m: 30 passkeys at 2K tokens, each at its depth in tokens (the defaults before the "
                "local chunks took the recent share)",
                "eval_niah_tokens_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid streamingllm "
                 "--retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_tokens_smollm2_30",
                 f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods sepllm "
                 "--retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_tokens_smollm2_30"),
                variant=f"the defaults then (`--selection kv_head`): {SIMHASH_NAME}",
                note="The grid of the next sections (15 single-key and 15 multi-key needles, depths 0.1-0.9 x 3 "
                     "seeds, the evaluation's share of Brown) with each target needle at the sentence break "
                     "nearest its depth in tokens, as `eval.run` places it now; the sections below placed it at "
                     "its depth's share of the sentences. ChunkLLM with the defaults then; vanilla, StreamingLLM and "
                     "SepLLM (the two best baselines of the 2K sections below) run in the same folder."),
    Measurement("niah_smollm2_repeated",
                "NIAH, smollm2-135m: 30 passkeys at 2K tokens in the passkey test's haystack (the defaults before "
                "the forty-sixth session: every chunk's last token)",
                "eval_niah_repeated_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_REPEATED_2K} --methods vanilla hybrid "
                 "streamingllm sepllm --retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_repeated_smollm2_30",),
                variant=f"the defaults then (`--selection kv_head`): {SIMHASH_NAME}, every chunk's last token read",
                note="The haystack of Mohtashami and Jaggi's passkey test (`--filler repeated`: \"The grass is green. "
                     "The sky is blue. The sun is yellow. Here we go. There and back again.\" over and over), which "
                     "no earlier section and no training used: a text with no content of its own, unlike Brown's "
                     "prose. 15 single-key and 15 multi-key needles (depths 0.1-0.9 x 3 seeds), each at its "
                     "depth in tokens. ChunkLLM with the defaults then; vanilla, StreamingLLM and SepLLM in the same "
                     "folder."),
    Measurement("niah_smollm2_python",
                "NIAH, smollm2-135m: 15 passkeys at 4K tokens of Python source (the defaults before the "
                "forty-sixth session: every chunk's last token)",
                "eval_niah_python_smollm2_15", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_CODE_4K_15} --methods vanilla hybrid "
                 "streamingllm sepllm --retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_python_smollm2_15",),
                variant=f"the defaults then (`--selection kv_head`): {SIMHASH_NAME}, every chunk's last token read",
                note="A haystack of code (`--filler python`: the source files of the installed numpy and jax, a "
                     "file's lines from a seeded file on, the passkey on a line of its own), which no training "
                     "used: the Chunk Adapter closes a chunk there every 27 tokens on average (18 for gemma3-270m's "
                     "below), and the heads' low-rank bases are built from code keys. 15 single-key needles (depths 0.1-0.9 x 3 seeds) at their "
                     "depth in tokens. The text follows the packages' versions, which the folder's fingerprint "
                     "records. Vanilla, StreamingLLM and SepLLM in the same folder."),
    Measurement("niah_smollm2_repeated_last_share",
                "NIAH, smollm2-135m: the same 30 passkeys in the passkey test's haystack, the last tokens within a "
                "quarter of what the budget leaves (today's defaults)",
                "eval_niah_repeated_bshare_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_REPEATED_2K} --methods vanilla hybrid "
                 "--retention 0.5 0.25 --boundary_share 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_repeated_bshare_smollm2_30",),
                others="eval_niah_repeated_smollm2_30",
                variant=f"today's defaults (`--selection kv_head`): {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section of this haystack above") + " The baselines' rows are read from there."),
    Measurement("niah_smollm2_python_last_share",
                "NIAH, smollm2-135m: the same 15 passkeys in Python source, the last tokens within a quarter of what "
                "the budget leaves (today's defaults)",
                "eval_niah_python_bshare_smollm2_15", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_CODE_4K_15} --methods vanilla hybrid "
                 "--retention 0.5 0.25 --boundary_share 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_python_bshare_smollm2_15",),
                others="eval_niah_python_smollm2_15",
                variant=f"today's defaults (`--selection kv_head`): {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section of smollm2-135m on Python source above") + " The baselines' rows are read "
                     "from there."),
    Measurement("niah_smollm2_package_docs",
                "NIAH, smollm2-135m: 30 passkeys at 2K tokens of the installed packages' READMEs (today's defaults)",
                "eval_niah_package_docs_smollm2", "eval",
                ("python -m eval.package_docs --out package_docs.txt",
                 f"python -m eval.run --model smollm2-135m {NIAH_PACKAGE_DOCS_2K} --methods vanilla hybrid streamingllm "
                 "sepllm --retention 0.5 0.25 --out docs/eval_niah_package_docs_smollm2"),
                rerun=False, outside=PACKAGE_DOCS_OUTSIDE,
                variant=f"today's defaults (`--selection kv_head`): {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note="A haystack of technical documentation, which no training used and no setting was chosen on: "
                     "the long descriptions in the metadata of the Python distributions installed beside the project "
                     "(`python -m eval.package_docs`: 77 READMEs here, markdown and reStructuredText with their URLs, "
                     "badges, code and tables; the folder's fingerprint holds the text's sha256). The 30 needles of "
                     "the 2K sets (single and multikey, depths 0.1-0.9 x 3 seeds) at their depth in tokens. "
                     "Vanilla, StreamingLLM and SepLLM in the same folder. The run stopped inside XLA at its 200th "
                     "of 210 generations (the process's memory mappings at the kernel's limit, now guarded: "
                     "`decoding.drop_compiled_near_map_limit`) and the same command resumed it: the last 10 "
                     "rows (SepLLM at 25%, multikey)."),
    *(recent_share_sweep(*sweep) for sweep in RECENT_SWEEPS),
    Measurement("niah_gemma3_python",
                "NIAH, gemma3-270m: 10 passkeys at 4K tokens of Python source (the defaults before the forty-sixth "
                "session: every chunk's last token)",
                "eval_niah_python_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_CODE_4K_10} --methods vanilla hybrid "
                 "streamingllm sepllm --retention 0.5 0.25 0.125 0.0625 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_python_gemma3_10",),
                variant=f"the defaults then: {GEMMA3_DEFAULTS_NAME}, every chunk's last token read",
                note="The code haystack of the section above, on the other model (a base model: the prompt ends with "
                     "the answer's lead), from a 50% budget down to 6.25%. Vanilla, StreamingLLM and SepLLM in the same "
                     "folder; the rows at 25% are the forty-third session's, the others the forty-fifth's (the same "
                     "settings; the command fills the folder whole from nothing). The plot is the folder's "
                     "`tradeoff.png`."),
    Measurement("niah_smollm2_budgets_last_share",
                "NIAH, smollm2-135m: the same 30 passkeys from 50% down to 6.25%, the last tokens within a quarter "
                "of what the budget leaves (today's defaults)",
                "eval_budget_sweep_bshare_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid "
                 "--retention 0.5 0.25 0.125 0.0625 --boundary_share 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_budget_sweep_bshare_smollm2_30",),
                others="eval_budget_sweep_smollm2_30",
                variant=f"today's defaults (`--selection kv_head`): {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note="`ChunkConfig.boundary_share`: where the last tokens of every chunk left out would take more than "
                     "that share, only the newest chunks left out give theirs, and the chunks chosen by score keep "
                     "the rest. " + COPIED.format("section \"from a 50% budget down to 6.25%\"") + " The baselines' "
                     "rows are read from there. The plot is the folder's `tradeoff.png`."),
    Measurement("niah_smollm2_budgets_no_last",
                "NIAH, smollm2-135m: the same 30 passkeys from 50% down to 6.25%, without the last tokens",
                "eval_budget_sweep_bt_off_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid "
                 "--retention 0.5 0.25 0.125 0.0625 --no-boundary_tokens --selection kv_head --needle_placement tokens "
                 "--out docs/eval_budget_sweep_bt_off_smollm2_30",),
                others="eval_budget_sweep_smollm2_30",
                variant="the defaults without the chunks' last tokens (`--no-boundary_tokens`)",
                note=COPIED.format("section \"from a 50% budget down to 6.25%\"") + " The baselines' rows are read "
                     "from there. The plot is the folder's `tradeoff.png`."),
    Measurement("niah_gemma3_python_last_share",
                "NIAH, gemma3-270m: the same 10 passkeys in Python source, the last tokens within a quarter of what "
                "the budget leaves (today's defaults)",
                "eval_niah_python_bshare_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_CODE_4K_10} --methods vanilla hybrid "
                 "--retention 0.5 0.25 0.125 0.0625 --boundary_share 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_python_bshare_gemma3_10",),
                others="eval_niah_python_gemma3_10",
                variant=f"today's defaults: {GEMMA3_DEFAULTS_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section of gemma3-270m on Python source") + " The baselines' rows are read from "
                     "there. The plot is the folder's `tradeoff.png`."),
    Measurement("niah_gemma3_python_no_last",
                "NIAH, gemma3-270m: the same 10 passkeys in Python source, without the last tokens",
                "eval_niah_python_bt_off_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_CODE_4K_10} --methods vanilla hybrid "
                 "--retention 0.5 0.25 0.125 0.0625 --no-boundary_tokens --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_python_bt_off_gemma3_10",),
                others="eval_niah_python_gemma3_10",
                variant="the defaults without the chunks' last tokens (`--no-boundary_tokens`)",
                note=COPIED.format("section of gemma3-270m on Python source") + " The baselines' rows are read from "
                     "there. The plot is the folder's `tradeoff.png`."),
    Measurement("niah_smollm2", "NIAH, smollm2-135m: 30 passkeys at 2K tokens", "eval_recent_share_bt_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--out docs/eval_recent_share_bt_smollm2_30",),
                others="eval_adapters_smollm2_30",
                note="15 single-key and 15 multi-key needles (depths 0.1-0.9 x 3 seeds) in the evaluation's share "
                     "of the Brown text, which training never reads. ChunkLLM with the shared rule's defaults (these rows were "
                     "measured as `--recent_share 0.75 --boundary_tokens`, which they now are). Vanilla's rows "
                     "are those of the next section, copied into the folder before the run; the rows of the other "
                     "methods are read from there (`oracle` there reads the budget by score alone)."),
    Measurement("niah_smollm2_per_head", "NIAH, smollm2-135m: the same 30 passkeys, each KV head choosing at every step",
                "eval_per_head_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 f"{PER_HEAD} --out docs/eval_per_head_smollm2_30",),
                others="eval_adapters_smollm2_30", variant=PER_HEAD_NAME,
                note="Decode's selections made by each KV head of each sparse layer at every step, from SparQ's "
                     "estimate of its attention over 16 of K's 64 dimensions (`chunkllm_jax/head_selection.py`); "
                     "the 16 dimensions lie in every cache line of a key, so the scores read all of K besides the KV "
                     "shown. Vanilla was run again in the folder; the baselines' rows are read from the first "
                     "defaults' section."),
    Measurement("niah_smollm2_per_head_lowrank",
                "NIAH, smollm2-135m: the same 30 passkeys, each KV head choosing at every step from low-rank keys",
                "eval_per_head_lowrank_bound_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 f"{LOWRANK} --out docs/eval_per_head_lowrank_bound_smollm2_30",),
                others="eval_adapters_smollm2_30", variant=LOWRANK_NAME,
                note=LOWRANK_NOTE.format(16, 64, "13%") + " Vanilla was run again in the folder; the baselines' rows "
                     "are read from the first defaults' section."),
    Measurement("niah_smollm2_per_head_sketch",
                "NIAH, smollm2-135m: the same 30 passkeys, each KV head choosing at every step from low-rank keys "
                "and a sketch of the rest",
                "eval_per_head_lowrank_sketch128_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 f"{SKETCH} --out docs/eval_per_head_lowrank_sketch128_smollm2_30",),
                others="eval_adapters_smollm2_30", variant=SKETCH_NAME,
                note=SKETCH_NOTE.format(16, 64, "16%") + " With a 64-bit sketch: 100% and 88% "
                     "(docs/eval_per_head_lowrank_sketch64_smollm2_30). Vanilla was run again in the folder; the "
                     "baselines' rows are read from the first defaults' section."),
    Measurement("niah_smollm2_per_head_simhash",
                "NIAH, smollm2-135m: the same 30 passkeys, each KV head choosing at every step from low-rank keys "
                "and the angle of the rest",
                "eval_per_head_lowrank_simhash128_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 f"{SIMHASH} --out docs/eval_per_head_lowrank_simhash128_smollm2_30",),
                others="eval_adapters_smollm2_30", variant=SIMHASH_NAME,
                note=SIMHASH_NOTE.format("16%") + " Vanilla was run again in the folder; the baselines' rows are "
                     "read from the first defaults' section."),
    Measurement("niah_smollm2_per_head_pages",
                "NIAH, smollm2-135m: the same 30 passkeys, each KV head choosing 16-token pages at every step",
                "eval_per_head_pages16_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 f"{PER_HEAD} --page_len 16 --out docs/eval_per_head_pages16_smollm2_30",),
                others="eval_adapters_smollm2_30", variant=f"each KV head choosing fixed 16-token pages at every step "
                                                           f"(`{PER_HEAD} --page_len 16`)",
                note="The per-head rule of the section before last on fixed 16-token pages instead of the Chunk "
                     "Adapter's chunks (Quest's unit, with SparQ's estimate; measured with the per-head read of commit "
                     "9b6f7db, before it took the working buffer's layout). Vanilla was run again in the folder."),
    Measurement("niah_smollm2_first_defaults", "NIAH, smollm2-135m: the same 30 passkeys, the first defaults",
                "eval_adapters_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla chunkllm hybrid streamingllm "
                 f"sepllm fixllm oracle --retention 0.5 0.25 {OFF} --out docs/eval_adapters_smollm2_30",),
                variant=FIRST,
                note="The budget by score alone and chunks read whole, for `hybrid` and `oracle` (the paper's rule "
                     "`chunkllm`, FixLLM and the window baselines never take the two knobs)."),
    Measurement("niah_smollm2_boundary_tokens",
                "NIAH, smollm2-135m: the same 30 passkeys, boundary tokens without the recent share",
                "eval_boundary_tokens_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.25 0.5 "
                 "--recent_share 0 --out docs/eval_boundary_tokens_smollm2_30",),
                variant="boundary tokens alone (`--recent_share 0`)",
                note="`ChunkConfig.boundary_tokens`: the budget pays first for the last token of every chunk the "
                     "selection leaves out. The baselines are those of the first section, on the same needles."),
    Measurement("niah_smollm2_recent_share",
                "NIAH, smollm2-135m: the same 30 passkeys, the recent share without boundary tokens",
                "eval_recent_share_smollm2_30", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--no-boundary_tokens --out docs/eval_recent_share_smollm2_30",),
                variant="`recent_share=0.75` alone (`--no-boundary_tokens`)",
                note="`ChunkConfig.recent_share`: the most recent candidates get the first 75% of the budget (with "
                     "the sinks, local and open chunk), the rest goes by score. " + COPIED.format("first sections")),
    Measurement("niah_smollm2_8k_defaults", "NIAH, smollm2-135m: 10 passkeys at 8K tokens, the defaults "
                "before the forty-sixth session (every chunk's last token)",
                "eval_defaults_smollm2_8k", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_8K} --past_context --methods vanilla hybrid "
                 "streamingllm sepllm fixllm --retention 0.5 0.25 --selection kv_head --out docs/eval_defaults_smollm2_8k",),
                others="eval_hybrid_8k",
                variant="the defaults then (each KV head choosing at every step from low-rank keys and the angle of "
                        "the rest from a 128-bit sketch), every chunk's last token read",
                note="10 single-key needles (depths 0.1-0.9 x 2 seeds) in the evaluation's share of Brown, at the "
                     "model's whole trained context (8192 tokens, and the 32 answer tokens past it: `--past_context`, "
                     "which eval.run asks for since 5 December 2026; the 8K smollm2 commands of the sections below "
                     "ran before it did). ChunkLLM with "
                     "the defaults then (no flag changed them); vanilla and the baselines run in the same folder. "
                     "The QK Adapters' first training alone (`chunkllm`) is read from an earlier run of the same "
                     "needles (eval_hybrid_8k/)."),
    Measurement("niah_smollm2_8k_last_share",
                "NIAH, smollm2-135m: the same 10 passkeys at 8K, the last tokens within a quarter of what the budget "
                "leaves (today's defaults)",
                "eval_defaults_bshare_smollm2_8k", "eval",
                (f"python -m eval.run --model smollm2-135m {NIAH_8K} --past_context --methods vanilla hybrid "
                 f"--retention 0.5 0.25 --boundary_share 0.25 --selection kv_head {SENTENCES} "
                 "--out docs/eval_defaults_bshare_smollm2_8k",),
                others="eval_defaults_smollm2_8k",
                variant=f"today's defaults (`--selection kv_head`): {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section at 8K above") + " The needles stand at their depth's share of the "
                     "sentences, as there; the baselines' rows are read from there."),
    Measurement("niah_gemma3_16k", "NIAH, gemma3-270m: 10 passkeys at 16K tokens (the defaults before the forty-sixth "
                "session: every chunk's last token)",
                "eval_niah_gemma3_16k", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_16K} --methods vanilla hybrid "
                 "streamingllm --retention 0.5 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_gemma3_16k",),
                variant=f"the defaults then: {GEMMA3_DEFAULTS_NAME}, every chunk's last token read",
                note="The longest context measured here: 10 single-key needles (depths 0.1-0.9 x 2 seeds) in the "
                     "evaluation's share of Brown, each at its depth in tokens, at twice the length of every other "
                     "section (Gemma 3 was trained to 32K). Only its 3 full-attention layers of 18 read a budget; "
                     "the others read their 512-token window, as vanilla's do. ChunkLLM with the defaults then; "
                     "vanilla and StreamingLLM in the same folder. The first seed's 25 runs were made with "
                     "`--niah_samples 1`, and the run resumed them."),
    Measurement("niah_gemma3_16k_last_share",
                "NIAH, gemma3-270m: the same 10 passkeys at 16K, the last tokens within a quarter of what the budget "
                "leaves (today's defaults)",
                "eval_niah_bshare_gemma3_16k", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_16K} --methods vanilla hybrid "
                 "--retention 0.5 0.25 --boundary_share 0.25 --selection kv_head --needle_placement tokens "
                 "--out docs/eval_niah_bshare_gemma3_16k",),
                others="eval_niah_gemma3_16k",
                variant=f"today's defaults: {GEMMA3_DEFAULTS_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section at 16K above") + " StreamingLLM's rows are read from there."),
    Measurement("niah_gemma3", "NIAH, gemma3-270m: 10 passkeys at 8K tokens", "eval_recent_share_bt_gemma3_8k", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--out docs/eval_recent_share_bt_gemma3_8k",),
                others="eval_gemma3_8k_headmax",
                note="Single-key needles, depths 0.1-0.9 x 2 seeds, Brown filler; ChunkLLM with the shared rule's defaults "
                     "and the shipped adapters (measured as `--recent_share 0.75 --boundary_tokens`). With a 25% "
                     "budget only a quarter of it (6% of the prompt) goes by score. Vanilla's rows are those of the "
                     "next section, copied into the folder before the run; the other methods' rows are read from "
                     "there (the float32 export of the same training run)."),
    Measurement("niah_gemma3_per_head",
                "NIAH, gemma3-270m: the same 10 passkeys, each KV head choosing at every step",
                "eval_per_head_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--selection kv_head --score_rank 64 --score_estimate sparq --out docs/eval_per_head_gemma3_10",),
                others="eval_gemma3_8k_headmax",
                variant="decode's selections made instead by each KV head at every step "
                        "(`--selection kv_head --score_rank 64 --score_estimate sparq`)",
                note="SparQ's estimate from 64 of the 256 dimensions: gemma3's QK-norm spreads |q| over the "
                     "dimensions, and the estimate ranks the needle's chunk out of the budget (the exact score, "
                     "`--score_estimate exact`, keeps all 10: docs/eval_per_head_exact_gemma3_10). Vanilla was run "
                     "again in the folder."),
    Measurement("niah_gemma3_per_head_lowrank",
                "NIAH, gemma3-270m: the same 10 passkeys, each KV head choosing at every step from low-rank keys",
                "eval_per_head_lowrank_bound_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 0 "
                 "--out docs/eval_per_head_lowrank_bound_gemma3_10",),
                others="eval_gemma3_8k_headmax",
                variant="decode's selections made instead by each KV head at every step, scored from low-rank keys "
                        "(`--selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 0`)",
                note=LOWRANK_NOTE.format(64, 256, "13%") + " Vanilla's rows are those of the same run with the "
                     "plain low-rank score (docs/results.md, twenty-second session), copied into the folder."),
    Measurement("niah_gemma3_per_head_sketch",
                "NIAH, gemma3-270m: the same 10 passkeys, each KV head choosing at every step from low-rank keys "
                "and a sketch of the rest",
                "eval_per_head_lowrank_sketch128_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 128 --sketch_estimate qjl "
                 "--out docs/eval_per_head_lowrank_sketch128_gemma3_10",),
                others="eval_gemma3_8k_headmax",
                variant="decode's selections made instead by each KV head at every step, scored from low-rank keys "
                        "and a sketch of what they miss (`--selection kv_head --score_rank 64 --score_estimate "
                        "lowrank --score_sketch 128 --sketch_estimate qjl`)",
                note=SKETCH_NOTE.format(64, 256, "14%") + " Vanilla was run again in the folder."),
    Measurement("niah_gemma3_per_head_simhash",
                "NIAH, gemma3-270m: the same 10 passkeys, each KV head choosing at every step from low-rank keys "
                "and the angle of the rest",
                "eval_per_head_lowrank_simhash128_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 128 --sketch_estimate "
                 "simhash --out docs/eval_per_head_lowrank_simhash128_gemma3_10",),
                others="eval_gemma3_8k_headmax",
                variant="decode's selections made instead by each KV head at every step, scored from low-rank keys "
                        "and the angle of what they miss from a sketch of its signs (`--selection kv_head "
                        "--score_rank 64 --score_estimate lowrank --score_sketch 128 --sketch_estimate simhash`)",
                note=SIMHASH_NOTE.format("14%") + " Vanilla was run again in the folder."),
    Measurement("niah_gemma3_8k_last_share",
                "NIAH, gemma3-270m: the same 10 passkeys, the last tokens within a quarter of what the budget leaves "
                "(today's defaults)",
                "eval_per_head_bshare_gemma3_10", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--boundary_share 0.25 --selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 128 "
                 f"--sketch_estimate simhash {SENTENCES} --out docs/eval_per_head_bshare_gemma3_10",),
                others="eval_gemma3_8k_headmax",
                variant=f"today's defaults: {GEMMA3_DEFAULTS_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section above (low-rank keys and the angle of the rest)") + " The needles "
                     "stand at their depth's share of the sentences, as in the sections of these 10 passkeys "
                     "before. The baselines' rows are read from the first defaults' section."),
    Measurement("niah_gemma3_first_defaults", "NIAH, gemma3-270m: the same 10 passkeys, the first defaults",
                "eval_gemma3_8k_headmax", "eval",
                (f"python -m eval.run --model gemma3-270m --adapters runs/gemma3_hm/export {NIAH_8K} --methods vanilla "
                 f"chunkllm hybrid streamingllm sepllm fixllm oracle --retention 0.5 0.25 {OFF} "
                 "--out docs/eval_gemma3_8k_headmax",),
                rerun=False, variant=FIRST,
                note="The rows read the float32 export of the training run (train/RESULTS.md); the package ships "
                     "the same weights in bfloat16."),
    Measurement("niah_gemma3_boundary_tokens",
                "NIAH, gemma3-270m: the same 10 passkeys, boundary tokens without the recent share",
                "eval_boundary_tokens_gemma3_8k", "eval",
                (f"python -m eval.run --model gemma3-270m {NIAH_8K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--recent_share 0 --out docs/eval_boundary_tokens_gemma3_8k",),
                variant="boundary tokens alone (`--recent_share 0`)",
                note="With the shipped adapters. " + COPIED.format("first gemma3 sections")),
    Measurement("ppl_smollm2_2k_8", "Perplexity, smollm2-135m, 8 texts of 2K tokens of Brown",
                "eval_ppl_brown_8docs_recent_bt", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--out docs/eval_ppl_brown_8docs_recent_bt",),
                others="eval_ppl_brown_8docs",
                note="The first 8 windows of 2048 tokens of the evaluation's share of Brown; 256-token prompt, 1792 "
                     "positions each teacher-forced through decode, 14336 scored tokens per row; perplexity is exp "
                     "of the mean NLL over all of them. " + COPIED.format("next section")
                     + " The baselines' rows are read from there."),
    Measurement("ppl_smollm2_2k_8_per_head",
                "Perplexity, smollm2-135m, the same 8 texts of 2K, each KV head choosing at every step",
                "eval_per_head_ppl_smollm2_2k_8", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 "
                 f"{PER_HEAD} --out docs/eval_per_head_ppl_smollm2_2k_8",),
                others="eval_ppl_brown_8docs", variant=PER_HEAD_NAME,
                note="As the NIAH section of the same name: SparQ's estimate from 16 of K's 64 dimensions, which "
                     "touch every cache line of K: all of K read besides the KV shown. The baselines' rows are read "
                     "from the first defaults' section."),
    Measurement("ppl_smollm2_2k_8_per_head_lowrank",
                "Perplexity, smollm2-135m, the same 8 texts of 2K, each KV head choosing at every step from low-rank keys",
                "eval_per_head_lowrank_ppl_smollm2_2k_8", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 "
                 f"{LOWRANK} --out docs/eval_per_head_lowrank_ppl_smollm2_2k_8",),
                others="eval_ppl_brown_8docs", variant=LOWRANK_NAME,
                note=LOWRANK_NOTE.format(16, 64, "13%") + " " + COPIED.format("per-head section above")),
    Measurement("ppl_smollm2_2k_8_per_head_sketch",
                "Perplexity, smollm2-135m, the same 8 texts of 2K, each KV head choosing at every step from low-rank "
                "keys and a sketch of the rest",
                "eval_per_head_sketch128_ppl_smollm2_2k_8", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 "
                 f"{SKETCH} --out docs/eval_per_head_sketch128_ppl_smollm2_2k_8",),
                others="eval_ppl_brown_8docs", variant=SKETCH_NAME,
                note=SKETCH_NOTE.format(16, 64, "16%") + " Vanilla was run again in the folder."),
    Measurement("ppl_smollm2_2k_8_first_defaults", "Perplexity, smollm2-135m, the same 8 texts of 2K, the first defaults",
                "eval_ppl_brown_8docs", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid sepllm streamingllm "
                 f"--retention 0.5 0.25 {OFF} --out docs/eval_ppl_brown_8docs",),
                variant=FIRST),
    Measurement("ppl_smollm2_2k_8_boundary_tokens",
                "Perplexity, smollm2-135m, the same 8 texts, boundary tokens without the recent share",
                "eval_ppl_brown_8docs_boundary_tokens", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 0.25 "
                 "--recent_share 0 --out docs/eval_ppl_brown_8docs_boundary_tokens",),
                variant="boundary tokens alone (`--recent_share 0`)",
                note="Same texts and vanilla as the sections above."),
    Measurement("ppl_smollm2_2k_8_budget_floor",
                "Perplexity, smollm2-135m, the same 8 texts, the first defaults reading at least 256 tokens a step",
                "eval_ppl_brown_8docs_budget_floor", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL2K} --methods vanilla hybrid --retention 0.5 {OFF} "
                 "--kv_budget_min_tokens 256 --out docs/eval_ppl_brown_8docs_budget_floor",),
                variant=f"a 256-token floor under the first defaults' budget (`{OFF} --kv_budget_min_tokens 256`)",
                note="`ChunkConfig.kv_budget_min_tokens` (0 by default): a step reads at least 256 tokens, so the "
                     "first 256 positions after the prompt read every token; the budget's share is fitted under the "
                     "floor so that the measured retention meets the target (`eval.methods.budget_share`). "
                     + COPIED.format("8-text sections above")),
    Measurement("ppl_gemma3_2k_8", "Perplexity, gemma3-270m, 8 texts of 2K tokens of Brown",
                "eval_gemma3_ppl_8docs_recent_bt", "eval",
                (f"python -m eval.run --model gemma3-270m {PPL2K} "
                 "--methods vanilla hybrid --retention 0.5 --out docs/eval_gemma3_ppl_8docs_recent_bt",),
                others="eval_gemma3_ppl_8docs",
                note="8 windows of 2048 gemma3 tokens, cut as for smollm2-135m from the evaluation's share of Brown "
                     "(another tokenizer, so not the same text spans); 256-token prompt, 1792 scored positions each, "
                     "with the shipped adapters; ChunkLLM with the shared rule's defaults (measured as `--recent_share 0.75 "
                     "--boundary_tokens`). " + COPIED.format("next section") + " The baselines' rows are read "
                     "from there."),
    Measurement("ppl_gemma3_2k_8_per_head_sketch",
                "Perplexity, gemma3-270m, the same 8 texts, each KV head choosing at every step from low-rank keys "
                "and a sketch of the rest",
                "eval_per_head_sketch128_ppl_gemma3_2k_8", "eval",
                (f"python -m eval.run --model gemma3-270m {PPL2K} --methods vanilla hybrid --retention 0.5 "
                 "--selection kv_head --score_rank 64 --score_estimate lowrank --score_sketch 128 --sketch_estimate qjl "
                 "--out docs/eval_per_head_sketch128_ppl_gemma3_2k_8",),
                others="eval_gemma3_ppl_8docs",
                variant="decode's selections made instead by each KV head at every step, scored from low-rank keys "
                        "and a sketch of what they miss (`--selection kv_head --score_rank 64 --score_estimate "
                        "lowrank --score_sketch 128 --sketch_estimate qjl`)",
                note=SKETCH_NOTE.format(64, 256, "14%") + " Vanilla was run again in the folder."),
    Measurement("ppl_gemma3_2k_8_first_defaults", "Perplexity, gemma3-270m, the same 8 texts, the first defaults",
                "eval_gemma3_ppl_8docs", "eval",
                (f"python -m eval.run --model gemma3-270m {PPL2K} "
                 f"--methods vanilla hybrid streamingllm sepllm --retention 0.5 {OFF} "
                 "--out docs/eval_gemma3_ppl_8docs",
                 f"python -m eval.run --model gemma3-270m {PPL2K} --methods streamingllm sepllm --retention 0.25 {OFF} "
                 "--out docs/eval_gemma3_ppl_8docs"),
                variant=FIRST,
                note="The baselines' rows at 25% were added in the forty-seventh session (the second command), for "
                     "today's defaults at 25% in the first table; SepLLM's window is fitted to each text there."),
    Measurement("ppl_gemma3_2k_8_boundary_tokens",
                "Perplexity, gemma3-270m, the same 8 texts, boundary tokens without the recent share",
                "eval_gemma3_ppl_8docs_boundary_tokens", "eval",
                (f"python -m eval.run --model gemma3-270m {PPL2K} "
                 "--methods vanilla hybrid --retention 0.5 --recent_share 0 "
                 "--out docs/eval_gemma3_ppl_8docs_boundary_tokens",),
                variant="boundary tokens alone (`--recent_share 0`)",
                note=COPIED.format("sections above")),
    Measurement("ppl_gemma3_2k_8_budget_floor",
                "Perplexity, gemma3-270m, the same 8 texts, the first defaults reading at least 256 tokens a step",
                "eval_gemma3_ppl_8docs_budget_floor", "eval",
                (f"python -m eval.run --model gemma3-270m {PPL2K} "
                 f"--methods vanilla hybrid --retention 0.5 {OFF} --kv_budget_min_tokens 256 "
                 "--out docs/eval_gemma3_ppl_8docs_budget_floor",),
                variant=f"a 256-token floor under the first defaults' budget (`{OFF} --kv_budget_min_tokens 256`)",
                note="The share fitted under the floor as for smollm2-135m. " + COPIED.format("sections above")),
    Measurement("ppl_smollm2_4k_8", "Perplexity, smollm2-135m, 8 texts of 4K tokens of Brown",
                "eval_ppl_brown_4k_8docs_recent_bt", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 "--out docs/eval_ppl_brown_4k_8docs_recent_bt",),
                others="eval_ppl_brown_4k_8docs",
                note="The first 8 windows of 4096 tokens of the evaluation's share of Brown; 256-token prompt, 3840 "
                     "positions each teacher-forced through decode, 30720 scored tokens per row; ChunkLLM with "
                     "the shared rule's defaults (measured as `--recent_share 0.75 --boundary_tokens`). "
                     + COPIED.format("next section") + " The baselines' rows are read from there."),
    Measurement("ppl_smollm2_4k_8_per_head_sketch",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, each KV head choosing at every step from low-rank "
                "keys and a sketch of the rest",
                "eval_per_head_sketch128_ppl_smollm2_4k_8", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 f"{SKETCH} --out docs/eval_per_head_sketch128_ppl_smollm2_4k_8",),
                others="eval_ppl_brown_4k_8docs", variant=SKETCH_NAME,
                note=SKETCH_NOTE.format(16, 64, "16%") + " Vanilla was run again in the folder."),
    Measurement("ppl_smollm2_4k_8_first_defaults", "Perplexity, smollm2-135m, the same 8 texts of 4K, the first defaults",
                "eval_ppl_brown_4k_8docs", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid sepllm streamingllm "
                 f"--retention 0.5 {OFF} --out docs/eval_ppl_brown_4k_8docs",),
                variant=FIRST),
    Measurement("ppl_smollm2_4k_8_budget_floor",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, the first defaults reading at least 768 tokens a step",
                "eval_ppl_brown_4k_8docs_budget_floor", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 {OFF} "
                 "--kv_budget_min_tokens 768 --out docs/eval_ppl_brown_4k_8docs_budget_floor",),
                variant=f"a 768-token floor under the first defaults' budget (`{OFF} --kv_budget_min_tokens 768`)",
                note="The first 768 positions after the prompt read every token, and the budget's share is fitted "
                     "under the floor (0.314) so that the measured retention meets the target. "
                     + COPIED.format("8-text 4K sections")),
    Measurement("ppl_smollm2_4k_8_recent_share",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, the recent share without boundary tokens",
                "eval_ppl_brown_4k_8docs_recent_share", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 "--no-boundary_tokens --out docs/eval_ppl_brown_4k_8docs_recent_share",),
                variant="`recent_share=0.75` alone (`--no-boundary_tokens`)",
                note="The most recent candidates get the first 75% of the budget (with the sinks, local and open "
                     "chunk), the rest goes by score. " + COPIED.format("8-text 4K sections")),
    Measurement("ppl_smollm2_4k_8_recent_floor",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, the recent share and at least 512 tokens a step, "
                "no boundary tokens", "eval_ppl_brown_4k_8docs_recent_floor", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 "--no-boundary_tokens --kv_budget_min_tokens 512 --out docs/eval_ppl_brown_4k_8docs_recent_floor",),
                variant="`recent_share=0.75` and a 512-token floor (`--no-boundary_tokens --kv_budget_min_tokens 512`)",
                note="The share fitted under the floor: 0.424. " + COPIED.format("8-text 4K sections")),
    Measurement("ppl_smollm2_4k_8_recent_floor768",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, the recent share and at least 768 tokens a step, "
                "no boundary tokens", "eval_ppl_brown_4k_8docs_recent_floor768", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 "--no-boundary_tokens --kv_budget_min_tokens 768 --out docs/eval_ppl_brown_4k_8docs_recent_floor768",),
                variant="`recent_share=0.75` and a 768-token floor (`--no-boundary_tokens --kv_budget_min_tokens 768`)",
                note="The share fitted under the floor: 0.314. " + COPIED.format("8-text 4K sections")),
    Measurement("ppl_smollm2_4k_8_recent_floor768_bt",
                "Perplexity, smollm2-135m, the same 8 texts of 4K, the shared rule's defaults and at least 768 tokens a step",
                "eval_ppl_brown_4k_8docs_recent_floor768_bt", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL4K} --methods vanilla hybrid --retention 0.5 "
                 "--kv_budget_min_tokens 768 --out docs/eval_ppl_brown_4k_8docs_recent_floor768_bt",),
                variant="a 768-token floor (`--kv_budget_min_tokens 768`)",
                note=COPIED.format("8-text 4K sections")),
    Measurement("ppl_smollm2_8k_8", "Perplexity, smollm2-135m, 8 texts of 8K tokens of Brown",
                "eval_ppl_brown_8k_8docs_recent_bt", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL8K} --methods vanilla hybrid --retention 0.5 "
                 "--out docs/eval_ppl_brown_8k_8docs_recent_bt",),
                others="eval_ppl_brown_8k_8docs",
                note="The first 8 windows of 8192 tokens of the evaluation's share of Brown (each starts at a "
                     "document's start and runs on into the next ones); 256-token prompt, 7936 positions each "
                     "teacher-forced through decode (vanilla's from one blocked prefill of the text), 63488 scored "
                     "tokens per row. " + COPIED.format("next section") + " The baselines' rows are read from there."),
    Measurement("ppl_smollm2_8k_8_first_defaults", "Perplexity, smollm2-135m, the same 8 texts of 8K, the first defaults",
                "eval_ppl_brown_8k_8docs", "eval",
                (f"python -m eval.run --model smollm2-135m {PPL8K} --methods vanilla hybrid streamingllm sepllm "
                 f"--retention 0.5 {OFF} --out docs/eval_ppl_brown_8k_8docs",),
                variant=FIRST,
                note="SepLLM's row was measured a session later than the others, once the sparse prefill's "
                     "tables were sized by the prompt (its run had held 20.6 GiB at batch 8; now 7.3 GiB peak RSS, "
                     "39 minutes)."),
    Measurement("ppl_smollm2_2k", "Perplexity, smollm2-135m, 2K tokens of Brown, the first defaults", "eval_ppl_brown",
                "eval",
                ("python -m eval.run --model smollm2-135m --suites ppl --ppl_tokens 2048 --ppl_docs 1 --filler brown "
                 f"--methods vanilla hybrid chunkllm streamingllm sepllm fixllm oracle --retention 0.5 0.25 {OFF} "
                 "--out docs/eval_ppl_brown",),
                variant=FIRST, note="256-token prompt, the rest teacher-forced through decode. One text."),
    Measurement("ppl_smollm2_4k", "Perplexity, smollm2-135m, 4K tokens of Brown, the first defaults", "eval_ppl_brown_4k",
                "eval",
                ("python -m eval.run --model smollm2-135m --suites ppl --ppl_tokens 4096 --ppl_docs 1 --filler brown "
                 f"--methods vanilla hybrid streamingllm sepllm --retention 0.5 {OFF} --out docs/eval_ppl_brown_4k",),
                variant=FIRST, note="One text."),
    Measurement("ppl_smollm2_generated", "Perplexity, smollm2-135m, 2K tokens of the generated filler, the first defaults",
                "eval_ppl_generated", "eval",
                ("python -m eval.run --model smollm2-135m --suites ppl --ppl_tokens 2048 --ppl_docs 1 --filler "
                 f"generated --methods vanilla hybrid chunkllm streamingllm --retention 0.5 {OFF} "
                 "--out docs/eval_ppl_generated",),
                variant=FIRST, note="One text."),
    Measurement("ppl_gemma3_2k", "Perplexity, gemma3-270m, 2K tokens of Brown, the first defaults",
                "eval_gemma3_ppl_headmax", "eval",
                ("python -m eval.run --model gemma3-270m --suites ppl --ppl_tokens 2048 --ppl_docs 1 --filler brown "
                 f"--methods vanilla hybrid streamingllm --retention 0.5 {OFF} --out docs/eval_gemma3_ppl_headmax",),
                variant=FIRST, note="One text."),
    Measurement("longbench_smollm2", "LongBench-format, smollm2-135m: mini_kv_qa, 8 prompts of 3.6K-4K tokens",
                "eval_longbench_smollm2_recent_bt", "eval",
                ("python -m eval.run --model smollm2-135m --suites longbench --tasks mini_kv_qa --methods vanilla "
                 "hybrid --retention 0.5 0.25 --out docs/eval_longbench_smollm2_recent_bt",),
                others="eval_longbench_smollm2",
                note="QA F1 (0-100) on the shipped mini set's key-value task; the model answers in a sentence, so a "
                     "right code scores 25. Vanilla gives the right code on 3 of the 8 prompts (8 prompts: one code "
                     "is 3 points of the mean). In the rows, ChunkLLM's new tokens are vanilla's, token for token, "
                     "on all 8 prompts at 50% and on 7 at 25%, where the eighth gives the right code and vanilla's "
                     "does not (as under the first defaults). " + COPIED.format("next section") + " The baselines' rows are "
                     "read from there. The other five mini tasks were not run: vanilla scores 0 on three of those "
                     "(docs/results.md history), and a task costs 10-20 minutes per method here."),
    Measurement("longbench_smollm2_per_head_sketch",
                "LongBench-format, smollm2-135m: the same mini_kv_qa prompts, each KV head choosing at every step "
                "from low-rank keys and a sketch of the rest",
                "eval_per_head_sketch128_longbench_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites longbench --tasks mini_kv_qa --methods vanilla "
                 f"hybrid --retention 0.5 0.25 {SKETCH} --out docs/eval_per_head_sketch128_longbench_smollm2",),
                others="eval_longbench_smollm2", variant=SKETCH_NAME,
                note=SKETCH_NOTE.format(16, 64, "16%") + " Vanilla was run again in the folder."),
    Measurement("longbench_smollm2_per_head_simhash",
                "LongBench-format, smollm2-135m: the same mini_kv_qa prompts, each KV head choosing at every step "
                "from low-rank keys and the angle of the rest",
                "eval_per_head_simhash128_longbench_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites longbench --tasks mini_kv_qa --methods vanilla "
                 f"hybrid --retention 0.5 0.25 {SIMHASH} --out docs/eval_per_head_simhash128_longbench_smollm2",),
                others="eval_longbench_smollm2", variant=SIMHASH_NAME,
                note=SIMHASH_NOTE.format("16%") + " Vanilla was run again in the folder."),
    Measurement("longbench_smollm2_last_share",
                "LongBench-format, smollm2-135m: the same mini_kv_qa prompts, the last tokens within a quarter of what "
                "the budget leaves (today's defaults)",
                "eval_longbench_bshare_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites longbench --tasks mini_kv_qa --methods vanilla "
                 f"hybrid --retention 0.5 0.25 {SIMHASH} --boundary_share 0.25 --out docs/eval_longbench_bshare_smollm2",),
                others="eval_longbench_smollm2", variant=f"today's defaults: {SIMHASH_NAME}, {LAST_SHARE_NAME}",
                note=COPIED.format("section above") + " The baselines' rows are read from the shared rule's section."),
    Measurement("longbench_smollm2_first_defaults",
                "LongBench-format, smollm2-135m: the same mini_kv_qa prompts, the first defaults",
                "eval_longbench_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites longbench --tasks mini_kv_qa --methods vanilla "
                 f"hybrid streamingllm sepllm --retention 0.5 0.25 {OFF} --out docs/eval_longbench_smollm2",),
                variant=FIRST,
                note="In the rows: at 50% ChunkLLM's new tokens are vanilla's, token for token, on all 8 prompts; at "
                     "25% on 7, and the eighth gives the right code where vanilla's is wrong. StreamingLLM repeats "
                     "vanilla's tokens on 6 and 4 of the 8 prompts at 50% and 25%, SepLLM on 5 and 3."),
    Measurement("short_smollm2", "Short-text identity, smollm2-135m", "eval_short_smollm2_recent_bt", "eval",
                ("python -m eval.run --model smollm2-135m --suites short --methods vanilla chunkllm hybrid "
                 "--out docs/eval_short_smollm2_recent_bt",),
                note="Prompts of a few dozen tokens are read whole: each method must give vanilla's tokens. The rows "
                     "of vanilla and of the paper's rule (`chunkllm`, which takes neither knob) are those of the "
                     "next section, copied into the folder before the run."),
    Measurement("short_smollm2_per_head_sketch",
                "Short-text identity, smollm2-135m, each KV head choosing at every step from low-rank keys and a "
                "sketch of the rest",
                "eval_per_head_sketch128_short_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites short --methods vanilla hybrid "
                 f"{SKETCH} --out docs/eval_per_head_sketch128_short_smollm2",),
                variant=SKETCH_NAME,
                note=SKETCH_NOTE.format(16, 64, "16%") + " Vanilla was run again in the folder."),
    Measurement("short_smollm2_per_head_simhash",
                "Short-text identity, smollm2-135m, each KV head choosing at every step from low-rank keys and the "
                "angle of the rest",
                "eval_per_head_simhash128_short_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites short --methods vanilla hybrid "
                 f"{SIMHASH} --out docs/eval_per_head_simhash128_short_smollm2",),
                variant=SIMHASH_NAME,
                note=SIMHASH_NOTE.format("16%") + " Vanilla was run again in the folder."),
    Measurement("short_smollm2_first_defaults", "Short-text identity, smollm2-135m, the first defaults",
                "eval_short_smollm2", "eval",
                ("python -m eval.run --model smollm2-135m --suites short --methods vanilla chunkllm hybrid "
                 f"{OFF} --out docs/eval_short_smollm2",),
                variant=FIRST),
    Measurement("ranks_smollm2", "Needle ranks, smollm2-135m: first adapters and retrained", "needle_ranks_headmax",
                "needle_ranks",
                ("python -m eval.needle_ranks --tokens 2048 4096 --depths 0.25 0.5 0.75 --out docs/needle_ranks_headmax",),
                before="needle_ranks"),
    Measurement("ranks_gemma3", "Needle ranks, gemma3-270m: first adapters and retrained", "needle_ranks_gemma3",
                "needle_ranks",
                ("python -m eval.needle_ranks --model gemma3-270m --tokens 2048 4096 --depths 0.25 0.5 0.75 "
                 "--out docs/needle_ranks_gemma3",),
                before="needle_ranks_gemma3_first"),
    Measurement("ranks_gemma3_8k", "Needle ranks, gemma3-270m at 8K: first adapters and retrained",
                "needle_ranks_gemma3_8k", "needle_ranks",
                ("python -m eval.needle_ranks --model gemma3-270m --tokens 8192 --depths 0.3 0.7 "
                 "--out docs/needle_ranks_gemma3_8k",),
                before="needle_ranks_gemma3_8k_first"),
    Measurement("held_out_smollm2", "Held-out KL and recall, smollm2-135m, under the head-max target",
                "adapters_smollm2", "held_out",
                ("python -m train.evaluate --preset smollm2-135m --data runs/data/brown_train50.txt --retrieval_mix 0.6 "
                 "--data_dir runs/smollm2_hm/data --adapters <the first export> smollm2-135m --compare_n_local 4",),
                rerun=False, labels=("first (head-mean teacher, every token, Brown only)",
                                     "retrained, shipped (head-max rows, retrieval mixture)"),
                note="8 held-out sequences of 2K tokens; selection layers 7 and 15."),
    Measurement("held_out_gemma3", "Held-out KL and recall, gemma3-270m, under the head-max target",
                "adapters_gemma3", "held_out",
                ("python -m train.evaluate --preset gemma3-270m --data runs/data/brown_train50.txt --retrieval_mix 0.6 "
                 "--seq_len 2048 --batch_size 4 --eval_batches 4 --max_chunks 256 --data_dir runs/gemma3_hm/data "
                 "--adapters <the first export> <the retrained export> --compare_n_local 4",),
                rerun=False, labels=("first (head-mean teacher, every token, 150 steps on Brown)",
                                     "retrained, shipped (head-max rows, retrieval mixture, 600 cached steps)"),
                note="4 held-out batches of 4 x 2K tokens; selection layers 5, 11 and 17."),
)


# Each check under today's defaults (the per-head rule, low-rank keys and a 128-bit sketch read as SimHash's
# angle), under the shared rule with its defaults (recent share and boundary tokens), under the shared rule's
# first defaults, and under the per-head rule's other scores: a section's name, or perplexity variants' files
# (eval.ppl_variants, the same texts and the same computation as eval.run's perplexity; a file's name, or
# several, one a budget), or None.
DEFAULT_CHECKS = (
    ("NIAH, smollm2-135m, 30 needles at 2K, each at its depth in tokens", "niah_smollm2_budgets_last_share", None, None,
     None, None),
    ("NIAH, smollm2-135m, 30 needles at 2K in the passkey test's haystack", "niah_smollm2_repeated_last_share", None,
     None, None, None),
    ("NIAH, smollm2-135m, 15 needles at 4K in Python source", "niah_smollm2_python_last_share", None, None, None, None),
    ("NIAH, smollm2-135m, 30 needles at 2K in the installed packages' READMEs", "niah_smollm2_package_docs", None, None,
     None, None),
    ("NIAH, gemma3-270m, 10 needles at 4K in Python source", "niah_gemma3_python_last_share", None, None, None, None),
    ("NIAH, smollm2-135m, 30 needles at 2K", "niah_smollm2_per_head_simhash", "niah_smollm2",
     "niah_smollm2_first_defaults", "niah_smollm2_per_head", "niah_smollm2_per_head_sketch"),
    ("NIAH, smollm2-135m, 10 needles at 8K", "niah_smollm2_8k_last_share", None, None, None, None),
    ("NIAH, gemma3-270m, 10 needles at 16K", "niah_gemma3_16k_last_share", None, None, None, None),
    ("NIAH, gemma3-270m, 10 needles at 8K", "niah_gemma3_8k_last_share", "niah_gemma3", "niah_gemma3_first_defaults",
     "niah_gemma3_per_head", "niah_gemma3_per_head_sketch"),
    ("Perplexity, smollm2-135m, 8 x 2K", ("eval_ppl_variants/brown_8x2048_boundary_share_50.jsonl",
                                          "eval_ppl_variants/brown_8x2048_boundary_share_25.jsonl"),
     "ppl_smollm2_2k_8", "ppl_smollm2_2k_8_first_defaults", "ppl_smollm2_2k_8_per_head",
     "ppl_smollm2_2k_8_per_head_sketch"),
    ("Perplexity, smollm2-135m, 8 x 4K", "eval_ppl_variants/brown_8x4096_boundary_share.jsonl",
     "ppl_smollm2_4k_8", "ppl_smollm2_4k_8_first_defaults", None, "ppl_smollm2_4k_8_per_head_sketch"),
    ("Perplexity, smollm2-135m, 8 x 8K", "eval_ppl_variants/brown_8x8192_defaults_bshare.jsonl", "ppl_smollm2_8k_8", "ppl_smollm2_8k_8_first_defaults", None, None),
    ("Perplexity, gemma3-270m, 8 x 2K", ("eval_ppl_variants/gemma3_brown_8x2048_defaults.jsonl",
                                         "eval_ppl_variants/gemma3_brown_8x2048_defaults_25.jsonl"),
     "ppl_gemma3_2k_8", "ppl_gemma3_2k_8_first_defaults", None, "ppl_gemma3_2k_8_per_head_sketch"),
    ("LongBench-format mini_kv_qa, smollm2-135m", "longbench_smollm2_last_share", "longbench_smollm2",
     "longbench_smollm2_first_defaults", None, "longbench_smollm2_per_head_sketch"),
)
