#!/usr/bin/env bash
# The mini benchmark: the tiny conv-stem ViT at 32 px with 4 px tokens (8 x 8 tokens) on the cluttered-digits demo data
# or on CIFAR-10/100, one row per method, each over paired seeds (seed s: same initial weights and data order in
# every row). Rows: (a) Mixup + CutMix, soft-target CE; (b) the same with BCE; (c) TokenMix, area targets;
# (d) TokenMix, the CNN teacher's online full own-class maps; (e) its top-5 maps; (f) its stored top-5 maps
# (tools/precompute_teacher_maps.py; demo data only); (g) random token masks with the targets of (d). TokenMix rows
# train with BCE, as the authors do, so (b) is their like-for-like baseline. Each run is validated clean and with
# 25% / 50% of the 4 px patches dropped; tokenmix_train/mini_table.py adds target fidelity (demo data), images/s,
# 95% intervals over seeds, the paired differences to (a) and (b) and two plots.
#
# Usage: scripts/mini_table.sh [--quick] [--out DIR] [--student-config YAML]
#                              [--dataset cifar10|cifar100 --data-dir DIR [--dataset-download]]
#   --quick      tiny demo data (30 train / 10 val images a class), 1 seed, 1 epoch, 1-epoch teacher: checks every
#                column and plot in a few minutes (with --dataset: 1 seed, 1 epoch on the given data)
#   --out        working folder (default: output/mini_table[_quick][_<dataset>]); it holds data/ (demo), teacher/,
#                maps/ (demo), runs/<row>-s<seed>/, table.md, top1_per_epoch.png and fidelity.png (demo).
#                Finished runs (validate.csv present) are reused, so an interrupted table resumes.
#   --student-config  the student's train.py config (default: configs/mini/vit_student.yaml, or
#                configs/mini/cifar_student.yaml with --dataset); validate.py gets each run's model, image size,
#                model_kwargs, gp and token size from its args.yaml, so any architecture is validated as trained
#   --dataset    cifar10 / cifar100 through timm's torch/cifar10 / torch/cifar100 (torchvision's CIFAR files under
#                --data-dir); configs/mini/cifar_*.yaml; no stored-maps row (the store needs an image folder) and
#                no fidelity column (CIFAR has no object masks)
#   --dataset-download  let torchvision download CIFAR into --data-dir
# Environment: PYTHON (default: the active virtualenv, else .venv, else conda; scripts/python_env.sh), SEEDS
#   (default "0 1 2 3 4"; quick: "0"), EPOCHS (student epochs; default: the config's), ROWS (row names to run;
#   default: all), JOBS (runs at a time, default 1; with 2 on a 2-core machine each run gets one thread, which
#   trains these small models faster in total than one run with two threads). Each run's output goes to
#   OUT/logs/<row>-s<seed>.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="usage: scripts/mini_table.sh [--quick] [--out DIR] [--student-config YAML]"
USAGE+=" [--dataset cifar10|cifar100 --data-dir DIR [--dataset-download]]"
die() { echo "mini_table.sh: error: $1" >&2; exit 2; }
QUICK=0
OUT=
DATASET=
DATA_DIR=
DOWNLOAD=()
STUDENT_CFG=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
        --student-config) [ $# -ge 2 ] || die "--student-config needs a YAML file"; STUDENT_CFG=$2; shift 2 ;;
        --dataset) [ $# -ge 2 ] || die "--dataset needs cifar10 or cifar100"; DATASET=$2; shift 2 ;;
        --data-dir) [ $# -ge 2 ] || die "--data-dir needs a folder"; DATA_DIR=$2; shift 2 ;;
        --dataset-download) DOWNLOAD=(--dataset-download); shift ;;
        *) die "unknown argument '$1' ($USAGE)" ;;
    esac
done
case "$DATASET" in
    '') [ -z "$DATA_DIR" ] || die "--data-dir is for --dataset cifar10|cifar100 (the demo data is written to --out)"
        [ ${#DOWNLOAD[@]} = 0 ] || die "--dataset-download is for --dataset cifar10|cifar100" ;;
    cifar10) NUM_CLASSES=10 ;;
    cifar100) NUM_CLASSES=100 ;;
    *) die "--dataset must be cifar10 or cifar100, got '$DATASET'" ;;
esac
[ -z "$DATASET" ] || [ -n "$DATA_DIR" ] || die "--dataset $DATASET needs --data-dir DIR (torchvision's CIFAR folder)"
[ -z "$STUDENT_CFG" ] || [ -f "$STUDENT_CFG" ] || die "--student-config: no file '$STUDENT_CFG'"
REPO=$HERE
source "$HERE/scripts/python_env.sh"
ALL_ROWS="a_mixup_cutmix b_mixup_cutmix_bce c_tokenmix_area d_tokenmix_teacher e_tokenmix_teacher_top5
f_tokenmix_stored_maps g_tokenmix_random"
ALL_ROWS=$(echo $ALL_ROWS)  # one line, names separated by single spaces
ROWS=$(echo ${ROWS:-$ALL_ROWS})
JOBS=${JOBS:-1}
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive whole number, got '$JOBS'"
for row in $ROWS; do
    [[ " $ALL_ROWS " == *" $row "* ]] || die "ROWS: unknown row '$row' (rows: $ALL_ROWS)"
done
SUFFIX=$([ "$QUICK" = 1 ] && echo _quick || true)${DATASET:+_$DATASET}
OUT=${OUT:-output/mini_table$SUFFIX}
if [ "$QUICK" = 1 ]; then
    SEEDS=${SEEDS:-0}
    TEACHER_ARGS=(--epochs 1 --warmup-epochs 0 --log-interval 1000)
    STUDENT_ARGS=(--epochs "${EPOCHS:-1}" --warmup-epochs 0 --log-interval 1000)
    FIDELITY_IMAGES=100
else
    SEEDS=${SEEDS:-0 1 2 3 4}
    TEACHER_ARGS=()
    STUDENT_ARGS=()
    if [ -n "${EPOCHS:-}" ]; then STUDENT_ARGS=(--epochs "$EPOCHS"); fi
    FIDELITY_IMAGES=1000
fi
TEACHER_MODEL=tokenmix_cnn_teacher_64
TEACHER="$OUT/teacher/model_best.pth.tar"
start=$(date +%s)
mkdir -p "$OUT"

if [ -z "$DATASET" ]; then
    DATA="$OUT/data"
    STUDENT_CFG=${STUDENT_CFG:-$HERE/configs/mini/vit_student.yaml}
    TEACHER_CFG="$HERE/configs/mini/cnn_teacher.yaml"
    DATA_FLAGS=(--data-dir "$DATA")
    VAL_FLAGS=(--data-dir "$DATA" --split val)
    if [ ! -f "$DATA/objects.json" ]; then
        rm -rf "$DATA.partial"
        if [ "$QUICK" = 1 ]; then SIZES=(--train-per-class 30 --val-per-class 10)
        else SIZES=(--train-per-class 500 --val-per-class 100); fi
        "$PYTHON" "$HERE/tools/make_demo_data.py" --out "$DATA.partial" --size 32 --seed 0 "${SIZES[@]}"
        mv "$DATA.partial" "$DATA"
    fi
else
    DATA="$DATA_DIR"
    STUDENT_CFG=${STUDENT_CFG:-$HERE/configs/mini/cifar_student.yaml}
    TEACHER_CFG="$HERE/configs/mini/cifar_teacher.yaml"
    DATA_FLAGS=(--data-dir "$DATA" --dataset "torch/$DATASET" --num-classes "$NUM_CLASSES")
    VAL_FLAGS=("${DATA_FLAGS[@]}" --split validation)
    FIDELITY_IMAGES=0
fi
if [ ! -f "$TEACHER" ]; then
    rm -rf "$OUT/teacher.partial"
    "$PYTHON" "$HERE/train.py" -c "$TEACHER_CFG" "${DATA_FLAGS[@]}" "${DOWNLOAD[@]}" --output "$OUT" \
        --experiment teacher.partial "${TEACHER_ARGS[@]}"
    rm -rf "$OUT/teacher"
    mv "$OUT/teacher.partial" "$OUT/teacher"
fi
MAPS="$OUT/maps"
if [ -z "$DATASET" ] && [[ " $ROWS " == *" f_tokenmix_stored_maps "* ]] && [ ! -f "$MAPS/.done" ]; then
    "$PYTHON" "$HERE/tools/precompute_teacher_maps.py" --data-dir "$DATA" --split train \
        --teacher-model "$TEACHER_MODEL" --teacher-checkpoint "$TEACHER" --img-size 64 --topk 5 --workers 1 \
        --out "$MAPS"
    touch "$MAPS/.done"
fi

# the table's module of this checkout, also where the packages are not pip-installed (benchmarks/gpu_mini_table.sh)
mini_table() { PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tokenmix_train.mini_table "$@"; }
ONLINE=(--tokenmix --bce-loss --teacher-model "$TEACHER_MODEL" --teacher-checkpoint "$TEACHER" --teacher-img-size 64)
# One (seed, row) run: train, then validate clean and occluded; validate.csv marks it finished.
run_one() {
    local seed=$1 row=$2 flags run log listed model_flags
    case $row in
        a_mixup_cutmix) flags=() ;;
        b_mixup_cutmix_bce) flags=(--bce-loss) ;;
        c_tokenmix_area) flags=(--tokenmix --bce-loss --tokenmix-target area) ;;
        d_tokenmix_teacher) flags=("${ONLINE[@]}") ;;
        e_tokenmix_teacher_top5) flags=("${ONLINE[@]}" --teacher-topk 5) ;;
        f_tokenmix_stored_maps)
            if [ -n "$DATASET" ]; then echo "skipping $row: stored maps need an image-folder dataset"; return; fi
            flags=(--tokenmix --bce-loss --teacher-model "$TEACHER_MODEL" --teacher-maps "$MAPS" --teacher-topk 5) ;;
        g_tokenmix_random) flags=("${ONLINE[@]}" --tokenmix-mask random) ;;
    esac
    run="$OUT/runs/$row-s$seed"
    log="$OUT/logs/$row-s$seed.log"
    [ -f "$run/validate.csv" ] && { echo "reusing $run"; return; }
    rm -rf "$run"
    "$PYTHON" "$HERE/train.py" -c "$STUDENT_CFG" "${DATA_FLAGS[@]}" --output "$OUT/runs" \
        --experiment "$row-s$seed" --seed "$seed" "${flags[@]}" "${STUDENT_ARGS[@]}" > "$log" 2>&1 \
        || die "training $row seed $seed failed; see $log"
    # the architecture as trained and its token size, one flag or value a line, from the run's args.yaml
    listed=$(mini_table --validate-flags "$run" 2>> "$log") \
        || die "reading the model of $row seed $seed from $run/args.yaml failed; see $log"
    mapfile -t model_flags <<< "$listed"
    "$PYTHON" "$HERE/validate.py" "${VAL_FLAGS[@]}" "${model_flags[@]}" --checkpoint "$run/model_best.pth.tar" \
        --occlusion 0 0.25 0.5 --occlusion-mode random --seed 0 -j 1 --results-file "$run/validate.csv.partial" \
        >> "$log" 2>&1 || die "validating $row seed $seed failed; see $log"
    mv "$run/validate.csv.partial" "$run/validate.csv"
    echo "finished $row seed $seed ($(( $(date +%s) - start )) s)"
}

# wait for one run; when it failed (its message is already printed), stop the others and fail
wait_one() {
    wait -n || { kill $(jobs -rp) 2>/dev/null || true; exit 2; }
}

mkdir -p "$OUT/logs"
# JOBS runs at a time, seed by seed, each with an equal share of the cores
if [ "$JOBS" -gt 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + JOBS - 1) / JOBS ))}; fi
for seed in $SEEDS; do
    for row in $ROWS; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait_one; done
        run_one "$seed" "$row" &
    done
done
while [ -n "$(jobs -rp)" ]; do wait_one; done
mini_table --out "$OUT" --data-dir "$DATA" --fidelity-images "$FIDELITY_IMAGES" --num-classes "${NUM_CLASSES:-10}" \
    --teacher-checkpoint "$TEACHER"
echo "mini_table: $(( $(date +%s) - start )) s; table and plots in $OUT"
