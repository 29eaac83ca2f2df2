#!/usr/bin/env bash
# The mini benchmark (scripts/mini_table.sh) on one GPU, for one or more student recipes at once, inside a time limit.
# Each recipe gets its own table folder OUT_ROOT/<recipe name>, seeded with the data and teacher of PREP (a finished
# mini_table folder: data/ and teacher/model_best.pth.tar), so every recipe sees the same data and teacher; the
# tables run side by side, JOBS runs each, seed by seed (a stopped table holds whole seeds first). At DEADLINE
# seconds the runs still going are stopped: finished runs (validate.csv) stay and a later mini_table.sh on the same
# folder, on any machine, reuses them. A table that fails in its first EARLY seconds (a setup fault, not a run's own)
# stops all of them at once, so that the log comes back while there is time to fix it; the exit status is 1 when a
# table failed, 0 otherwise (also when the deadline stopped them).
#
# Usage: benchmarks/gpu_mini_table.sh PREP OUT_ROOT CONFIG.yaml [CONFIG.yaml ...]
# Environment: DEADLINE (seconds, default 400), EARLY (seconds, default 120), JOBS (runs at a time per recipe,
#   default 7), SEEDS / ROWS / EPOCHS (passed on to mini_table.sh), PYTHON (default python3).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "gpu_mini_table.sh: error: $1" >&2; exit 2; }
[ $# -ge 3 ] || die "usage: benchmarks/gpu_mini_table.sh PREP OUT_ROOT CONFIG.yaml [CONFIG.yaml ...]"
PREP=$(cd "$1" && pwd) || die "PREP: no folder '$1'"
OUT_ROOT=$2
shift 2
[ -f "$PREP/data/objects.json" ] || die "PREP: no demo data in $PREP/data (tools/make_demo_data.py)"
[ -f "$PREP/teacher/model_best.pth.tar" ] || die "PREP: no teacher in $PREP/teacher/model_best.pth.tar"
DEADLINE=${DEADLINE:-400}
EARLY=${EARLY:-120}
export JOBS=${JOBS:-7} PYTHON=${PYTHON:-python3} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
declare -A table_of seen
for cfg in "$@"; do  # every config checked before any table starts
    [ -f "$cfg" ] || die "no config '$cfg'"
    name=$(basename "$cfg" .yaml)
    [ -z "${seen[$name]:-}" ] || die "two configs named $name: each table's folder is OUT_ROOT/<config name>"
    seen[$name]=1
done
for cfg in "$@"; do
    name=$(basename "$cfg" .yaml)
    dir="$OUT_ROOT/$name"
    mkdir -p "$dir/teacher"
    [ -e "$dir/data" ] || ln -s "$PREP/data" "$dir/data"
    cp "$PREP/teacher/model_best.pth.tar" "$dir/teacher/"
    # a session of its own, so that the deadline stops the table with every run it started: a background child of
    # this non-interactive script is no process-group leader, so setsid does not fork and $! is the new group's id
    setsid "$HERE/scripts/mini_table.sh" --out "$dir" --student-config "$cfg" > "$OUT_ROOT/$name.log" 2>&1 &
    table_of[$!]=$name
done
stop_all() { for pid in "${!table_of[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done; }
failed=0
while [ ${#table_of[@]} -gt 0 ]; do
    for pid in "${!table_of[@]}"; do
        kill -0 "$pid" 2>/dev/null && continue
        wait "$pid"
        rc=$?
        echo "table ${table_of[$pid]}: exit $rc after $(( $(date +%s) - start )) s"
        unset "table_of[$pid]"
        if [ "$rc" != 0 ]; then
            failed=1
            if [ $(( $(date +%s) - start )) -lt "$EARLY" ]; then stop_all; fi
        fi
    done
    if [ ${#table_of[@]} -gt 0 ] && [ $(( $(date +%s) - start )) -ge "$DEADLINE" ]; then
        echo "deadline ($DEADLINE s): stopping the tables still running"
        stop_all
        sleep 2
        for pid in "${!table_of[@]}"; do wait "$pid" 2>/dev/null; done
        table_of=()
    fi
    sleep 2
done
for cfg in "$@"; do
    name=$(basename "$cfg" .yaml)
    echo "$name: $(ls "$OUT_ROOT/$name"/runs/*/validate.csv 2>/dev/null | wc -l) finished runs"
done
exit $failed
