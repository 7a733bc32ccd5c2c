# Shared by the scripted tests (tests/scripts/*.sh), after scripts/lib.sh:
# results, checks and expected errors. Scripts set NAME and PORT (the cluster)
# and, for expect_error's log of every message, FIXTURES; DB defaults to postgres.
fail=0
# The scripts run Python and the emulators from the tests' environment only.
ensure_python_env
ok() { echo "ok: $1"; }
not_ok() { echo "NOT OK: $1"; fail=1; }
check() { if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1: got '$2', expected '$3'"; fi; }
expect_error() { # expect_error LABEL SQLSTATE TEXT SQL
    local out
    out=$(psql_at "$NAME" "$PORT" -d "${DB:-postgres}" -qAt -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c "$4" 2>&1)
    if grep -q "ERROR:  $2:" <<<"$out" && grep -q -- "$3" <<<"$out"; then ok "$1 ($2)"; else not_ok "$1: $out"; fi
    if [ -n "${FIXTURES:-}" ]; then echo "$out" >> "$FIXTURES/errors.log"; fi
}
# wait_for_audit_queue: until the audit writer has written every queued record (30 s at most)
wait_for_audit_queue() {
    local i
    for i in $(seq 300); do
        [ "$(psql_at "$NAME" "$PORT" -d "${DB:-postgres}" -qAt -c "SELECT (SELECT audit_queued FROM byok.broker_status()) = 0 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'byok catalog writer')")" = t ] && return 0
        sleep 0.1
    done
    return 1
}
