#!/usr/bin/env bash
# Swin-T row: 300 epochs, the Swin authors' Mixup+CutMix recipe against TokenMix on 32 px cells (teacher NFNet-F0).
# Swin paper: 81.3 top-1; third-party tables list 81.6 with TokenMix. The Swin recipe has no EMA: raw weights only.
# Matched control: the same Mixup+CutMix recipe with BCE, as the TokenMix row: only the mixer differs.
# Usage: scripts/swin_tiny_table.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags] (see scripts/lib.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
table_args "$@"
run_row swin swin_tiny_cutmix_mixup_300ep
run_row swin swin_tiny_cutmix_mixup_bce_300ep
run_row swin swin_tiny_tokenmix_300ep
echo "results: $RESULTS"
