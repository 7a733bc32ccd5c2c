#!/usr/bin/env bash
# Revocation with a stated bound, on the embedded `local` provider, across
# databases: the customer revokes its master key (a line in the revocation
# list beside the key file), and every session of every database reading that
# tenant stops within revocation_check_seconds + 1 s, under a 24 h cache TTL;
# reads come back on their own when the line is removed; an outage (the key
# file gone) is bridged, not treated as a revocation. The cloud providers run
# the same drill in their own scripts (aws_kms.sh, vault.sh, azure_kv.sh,
# gcp_kms.sh), through `revocation_drill` in tests/testlib.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54347
NAME=revocation
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
start_cluster $NAME $PORT
trap 'stop_cluster $NAME' EXIT
DATA="$BYOK_WORK/$NAME/data"
KEY="$DATA/byok_local_master.key"
q() { psql_at $NAME $PORT -d "${DB:-postgres}" -qAt "$@"; }

config() { # config TENANT KEY_ID INTERVAL
    printf '{"customer":"acme_corp","tenant_id":"%s","encryption":{"provider":"local","local":{"key_id":"%s"},"cache_config":{"ttl_seconds":86400,"revocation_check_seconds":%s}}}' "$1" "$2" "$3"
}
for db in postgres second; do
    [ $db = postgres ] || q -c "CREATE DATABASE $db" >/dev/null
    DB=$db q -c "CREATE EXTENSION byok_pg" >/dev/null
    DB=$db q -c "SELECT byok.configure_tenant('$(config acme acme-cmk 2)')" >/dev/null
    DB=$db q -c "SELECT byok.configure_tenant('$(config globex globex-cmk 2)')" >/dev/null
done
check "the server default interval is 30 s" "$(q -c "SHOW byok.revocation_check_seconds")" "30s"
check "a tenant's own interval is in its configuration" "$(q -c "SELECT config #>> '{encryption,cache_config,revocation_check_seconds}' FROM byok.tenant_config WHERE tenant_id = 'acme'")" "2"
check "byok_admin reads the key status" "$(q -c "SET ROLE byok_admin; SELECT count(*) FROM byok.tenant_key_status")" "2"

revoke_acme() { as_postgres sh -c "printf '# revoked by the customer\nacme-cmk\n' > '$KEY.revoked'"; }
restore_acme() { as_postgres rm -f "$KEY.revoked"; }
key_file_gone() { as_postgres mv "$KEY" "$KEY.away"; }
key_file_back() { as_postgres mv "$KEY.away" "$KEY"; }

# The other database reads the same tenant (and master key) in the background.
DB=second q -c "CREATE TABLE other AS SELECT g AS id, byok.encrypt_text('acme', 'x' || g) AS v FROM generate_series(1, 20) g" >/dev/null
printf "SELECT extract(epoch FROM clock_timestamp()), count(*) FROM other WHERE byok.decrypt_text(v) = 'x' || id\n\\\\watch 0.2\n" \
    | psql_at $NAME $PORT -d second -qAt -v VERBOSITY=verbose > "$BYOK_WORK/revocation-second-db" 2>&1 &
OTHER_DB=$!
# ...and another tenant, not revoked, in this database.
q -c "CREATE TABLE bystander AS SELECT g AS id, byok.encrypt_text('globex', 'y' || g) AS v FROM generate_series(1, 20) g" >/dev/null

revocation_drill "local: a master key id in the revocation list" acme 2 55000 'local master key "acme-cmk" is revoked' \
    revoke_acme restore_acme key_file_gone key_file_back
# Any role that can connect can LISTEN: by default the payloads name no tenant.
alerts="$BYOK_WORK/drill-$NAME-acme/alerts"
grep -q '"event" : "master_key_revoked"' "$alerts" && ! grep -q 'tenant_id\|acme-cmk\|revoked (' "$alerts" \
    && ok "by default the byok_alerts payloads name the audit row only" || not_ok "byok_alerts payload content: $(grep -m1 Asynchronous "$alerts")"
check "the refusal does not show the server's paths" "$(grep -c "$DATA" "$BYOK_WORK/drill-$NAME-acme/reader1")" "0"

grep -q "ERROR:  55000:" "$BYOK_WORK/revocation-second-db" \
    && ok "a session of another database reading the tenant stopped too" \
    || not_ok "the other database's session: $(tail -2 "$BYOK_WORK/revocation-second-db" | tr '\n' ' ')"
kill $OTHER_DB 2>/dev/null
check "the other database's trail has the revocation too" \
    "$(DB=second q -c "SELECT count(*) > 0 FROM byok.audit_log WHERE tenant_id = 'acme' AND event = 'master_key_revoked'")" "t"
check "another tenant was never refused" "$(q -c "SELECT count(*) FROM bystander WHERE byok.decrypt_text(v) = 'y' || id")" "20"
check "checks are counted in byok.metrics" "$(q -c "SELECT key_checks > 0 FROM byok.metrics WHERE tenant_id = 'acme' AND database = 'postgres'")" "t"
check "a check per master key, not per database or data key" \
    "$(q -c "SELECT watched_master_keys FROM byok.broker_status()")" "2"

echo "== revocation_check_seconds = 0 turns the check off"
q -c "SELECT byok.configure_tenant('$(config globex globex-cmk 0)')" >/dev/null
# The key broker learns the new setting when the key is next asked for; a
# check already running (at the old 2 s) may still finish: let it.
q -c "SELECT count(*) FROM bystander WHERE byok.decrypt_text(v) = 'y' || id" >/dev/null
sleep 1
before=$(q -c "SELECT key_checks FROM byok.metrics WHERE tenant_id = 'globex' AND database = 'postgres'")
q -c "SELECT count(*) FROM bystander WHERE byok.decrypt_text(v) = 'y' || id" >/dev/null
sleep 3
check "no checks for a tenant with checks off" "$(q -c "SELECT key_checks - $before FROM byok.metrics WHERE tenant_id = 'globex' AND database = 'postgres'")" "0"
expect_error "a negative interval is refused" 22023 "revocation_check_seconds: must be an integer between 0 and 86400" \
    "SELECT byok.configure_tenant('$(config globex globex-cmk -1)')"

exit $fail
