\set VERBOSITY terse
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- Correctness found on the way.
-- 1. Advisory locks: each purpose has its own class (the first key), so no two
--    collide. A re-encryption job's worker holds its job's lock while the job is
--    paused; audited administration (which locks the audit chain) goes on.
SELECT classid > 0 AS has_class, purpose FROM byok.advisory_locks() ORDER BY classid;
SELECT count(DISTINCT classid) = count(*) AS distinct_classes FROM byok.advisory_locks();
SELECT byok.configure_tenant('{"customer": "Lock", "tenant_id": "lock_t",
  "encryption": {"provider": "local", "local": {"key_id": "lock-cmk"}}}');
CREATE TABLE lock_rows (id int, v byok.encrypted);
INSERT INTO lock_rows SELECT g, byok.encrypt_text('lock_t', 'v' || g) FROM generate_series(1, 10) g;
SELECT byok.protect_column('lock_rows', 'v');
SELECT byok.rotate_data_key('lock_t') > 0 AS rotated;
-- Job 1 (the id that collided with the audit chain's lock), paused while its worker runs.
DELETE FROM byok.reencrypt_jobs WHERE job_id = 1;
SELECT setval('byok.reencrypt_jobs_job_id_seq', 1, false);
BEGIN;
SELECT byok.start_reencrypt('lock_t', 'lock_rows') AS job \gset
SELECT byok.pause_job(:job);
COMMIT;
SELECT :job AS job_id;
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 1 AND granted
                           AND classid::bigint = (SELECT classid FROM byok.advisory_locks() WHERE purpose LIKE 're-encryption job%'));
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
SELECT count(*) AS job_lock_held FROM pg_locks l JOIN byok.advisory_locks() a ON a.classid = l.classid::bigint
 WHERE l.locktype = 'advisory' AND a.purpose LIKE 're-encryption job%' AND l.objid = 1 AND l.granted;
SET statement_timeout = '5s';
SELECT byok.flush_cache('lock_t') >= 0 AS audited_administration_not_blocked;
RESET statement_timeout;
SELECT byok.cancel_job(:job);

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
