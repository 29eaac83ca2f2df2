# Sourced by distributed_train.sh and scripts/*.sh (not run): sets PYTHON to the project's environment.
# Order: $PYTHON when set; else the active virtualenv ($VIRTUAL_ENV); else the repository's .venv (what
# `make setup` creates); else the active conda environment ($CONDA_PREFIX); else stop with exit code 2,
# since the system python3 usually lacks torch and would fail later with "No module named 'torch'".
# Needs REPO (the repository root) to be set by the caller.
if [ -z "${PYTHON:-}" ]; then
    for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$REPO/.venv/bin/python" \
                     "${CONDA_PREFIX:+$CONDA_PREFIX/bin/python}"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            PYTHON=$candidate
            break
        fi
    done
    if [ -z "${PYTHON:-}" ]; then
        echo "$(basename "$0"): error: no Python environment: run 'make setup' (creates $REPO/.venv)," \
             "activate a virtualenv, or set PYTHON=/path/to/python" >&2
        exit 2
    fi
fi
export PYTHON
