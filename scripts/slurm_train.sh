#!/usr/bin/env bash
# A TokenMix run as a SLURM job that is stopped (time limit, preemption), requeued and continued step for step.
#   sbatch scripts/slurm_train.sh -c configs/imagenet/deit_small_tokenmix_300ep.yaml --data-dir /data/imagenet \
#       --teacher-checkpoint /ckpt/nfnet_f6.pth --output /runs --experiment deit_s_tokenmix
# --experiment is required: a requeued job finds its run folder by it. One task per GPU; train.py joins the
# process group from SLURM_PROCID / SLURM_NTASKS (timm's init_distributed_device) with MASTER_ADDR set below.
# - 180 s before the time limit SLURM sends SIGUSR1 to every task (--signal=USR1@180): the ranks finish the step,
#   save their position (recovery-E-B.pth.tar) and exit 3; this script then requeues the job (scontrol requeue).
# - On preemption SLURM sends SIGTERM and requeues the job itself (--requeue, PreemptMode=REQUEUE): same save.
# - Each start runs the same command with --resume latest: the newest checkpoint of the run folder, or a fresh
#   start; summary.csv and TensorBoard list each epoch once.
#SBATCH --job-name=tokenmix
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
if ! printf '%s\n' "$@" | grep -q -- '^--experiment'; then
    echo "usage: sbatch $0 [train.py args] --experiment NAME (a requeued job continues that run folder)" >&2
    exit 2
fi
# sbatch runs a copy of this script: the repository is the submit directory
REPO=${TOKENMIX_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO/scripts/python_env.sh"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
srun --kill-on-bad-exit=1 "$PYTHON" "$REPO/train.py" "$@" --resume latest
status=$?
if [ "$status" -eq 3 ]; then
    echo "slurm_train.sh: the ranks saved their position after a stop signal; requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID:?}"
    exit 0
fi
exit "$status"
