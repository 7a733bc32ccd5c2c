\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Data key and job ids in messages start at 10001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 10000), setval('byok.reencrypt_jobs_job_id_seq', 10000) \gset

-- Re-encryption jobs: after a data-key rotation, existing rows are rewritten
-- under the new key by a background worker, then verified; the old key retires.
SELECT byok.configure_tenant('{"customer": "umbrella", "tenant_id": "umbrella",
  "encryption": {"provider": "local", "local": {"key_id": "umbrella-cmk"}}}');
CREATE TABLE patients (id int PRIMARY KEY, tenant text, ssn byok.encrypted, notes byok.encrypted, plain int);
INSERT INTO patients
SELECT g, 'umbrella', byok.encrypt_text('umbrella', 'ssn ' || g, 'patients.ssn'),
       byok.encrypt_text('umbrella', 'notes ' || g), g
  FROM generate_series(1, 500) g;

-- Register the encrypted columns, and the context their values are sealed with.
SELECT byok.protect_column('patients', 'plain');
SELECT byok.protect_column('patients', 'nope');
SELECT byok.start_reencrypt('umbrella', 'patients');
SELECT byok.protect_column('patients', 'ssn', tenant_col => 'tenant', context => 'patients.ssn');
SELECT byok.protect_column('patients', 'notes');
SELECT table_name, column_name, tenant_column, context FROM byok.protected_columns ORDER BY column_name;

-- A new data key: the old one becomes decrypt-only and still seals all 1000 values.
SELECT byok.rotate_data_key('umbrella') > 0 AS rotated;
SELECT state, byok.data_key_references(dek_id) AS values_sealed FROM byok.data_keys
 WHERE tenant_id = 'umbrella' ORDER BY dek_id;

-- A migration starts the job and waits for it.
SELECT byok.start_reencrypt('umbrella') AS job \gset
SELECT byok.wait_job(:job, '2 minutes') AS final_state;
SELECT state, rows_done, rows_total, percent_done, keys_retired, last_error
  FROM byok.jobs WHERE job_id = :job;

-- Every value is under the new key and reads back; the old key is retired.
SELECT count(*) FILTER (WHERE byok.data_key_id(ssn) = k.dek_id AND byok.data_key_id(notes) = k.dek_id) AS under_active_key,
       count(*) FILTER (WHERE byok.decrypt_text(ssn, 'patients.ssn') = 'ssn ' || id
                          AND byok.decrypt_text(notes) = 'notes ' || id) AS readable
  FROM patients, byok.data_keys k WHERE k.tenant_id = 'umbrella' AND k.state = 'active';
SELECT state, byok.data_key_references(dek_id) AS values_sealed FROM byok.data_keys
 WHERE tenant_id = 'umbrella' ORDER BY dek_id;

-- Running it again finds nothing to do.
SELECT byok.wait_job(byok.start_reencrypt('umbrella'), '1 minute') AS again;

-- A migration that starts a job under a savepoint (a DO block with an exception
-- handler, psql's ON_ERROR_ROLLBACK) and waits in the same transaction: the work
-- is done there, as without the savepoint.
SELECT byok.rotate_data_key('umbrella') > 0 AS rotated;
BEGIN;
SAVEPOINT before_job;
SELECT byok.start_reencrypt('umbrella', 'patients') AS saved_job \gset
RELEASE SAVEPOINT before_job;
SELECT byok.wait_job(:saved_job, '10 seconds') AS under_a_savepoint;
COMMIT;

-- Pause and resume: a job paused before its worker starts waits, then finishes.
SELECT byok.rotate_data_key('umbrella') > 0 AS rotated;
BEGIN;
SELECT byok.start_reencrypt('umbrella', 'patients') AS job2 \gset
SELECT byok.pause_job(:job2);
COMMIT;
SELECT byok.wait_job(:job2, '1 second') AS while_paused;
SELECT state, rows_done FROM byok.jobs WHERE job_id = :job2;
SELECT byok.resume_job(:job2);
SELECT byok.wait_job(:job2, '2 minutes') AS after_resume;
SELECT rows_done, rows_total FROM byok.jobs WHERE job_id = :job2;

-- A key that registered columns still use is never destroyed.
SELECT byok.rotate_data_key('umbrella') > 0 AS rotated;
SELECT dek_id AS old_key FROM byok.data_keys WHERE tenant_id = 'umbrella' AND state = 'decrypt-only' \gset
SELECT byok.destroy_data_key(:old_key, :old_key);

-- Cancel, and the states a job cannot move between.
BEGIN;
SELECT byok.start_reencrypt('umbrella') AS job3 \gset
SELECT byok.cancel_job(:job3);
COMMIT;
SELECT byok.wait_job(:job3, '10 seconds') AS cancelled;
SELECT byok.resume_job(:job3);
SELECT byok.pause_job(:job);
SELECT byok.pause_job(999999);

-- A value sealed with another context than the registered one makes the job fail
-- with the reason, and nothing is lost: the row keeps its value.
UPDATE patients SET ssn = byok.encrypt_text('umbrella', 'ssn 1', 'another context') WHERE id = 1;
SELECT byok.rotate_data_key('umbrella') > 0 AS rotated;
SELECT byok.wait_job(byok.start_reencrypt('umbrella'), '2 minutes') AS with_a_bad_value;
SELECT state, last_error FROM byok.jobs ORDER BY job_id DESC LIMIT 1;
SELECT byok.decrypt_text(ssn, 'another context') FROM patients WHERE id = 1;
-- Fixed (the value sealed with the registered context), the job resumes and finishes.
UPDATE patients SET ssn = byok.encrypt_text('umbrella', 'ssn 1', 'patients.ssn') WHERE id = 1;
SELECT max(job_id) AS failed_job FROM byok.jobs \gset
SELECT byok.resume_job(:failed_job);
SELECT byok.wait_job(:failed_job, '2 minutes') AS after_the_fix;
SELECT count(*) FILTER (WHERE byok.decrypt_text(ssn, 'patients.ssn') = 'ssn ' || id) AS readable FROM patients;
-- Its rate counts only the run after the resume: the worker marked where that run began.
SELECT run_started_at > started_at AS new_run_after_resume FROM byok.reencrypt_jobs WHERE job_id = :failed_job;

-- Rate and ETA count only the current (or last) run, not time spent paused or down:
-- a job that sat for an hour and then did 1,000 rows in its last 10 seconds ran
-- at 100 rows/s, not at 0.6 (2,000 rows over the hour).
INSERT INTO byok.reencrypt_jobs (tenant_id, state, rows_total, rows_done, started_at,
                                 run_started_at, run_rows_start, updated_at, finished_at)
VALUES ('umbrella', 'done', 2000, 2000, now() - interval '1 hour',
        now() - interval '10 seconds', 1000, now(), now())
RETURNING job_id AS finished_job \gset
SELECT rows_per_second, percent_done, eta FROM byok.jobs WHERE job_id = :finished_job;
DELETE FROM byok.reencrypt_jobs WHERE job_id = :finished_job;

DROP TABLE patients;
SELECT byok.destroy_tenant_keys('umbrella', 'umbrella');
