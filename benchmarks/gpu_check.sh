#!/usr/bin/env bash
# One-GPU throughput check of TokenMix against timm's Mixup/CutMix (issue 4), a few minutes in all:
# DeiT-S student, ResNet-50 teacher (full 224 px and reduced 112 px input), synthetic 224 px batches of 128,
# bfloat16 autocast, 3 interleaved rounds of 60 timed steps per configuration. Prints images/s, the ratio to
# the timm baseline measured in the same run, and peak GPU memory per configuration.
# Goal (teacher about a third of the student's cost): tokenmix-teacher at >= 0.9x timm-mixup-cutmix.
# Also measured: tokenmix-teacher-top5 (--teacher-topk 5: the full B x 1000 x h x w maps instead of the label rows)
# and tokenmix-stored (--teacher-maps: 14 x 14 maps carried by the batch, no teacher; goal >= 0.98x tokenmix-area,
# printed as a same-round ratio). Not run on a GPU yet.
# Usage: benchmarks/gpu_check.sh [extra bench_train.py flags, e.g. -b 256 --steps 100]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to torch" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")'
exec timeout 300 "$PYTHON" benchmarks/bench_train.py \
    --device cuda \
    --model deit_small_patch16_224 \
    --teacher-model resnet50 \
    --num-classes 1000 \
    --img-size 224 \
    --teacher-img-size 112 \
    -b 128 \
    --amp-dtype bfloat16 \
    --warmup-steps 10 \
    --steps 60 \
    --rounds 3 \
    "$@"
