#!/usr/bin/env bash
# Proves that tests/deps/requirements.txt has no entry the tests could do
# without and hides none they need: for each entry, builds the environment
# without it (as the set-up does: --no-deps, then `pip check`) and runs the
# emulator preflight (tests/preflight.py). Every removal must fail one of the two.
# Takes about 10 s per entry with pip's wheel cache warm.
# Usage: bash scripts/check-requirements.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_python_env   # also warms pip's cache with every wheel
scratch="$BYOK_WORK/requirements-check"
rm -rf "$scratch"; mkdir -p "$scratch"
mapfile -t entries < <(deps_list requirements.txt)
survived=()
for entry in "${entries[@]}"; do
    grep -vxF "$entry" <(deps_list requirements.txt) > "$scratch/requirements.txt"
    rm -rf "$scratch/venv"
    python3 -m venv "$scratch/venv"
    if ! "$scratch/venv/bin/python3" -m pip install -q --disable-pip-version-check --no-deps -r "$scratch/requirements.txt" >"$scratch/pip.log" 2>&1; then
        echo "without $entry: fails (pip install: $(tail -1 "$scratch/pip.log"))"
    elif ! "$scratch/venv/bin/python3" -m pip check --disable-pip-version-check >"$scratch/check.log" 2>&1; then
        echo "without $entry: fails (pip check: $(head -1 "$scratch/check.log"))"
    elif ! "$scratch/venv/bin/python3" "$BYOK_ROOT/tests/preflight.py" "$scratch/preflight" >"$scratch/preflight.log" 2>&1; then
        echo "without $entry: fails ($(grep -m1 '^MISSING' "$scratch/preflight.log" | cut -c1-140))"
    else
        echo "without $entry: STILL PASSES"
        survived+=("$entry")
    fi
done
rm -rf "$scratch"
if [ ${#survived[@]} -gt 0 ]; then
    echo "entries the tests do not need (remove them, or make a test need them): ${survived[*]}"
    exit 1
fi
echo "every one of the ${#entries[@]} entries is needed"
