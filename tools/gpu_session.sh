#!/usr/bin/env bash
# One device call: install carried wheels (if any), GPU correctness tests, then the kernel
# benchmark; logs and results go to $OUT (and benchmarks/), a short table prints last.
#   bash tools/gpu_session.sh [bench args...]      (env: SKIP_TESTS=1, SKIP_BENCH=1, PYTEST_K=expr)
set -o pipefail
source tools/device_env.sh
status=0
if [ -z "$SKIP_TESTS" ]; then
    timeout ${TEST_TIMEOUT:-250} python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/kernels/test_triton_gpu.py \
        ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
    status=$?
fi
if [ -z "$SKIP_BENCH" ]; then
    timeout ${BENCH_TIMEOUT:-300} python3 tools/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
    mkdir -p benchmarks && cp "$OUT"/kernels-* benchmarks/ 2>/dev/null
fi
echo "== summary =="
tail -3 "$OUT/gpu_tests.log" 2>/dev/null
grep -E '^\| [0-9]' "$OUT"/kernels-*.md 2>/dev/null
exit $status
