#!/usr/bin/env bash
# The selection measurements of docs/results.md: NIAH at matched, measured KV budgets (50% and 25%)
# on smollm2-135m, two filler texts, vanilla, the training-free oracle, ChunkLLM with the shipped
# adapters and StreamingLLM. About 50 minutes on a 2-core CPU. Results resume where they stopped
# (eval.run), so a killed run can be started again.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--model smollm2-135m --methods vanilla oracle chunkllm streamingllm --suites niah --niah_kinds single
        --niah_lengths 2048 4096 --retention 0.5 0.25 --needle_placement sentences --selection shared --recent_share 0
        --no-boundary_tokens)  # as these rows were measured (the first defaults)
python -m eval.run "${common[@]}" --filler brown --niah_depths 0.1 0.5 0.9 --out docs/eval_selection_brown
python -m eval.run "${common[@]}" --filler generated --niah_depths 0.3 0.7 --out docs/eval_selection_generated
