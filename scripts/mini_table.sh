#!/usr/bin/env bash
# The measured mini-reproduction (CPU, minutes to an hour or two): the tiny ViT of `make demo` on the cluttered-digits
# demo data, trained with (a) timm Mixup+CutMix, (b) TokenMix with area targets, (c) TokenMix with the tiny CNN
# teacher's targets (block masks), (d) the same with random token masks; each row over seeds, validated clean and
# with 25% / 50% of the 8 px patches dropped, plus the target fidelity error of its mixer (scripts/mini_table.py).
#
# Usage: scripts/mini_table.sh [--quick] [--out DIR]
#   --quick   tiny data (30 train / 10 val images a class), 1 seed, 1 epoch: checks every column in ~1-2 minutes
#   --out     working folder (default: output/mini_table, or output/mini_table_quick with --quick); it holds
#             data/, teacher/, runs/<method>-s<seed>/ and table.md. Finished runs (validate.csv present) are reused.
# Environment: PYTHON (default: the active virtualenv, else .venv, else conda; scripts/python_env.sh), SEEDS (default "0 1 2"; quick: "0"),
#   EPOCHS (student epochs; default: configs/mini/vit_student.yaml's 13; quick: 1).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
OUT=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) [ $# -ge 2 ] || { echo "mini_table.sh: error: --out needs a folder" >&2; exit 2; }; OUT=$2; shift 2 ;;
        *) echo "mini_table.sh: error: unknown argument '$1' (usage: scripts/mini_table.sh [--quick] [--out DIR])" >&2
           exit 2 ;;
    esac
done
REPO=$HERE
source "$HERE/scripts/python_env.sh"
if [ "$QUICK" = 1 ]; then
    OUT=${OUT:-output/mini_table_quick}
    SEEDS=${SEEDS:-0}
    DATA_ARGS=(--train-per-class 30 --val-per-class 10)
    TEACHER_ARGS=(--epochs 1 --log-interval 1000)
    STUDENT_ARGS=(--epochs "${EPOCHS:-1}" --warmup-epochs 0 --log-interval 1000)
    FIDELITY_IMAGES=100
else
    OUT=${OUT:-output/mini_table}
    SEEDS=${SEEDS:-0 1 2}
    DATA_ARGS=(--train-per-class 500 --val-per-class 100)
    TEACHER_ARGS=()
    STUDENT_ARGS=()
    if [ -n "${EPOCHS:-}" ]; then
        STUDENT_ARGS=(--epochs "$EPOCHS")
    fi
    FIDELITY_IMAGES=1000
fi
DATA="$OUT/data"
TEACHER="$OUT/teacher/model_best.pth.tar"
start=$(date +%s)

if [ ! -f "$DATA/objects.json" ]; then
    rm -rf "$DATA.partial"
    "$PYTHON" "$HERE/tools/make_demo_data.py" --out "$DATA.partial" --size 32 --seed 0 "${DATA_ARGS[@]}"
    mv "$DATA.partial" "$DATA"
fi
if [ ! -f "$TEACHER" ]; then
    rm -rf "$OUT/teacher.partial"
    "$PYTHON" "$HERE/train.py" -c "$HERE/configs/demo_teacher.yaml" --data-dir "$DATA" --output "$OUT" \
        --experiment teacher.partial "${TEACHER_ARGS[@]}"
    rm -rf "$OUT/teacher"
    mv "$OUT/teacher.partial" "$OUT/teacher"
fi

TEACHER_FLAGS=(--tokenmix --teacher-model tokenmix_cnn_teacher_64 --teacher-checkpoint "$TEACHER")
for seed in $SEEDS; do
    for method in a_mixup_cutmix b_tokenmix_area c_tokenmix_teacher d_tokenmix_teacher_random; do
        case $method in
            a_mixup_cutmix) flags=() ;;
            b_tokenmix_area) flags=(--tokenmix --tokenmix-target area) ;;
            c_tokenmix_teacher) flags=("${TEACHER_FLAGS[@]}" --tokenmix-mask block) ;;
            d_tokenmix_teacher_random) flags=("${TEACHER_FLAGS[@]}" --tokenmix-mask random) ;;
        esac
        run="$OUT/runs/$method-s$seed"
        [ -f "$run/validate.csv" ] && { echo "reusing $run"; continue; }
        rm -rf "$run"
        "$PYTHON" "$HERE/train.py" -c "$HERE/configs/mini/vit_student.yaml" --data-dir "$DATA" --output "$OUT/runs" \
            --experiment "$method-s$seed" --seed "$seed" "${flags[@]}" "${STUDENT_ARGS[@]}"
        "$PYTHON" "$HERE/validate.py" --data-dir "$DATA" --split val --model tokenmix_vit_tiny_p8_64 --img-size 32 \
            --checkpoint "$run/model_best.pth.tar" --occlusion 0 0.25 0.5 --occlusion-mode random --patch-size 8 \
            --seed 0 -j 1 --results-file "$run/validate.csv.partial"
        mv "$run/validate.csv.partial" "$run/validate.csv"
    done
done
"$PYTHON" "$HERE/scripts/mini_table.py" --out "$OUT" --data-dir "$DATA" --fidelity-images "$FIDELITY_IMAGES"
echo "mini_table: $(( $(date +%s) - start )) s; table in $OUT/table.md"
