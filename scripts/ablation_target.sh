#!/usr/bin/env bash
# Target ablation: DeiT-S TokenMix, 300 epochs, label weights from the token area against the teacher (NFNet-F0).
# Paper top-1: teacher 80.8; area-target TokenMix not reported separately. Matched control: Mixup+CutMix trained
# like TokenMix (BCE, 310 epochs), differing from both rows only in the mixer.
# Usage: scripts/ablation_target.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags] (see scripts/lib.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
table_args "$@"
run_row target deit_small_cutmix_mixup_bce_300ep
run_row target deit_small_tokenmix_area_300ep
run_row target deit_small_tokenmix_300ep
echo "results: $RESULTS"
