#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60; longer locally), on the
# committed corpora. Any crash is a failure; cargo fuzz saves the input under
# fuzz/artifacts/ so it can become a regression test.
# Usage: bash scripts/fuzz.sh [SECONDS]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SECONDS_EACH=${1:-60}
cd "$BYOK_ROOT/fuzz"
ensure_cargo_tools   # cargo-fuzz, pinned in tests/deps/cargo-tools.txt
# cargo fuzz needs unstable compiler flags; the stable toolchain accepts them under
# RUSTC_BOOTSTRAP. The target CPU flags of the extension do not apply here.
export RUSTC_BOOTSTRAP=1
status=0
for target in $(cargo fuzz list); do
    log "fuzzing $target for ${SECONDS_EACH}s"
    mkdir -p "corpus/$target"
    # Runs on a scratch copy of the corpus, so the committed seeds stay small.
    work=$(mktemp -d)
    cp -r "corpus/$target/." "$work/"
    if cargo fuzz run "$target" "$work" -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 2>&1 | tail -12; then
        echo "PASS: fuzz $target"
    else
        echo "FAIL: fuzz $target"; status=1
    fi
    rm -rf "$work"
done
exit $status
