#!/usr/bin/env bash
# Key caches follow catalog changes made by other sessions, at commit and not before.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
PORT=54334
start_cluster xsession $PORT
trap 'stop_cluster xsession' EXIT
q() { psql_at xsession $PORT -d postgres -qAt "$@"; }

q -c "CREATE EXTENSION byok_pg" \
  -c "SELECT byok.configure_tenant('{\"customer\":\"c\",\"tenant_id\":\"t1\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k1\"}}}')" >/dev/null
first_key=$(q -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 't1' AND state = 'active'")

# Session A keeps one connection open throughout; \! runs the other sessions from inside it.
out=$(psql_at xsession $PORT -d postgres -qAt <<SQL
SELECT 'warm:' || byok.data_key_id(byok.encrypt_text('t1', 'a'));
-- B rotates inside a transaction that is still open while A encrypts: A must keep the old key.
\! psql -X -h $BYOK_WORK/xsession -p $PORT -U postgres -d postgres -qAt -c "BEGIN" -c "SELECT byok.rotate_data_key('t1')" -c "SELECT pg_sleep(3)" -c "ROLLBACK" >/dev/null &
SELECT pg_sleep(1);
SELECT 'during-open-tx:' || byok.data_key_id(byok.encrypt_text('t1', 'b'));
SELECT pg_sleep(3);
SELECT 'after-rollback:' || byok.data_key_id(byok.encrypt_text('t1', 'c'));
-- B rotates and commits: A's next encrypt uses the new key.
\! psql -X -h $BYOK_WORK/xsession -p $PORT -U postgres -d postgres -qAt -c "SELECT byok.rotate_data_key('t1')" >/dev/null
SELECT 'after-commit:' || byok.data_key_id(byok.encrypt_text('t1', 'd'));
-- B destroys the old key: A, which has it cached, must stop decrypting with it.
\! psql -X -h $BYOK_WORK/xsession -p $PORT -U postgres -d postgres -qAt -c "SELECT byok.destroy_data_key($first_key, $first_key)" >/dev/null
SELECT 'after-destroy:' || byok.decrypt_text(byok.encrypt_text('t1', 'e'));
SQL
)
new_key=$(q -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 't1' AND state = 'active'")
echo "$out"
fail=0
expect() { if grep -qx "$1" <<<"$out"; then echo "ok: $1"; else echo "NOT OK: expected line '$1'"; fail=1; fi; }
expect "warm:$first_key"
expect "during-open-tx:$first_key"
expect "after-rollback:$first_key"
expect "after-commit:$new_key"
expect "after-destroy:e"
[ "$new_key" != "$first_key" ] || { echo "NOT OK: rotation made no new key"; fail=1; }

# A session that cached the old key before it was destroyed cannot use it afterwards.
err=$(psql_at xsession $PORT -d postgres -qAt -v ON_ERROR_STOP=1 2>&1 <<SQL || true
CREATE TABLE old_vals AS SELECT byok.encrypt_text('t1', 'x') AS v;
SELECT byok.rotate_data_key('t1');
SELECT byok.decrypt_text(v) FROM old_vals;
\! psql -X -h $BYOK_WORK/xsession -p $PORT -U postgres -d postgres -qAt -c "SELECT byok.destroy_data_key($new_key, $new_key)" >/dev/null
SELECT byok.decrypt_text(v) FROM old_vals;
SQL
)
if grep -q "data key $new_key has been destroyed" <<<"$err"; then echo "ok: cached key refused after destroy elsewhere"; else echo "NOT OK: $err"; fail=1; fi

# A dropped role's grants go with it (the scheduler removes them, so a future
# role with the same OID inherits nothing), and the removal is audited.
q -c "ALTER SYSTEM SET byok.scheduler_naptime_seconds = 1" -c "SELECT pg_reload_conf()" >/dev/null
q -c "CREATE ROLE short_lived" -c "SELECT byok.grant_tenant('short_lived', 't1')" >/dev/null
oid=$(q -c "SELECT oid FROM pg_roles WHERE rolname = 'short_lived'")
q -c "DROP ROLE short_lived" >/dev/null
left=1
for _ in $(seq 1 100); do
    left=$(q -c "SELECT count(*) FROM byok.tenant_grants WHERE grantee::oid = $oid")
    [ "$left" = 0 ] && break
    sleep 0.1
done
[ "$left" = 0 ] && echo "ok: a dropped role's grant is removed" || { echo "NOT OK: the grant of dropped role $oid is still there"; fail=1; }
audited=$(q -c "SELECT count(*) FROM byok.audit_log WHERE event = 'grant_dropped_with_role' AND tenant_id = 't1' AND details->>'role_oid' = '$oid'")
[ "$audited" = 1 ] && echo "ok: and the removal is in the audit trail" || { echo "NOT OK: removal audited $audited time(s)"; fail=1; }
q -c "ALTER SYSTEM RESET byok.scheduler_naptime_seconds" -c "SELECT pg_reload_conf()" >/dev/null
exit $fail
