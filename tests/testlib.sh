# Shared by the scripted tests (tests/scripts/*.sh), after scripts/lib.sh:
# results, checks and expected errors. Scripts set NAME and PORT (the cluster)
# and, for expect_error's log of every message, FIXTURES; DB defaults to postgres.
fail=0
ok() { echo "ok: $1"; }
not_ok() { echo "NOT OK: $1"; fail=1; }
check() { if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1: got '$2', expected '$3'"; fi; }
expect_error() { # expect_error LABEL SQLSTATE TEXT SQL
    local out
    out=$(psql_at "$NAME" "$PORT" -d "${DB:-postgres}" -qAt -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c "$4" 2>&1)
    if grep -q "ERROR:  $2:" <<<"$out" && grep -q -- "$3" <<<"$out"; then ok "$1 ($2)"; else not_ok "$1: $out"; fi
    if [ -n "${FIXTURES:-}" ]; then echo "$out" >> "$FIXTURES/errors.log"; fi
}
