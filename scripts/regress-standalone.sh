#!/usr/bin/env bash
# Runs each golden pg_regress file alone, in a fresh database of its own, on a
# running cluster (started with start_cluster: shared_preload_libraries =
# 'byok_pg', nothing else). Each file must set up what it uses, print nothing
# that depends on what ran before, and clean up after itself: a file fails if
# its output differs from its expected output, or if it leaves roles behind
# (roles are cluster-wide; leftovers are dropped so the next file is not affected).
# Usage: bash scripts/regress-standalone.sh CLUSTER_NAME PORT [tests...]
#   (CLUSTER_NAME as given to start_cluster: the cluster lives in $BYOK_WORK/NAME)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BYOK_ROOT"

[ $# -ge 2 ] || die "usage: $0 CLUSTER_NAME PORT [tests...]"
cluster=$1 port=$2; shift 2
tests=${*:-$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$//' | sort)}
out="$BYOK_WORK/regress-standalone"
rm -rf "$out"; mkdir -p "$out"

sql() { PGOPTIONS="-c client_min_messages=warning" psql_at "$cluster" "$port" -d postgres -Atq "$@"; }
roles_now() { sql -c "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1"; }
roles_before="$(roles_now)"

failed=()
for t in $tests; do
    db="byok_alone_$t"
    started=$SECONDS
    sql -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" -c "CREATE DATABASE \"$db\""
    status=0
    PGOPTIONS="-c client_min_messages=warning" \
    "/usr/lib/postgresql/${PG_MAJOR}/lib/pgxs/src/test/regress/pg_regress" \
        --use-existing --host="$BYOK_WORK/$cluster" --port="$port" --user=postgres \
        --dbname="$db" --bindir="$PG_BIN" \
        --inputdir=tests/pg_regress --outputdir="$out/$t" \
        "$t" > "$out/$t.log" 2>&1 || status=$?
    ran=$((SECONDS - started))
    sql -c "DROP DATABASE \"$db\" WITH (FORCE)"
    left="$(comm -13 <(echo "$roles_before") <(roles_now) | tr '\n' ' ')"
    if [ $status -ne 0 ]; then
        echo "FAIL (alone): $t"
        cat "$out/$t/regression.diffs" 2>/dev/null | head -60 || cat "$out/$t.log"
        failed+=("$t")
    elif [ -n "$left" ]; then
        echo "FAIL (alone): $t left roles behind: $left"
        failed+=("$t")
    else
        echo "ok (alone): $t (${ran}s)"
    fi
    for r in $left; do sql -c "DROP ROLE IF EXISTS \"$r\"" || true; done
done

[ ${#failed[@]} -eq 0 ] || { echo "failed when run alone: ${failed[*]}"; exit 1; }
echo "every file passes alone ($(echo $tests | wc -w) files)"
