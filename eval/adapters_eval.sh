#!/usr/bin/env bash
# The adapters round of docs/results.md: NIAH at matched, measured KV budgets (25% and 50%) on
# smollm2-135m, 30 needles at 2K tokens (single and multi-key, five depths, three seeds each), on
# the evaluation's share of the Brown text (training never reads it: eval.filler_split). Vanilla,
# ChunkLLM with the shipped (retrained) adapters, StreamingLLM, the training-free oracle, and the
# earlier adapters given as OLD_ADAPTERS, and ChunkLLM's defaults (`hybrid`: the prompt's selections
# by the frozen attention, decode's by the QK Adapters). Results resume where they stopped (eval.run), and the
# steps add to one folder, most needed first. About 75 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_ADAPTERS=${OLD_ADAPTERS:-}
out=docs/eval_adapters_smollm2_30  # the previous round's rows (older code) stay in docs/eval_adapters_smollm2
common=(--model smollm2-135m --suites niah --niah_kinds single multikey --niah_lengths 2048
        --niah_depths 0.1 0.3 0.5 0.7 0.9 --niah_samples 3 --filler brown --needle_placement sentences
        --selection shared --recent_share 0 --no-boundary_tokens)  # as these rows were measured (the first defaults)
python -m eval.run "${common[@]}" --methods vanilla chunkllm hybrid streamingllm --retention 0.25 --out $out
python -m eval.run "${common[@]}" --methods vanilla chunkllm hybrid streamingllm --retention 0.25 0.5 --out $out
if [ -n "$OLD_ADAPTERS" ]; then
  python -m eval.run "${common[@]}" --methods chunkllm --retention 0.25 --adapters "$OLD_ADAPTERS" \
      --out ${out}_old
fi
python -m eval.run "${common[@]}" --methods vanilla chunkllm hybrid streamingllm oracle --retention 0.25 0.5 --out $out
