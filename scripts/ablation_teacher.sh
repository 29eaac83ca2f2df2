#!/usr/bin/env bash
# Teacher-strength ablation: DeiT-S TokenMix, 300 epochs, strong teacher NFNet-F0 (dm_nfnet_f0, 83.6%) against
# weak ResNet-18 (resnet18.tv_in1k, 69.8%). Paper: 80.8 with NFNet-F6 maps; the weak-teacher row is not reported.
# Usage: scripts/ablation_teacher.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags] (see scripts/lib.sh)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
table_args "$@"
run_row teacher deit_small_tokenmix_300ep
run_row teacher deit_small_tokenmix_weak_teacher_300ep
echo "results: $RESULTS"
