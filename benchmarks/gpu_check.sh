#!/usr/bin/env bash
# One-GPU throughput check, two parts inside one 10-minute device call (at most 210 + 330 s, then cut off).
# 1. TokenMix against timm's Mixup/CutMix on synthetic batches (issue 4, benchmarks/bench_train.py), a few minutes:
#    DeiT-S student, ResNet-50 teacher (full 224 px and reduced 112 px input), synthetic 224 px batches of 128,
#    bfloat16 autocast, 3 interleaved rounds of 60 timed steps per configuration. Prints images/s, the ratio to
#    the timm baseline measured in the same run, and peak GPU memory per configuration.
#    Goal (teacher about a third of the student's cost): tokenmix-teacher at >= 0.9x timm-mixup-cutmix.
#    Also measured: tokenmix-teacher-top5 (--teacher-topk 5: the full B x 1000 x h x w maps instead of the label
#    rows) and tokenmix-stored (--teacher-maps: 14 x 14 maps carried by the batch, no teacher; goal >= 0.98x
#    tokenmix-area, printed as a same-round ratio). Run once on an H200 (docs/benchmarks.md, 2026-12-04).
# 2. The same kind of steps fed by the real loader from JPEG files (issue 26, benchmarks/bench_fed.py): the DeiT-S
#    stored-maps recipe (configs/imagenet/deit_small_tokenmix_stored_maps_300ep.yaml, 224 px, batch 128, 1000
#    classes, bfloat16) built as train.py builds it, --workers = cores - 2; 256 ImageNet-sized JPEG files generated
#    into output/bench_fed/ and linked to fill a pass; a map store precomputed there with a ResNet-50 teacher of
#    random weights (the rates do not depend on them), the same teacher online (bf16) for tokenmix-teacher.
#    For timm-mixup-cutmix, tokenmix-area, tokenmix-stored and tokenmix-teacher: fed img/s, synthetic img/s (the
#    loader's batches kept on the GPU), loader-alone img/s, fed / synthetic and whether each row is loader- or
#    GPU-bound; 3 interleaved rounds of 30 warm-up + 42 timed steps. NOT RUN ON A GPU YET (no device was lent on
#    2026-12-05): tested on a CPU with tiny models only; its time on the device is an estimate (about 3-5 minutes).
# Usage: benchmarks/gpu_check.sh [extra bench_train.py flags, e.g. -b 256 --steps 100]
# Exit code: 0 when both parts ran, else the last failing part's (124: cut off by its time limit).
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
status=0
timeout 210 "$PYTHON" benchmarks/bench_train.py \
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
    "$@" || status=$?
workers=$(( $(nproc) - 2 ))
if [ "$workers" -lt 1 ]; then
    workers=1
fi
timeout 330 "$PYTHON" benchmarks/bench_fed.py \
    --teacher-model resnet50 \
    --teacher-amp \
    --images 256 \
    --rounds 3 \
    --steps 42 \
    -- \
    --device cuda \
    --num-classes 1000 \
    --amp-dtype bfloat16 \
    --workers "$workers" \
    || status=$?
exit "$status"
