\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Key-manager calls reach byok.audit_log through a queue the audit writer
-- drains within a second or so; this helper waits for it (up to 30 s).
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

-- Disaster recovery. A tenant names a second master key, its backup
-- (encryption.backup), on the same or another key manager: every data key
-- is wrapped under both. (Here both are local keys; tests/scripts/dr.sh runs
-- the drills across key managers.)
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt",
  "encryption": {"provider": "local", "local": {"key_id": "drt-cmk"},
                 "backup": {"provider": "local", "local": {"key_id": "drt-escrow"}}}}');
SELECT provider, master_key_id, backup_provider, backup_master_key_id, dr_active
  FROM byok.tenants WHERE tenant_id = 'drt';
SELECT state, cmk_id, has_primary_wrap, backup_provider, backup_cmk_id, has_backup_wrap
  FROM byok.data_keys WHERE tenant_id = 'drt';
CREATE TABLE dr_notes (id int PRIMARY KEY, body byok.encrypted);
INSERT INTO dr_notes SELECT g, byok.encrypt_text('drt', 'note ' || g, 'dr_notes.body')
  FROM generate_series(1, 20) g;

-- New data keys get both wraps too.
SELECT byok.rotate_data_key('drt') > 0 AS rotated;
SELECT state, has_primary_wrap, has_backup_wrap FROM byok.data_keys WHERE tenant_id = 'drt' ORDER BY dek_id;

-- validate_tenant checks the backup key like the primary, and that every
-- data key has its backup wrap.
SELECT check_name, ok FROM byok.validate_tenant('drt') WHERE check_name LIKE 'backup:%' OR check_name = 'DR';

-- A tenant configured before it had a backup: its existing keys get their
-- backup wraps from a resumable procedure (it commits after every batch).
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt2",
  "encryption": {"provider": "local", "local": {"key_id": "drt2-cmk"}}}');
INSERT INTO dr_notes SELECT g, byok.encrypt_text('drt2', 'note ' || g, 'dr_notes.body')
  FROM generate_series(101, 105) g;
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt2",
  "encryption": {"provider": "local", "local": {"key_id": "drt2-cmk"},
                 "backup": {"provider": "local", "local": {"key_id": "drt2-escrow"}}}}');
SELECT ok, detail FROM byok.validate_tenant('drt2') WHERE check_name = 'backup: every data key has a backup wrap';
CALL byok.complete_key_wraps('drt2');
SELECT has_primary_wrap, has_backup_wrap, backup_cmk_id FROM byok.data_keys WHERE tenant_id = 'drt2';

-- DR activation: the backup master key makes and opens the tenant's data
-- keys; the primary is not asked. Visible in byok.tenants, audited.
SELECT byok.activate_dr('drt');
SELECT dr_active, dr_activated_at IS NOT NULL AS since FROM byok.tenants WHERE tenant_id = 'drt';
SELECT byok.flush_cache('drt') >= 0 AS flushed;
SELECT count(*) FILTER (WHERE byok.decrypt_text(body, 'dr_notes.body') = 'note ' || id) AS readable
  FROM dr_notes WHERE id <= 20;
SELECT served_by_backup > 0 AS served_by_backup FROM byok.metrics
 WHERE tenant_id = 'drt' AND database = current_database() AND provider = 'local';
SELECT wait_for_audit_queue();
SELECT details->>'key_manager' AS key_manager, outcome FROM byok.audit_log
 WHERE event = 'kms_unwrap' AND tenant_id = 'drt' ORDER BY id DESC LIMIT 1;
-- A data key made during DR is wrapped by the backup only (and opens).
SELECT byok.rotate_data_key('drt') > 0 AS rotated_during_dr;
SELECT has_primary_wrap, has_backup_wrap FROM byok.data_keys WHERE tenant_id = 'drt' AND state = 'active';
SELECT byok.decrypt_text(byok.encrypt_text('drt', 'written during DR', 'c'), 'c');
-- What needs the primary is refused meanwhile, saying why.
CALL byok.rotate_master_key('drt', 'drt-cmk-2');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The backup cannot be removed while it serves.
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt",
  "encryption": {"provider": "local", "local": {"key_id": "drt-cmk"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Back to the primary, which must answer: the keys made during DR are
-- wrapped by it first, so from then on its customer's revocations decide.
SELECT byok.deactivate_dr('drt');
SELECT dr_active FROM byok.tenants WHERE tenant_id = 'drt';
SELECT count(*) FILTER (WHERE has_primary_wrap AND has_backup_wrap) AS both_wraps, count(*) AS data_keys
  FROM byok.data_keys WHERE tenant_id = 'drt';
-- A master-key rotation moves the primary's wraps; the backup's stay.
CALL byok.rotate_master_key('drt', 'drt-cmk-2');
CALL byok.complete_key_wraps('drt');
SELECT count(*) FILTER (WHERE has_primary_wrap AND has_backup_wrap) AS both_wraps, count(*) AS data_keys
  FROM byok.data_keys WHERE tenant_id = 'drt';
SELECT count(*) FILTER (WHERE byok.decrypt_text(body, 'dr_notes.body') = 'note ' || id) AS readable
  FROM dr_notes WHERE id <= 20;
SELECT event, outcome FROM byok.audit_log
 WHERE tenant_id = 'drt' AND event IN ('activate_dr', 'deactivate_dr', 'complete_key_wraps') ORDER BY id;

-- Errors: DR needs a backup; a backup must be another key, and complete.
SELECT byok.activate_dr('drt_none');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt3",
  "encryption": {"provider": "local", "local": {"key_id": "drt3-cmk"}}}');
SELECT byok.activate_dr('drt3');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt3",
  "encryption": {"provider": "local", "local": {"key_id": "drt3-cmk"},
                 "backup": {"provider": "local", "local": {"key_id": "drt3-cmk"}}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "dr", "tenant_id": "drt3",
  "encryption": {"provider": "local", "local": {"key_id": "drt3-cmk"},
                 "backup": {"provider": "vault", "vault": {"key_name": "escrow"}}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Crypto-shredding erases both wraps.
SELECT byok.destroy_tenant_keys('drt2', 'drt2');
SELECT state, has_primary_wrap, has_backup_wrap FROM byok.data_keys WHERE tenant_id = 'drt2';

-- Key compromise, in one resumable call, in the order that works: rewrap
-- every data key under the new master key (while the compromised one still
-- opens them), a new data key, re-encrypt every registered column, verify,
-- then retire and destroy the old data keys and retire the compromised master key.
SELECT byok.protect_column('dr_notes', 'body', NULL, 'dr_notes.body');
DELETE FROM dr_notes WHERE id > 100;
SELECT count(*) AS old_data_keys FROM byok.data_keys WHERE tenant_id = 'drt' AND state <> 'destroyed';
CALL byok.respond_to_compromise('drt', 'drt-cmk-new');
SELECT state, cmk_id, count(*) FROM byok.data_keys WHERE tenant_id = 'drt' GROUP BY 1, 2 ORDER BY 1;
SELECT count(*) FILTER (WHERE byok.decrypt_text(body, 'dr_notes.body') = 'note ' || id) AS readable,
       count(DISTINCT byok.data_key_id(body)) AS data_keys_used
  FROM dr_notes;
SELECT EXISTS (SELECT 1 FROM byok.retired_master_keys
                WHERE tenant_id = 'drt' AND master_key_id = 'drt-cmk-2') AS compromised_key_retired;
SELECT step, new_master_key_id, finished_at IS NOT NULL AS finished,
       (report->'reencrypt'->>'rows_reencrypted')::int AS rows_reencrypted,
       jsonb_array_length(report->'destroy'->'data_keys_destroyed') AS data_keys_destroyed
  FROM byok.compromise_responses WHERE tenant_id = 'drt';
SELECT wait_for_audit_queue();
SELECT array_agg(DISTINCT details->>'step' ORDER BY details->>'step') AS steps_audited
  FROM byok.audit_log WHERE tenant_id = 'drt' AND event = 'compromise_response_step';
SELECT outcome, details ? 'seconds' AS has_times FROM byok.audit_log
 WHERE tenant_id = 'drt' AND event = 'compromise_response';
-- A byok.encrypted column nobody registered, holding a value under a key
-- about to be replaced: the response refuses to start (nothing moves), and
-- runs once the column is registered.
CREATE TABLE dr_unregistered (id int, v byok.encrypted);
INSERT INTO dr_unregistered VALUES (1, byok.encrypt_text('drt', 'unregistered'));
CALL byok.respond_to_compromise('drt', 'drt-cmk-newer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) AS responses_under_way FROM byok.compromise_responses
 WHERE tenant_id = 'drt' AND finished_at IS NULL;
SELECT byok.protect_column('dr_unregistered', 'v');
CALL byok.respond_to_compromise('drt', 'drt-cmk-newer');
SELECT step FROM byok.compromise_responses WHERE tenant_id = 'drt' ORDER BY response_id DESC LIMIT 1;
SELECT byok.decrypt_text(v) FROM dr_unregistered;
-- A step with no response under way; a NULL tenant.
SELECT byok.compromise_response_step('drt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.compromise_response_step(NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
DROP TABLE dr_unregistered;

-- In production (dual control), one administrator cannot switch a tenant to
-- its backup, nor start a compromise response (it ends by destroying keys):
-- a second one approves.
SET byok.environment = 'production';
SET byok.key_prefix = 'drt';
CREATE ROLE dr_officer_ada LOGIN IN ROLE byok_admin;
CREATE ROLE dr_officer_bob LOGIN IN ROLE byok_admin;
SET SESSION AUTHORIZATION dr_officer_ada;
SELECT byok.activate_dr('drt');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL byok.respond_to_compromise('drt', 'drt-cmk-4');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('activate_dr', 'drt') AS dr_request \gset
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION dr_officer_bob;
SELECT byok.approve_operation(:dr_request) LIKE 'DR active for tenant "drt"%' AS approved;
RESET SESSION AUTHORIZATION;
SELECT dr_active FROM byok.tenants WHERE tenant_id = 'drt';
RESET byok.environment;
RESET byok.key_prefix;
SELECT byok.deactivate_dr('drt') LIKE 'DR ended%' AS ended;
DROP ROLE dr_officer_ada, dr_officer_bob;

DROP TABLE dr_notes;
SELECT byok.destroy_tenant_keys('drt', 'drt');
SELECT byok.destroy_tenant_keys('drt3', 'drt3');
DROP FUNCTION wait_for_audit_queue();
