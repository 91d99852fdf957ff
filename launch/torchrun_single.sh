#!/usr/bin/env bash
# One node, all its GPUs (or N CPU processes with gloo when there is no GPU).
#
#   launch/torchrun_single.sh configs/nsa_1b_64k_h100.yaml [key=value ...] [--megatron-flags]
#
# NPROC (default: number of GPUs, or 1 without GPUs) sets the processes per node.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
  "$HERE/pretrain_nsa.py" --config "$CONFIG" "$@"
