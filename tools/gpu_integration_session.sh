#!/usr/bin/env bash
# One single-GPU device call for everything above the kernels: megatron-core 0.19.2 (carried
# wheel) integration tests, Megatron-LM pretrain() with NSA, decode kernels + benchmark, and
# the 1B-at-64k end-to-end throughput of NSA vs full attention. A short table prints last.
#   NSA_COMMIT=<sha> [SKIP_E2E=1] [SKIP_DECODE=1] [E2E_ITERS=n] bash tools/gpu_integration_session.sh [tag]
set -o pipefail
source tools/device_env.sh
TAG=${1:-gpu}
status=0
timeout ${TEST_TIMEOUT:-170} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_decode.py \
    tests/nsa_megatron/test_gpu_model.py tests/launch/test_megatron_lm.py 2>&1 | tee "$OUT/integration_gpu_tests.log" | tail -15
status=$?
[ -n "$SKIP_DECODE" ] || timeout ${DECODE_TIMEOUT:-150} python3 tools/bench_decode.py --out "$OUT" --tag="-$TAG" 2>&1 | tee "$OUT/bench_decode.log" | tail -20
[ -n "$SKIP_E2E" ] || timeout ${E2E_TIMEOUT:-260} python3 tools/bench_e2e.py --out "$OUT" --tag "$TAG" --iters ${E2E_ITERS:-6} --timeout ${E2E_CFG_TIMEOUT:-125} 2>&1 \
    | tee "$OUT/bench_e2e.log" | tail -8
echo "== summary =="
tail -2 "$OUT/integration_gpu_tests.log"
grep -hE '^\| ' "$OUT"/decode-*.md "$OUT"/e2e-*.md 2>/dev/null | grep -v -- '---' | head -24
exit $status
