#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#
#   NNODES=4 RDZV_ENDPOINT=node001:29400 launch/torchrun_multinode.sh configs/nsa_27b_moe_64k.yaml
#
# Rendezvous arguments (torchrun):
#   --nnodes NNODES             number of nodes that must join (or MIN:MAX for elastic jobs)
#   --nproc-per-node NPROC      processes (GPUs) per node, default 8
#   --rdzv-backend c10d         rendezvous hosted by the first node to reach the endpoint
#   --rdzv-endpoint HOST:PORT   a host every node can reach (usually node 0) and a free port
#   --rdzv-id RDZV_ID           job id shared by all nodes of this job (default: $USER-nsa)
# Node ranks are assigned by the rendezvous; global ranks are node_rank * NPROC + local rank.
# The corpus/data cache (data.cache_dir) and checkpoint folder must be on a shared filesystem.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-${USER:-nsa}-nsa}" \
  "$HERE/pretrain_nsa.py" --config "$CONFIG" "$@"
