#!/usr/bin/env bash
# qbench's GPU suite: the figures of the GPU check, each part's output in OUT/<part>.txt.
#
#   bench/gpu_suite.sh OUT [PART...]       (from any directory; PYTHON defaults to python3)
#
# PARTs, by default all, in this order (most wanted first, so that a time limit cuts the rest):
#   forward-bf16  bench/quant_bench.py: fake-quant forward / fp forward per format, reference and
#                 compiled fast path (goal: fast / fp <= 1.15), random Llama of width 4096, bf16
#   sweep         bench/sweep_bench.py --recipe recipes/gpu-check.yaml: its sweep's peak GPU
#                 memory (max allocated) / model size, records in OUT/suite-results
#   forward-fp32  forward-bf16 in fp32
#   perplexity    bench/perplexity_bench.py: qbench's perplexity tokens/s against lm-eval's
#                 loglikelihood_rolling on the same tokens (WikiText-2), fp and W4A4 nvfp4
# Without CUDA every part prints one "skipped (no CUDA device)" line for what needs a GPU and
# runs a CPU-sized version instead (width 256 in fp32, fewer tokens; the recipe scaled down by
# sweep_bench.py --scale-down), so the scripts are exercised: a few minutes on 2 cores.
# Exit status 1 when a part failed (its output says why); the other parts still run.
set -u
OUT=${1:?usage: bench/gpu_suite.sh OUT [forward-bf16 sweep forward-fp32 perplexity]}
shift
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
parts=${*:-forward-bf16 sweep forward-fp32 perplexity}
if $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then gpu=1; else gpu=0; fi
status=0

run() {  # run PART CMD...: its output to the terminal and OUT/PART.txt; note a failure
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "=== $name: FAILED (exit $rc)"; status=1; }
}
skip() { echo "skipped (no CUDA device): $*" | tee -a "$OUT/skipped.txt"; }

forward() {  # forward PART DTYPE
  if [ $gpu = 1 ]; then
    run "$1" "$PYTHON" bench/quant_bench.py --random-width 4096 --layers 4 --dtype "$2" \
      --only forward --batch 8 512 --repeats 5
  elif [ "$2" = float32 ]; then
    skip "$1 at width 4096 (on the CPU: width 256, int4 and nvfp4)"
    run "$1" "$PYTHON" bench/quant_bench.py --random-width 256 --layers 2 --only forward \
      --formats int4 nvfp4 --batch 4 128 --repeats 3
  else
    skip "$1 (bf16 matmuls are ~30x slower than fp32 on a CPU)"
  fi
}

for part in $parts; do
  case $part in
  forward-bf16) forward "$part" bfloat16 ;;
  forward-fp32) forward "$part" float32 ;;
  sweep)
    if [ $gpu = 1 ]; then
      run sweep "$PYTHON" bench/sweep_bench.py --recipe recipes/gpu-check.yaml \
        --results "$OUT/suite-results"
    else
      skip "sweep of recipes/gpu-check.yaml at full size (on the CPU: --scale-down)"
      run sweep "$PYTHON" bench/sweep_bench.py --recipe recipes/gpu-check.yaml \
        --results "$OUT/suite-results" --scale-down
    fi
    ;;
  perplexity)
    if [ $gpu = 1 ]; then
      run perplexity "$PYTHON" bench/perplexity_bench.py --random-width 4096 --layers 4 \
        --dtype bfloat16 --data wikitext2 --seq-len 2048 --tokens 65536 --batch-size 8 \
        --formats nvfp4 --repeats 3
    else
      skip "perplexity at width 4096 (on the CPU: width 256)"
      run perplexity "$PYTHON" bench/perplexity_bench.py --random-width 256 --layers 2 \
        --data wikitext2 --seq-len 128 --tokens 4096 --formats nvfp4 --repeats 2
    fi
    ;;
  *)
    echo "unknown part '$part': use forward-bf16, sweep, forward-fp32, perplexity"
    status=1
    ;;
  esac
done
echo "=== gpu_suite: figures in $OUT/*.txt; exit $status"
exit $status
