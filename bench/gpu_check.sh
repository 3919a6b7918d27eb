#!/usr/bin/env bash
# `make gpu-check`: the test suite on CUDA, the fast-path comparisons, then bench/gpu_suite.sh.
#
#   bench/gpu_check.sh OUT       (PYTHON defaults to python3; about 6 minutes on one GPU)
#
# 1. tests: the whole suite, with every checkpoint the tests load on CUDA (load_checkpoint puts
#    models on the GPU when there is one; tests/test_gpu.py and test_fused.py's CUDA test need
#    one). Without CUDA: one "skipped" line (make test runs the suite on the CPU).
# 2. fast path: tests/test_fused.py and tests/test_gpu.py alone (on a CPU: the CPU fast-path
#    tests run, each CUDA-only test is listed as skipped with its reason).
# 3. bench/gpu_suite.sh OUT: forward / fp per format, the gpu-check sweep's peak memory,
#    perplexity throughput against lm-eval (CPU-sized where there is no GPU).
set -u
OUT=${1:?usage: bench/gpu_check.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then gpu=1; else gpu=0; fi
status=0
if [ $gpu = 1 ]; then
  echo "=== tests on CUDA"
  "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "skipped (no CUDA device): the test suite on CUDA (make test runs it on the CPU)" \
    | tee -a "$OUT/skipped.txt"
fi
echo "=== fast-path comparisons and CUDA tests"
"$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests/test_fused.py tests/test_gpu.py 2>&1 \
  | tee "$OUT/fast-path.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
bench/gpu_suite.sh "$OUT" || status=1
echo "=== gpu-check: exit $status (figures and logs in $OUT)"
exit $status
