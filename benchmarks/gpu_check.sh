#!/usr/bin/env bash
# What only a GPU shows, in one call (under 9 minutes on one H100, no network): a Qwen3-8B-shaped checkpoint with
# random bfloat16 weights built from its config, the built-in suite on it in bfloat16 and in float16, the
# generation benchmark, and the hand-written static-cache + compiled loop it is measured against; then one
# summary.json and one summary.md in OUT_DIR.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default gpu-check/
#
# GPU_CHECK_SHAPE=tiny GPU_CHECK_DEVICE=cpu runs the same steps at a size a CPU takes in seconds (the project's
# tests dry-run it so). Every phase has its own time limit (GPU_CHECK_PHASE_SECONDS, default 150); a phase that
# fails or runs out is recorded with its exit status and the summary is written anyway. GPU_CHECK_SWEEP replaces
# the benchmark's sweep options.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu-check}")
shape=${GPU_CHECK_SHAPE:-qwen3-8b}
device=${GPU_CHECK_DEVICE:-cuda}
limit=${GPU_CHECK_PHASE_SECONDS:-150}
python=${PYTHON:-python}
mkdir -p "$out" && : > "$out/phases.jsonl"

phase() {  # phase NAME COMMAND...: run it under the time limit, log its output, record exit status and seconds
  local name=$1 start=$SECONDS status
  shift
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  printf '{"phase": "%s", "exit": %d, "seconds": %d}\n' "$name" "$status" $((SECONDS - start)) >> "$out/phases.jsonl"
  tail -n 3 "$out/$name.log"
}

checkpoint="$out/checkpoint"
phase build "$python" benchmarks/gpu_check.py build "$out" --shape "$shape" --device "$device"
suite=(-p no:cacheprovider --causal-lm-checkpoint="$checkpoint" --causal-lm-device="$device" --causal-lm-random-weights)
for dtype in bfloat16 float16; do
  phase "suite-$dtype" "$python" -m pytest -q "${suite[@]}" --causal-lm-suite=only --causal-lm-dtype="$dtype" \
    --causal-lm-report="$out/suite-$dtype.json"
done
# the benchmark in bfloat16 over a short sweep (the full default sweep takes longer than one GPU slot)
phase benchmark "$python" -m pytest -q "${suite[@]}" --causal-lm-suite=only --causal-lm-dtype=bfloat16 --causal-lm-benchmark --benchmark-only \
  ${GPU_CHECK_SWEEP:---causal-lm-benchmark-new-tokens=32,128 --causal-lm-benchmark-prompt-lengths=32,1024 --causal-lm-benchmark-rounds=3} \
  --causal-lm-benchmark-plot="$out/benchmark.png" --benchmark-json="$out/benchmark.json"
if [ "$device" != cpu ]; then  # compiling the hand-written loop on a CPU costs minutes and shows nothing a GPU does
  CAUSAL_LM_TEST_REFERENCE_LOOP_CHECKPOINT="$checkpoint" phase reference-loop "$python" -m pytest -q -p no:cacheprovider \
    benchmarks/test_reference_loop.py --benchmark-json="$out/reference-loop.json"
fi
rm -rf "$checkpoint"  # 16 GB of random weights: the figures are what this run is for
"$python" benchmarks/gpu_check.py summarize "$out"
