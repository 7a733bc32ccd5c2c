-- The byok_pg demo: a tenant on the built-in local key provider, an encrypted
-- column, data-key rotation, the errors that guard the data, monitoring, a
-- re-encryption job, a per-tenant grant, validation and the audit trail.
-- Run it as a superuser in a new database of a server with
-- shared_preload_libraries = 'byok_pg':
--     psql -e -f demo.sql
-- Four statements fail on purpose (steps 4 and 7): their errors are the point.
-- scripts/demo.sh runs it, then revokes and restores the master key (step 8);
-- the Debian package installs it as /usr/share/doc/postgresql-15-byok-pg/examples/demo.sql.

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
