#!/usr/bin/env bash
# The adapters round of docs/results.md: NIAH at matched, measured KV budgets (50% and 25%) on
# smollm2-135m, 30 needles at 2K tokens (single and multi-key, five depths, three seeds each), on
# the evaluation's share of the Brown text (training never reads it: eval.filler_split). Vanilla,
# ChunkLLM with the shipped (retrained) adapters, the training-free oracle, StreamingLLM, and the
# earlier adapters given as OLD_ADAPTERS. About an hour on a 2-core CPU; results resume where they
# stopped (eval.run), so a killed run can be started again.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_ADAPTERS=${OLD_ADAPTERS:-}
common=(--model smollm2-135m --suites niah --niah_kinds single multikey --niah_lengths 2048
        --niah_depths 0.1 0.3 0.5 0.7 0.9 --niah_samples 3 --filler brown)
python -m eval.run "${common[@]}" --methods vanilla chunkllm oracle streamingllm --retention 0.5 0.25 \
    --out docs/eval_adapters_smollm2
if [ -n "$OLD_ADAPTERS" ]; then
  python -m eval.run "${common[@]}" --methods chunkllm --retention 0.25 --adapters "$OLD_ADAPTERS" \
      --out docs/eval_adapters_smollm2_old
fi
