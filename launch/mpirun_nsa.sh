#!/usr/bin/env bash
# MPI launch: ranks come from MPI (mpi4py), which also broadcasts rank 0's host and a free
# port, so torch.distributed needs no other rendezvous.
#
#   NP=16 HOSTFILE=hosts.txt launch/mpirun_nsa.sh configs/nsa_1b_64k_h100.yaml [overrides...]
#   NP=2 launch/mpirun_nsa.sh configs/tiny_cpu.yaml          # one machine, gloo on CPU
#
# Works with MPICH (pip install mpich mpi4py gives `mpiexec`) and Open MPI (add
# MPI_EXTRA="--allow-run-as-root --oversubscribe" where needed). Ranks on one host are
# numbered consecutively, as with torchrun, so local rank = rank within the host.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
MPIEXEC=${MPIEXEC:-mpiexec}
HOSTS=()
if [[ -n "${HOSTFILE:-}" ]]; then HOSTS=(-hostfile "$HOSTFILE"); fi
# shellcheck disable=SC2086
exec "$MPIEXEC" -n "${NP:-2}" "${HOSTS[@]}" ${MPI_EXTRA:-} \
  python "$HERE/pretrain_nsa.py" --config "$CONFIG" "$@"
