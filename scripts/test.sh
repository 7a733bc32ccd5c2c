#!/usr/bin/env bash
# Runs every test: the layer check, the Rust unit tests of the core crates, the
# golden pg_regress suite, and the scripted multi-session tests. Sets up what it
# needs first.
# Usage: bash scripts/test.sh            (as root or as a user who can install into PostgreSQL)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BYOK_ROOT"

passed=0
failed=0
failures=()
record() { # record NAME STATUS
    if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "PASS: $1"
    else failed=$((failed + 1)); failures+=("$1"); echo "FAIL: $1"; fi
}

ensure_toolchain
reserve_test_ports

# Before anything else: each key-manager emulator starts from the test
# environment and answers a real request. A missing package stops the run here,
# named, instead of as a confusing failure twenty minutes in.
log "preflight: every key-manager emulator answers a real request"
"$PY" tests/preflight.py "$BYOK_WORK/preflight" || die "an emulator is missing (above); nothing else was run"

# Cheap and first among the checks: no module imports from a layer above its
# own, no cycles, the core crates free of pgrx (the table in ARCHITECTURE.md).
log "layers: dependencies flow down only (scripts/check-layers.py, ARCHITECTURE.md)"
status=0; python3 scripts/check-layers.py || status=$?
record "layers" $status

log "style: cargo fmt --check, cargo clippy"
status=0; cargo fmt --all --check && cargo fmt --manifest-path fuzz/Cargo.toml --check || status=$?
record "cargo fmt" $status
status=0; cargo clippy --workspace --all-targets --quiet -- -D warnings || status=$?
record "cargo clippy" $status

log "fuzzing: envelope, text input, tenant config (${FUZZ_SECONDS:-60}s each)"
status=0; bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}" || status=$?
record "fuzzing" $status

log "unit tests: byok-core, byok-exporter, byok-kms (no PostgreSQL)"
# (a debug build: overflow checks and debug assertions on. The test command makes
# no release build, which takes ten minutes of the CI machine's two cores: the
# benchmarks (bench/) and scripts/package.sh build and run it, and
# PACKAGE_PROFILE=release bash tests/scripts/package.sh tests its package.)
status=0; cargo test -p byok-core -p byok-exporter -p byok-kms 2>&1 | tee "$BYOK_WORK.cargo-test.log" | grep -E "^test result|FAILED|panicked" || status=$?
# (compiler errors start their line; a test's name may contain "error::")
grep -qE "FAILED|^error(\[|:)" "$BYOK_WORK.cargo-test.log" && status=1
record "cargo test (core, exporter, kms)" $status

log "key-manager stand-ins tested against the vendors' REST reference examples"
status=0; for t in tests/standins/*/test_*.py; do "$PY" "$t" 2>&1 | tail -3 || status=$?; done
record "stand-ins" $status

install_extension

log "pg_regress: tests/pg_regress"
start_cluster regress 54330
psql_at regress 54330 -d postgres -q -c "CREATE DATABASE byok_regress"
rm -rf "$BYOK_WORK/regress-out"; mkdir -p "$BYOK_WORK/regress-out"
tests=$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//' | sort)
status=0
PGOPTIONS="-c client_min_messages=warning" \
"/usr/lib/postgresql/${PG_MAJOR}/lib/pgxs/src/test/regress/pg_regress" \
    --use-existing --host="$BYOK_WORK/regress" --port=54330 --user=postgres \
    --dbname=byok_regress --bindir="$PG_BIN" \
    --inputdir=tests/pg_regress --outputdir="$BYOK_WORK/regress-out" \
    $tests || status=$?
if [ $status -ne 0 ] && [ -f "$BYOK_WORK/regress-out/regression.diffs" ]; then
    head -200 "$BYOK_WORK/regress-out/regression.diffs"
fi
record "pg_regress" $status

log "pg_regress: each file alone, in a fresh database of its own"
status=0; bash scripts/regress-standalone.sh regress 54330 || status=$?
record "pg_regress (each file alone)" $status
stop_cluster regress

log "docs: every SQL object and GUC of the installed extension is documented; links resolve"
status=0; bash scripts/check-docs.sh || status=$?
record "docs" $status

for script in tests/scripts/*.sh; do
    log "scripted: $script"
    status=0; bash "$script" || status=$?
    record "$(basename "$script" .sh)" $status
done

log "load: pgbench 16 clients x 64 tenants for ${LOAD_SECONDS:-20}s (bench/load.sh; 60 s on demand)"
# (pipefail is on: the pipeline fails when load.sh does)
status=0; PROFILE=debug DURATION="${LOAD_SECONDS:-20}" bash bench/load.sh 2>&1 | tail -8 || status=$?
record "load" $status

echo
[ $failed -eq 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
