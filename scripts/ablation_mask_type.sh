#!/usr/bin/env bash
# Mask-type ablation: DeiT-S TokenMix, 300 epochs, block token masks against random tokens (teacher NFNet-F0).
# Paper top-1 (authors' issue #5 / Table 8): block 80.6, random 80.6 (CutMix region 79.8). Matched control:
# Mixup+CutMix trained like TokenMix (BCE, 310 epochs), differing from both rows only in the mixer.
# Usage: scripts/ablation_mask_type.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags] (see scripts/lib.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
table_args "$@"
run_row mask_type deit_small_cutmix_mixup_bce_300ep
run_row mask_type deit_small_tokenmix_300ep
run_row mask_type deit_small_tokenmix_random_300ep
echo "results: $RESULTS"
