\set VERBOSITY terse
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- Correctness found on the way.
-- 1. No advisory locks. Any role may take any advisory lock key
--    (pg_advisory_lock is PUBLIC), so a session squatting on the keys byok_pg
--    once used (0x62790001 for the audit chain, 0x62790002 + job id for a job's
--    worker; and they collided: job 1's lock was the audit chain's) stalled
--    the audit trail and jobs. The audit chain now takes a table lock only its
--    owner can take; a job is kept to one worker by a claim in its row.
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
SELECT byok.configure_tenant('{"customer": "Lock", "tenant_id": "lock_t",
  "encryption": {"provider": "local", "local": {"key_id": "lock-cmk"}}}');
CREATE TABLE lock_rows (id int, v byok.encrypted);
INSERT INTO lock_rows SELECT g, byok.encrypt_text('lock_t', 'v' || g) FROM generate_series(1, 10) g;
SELECT byok.protect_column('lock_rows', 'v');
SELECT byok.rotate_data_key('lock_t') > 0 AS rotated;
-- A role with no byok_pg rights at all squats on the old keys (advisory locks
-- belong to the session, which keeps them after RESET ROLE): the chain's, and
-- those of the next jobs, 1 included.
CREATE ROLE lock_squatter;
SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END AS next_job
  FROM byok.reencrypt_jobs_job_id_seq \gset
SET ROLE lock_squatter;
SELECT count(pg_advisory_lock(x'62790001'::int, k)) AS squatted
  FROM (VALUES (0), (1)) AS keys(k);
SELECT count(pg_advisory_lock(x'62790002'::int, k)) AS squatted
  FROM generate_series(:next_job, :next_job + 4) AS k;
SELECT pg_advisory_lock(x'62790002'::int, 1);
RESET ROLE;
-- Key-manager calls are recorded by the catalog writer (another process),
-- which extends the chain: the queue drains.
SELECT byok.flush_cache('lock_t') >= 0 AS flushed;
SELECT count(byok.decrypt_text(v)) AS opened FROM lock_rows;
SELECT wait_for_audit_queue() AS audit_trail_not_stalled;
-- A job's worker (another process) takes the job up and finishes it.
SELECT byok.start_reencrypt('lock_t', 'lock_rows') AS job \gset
SELECT :job BETWEEN :next_job AND :next_job + 4 AS job_key_squatted;
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT state FROM byok.jobs WHERE job_id = (SELECT max(job_id) FROM byok.jobs)) = 'done';
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
SELECT state, rows_done FROM byok.jobs WHERE job_id = :job;
SELECT pg_advisory_unlock_all();
DROP ROLE lock_squatter;

-- 2. CALL byok.rotate_master_key by a byok_admin that is not a superuser
--    finishes and records its end (it used to commit its rewraps and then fail
--    on the audit function's permissions).
CREATE ROLE rotator LOGIN IN ROLE byok_admin;
\c - rotator
CALL byok.rotate_master_key('lock_t', 'lock-cmk-2', '1 hour');
SELECT master_key_id FROM byok.tenants WHERE tenant_id = 'lock_t';
\c - postgres
SELECT event, role_name, details->>'new_key_id' AS new_key FROM byok.audit_log
 WHERE tenant_id = 'lock_t' AND event LIKE 'rotate\_master\_key%' ORDER BY id;
-- Calling it again changes nothing and records the completed rotation again.
\c - rotator
CALL byok.rotate_master_key('lock_t', 'lock-cmk-2', '1 hour');
\c - postgres

DROP TABLE lock_rows;
-- (new job ids go on after the highest one again)
SELECT setval('byok.reencrypt_jobs_job_id_seq', max(job_id)) FROM byok.reencrypt_jobs \gset
SELECT byok.destroy_tenant_keys('lock_t', 'lock_t');
DROP ROLE rotator;
DROP FUNCTION wait_for_audit_queue();
