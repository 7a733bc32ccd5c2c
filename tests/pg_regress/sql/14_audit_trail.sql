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
-- Data key ids in messages start at 14001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 14000) \gset

-- The audit trail records every call the key broker makes to a key manager, and
-- every failed key operation, even though a failure aborts its own transaction.
-- Audit records of what ran before this file, still in the queue, land first.
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
SELECT audit_dropped AS dropped_before FROM byok.broker_status() \gset
SELECT byok.configure_tenant('{"customer": "Gotham", "tenant_id": "gotham",
  "encryption": {"provider": "local", "local": {"key_id": "gotham-cmk"}}}');
CREATE TABLE gotham_files (id int, body byok.encrypted);
INSERT INTO gotham_files VALUES (1, byok.encrypt_text('gotham', 'case file'));
SELECT wait_for_audit_queue();
-- Each key-manager call: operation, outcome, provider, latency (and the provider's
-- request id where it returns one: AWS; see tests/scripts/aws_kms.sh).
SELECT event, dek_id IS NOT NULL AS has_key, role_name, outcome, details->>'provider' AS provider,
       (details->>'latency_ms')::float8 >= 0 AS timed
  FROM byok.audit_log WHERE tenant_id = 'gotham' AND id > :audit_before ORDER BY logged_at, id;

-- A failed administrative call leaves a failure record although it rolled back.
SELECT dek_id AS gotham_dek FROM byok.data_keys WHERE tenant_id = 'gotham' AND state = 'active' \gset
SELECT byok.destroy_data_key(:gotham_dek, :gotham_dek);
BEGIN;
SELECT byok.rotate_data_key('gotham') > 0 AS rotated;
SELECT byok.set_data_key_state(:gotham_dek, 'destroyed');
ROLLBACK;
-- So does an application's refused or failed use of a key.
CREATE ROLE gotham_app LOGIN IN ROLE byok_user;
GRANT SELECT ON gotham_files TO gotham_app;
SET ROLE gotham_app;
SELECT byok.decrypt_text(body) FROM gotham_files;
RESET ROLE;
SELECT byok.decrypt_text(body, 'wrong context') FROM gotham_files;
SELECT wait_for_audit_queue();
SELECT event, dek_id = :gotham_dek AS this_key, role_name, outcome, reason
  FROM byok.audit_log
 WHERE id > :audit_before AND outcome = 'failed' ORDER BY logged_at, id;
-- (the rotation itself rolled back: its success record went with it)
SELECT count(*) AS rotations FROM byok.audit_log WHERE tenant_id = 'gotham' AND event = 'rotate_data_key';

-- A master-key rotation: its start, one rewrap per data key, its end.
CALL byok.rotate_master_key('gotham', 'gotham-cmk-2', '1 hour');
SELECT wait_for_audit_queue();
SELECT event, outcome, details->>'new_key_id' AS new_key FROM byok.audit_log
 WHERE tenant_id = 'gotham' AND (event = 'kms_rewrap' OR event LIKE 'rotate\_master\_key%')
 ORDER BY logged_at, id;

-- Nothing was dropped, and the chain over the new rows is intact.
SELECT audit_dropped - :dropped_before AS audit_dropped FROM byok.broker_status();
SELECT count(*) AS breaks FROM byok.verify_audit_chain() WHERE id > :audit_before;
-- No key material or plaintext anywhere in the trail.
SELECT count(*) AS leaks FROM byok.audit_log
 WHERE id > :audit_before AND (coalesce(reason, '') || coalesce(details::text, '')) ~* 'case file';

DROP TABLE gotham_files;
DROP ROLE gotham_app;
SELECT byok.destroy_tenant_keys('gotham', 'gotham');
DROP FUNCTION wait_for_audit_queue();
