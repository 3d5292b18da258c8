#!/usr/bin/env bash
# The one prepared run for a session lent a GPU (or a TPU): every kernel built, checked against its jnp
# reference and timed (bench_kernels.py), then the default per-head rule's whole decode step under a KV
# budget (kv_budget, as users set it) against dense decode on the device (bench_chunk.py, the same program
# the CPU pages time), with XLA's attention and with the per-head decode kernel (attention="pallas"). Each
# part writes its files to OUT as it goes, so a run cut short keeps what finished:
#
#   OUT=/some/dir bash bench/device_run.sh                 # everything
#   OUT=/some/dir PARTS="kernels" bash bench/device_run.sh # one part: kernels, kernels_prefill, decode or
#                                                          # decode_kernel (decode with the per-head kernel)
#
# Where one call has a time limit, give each part a call of its own (same OUT): the prefill part resumes the
# kernels part's RESULTS.json.
#
# Afterwards copy OUT/RESULTS.md, RESULTS.json and kernels_speed.png to bench/ (bench_kernels.py's page), and
# OUT/RESULTS_chunk_device.* and RESULTS_chunk_device_kernel.* beside them. BENCH_SMOKE=1 runs every part at tiny shapes on a CPU (interpret
# mode, meaningless timings): tests/test_bench_kernels.py runs it so that this script cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
PARTS=${PARTS:-"kernels kernels_prefill decode decode_kernel"}
PYTHON=${PYTHON:-python3}  # the device image has python3 (the one with jax), not always a plain `python`
export PYTHONUNBUFFERED=1
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  smoke=(--smoke); lengths=(1024); rounds=1; platform=cpu
else
  smoke=(); lengths=(8192 32768 131072); rounds=3; platform=${JAX_PLATFORMS:-}
  backend=$(JAX_PLATFORMS=$platform $PYTHON -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -1)
  if [ "$backend" != gpu ] && [ "$backend" != tpu ]; then  # the CPU's own pages are bench/regenerate.py's
    echo "no GPU or TPU here (jax backend '${backend:-none}'): this run is for an accelerator; BENCH_SMOKE=1 runs it" \
      "at tiny shapes on a CPU" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
status=0
for part in $PARTS; do
  echo "== $part ($(date -u +%H:%M:%S))"
  resume=(); [ -f "$OUT/RESULTS.json" ] && resume=(--resume "$OUT/RESULTS.json")  # keep what an earlier part or run finished
  case $part in
    kernels)  # bandwidth, correctness, decode kernels, distillation
      $PYTHON bench/bench_kernels.py "${smoke[@]}" "${resume[@]}" --out "$OUT" --only bandwidth checks decode distill ;;
    kernels_prefill)  # the prefill kernels, added to the same page
      $PYTHON bench/bench_kernels.py "${smoke[@]}" "${resume[@]}" --out "$OUT" --only prefill ;;
    decode)  # the library's default rule, a whole decode step against dense decode, on the device
      JAX_PLATFORMS=$platform $PYTHON bench/bench_chunk.py --lengths "${lengths[@]}" --ratios 0.5 0.25 \
        --rounds "$rounds" --prefill-lengths --budget --out "$OUT/RESULTS_chunk_device.md" ;;
    decode_kernel)  # the same with its decode attention in the per-head kernel (attention="pallas")
      JAX_PLATFORMS=$platform $PYTHON bench/bench_chunk.py --lengths "${lengths[@]}" --ratios 0.5 0.25 \
        --rounds "$rounds" --prefill-lengths --budget --attention pallas --out "$OUT/RESULTS_chunk_device_kernel.md" ;;
    *) echo "unknown part $part (kernels, kernels_prefill, decode, decode_kernel)" >&2; status=2; continue ;;
  esac
  rc=$?
  [ $rc -ne 0 ] && { echo "== $part failed (exit $rc)" >&2; status=$rc; }
done
exit $status
