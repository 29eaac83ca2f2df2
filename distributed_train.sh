#!/usr/bin/env bash
# Multi-process training with torchrun, as in timm: ./distributed_train.sh NUM_PROC [train.py args]
# One node:   ./distributed_train.sh 8 --data-dir /data/imagenet --model deit_small_patch16_224 --tokenmix ...
# Multi-node: set NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT, or pass torchrun's own flags through
#             TORCHRUN_ARGS (e.g. "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:29400").
# SLURM: call train.py directly from srun (one task per GPU); timm reads SLURM_PROCID / SLURM_NTASKS.
#        scripts/slurm_train.sh is an sbatch example that is preempted, requeued and continues.
# torchrun runs through tokenmix_train/launch.py: SIGTERM, SIGUSR1 (and the rest of --preempt-signal) sent to this
# script reach every rank, which saves its position and stops (exit code 3); --resume latest continues.
# Python: $PYTHON, else the active virtualenv, else ./.venv (make setup), else the active conda environment
# (scripts/python_env.sh); without any of them it stops with exit code 2.
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NUM_PROC [train.py args]" >&2
    exit 2
fi
NUM_PROC=$1
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO=$HERE
source "$HERE/scripts/python_env.sh"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${TORCHRUN_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    exec "$PYTHON" -m tokenmix_train.launch $TORCHRUN_ARGS --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
elif [ -n "${NNODES:-}" ]; then
    exec "$PYTHON" -m tokenmix_train.launch --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" \
        --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
        --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
else
    exec "$PYTHON" -m tokenmix_train.launch --standalone --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
fi
