#!/usr/bin/env bash
# Main table: DeiT-T/S/B, 300 epochs, DeiT's Mixup+CutMix against TokenMix (teacher NFNet-F0).
# Paper top-1 (baseline -> TokenMix): DeiT-T 72.2 -> 73.2, DeiT-S 79.8 -> 80.8, DeiT-B 81.8 -> 82.9.
# Each model also gets its matched control, Mixup+CutMix trained like TokenMix (BCE, no repeated augmentation,
# 310 epochs, EMA): only the mixer differs, so loss and schedule are not confounded with the method.
# Usage: scripts/deit_main_table.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags] (see scripts/lib.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
table_args "$@"
run_row main deit_tiny_cutmix_mixup_300ep
run_row main deit_tiny_cutmix_mixup_bce_300ep
run_row main deit_tiny_tokenmix_300ep
run_row main deit_small_cutmix_mixup_300ep
run_row main deit_small_cutmix_mixup_bce_300ep
run_row main deit_small_tokenmix_300ep
run_row main deit_base_cutmix_mixup_300ep
run_row main deit_base_cutmix_mixup_bce_300ep
run_row main deit_base_tokenmix_300ep
echo "results: $RESULTS"
