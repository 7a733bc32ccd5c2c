#!/usr/bin/env bash
# Sets everything up on a fresh machine and walks through byok_pg on the built-in
# local key provider: configure a tenant from its byok_config document, encrypt a
# column, read it back, rotate the data key, and see the errors that guard the data.
# Usage: bash scripts/demo.sh   (as root, or a user who can install into PostgreSQL)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = "--stop" ]; then stop_cluster demo; exit 0; fi
ensure_toolchain
install_extension
PORT=54321
start_cluster demo $PORT
log "demo cluster on port $PORT (socket $BYOK_WORK/demo); server log: $BYOK_WORK/demo/server.log"
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e <<'SQL'
CREATE EXTENSION byok_pg;

-- 1. Configure a tenant from the guide's byok_config.yaml, as JSON.
SELECT byok.configure_tenant($$
{"customer": "acme_corp", "tenant_id": "tenant_12345",
 "encryption": {"provider": "local", "local": {"key_id": "acme-cmk-1"},
                "key_rotation": {"enabled": true, "interval_days": 90},
                "cache_config": {"ttl_seconds": 86400, "max_entries": 1000,
                                 "revocation_check_seconds": 2},
                "audit": {"log_all_operations": true, "alert_on_failures": true}}}$$);
SELECT * FROM byok.tenants;
SELECT * FROM byok.data_keys;

-- 2. Encrypt a column; the context binds each value to its column.
CREATE TABLE patients (id serial PRIMARY KEY, tenant_id text, diagnosis byok.encrypted);
INSERT INTO patients (tenant_id, diagnosis)
SELECT 'tenant_12345', byok.encrypt_text('tenant_12345', d, 'patients.diagnosis')
  FROM unnest(ARRAY['influenza', 'fracture', 'migraine']) d;
SELECT id, left(diagnosis::text, 40) || '...' AS stored FROM patients;
SELECT id, byok.decrypt_text(diagnosis, 'patients.diagnosis') AS diagnosis FROM patients;

-- 3. Rotate the data key: new values use the new key, old ones still open.
SELECT byok.rotate_data_key('tenant_12345');
INSERT INTO patients (tenant_id, diagnosis)
VALUES ('tenant_12345', byok.encrypt_text('tenant_12345', 'asthma', 'patients.diagnosis'));
SELECT id, byok.data_key_id(diagnosis) AS key, byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients;

-- 4. What stops misuse: wrong context, another tenant, a tampered value.
SELECT byok.decrypt_text(diagnosis, 'patients.other_column') FROM patients WHERE id = 1;
SET byok.tenant = 'someone_else';
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
RESET byok.tenant;
SELECT byok.decrypt_text(('byok:' || encode(set_byte(decode(substr(diagnosis::text, 6), 'base64'), 20, 0), 'base64'))::byok.encrypted,
                         'patients.diagnosis') FROM patients WHERE id = 1;
SELECT * FROM byok.backend_cache_stats();

-- 5. Monitoring: one key-manager call per data key, and the cache hit ratio.
SELECT tenant_id, kms_api_success_rate, dek_generation_p99_ms, key_cache_hit_ratio,
       decrypt_failures_rate, kms_calls, l1_hits, decrypts, decrypt_failures
  FROM byok.metrics;
SELECT * FROM byok.broker_status();

-- 6. Re-encrypt the old rows under the new key, as a migration would, then check.
SELECT byok.protect_column('patients', 'diagnosis', 'tenant_id', 'patients.diagnosis');
SELECT byok.wait_job(byok.start_reencrypt('tenant_12345'), '1 minute');
SELECT job_id, state, rows_done, rows_total, keys_retired FROM byok.jobs;
SELECT byok.data_key_id(diagnosis) AS key, count(*) FROM patients GROUP BY 1;
SELECT dek_id, state FROM byok.data_keys ORDER BY dek_id;

-- 7. Governance: least privilege with a per-tenant grant, the guide's validation,
--    and the hash-chained audit trail (key-manager calls arrive within a second).
DROP ROLE IF EXISTS demo_app;
CREATE ROLE demo_app LOGIN IN ROLE byok_user;
GRANT SELECT ON patients TO demo_app;
SET ROLE demo_app;
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
RESET ROLE;
SELECT byok.grant_tenant('demo_app', 'tenant_12345');
SET ROLE demo_app;
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
RESET ROLE;
SELECT check_name, ok FROM byok.validate_tenant('tenant_12345');
SELECT pg_sleep(2);
SELECT id, logged_at::time(0), event, tenant_id, dek_id, role_name, outcome, left(reason, 60) AS reason
  FROM byok.audit_log ORDER BY logged_at, id;
SELECT count(*) AS audit_chain_breaks FROM byok.verify_audit_chain();
SQL
# 8. Revocation: the customer revokes its master key. For the local provider its
#    switch is the revocation list beside the key file; the cached key (24 h TTL)
#    stops working within revocation_check_seconds + 1 s, and comes back alone.
REVOKED="$BYOK_WORK/demo/data/byok_local_master.key.revoked"
log "8. the customer revokes master key acme-cmk-1 (a line in $REVOKED)"
as_postgres sh -c "echo acme-cmk-1 > '$REVOKED'"
sleep 3
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e <<'SQL'
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
SELECT tenant_id, status, reason, last_checked_at::time(0), last_ok_at::time(0) FROM byok.tenant_key_status;
SQL
log "8. the customer enables it again (the line removed)"
as_postgres rm -f "$REVOKED"
sleep 3
psql_at demo $PORT -d postgres -v ON_ERROR_STOP=0 -e <<'SQL'
SELECT byok.decrypt_text(diagnosis, 'patients.diagnosis') FROM patients WHERE id = 1;
SELECT tenant_id, status FROM byok.tenant_key_status;
SELECT logged_at::time(0), event, outcome, left(reason, 70) AS reason FROM byok.audit_log
 WHERE event LIKE 'master_key_%' ORDER BY id;
SQL
log "demo done. Connect with: psql -h $BYOK_WORK/demo -p $PORT -U postgres"
log "stop it with: bash scripts/demo.sh --stop   (or pg_ctl -D $BYOK_WORK/demo/data stop as postgres)"
