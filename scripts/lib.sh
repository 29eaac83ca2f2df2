# Shared by the ImageNet table scripts (sourced, not run): argument parsing, one "train then validate" row,
# and the results file. Each table script calls `table_args "$@"` then `run_row NAME` for each of its rows.
#
# Usage of a table script:  scripts/<table>.sh NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags]
#   NUM_GPUS     GPUs on this node (distributed_train.sh NUM_PROC)
#   DATA_DIR     ImageNet as an ImageFolder: DATA_DIR/train/<wnid>/*.JPEG, DATA_DIR/val/<wnid>/*.JPEG
#   OUTPUT_DIR   runs go to OUTPUT_DIR/<row>, all rows to OUTPUT_DIR/results.csv (default: output/imagenet)
# Environment:
#   PER_GPU_BATCH=128  images per GPU per step; the global batch stays 1024 via --grad-accum-steps
#   PYTHON             interpreter for train.py / validate.py (default: the active virtualenv, else .venv,
#                      else the active conda environment; scripts/python_env.sh)
#   OCCLUSION="0 0.25 0.5 0.75"  shares of 16 px patches dropped at validation (0 = clean)
#   DRY_RUN=1          print the commands instead of running them
# A row is trained with --resume latest, so an interrupted row continues from its newest checkpoint; a row whose
# newest checkpoint finished every epoch is not trained again (only validated).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/python_env.sh"
PER_GPU_BATCH="${PER_GPU_BATCH:-128}"
OCCLUSION="${OCCLUSION:-0 0.25 0.5 0.75}"
GLOBAL_BATCH=1024
CONFIG_DIR="$REPO/configs/imagenet"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# Print a command (shell-quoted, after "+ ") under DRY_RUN=1, else run it.
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

table_args() {
    [ $# -ge 2 ] || die "usage: $0 NUM_GPUS DATA_DIR [OUTPUT_DIR] [-- extra train.py flags]"
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$1'"
    [[ "$PER_GPU_BATCH" =~ ^[1-9][0-9]*$ ]] || die "PER_GPU_BATCH must be a positive integer, got '$PER_GPU_BATCH'"
    GPUS=$1
    DATA=$2
    shift 2
    OUT=output/imagenet
    if [ $# -gt 0 ] && [ "$1" != -- ]; then OUT=$1; shift; fi
    if [ $# -gt 0 ] && [ "$1" = -- ]; then shift; fi
    EXTRA=("$@")
    [ "${DRY_RUN:-0}" = 1 ] || [ -d "$DATA/train" ] || die "DATA_DIR '$DATA' has no train/ folder"
    local per_step=$((GPUS * PER_GPU_BATCH))
    [ $((GLOBAL_BATCH % per_step)) -eq 0 ] || \
        die "NUM_GPUS x PER_GPU_BATCH = $per_step does not divide the global batch $GLOBAL_BATCH"
    ACCUM=$((GLOBAL_BATCH / per_step))
    RESULTS="$OUT/results.csv"
}

config_value() {  # config_value FILE KEY: a top-level scalar of a config
    sed -n "s/^$2: *//p" "$1"
}

# finished_epochs DIR: the epochs the newest loadable checkpoint in run folder DIR finished (0 without DIR).
finished_epochs() {
    if [ -d "$1" ]; then
        PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tokenmix_train.checkpoint "$1"
    else
        echo 0
    fi
}

# Train one table row (configs/imagenet/NAME.yaml) unless finished, then validate its best checkpoint, raw and
# (when the recipe keeps them) EMA weights, clean and occluded; append the rows to $RESULTS with the table and
# row names in front.
run_row() {
    local table=$1 name=$2
    local cfg="$CONFIG_DIR/$name.yaml" dir="$OUT/$name"
    [ -f "$cfg" ] || die "no config $cfg"
    local model epochs finished
    model=$(config_value "$cfg" model)
    epochs=$(($(config_value "$cfg" epochs) + $(config_value "$cfg" cooldown_epochs | grep . || echo 0)))
    finished=$(finished_epochs "$dir")  # a folder of only broken checkpoints ends the script here (exit 2)
    if [ "$finished" -ge "$epochs" ]; then
        echo "$name: the newest checkpoint in $dir finished all $epochs epochs, not training again"
    else
        run env PYTHON="$PYTHON" "$REPO/distributed_train.sh" "$GPUS" -c "$cfg" --data-dir "$DATA" \
            --output "$OUT" --experiment "$name" --resume latest -b "$PER_GPU_BATCH" --grad-accum-steps "$ACCUM" \
            ${EXTRA[@]+"${EXTRA[@]}"}
    fi
    local ema suffix emas=('')
    [ "$(config_value "$cfg" model_ema)" = true ] && emas+=(--use-ema)
    for ema in "${emas[@]}"; do
        suffix=${ema:+-ema}
        # shellcheck disable=SC2086
        run "$PYTHON" "$REPO/validate.py" --data-dir "$DATA" --split val --model "$model" \
            --checkpoint "$dir/model_best.pth.tar" ${ema:+"$ema"} --img-size 224 --crop-pct 0.875 --amp \
            --occlusion $OCCLUSION --occlusion-mode random --patch-size 16 --seed 0 \
            --results-file "$dir/validate$suffix.csv"
        run append_results "$table" "$name" "$dir/validate$suffix.csv" "$RESULTS"
    done
}

# append_results TABLE ROW CSV RESULTS: CSV's data rows, prefixed with TABLE,ROW, to RESULTS (header once).
append_results() {
    mkdir -p "$(dirname "$4")"
    [ -s "$4" ] || { printf 'table,row,'; head -n 1 "$3"; } > "$4"
    tail -n +2 "$3" | sed "s/^/$1,$2,/" >> "$4"
}
