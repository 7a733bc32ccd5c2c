#!/usr/bin/env bash
# A physical streaming standby (pg_basebackup) with byok_pg preloaded decrypts
# every row, follows key rotations on the primary, and refuses key
# administration with a clear read-only error.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PRIMARY=54345
STANDBY=54346
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
p() { psql_at rep_primary $PRIMARY -d postgres -qAt "$@"; }
s() { psql_at rep_standby $STANDBY -d postgres -qAt "$@"; }
trap 'stop_cluster rep_standby; stop_cluster rep_primary' EXIT

start_cluster rep_primary $PRIMARY "wal_level = replica" "max_wal_senders = 4"
echo "host replication postgres 127.0.0.1/32 trust" | as_postgres tee -a "$BYOK_WORK/rep_primary/data/pg_hba.conf" >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/rep_primary/data" reload >/dev/null
p >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"c","tenant_id":"t1","encryption":{"provider":"local","local":{"key_id":"k1"}}}');
CREATE ROLE reader LOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('reader', 't1');
CREATE TABLE secrets AS SELECT g AS id, byok.encrypt_text('t1', 'secret ' || g, 'secrets') AS v FROM generate_series(1, 5000) g;
SQL

# The base backup carries the local master key file with the data directory.
rm -rf "$BYOK_WORK/rep_standby"
as_postgres mkdir -p "$BYOK_WORK/rep_standby"
as_postgres "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p $PRIMARY -U postgres -D "$BYOK_WORK/rep_standby/data" -R -X stream >/dev/null
{
    echo "port = $STANDBY"
    echo "unix_socket_directories = '$BYOK_WORK/rep_standby'"
    echo "hot_standby = on"
} | as_postgres tee -a "$BYOK_WORK/rep_standby/data/postgresql.conf" >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/rep_standby/data" -l "$BYOK_WORK/rep_standby/server.log" -w -t 60 start >/dev/null
check "the standby is in recovery" "$(s -c "SELECT pg_is_in_recovery()")" "t"
check "its key broker runs" "$(s -c "SELECT broker_pid IS NOT NULL FROM byok.broker_status()")" "t"
check "every row decrypts on the standby" "$(s -c "SELECT count(*) FROM secrets WHERE byok.decrypt_text(v, 'secrets') = 'secret ' || id")" "5000"
psql_at rep_primary $PRIMARY -d postgres -qAt -c "GRANT SELECT ON secrets TO reader" >/dev/null
for _ in $(seq 1 50); do [ "$(s -c "SELECT has_table_privilege('reader', 'secrets', 'SELECT')")" = t ] && break; sleep 0.1; done
check "a granted application role reads on the standby too (its grant is checked there, read-only)" \
    "$(psql_at rep_standby $STANDBY -d postgres -qAt -U reader -c "SELECT count(*) FROM secrets WHERE byok.decrypt_text(v, 'secrets') = 'secret ' || id")" "5000"

wait_replay() {
    local lsn; lsn=$(p -c "SELECT pg_current_wal_lsn()")
    for _ in $(seq 1 100); do
        [ "$(s -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] && return 0; sleep 0.1
    done
    return 1
}
echo "== changes on the primary reach the standby's caches"
s -c "SELECT count(byok.decrypt_text(v, 'secrets')) FROM secrets" >/dev/null
p >/dev/null <<'SQL'
SELECT byok.rotate_data_key('t1');
INSERT INTO secrets SELECT g, byok.encrypt_text('t1', 'secret ' || g, 'secrets') FROM generate_series(5001, 6000) g;
CALL byok.rotate_master_key('t1', 'k2');
SQL
wait_replay && ok "standby caught up" || not_ok "standby did not catch up"
check "rows sealed after a rotation decrypt on the standby" "$(s -c "SELECT count(*) FROM secrets WHERE byok.decrypt_text(v, 'secrets') = 'secret ' || id")" "6000"
check "the standby sees the rewrapped keys" "$(s -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys")" "k2"
old=$(p -c "SELECT min(dek_id) FROM byok.data_keys")
p -c "SELECT byok.set_data_key_state($old, 'retired')" >/dev/null
wait_replay
err=$(s -c "SELECT byok.decrypt_text(v, 'secrets') FROM secrets WHERE id = 1" 2>&1)
grep -q "is retired" <<<"$err" && ok "a key retired on the primary is refused on the standby (its cache followed)" || not_ok "retired key: $err"

echo "== key administration on the standby is refused clearly"
for sql in "SELECT byok.configure_tenant('{\"customer\":\"c\",\"tenant_id\":\"t2\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k\"}}}')" \
           "SELECT byok.rotate_data_key('t1')" "CALL byok.rotate_master_key('t1', 'k3')" "SELECT byok.destroy_data_key($old, $old)"; do
    err=$(psql_at rep_standby $STANDBY -d postgres -qAt -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c "$sql" 2>&1)
    grep -q "ERROR:  25006: cannot .* on a standby server" <<<"$err" && ok "refused: ${sql:0:40}..." || not_ok "$sql: $err"
done
check "encrypting on the standby still works (it only reads keys)" "$(s -c "SELECT byok.decrypt_text(byok.encrypt_text('t1', 'read-only is fine'))")" "read-only is fine"
exit $fail
