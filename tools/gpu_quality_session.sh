#!/usr/bin/env bash
# Issue 9 on one GPU across several device calls. The experiments run in the background
# (setsid, from a copy of the checkout under /tmp), so they outlive each call while the
# machine stays held; every call copies the
# reports written so far to $OUT.
#   bash tools/gpu_quality_session.sh start   # GPU model test, per-kernel profile, start the experiments
#   bash tools/gpu_quality_session.sh wait N  # wait up to N s (or until all finish), collect
# Experiments, in order (QUALITY_EXPERIMENTS picks a subset): lm (configs/quality_lm_small.yaml,
# nsa vs full, + selection plot), needle4k, needle16k (NEEDLE_ARMS=full, say, trains one arm).
# SKIP_START_CHECKS=1 skips the GPU model test and the kernel profile of 'start'.
set -o pipefail
source tools/device_env.sh
WORK=/tmp/quality
REPORTS=$WORK/reports
mkdir -p "$REPORTS"

collect() {  # one archive: $OUT returns at most 8 files
    tar -czf "$OUT/quality.tgz" -C "$WORK" reports logs 2>/dev/null
    tail -5 "$WORK/logs/driver.log" 2>/dev/null
}

case "${1:-start}" in
start)
    [ -n "$SKIP_START_CHECKS" ] || timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/nsa_megatron/test_gpu_model.py 2>&1 \
        | tee "$REPORTS/gpu_model_tests.log" | tail -4
    [ -n "$SKIP_START_CHECKS" ] || timeout 240 python3 tools/profile_kernels.py --out "$REPORTS" --tag="-${NSA_COMMIT:-head}" 2>&1 | tail -60
    mkdir -p "$WORK/logs"
    # each call replaces the carried checkout: the experiments run from their own copy
    rm -rf "$WORK/repo" && cp -r "$PWD" "$WORK/repo" && cd "$WORK/repo" && NSA_PKGS=$WORK/pkgs source tools/device_env.sh
    export NSA_COMMIT REPORTS WORK QUALITY_EXPERIMENTS NEEDLE_ARMS
    setsid nohup bash -c '
        set -x
        for e in ${QUALITY_EXPERIMENTS:-lm needle4k needle16k}; do case $e in
        lm) python3 tools/quality_lm.py --config configs/quality_lm_small.yaml --report-dir $REPORTS > $WORK/logs/lm.log 2>&1
            python3 tools/plot_selection.py --load runs/quality_lm/nsa/checkpoints --text-file nsa_megatron/attention.py \
                --out $REPORTS/selection-lm.png --json $REPORTS/selection-lm.json > $WORK/logs/plot.log 2>&1 ;;
        needle4k) python3 tools/needle.py --config configs/needle_nsa_4k.yaml --arms ${NEEDLE_ARMS:-nsa,full} --tag 4k --report-dir $REPORTS > $WORK/logs/needle4k.log 2>&1 ;;
        needle16k) python3 tools/needle.py --config configs/needle_nsa_16k.yaml --arms ${NEEDLE_ARMS:-nsa,full} --tag 16k --report-dir $REPORTS > $WORK/logs/needle16k.log 2>&1 ;;
        esac; done
        echo ALL-DONE
    ' > "$WORK/logs/driver.log" 2>&1 < /dev/null &
    sleep 60
    tail -3 "$WORK"/logs/*.log
    collect
    ;;
wait)
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ] && ! grep -q ALL-DONE "$WORK/logs/driver.log" 2>/dev/null; do sleep 15; done
    for f in "$WORK"/logs/*.log; do echo "== $f"; grep -E "iteration|complete|accuracy|loss" "$f" | tail -3; done
    collect
    ;;
esac
