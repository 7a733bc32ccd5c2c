#!/usr/bin/env bash
# ALTER EXTENSION byok_pg UPDATE from the released 0.1.0 to this tree's version,
# the way a server goes through it (docs/upgrading.md):
#  1. builds 0.1.0's library and install script from its commit (debug build, its
#     own target directory, seeded from this tree's build) and checks the script
#     equals the frozen one, sql/archive/byok_pg--0.1.0.sql;
#  2. installs them into a private copy of PostgreSQL 15 (never the system's),
#     starts a cluster, creates 0.1.0 data with 0.1.0's API (tests/upgrade/
#     data-0.1.0.sql) in one database, leaves another empty, and edits a third's
#     audit trail behind its trigger;
#  3. stops it, installs this tree's library and scripts (the old library file
#     replaced), starts it, calls a few old definitions (no crash), runs ALTER
#     EXTENSION byok_pg UPDATE (refused on the edited trail until accepted);
#  4. checks that every tenant, key, grant, job, request, registered column,
#     audit row and sealed value is kept, that the updated catalog equals a fresh
#     install's (tests/upgrade/catalog.sql: a catalog change not mirrored in the
#     update script fails here), the golden pg_regress suite on the updated empty
#     database, then that old values decrypt, the audit chain verifies, and
#     rotation, a re-encryption job, grants and dual control work after the update.
# UPGRADE_PORT sets the cluster's port (default 54350).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
NAME=upgrade
PORT="${UPGRADE_PORT:-54350}"
OLD_VERSION=0.1.0
NEW_VERSION="$BYOK_VERSION"
U="$BYOK_WORK/upgrade-build"
P="$U/pg"                                  # the private PostgreSQL
SYSTEM_PG_CONFIG="$PG_CONFIG"
trap 'stop_cluster "$NAME"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
OLD_COMMIT="$RELEASE_0_1_0_COMMIT"
cd "$BYOK_ROOT"
mkdir -p "$U"

# --- 1. the old release, built from its commit (kept between runs) -------------
build_release "$OLD_VERSION" "$OLD_COMMIT"
old_pkg="$RELEASE_STAGE"
cmp -s "$old_pkg/usr/share/postgresql/${PG_MAJOR}/extension/byok_pg--$OLD_VERSION.sql" "sql/archive/byok_pg--$OLD_VERSION.sql" \
    && ok "sql/archive/byok_pg--$OLD_VERSION.sql is what commit ${OLD_COMMIT:0:7} installs" \
    || not_ok "sql/archive/byok_pg--$OLD_VERSION.sql differs from the install script commit ${OLD_COMMIT:0:7} generates"

log "upgrade: packaging this tree's byok_pg $NEW_VERSION (debug; reuses the build)"
new_pkg="$U/pkg-new"
rm -rf "$new_pkg"
cargo pgrx package --debug --pg-config "$SYSTEM_PG_CONFIG" --out-dir "$new_pkg" 2>&1 | grep -E "^error|Finished" || true
[ -f "$new_pkg/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so" ] || die "packaging this tree failed"

# --- 2. a private PostgreSQL running 0.1.0 ------------------------------------
private_postgres "$P"
install -m 755 "$old_pkg/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so" "$PKGLIB/byok_pg.so"
install -m 644 "$old_pkg/usr/share/postgresql/${PG_MAJOR}/extension/byok_pg.control" "sql/archive/byok_pg--$OLD_VERSION.sql" "$EXTDIR/"

log "upgrade: a cluster on byok_pg $OLD_VERSION, with data"
start_cluster "$NAME" "$PORT"
q() { psql_at "$NAME" "$PORT" -d "$1" -qAt -c "$2"; }
q postgres "CREATE DATABASE app"
q postgres "CREATE DATABASE golden"
q app "CREATE EXTENSION byok_pg VERSION '$OLD_VERSION'"
q golden "CREATE EXTENSION byok_pg VERSION '$OLD_VERSION'"
check "installed version" "$(q app "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" "$OLD_VERSION"
# The first key-manager call waits for the key broker to start; retried.
for i in 1 2 3 4 5; do
    q app "SELECT byok.configure_tenant('{\"customer\":\"acme\",\"tenant_id\":\"acme\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"acme-cmk\"}}}')" >/dev/null 2>&1 && break
    sleep 2
done
psql_at "$NAME" "$PORT" -d app -q -f tests/upgrade/data-0.1.0.sql >/dev/null 2>"$U/data.err" || { cat "$U/data.err"; die "creating the $OLD_VERSION data failed"; }
grep -q "still seals" "$U/data.err" || { cat "$U/data.err"; not_ok "the refused destroy did not fail as expected"; }
check "0.1.0 data: values under their keys" \
    "$(q app "SELECT string_agg(tenant || ':' || state || ':' || n, ' ' ORDER BY tenant, state) FROM (SELECT tenant, k.state, count(*) n FROM people JOIN byok.wrapped_data_keys k ON k.dek_id = byok.data_key_id(ssn) GROUP BY 1, 2) x")" \
    "acme:active:200 globex:active:50 globex:decrypt-only:200 initech:active:200"
# A database whose 0.1.0 audit trail was edited behind the trigger's back.
q postgres "CREATE DATABASE tampered"
psql_at "$NAME" "$PORT" -d tampered -q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg VERSION '0.1.0';
SELECT byok.audit_event('test_event', NULL, NULL, 'ok', NULL, jsonb_build_object('n', n)) FROM generate_series(1, 3) n;
ALTER TABLE byok.audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE byok.audit_log SET details = '{"n": 99}' WHERE id = 2;
ALTER TABLE byok.audit_log ENABLE TRIGGER audit_log_append_only;
SQL
# A database left on 0.1.0's catalog for a while after the new library is in
# (ALTER EXTENSION byok_pg UPDATE not run yet): its keys must keep their lifecycle.
q postgres "CREATE DATABASE later"
q later "CREATE EXTENSION byok_pg VERSION '$OLD_VERSION'"
q later "SELECT byok.configure_tenant('{\"customer\":\"later\",\"tenant_id\":\"later\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"later-cmk\"}}}')" >/dev/null
q later "CREATE TABLE notes AS SELECT g AS id, byok.encrypt_text('later', 'n' || g) AS v FROM generate_series(1, 10) g"
audit_max=$(q app "SELECT max(id) FROM byok.audit_log")
psql_at "$NAME" "$PORT" -d app -qAt -v audit_max="$audit_max" -f tests/upgrade/rows.sql > "$U/rows-before.txt"
plain_sql="SELECT count(*) || ' ' || md5(string_agg(byok.decrypt_text(ssn, 'people.ssn') || convert_from(byok.decrypt(note), 'UTF8'), '|' ORDER BY id)) FROM people"
plain_before=$(q app "$plain_sql")
check "0.1.0: every value decrypts" "${plain_before%% *}" "650"
check "0.1.0: the audit chain is intact" "$(q app "SELECT count(*) FROM byok.verify_audit_chain()")" "0"
cat "$U/rows-before.txt"

# --- 3. the new package replaces the old, restart, update -------------------
log "upgrade: installing byok_pg $NEW_VERSION over it, restarting, ALTER EXTENSION byok_pg UPDATE"
stop_cluster "$NAME"
install -m 755 "$new_pkg/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so" "$PKGLIB/byok_pg.so"
install -m 644 "$new_pkg/usr/share/postgresql/${PG_MAJOR}/extension/"byok_pg* "$EXTDIR/"
ls "$EXTDIR"/byok_pg--*--*.sql >/dev/null 2>&1 || not_ok "the package carries no update script (sql/byok_pg--X--Y.sql)"
restart_cluster "$NAME"
# Between the restart and the update the 0.1.0 definitions meet the new library:
# a call may work or fail, but must not take the server down.
for sql in "SELECT * FROM byok.broker_status()" "SELECT * FROM byok.backend_cache_stats()" \
           "SELECT count(*) FROM byok.metrics" "SELECT count(*) FROM byok.jobs" \
           "SELECT byok.data_key_id(ssn), ssn::text FROM people LIMIT 1" \
           "SELECT byok.decrypt_text(ssn, 'people.ssn') FROM people LIMIT 1"; do
    out=$(psql_at "$NAME" "$PORT" -d app -qAt -c "$sql" 2>&1) && echo "before the update, works: $sql" \
        || echo "before the update, fails: $sql: $(head -1 <<<"$out")"
done
check "server up after the old definitions met the new library" "$(grep -c 'terminated by signal' "$BYOK_WORK/$NAME/server.log")" "0"
check "before the update: a data-key rotation on the 0.1.0 catalog" "$(q later "SELECT byok.rotate_data_key('later') > 0")" "t"
check "before the update: values under the old and the new key decrypt" \
    "$(q later "INSERT INTO notes VALUES (11, byok.encrypt_text('later', 'n11')); SELECT count(*) FROM notes WHERE byok.decrypt_text(v) = 'n' || id")" "11"
check "before the update: reconfiguring the tenant" \
    "$(q later "SELECT byok.configure_tenant('{\"customer\":\"later inc\",\"tenant_id\":\"later\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"later-cmk\"}}}')")" "later"
check "before the update: crypto-shredding" "$(q later "SELECT byok.destroy_tenant_keys('later', 'later')")" "2"
for db in app golden; do
    out=$(psql_at "$NAME" "$PORT" -d "$db" -q -c "ALTER EXTENSION byok_pg UPDATE" 2>&1) || not_ok "ALTER EXTENSION byok_pg UPDATE in $db: $out"
    [ -z "$out" ] || echo "$out"
    check "$db updated" "$(q "$db" "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" "$NEW_VERSION"
done
# A broken 0.1.0 chain stops the update (re-chaining would hide the edit), unless accepted.
out=$(psql_at "$NAME" "$PORT" -d tampered -q -v VERBOSITY=verbose -c "ALTER EXTENSION byok_pg UPDATE" 2>&1 || true)
grep -q "ERROR:  55000: byok_pg update: the audit trail's 0.1.0 hash chain is broken at 1 row" <<<"$out" \
    && ok "a broken 0.1.0 audit chain stops the update" || not_ok "a broken 0.1.0 audit chain: $out"
check "the tampered database stays at $OLD_VERSION" "$(q tampered "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" "$OLD_VERSION"
psql_at "$NAME" "$PORT" -d tampered -q -c "SET byok_upgrade.accept_broken_audit_chain = on" -c "ALTER EXTENSION byok_pg UPDATE" 2>/dev/null
check "accepted, the update records the break" \
    "$(q tampered "SELECT details->'previous_chain_breaks'->0->>'id' FROM byok.audit_log WHERE event = 'extension_update'")" "2"
check "server still up (no backend crashed)" "$(grep -c 'terminated by signal' "$BYOK_WORK/$NAME/server.log")" "0"

# --- 4. checks ---------------------------------------------------------------
psql_at "$NAME" "$PORT" -d app -qAt -v audit_max="$audit_max" -f tests/upgrade/rows.sql > "$U/rows-after.txt"
if diff "$U/rows-before.txt" "$U/rows-after.txt"; then ok "every tenant, key, grant, job, request, registered column, audit row and sealed value kept"
else not_ok "rows changed by the update (diff above: before < > after)"; fi

log "upgrade: the updated catalog against a fresh $NEW_VERSION install"
q postgres "CREATE DATABASE fresh"
q fresh "CREATE EXTENSION byok_pg"
for db in fresh app golden; do
    psql_at "$NAME" "$PORT" -d "$db" -qAt -f tests/upgrade/catalog.sql > "$U/catalog-$db.txt"
done
for db in app golden; do
    if diff "$U/catalog-$db.txt" "$U/catalog-fresh.txt" > "$U/catalog-$db.diff"; then
        ok "catalog of the updated database $db = a fresh install's ($(wc -l < "$U/catalog-fresh.txt") facts)"
    else
        head -60 "$U/catalog-$db.diff"
        not_ok "catalog of the updated database $db differs from a fresh install's (above: < updated, > fresh; all of it in $U/catalog-$db.diff). Mirror the change in the update script, sql/byok_pg--*--$NEW_VERSION.sql: docs/upgrading.md"
    fi
done

log "upgrade: the golden pg_regress suite on the updated (empty) database"
# Each file's CREATE EXTENSION byok_pg finds the updated extension there.
rm -rf "$U/regress-in" "$U/regress-out"
mkdir -p "$U/regress-out"
cp -r tests/pg_regress "$U/regress-in"
# (A test that names the regress cluster's data directory gets this one's.)
sed -i -e 's/^CREATE EXTENSION byok_pg;$/CREATE EXTENSION IF NOT EXISTS byok_pg;/' \
       -e "s|/tmp/byok_pg-work/regress/data|$BYOK_WORK/$NAME/data|g" \
    "$U"/regress-in/sql/*.sql "$U"/regress-in/expected/*.out
chmod -R a+rwX "$U/regress-in" "$U/regress-out"
tests=$(cd "$U/regress-in/sql" && ls *.sql | sed 's/\.sql$//' | sort)
status=0
# shellcheck disable=SC2086
PGOPTIONS="-c client_min_messages=warning" \
"/usr/lib/postgresql/${PG_MAJOR}/lib/pgxs/src/test/regress/pg_regress" \
    --use-existing --host="$BYOK_WORK/$NAME" --port="$PORT" --user=postgres \
    --dbname=golden --bindir="$PG_BIN" \
    --inputdir="$U/regress-in" --outputdir="$U/regress-out" $tests || status=$?
if [ $status -eq 0 ]; then ok "golden suite on the updated database"
else head -100 "$U/regress-out/regression.diffs" 2>/dev/null; not_ok "golden suite on the updated database"; fi

log "upgrade: the updated database at work"
check "every 0.1.0 value decrypts" "$(q app "$plain_sql")" "$plain_before"
check "a user view over them still works" "$(q app "SELECT count(*) FROM people_clear WHERE ssn = 'ssn-' || id")" "650"
check "audit chain re-keyed and intact" "$(q app "SELECT count(*) FROM byok.verify_audit_chain()")" "0"
check "the update is in the audit trail, after every re-chained row" \
    "$(q app "SELECT u.details->>'from' || '>' || (u.details->>'to') || ' ' ||
              ((u.details->>'rows_rechained')::bigint = (SELECT count(*) FROM byok.audit_log a WHERE a.id < u.id)
               AND (u.details->'previous_chain_head'->>'id')::bigint = (SELECT max(a.id) FROM byok.audit_log a WHERE a.id < u.id)
               AND (u.details->'previous_chain_head'->>'id')::bigint >= $audit_max)
                FROM byok.audit_log u WHERE u.event = 'extension_update'")" \
    "$OLD_VERSION>$NEW_VERSION true"
check "a granted role decrypts after the update" \
    "$(psql_at "$NAME" "$PORT" -d app -U upg_app -qAt -c "SELECT count(*) FROM people WHERE byok.decrypt_text(ssn, 'people.ssn') = 'ssn-' || id")" "650"
check "a revoke takes effect" \
    "$(q app "SELECT byok.revoke_tenant('upg_app', 'initech')" >/dev/null; psql_at "$NAME" "$PORT" -d app -U upg_app -qAt -v VERBOSITY=verbose -c "SELECT byok.decrypt_text(ssn, 'people.ssn') FROM people WHERE tenant = 'initech' LIMIT 1" 2>&1 | grep -c 'ERROR:  42501' || true)" "1"
check "the pending 0.1.0 request is approved by a second administrator" \
    "$(psql_at "$NAME" "$PORT" -d app -U upg_bob -qAt -c "SELECT byok.approve_operation(request_id) FROM byok.pending_operations WHERE state = 'pending'" | grep -c 'new active data key')" "1"
check "rotation, then a job re-encrypting every old value" \
    "$(q app "SELECT byok.rotate_data_key('globex') > 0"; q app "SELECT byok.wait_job(byok.start_reencrypt(), '3 minutes')")" "$(printf 't\ndone')"
check "every value under its tenant's active key" \
    "$(q app "SELECT count(*) FROM people JOIN byok.wrapped_data_keys k ON k.dek_id = byok.data_key_id(ssn) AND k.dek_id = byok.data_key_id(note) WHERE k.state = 'active'")" "650"
check "and still decrypts" "$(q app "$plain_sql")" "$plain_before"
check "new values" "$(q app "SELECT byok.decrypt_text(byok.encrypt_text('initech', 'after the update', 'c'), 'c')")" "after the update"
check "audit chain intact after new work" "$(q app "SELECT count(*) FROM byok.verify_audit_chain()")" "0"
check "server still up (no backend crashed)" "$(grep -c 'terminated by signal' "$BYOK_WORK/$NAME/server.log")" "0"
exit $fail
