#!/usr/bin/env bash
# One multi-GPU device call (issue 6 / 10): NCCL CP correctness tests, then the CP benchmark.
#   NSA_COMMIT=<sha> bash tools/gpu_cp_session.sh [--seq N] [--worlds 2,4]
set -o pipefail
source tools/device_env.sh
status=0
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -m multigpu -q -p no:cacheprovider \
    tests/nsa_megatron/context_parallel/test_cp_gpu.py 2>&1 | tee "$OUT/cp_gpu_tests.log" | tail -15
status=$?
timeout ${BENCH_TIMEOUT:-300} python3 tools/bench_cp.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_cp.log" | tail -25
mkdir -p benchmarks && cp "$OUT"/cp-* benchmarks/ 2>/dev/null
echo "== summary =="
tail -2 "$OUT/cp_gpu_tests.log"
grep -E '^\| [0-9]' "$OUT"/cp-*.md 2>/dev/null
exit $status
