-- Disaster recovery: every data key of a tenant with encryption.backup is
-- wrapped under both master keys. This procedure adds the wraps that are
-- missing (keys made before the backup was configured, or under a backup
-- since replaced; keys made while DR was active, once the primary is back).
-- Commits after every batch, so it runs on a live database and, after a
-- crash, is called again to finish. (A procedure that commits cannot pin
-- search_path; it only calls schema-qualified functions, each of which does.)
CREATE PROCEDURE byok.complete_key_wraps(tenant_id text)
LANGUAGE plpgsql AS $proc$
DECLARE
    changed bigint;
BEGIN
    LOOP
        changed := byok.complete_key_wraps_step(tenant_id);
        COMMIT;
        EXIT WHEN changed OPERATOR(pg_catalog.=) 0;
    END LOOP;
    RAISE NOTICE 'tenant %: %', tenant_id, byok.complete_key_wraps_finish(tenant_id);
END
$proc$;
COMMENT ON PROCEDURE byok.complete_key_wraps(text) IS
    'Wraps every data key of a tenant under both its master key and its backup master key; resumable';

-- The guide's key-compromise procedure, one resumable operation (see
-- src/admin/compromise.rs for the steps and why their order matters).
CREATE TABLE byok.compromise_responses (
    response_id bigserial PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    compromised_key_id text NOT NULL,
    new_master_key_id text NOT NULL,
    -- the tenant's live data keys when the response started: replaced, then destroyed
    old_data_keys bigint[] NOT NULL,
    step text NOT NULL DEFAULT 'rewrap'
        CHECK (step IN ('rewrap', 'new_data_key', 'reencrypt', 'verify', 'retire', 'destroy', 'done')),
    -- the re-encryption job of the reencrypt step
    job_id bigint,
    started_by name NOT NULL,
    started_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at timestamptz,
    -- per step: when it finished and what it found
    report jsonb NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX compromise_responses_one_per_tenant
    ON byok.compromise_responses (tenant_id) WHERE finished_at IS NULL;
COMMENT ON TABLE byok.compromise_responses IS 'Key-compromise responses (byok.respond_to_compromise): their steps and reports';
SELECT pg_catalog.pg_extension_config_dump('byok.compromise_responses', '');
SELECT pg_catalog.pg_extension_config_dump('byok.compromise_responses_response_id_seq', '');

-- Starts (or resumes) the response and runs it to the end, committing after
-- every step. Under dual control a second administrator approves
-- 'start_compromise_response' first; the CALL then resumes that response.
CREATE PROCEDURE byok.respond_to_compromise(tenant_id text, new_master_key text)
LANGUAGE plpgsql AS $proc$
DECLARE
    state text;
    job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM byok.compromise_responses r
                    WHERE r.tenant_id OPERATOR(pg_catalog.=) respond_to_compromise.tenant_id
                      AND r.finished_at IS NULL) THEN
        PERFORM byok.start_compromise_response(tenant_id, new_master_key);
        COMMIT;
    END IF;
    LOOP
        state := byok.compromise_response_step(tenant_id);
        COMMIT;
        IF state OPERATOR(pg_catalog.=) 'start_job' THEN
            job := byok.start_reencrypt(tenant_id);
            state := byok.compromise_response_step(tenant_id, job);
            COMMIT;
        END IF;
        IF state OPERATOR(pg_catalog.~~) 'wait_job:%' THEN
            PERFORM byok.wait_job(pg_catalog.split_part(state, ':', 2)::pg_catalog.int8, '24 hours');
            COMMIT;
        ELSIF state OPERATOR(pg_catalog.=) 'waiting' THEN
            -- (transactions older than the new data key must end first)
            PERFORM pg_catalog.pg_sleep(0.2);
        ELSIF state OPERATOR(pg_catalog.~~) 'job_failed:%' THEN
            RAISE EXCEPTION 'the re-encryption job % of the compromise response failed', pg_catalog.split_part(state, ':', 2)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'see byok.jobs for its error; CALL byok.respond_to_compromise again to start a new job';
        END IF;
        EXIT WHEN state OPERATOR(pg_catalog.=) 'done';
    END LOOP;
    RAISE NOTICE 'tenant %: compromise response complete: %', tenant_id,
        (SELECT r.report FROM byok.compromise_responses r
          WHERE r.tenant_id OPERATOR(pg_catalog.=) respond_to_compromise.tenant_id
          ORDER BY r.response_id DESC LIMIT 1);
END
$proc$;
COMMENT ON PROCEDURE byok.respond_to_compromise(text, text) IS
    'Key compromise: rewrap under a new master key, new data key, re-encrypt, verify, retire and destroy the old keys; resumable';
