\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Key-manager calls and failed operations reach byok.audit_log through a queue
-- the audit writer drains within a second or so; this helper waits for it (up to 30 s).
CREATE OR REPLACE FUNCTION wait_for_audit_queue() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        PERFORM pg_stat_clear_snapshot();
        IF (SELECT audit_queued FROM byok.broker_status()) = 0
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'byok catalog writer') THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END
$$;
-- Data key ids in messages start at 11001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 11000) \gset

-- Audit records of what ran before this file, still in the queue, land first.
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
-- Validation: the guide's validate_byok.py as SQL (latencies are in the detail column).
SELECT byok.configure_tenant('{"customer": "stark", "tenant_id": "stark",
  "encryption": {"provider": "local", "local": {"key_id": "stark-cmk"}}}');
SELECT check_name, ok FROM byok.validate_tenant('stark');
SELECT check_name, ok, detail FROM byok.validate_tenant('no-such-tenant');

-- The audit trail: every key-level event, with role and outcome.
SELECT byok.rotate_data_key('stark') > 0 AS rotated;
SELECT byok.flush_cache('stark') >= 0 AS flushed;
SELECT event, tenant_id, dek_id IS NOT NULL AS has_key, role_name, outcome, reason
  FROM byok.audit_log WHERE tenant_id = 'stark' AND event NOT LIKE 'kms\_%' ORDER BY id;

-- It is append-only...
UPDATE byok.audit_log SET reason = 'nothing happened' WHERE tenant_id = 'stark';
DELETE FROM byok.audit_log WHERE tenant_id = 'stark';
TRUNCATE byok.audit_log;
-- ...and hash-chained: the chain is intact,
SELECT count(*) AS breaks FROM byok.verify_audit_chain() WHERE id > :audit_before;
-- until someone with the power to disable the trigger edits a row, or removes one.
ALTER TABLE byok.audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE byok.audit_log SET reason = 'edited' WHERE id = (SELECT min(id) FROM byok.audit_log WHERE event = 'flush_cache' AND tenant_id = 'stark');
DELETE FROM byok.audit_log WHERE id = (SELECT min(id) FROM byok.audit_log WHERE event = 'validate_tenant' AND tenant_id = 'stark');
ALTER TABLE byok.audit_log ENABLE TRIGGER audit_log_append_only;
SELECT v.problem FROM byok.verify_audit_chain() v WHERE v.id > :audit_before ORDER BY v.id;

-- A tenant whose audit.log_all_operations is off: administrative events are
-- still recorded (configure, rotate); only successful key fetches of the data
-- path (kms_unwrap) are left out.
SELECT byok.configure_tenant('{"customer": "quiet", "tenant_id": "quiet",
  "encryption": {"provider": "local", "local": {"key_id": "quiet-cmk"}},
  "audit": {"log_all_operations": false, "alert_on_failures": true}}');
SELECT byok.rotate_data_key('quiet') > 0 AS rotated;
SELECT count(*) AS audit_rows FROM byok.audit_log WHERE tenant_id = 'quiet';

-- Crypto-shredding: every key of the tenant destroyed, every cache flushed.
CREATE TABLE stark_files (id int, body byok.encrypted);
INSERT INTO stark_files SELECT g, byok.encrypt_text('stark', 'file ' || g) FROM generate_series(1, 3) g;
CREATE TABLE other_files AS SELECT 1 AS id, byok.encrypt_text('quiet', 'still here') AS body;
SELECT byok.decrypt_text(body) FROM stark_files WHERE id = 1;
SELECT byok.destroy_tenant_keys('stark', 'not-stark');
SELECT byok.destroy_tenant_keys('nobody', 'nobody');
SELECT byok.destroy_tenant_keys('stark', 'stark') AS keys_destroyed;
SELECT byok.decrypt_text(body) FROM stark_files WHERE id = 1;
SELECT byok.encrypt_text('stark', 'new');
SELECT byok.decrypt_text(body) FROM other_files;
SELECT state, count(*) FROM byok.data_keys WHERE tenant_id = 'stark' GROUP BY state;
-- (the two refused calls are recorded as failures, with their reasons)
SELECT wait_for_audit_queue();
SELECT event, tenant_id, outcome, reason, details FROM byok.audit_log
 WHERE event = 'destroy_tenant_keys' AND id > :audit_before ORDER BY logged_at, id;

DROP TABLE stark_files, other_files;
SELECT byok.destroy_tenant_keys('quiet', 'quiet');
DROP FUNCTION wait_for_audit_queue();
