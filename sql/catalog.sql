-- The key catalog. Both tables and the key id sequence are extension
-- configuration: pg_dump includes their rows, so a dump restored into a cluster
-- that can reach the same master keys decrypts everything.

CREATE TABLE byok.tenant_config (
    tenant_id text PRIMARY KEY
        CHECK (tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$'),
    customer text NOT NULL,
    provider text NOT NULL
        CHECK (provider IN ('local', 'aws_kms', 'azure_kv', 'gcp_kms', 'vault')),
    master_key_id text NOT NULL,
    provider_options jsonb NOT NULL DEFAULT '{}',
    rotation_enabled boolean NOT NULL DEFAULT false,
    rotation_interval_days integer NOT NULL DEFAULT 90 CHECK (rotation_interval_days BETWEEN 1 AND 3650),
    -- NULL: the server's byok.cache_ttl_seconds / byok.cache_max_entries
    cache_ttl_seconds integer CHECK (cache_ttl_seconds >= 1),
    cache_max_entries integer CHECK (cache_max_entries >= 1),
    cache_grace_period_seconds integer NOT NULL DEFAULT 0 CHECK (cache_grace_period_seconds >= 0),
    audit_log_all_operations boolean NOT NULL DEFAULT true,
    audit_alert_on_failures boolean NOT NULL DEFAULT true,
    -- after a master-key rotation: the key it replaced, and when that one counts as retired
    previous_master_key_id text,
    previous_master_key_retires_at timestamptz,
    -- the document as given to byok.configure_tenant()
    config jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE byok.tenant_config IS 'One row per tenant, from its byok_config document';

CREATE SEQUENCE byok.data_key_id_seq;

CREATE TABLE byok.wrapped_data_keys (
    dek_id bigint PRIMARY KEY DEFAULT nextval('byok.data_key_id_seq'),
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    -- the data key wrapped by the tenant's master key; NULL once destroyed
    wrapped_dek bytea,
    provider text NOT NULL,
    cmk_id text NOT NULL,
    cmk_version text NOT NULL,
    state text NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired', 'destroyed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- when it stopped being the tenant's active key
    rotated_at timestamptz,
    destroyed_at timestamptz,
    CHECK ((state = 'destroyed') = (wrapped_dek IS NULL))
);
ALTER SEQUENCE byok.data_key_id_seq OWNED BY byok.wrapped_data_keys.dek_id;
CREATE UNIQUE INDEX wrapped_data_keys_one_active_per_tenant
    ON byok.wrapped_data_keys (tenant_id) WHERE state = 'active';
CREATE INDEX wrapped_data_keys_tenant ON byok.wrapped_data_keys (tenant_id);
COMMENT ON TABLE byok.wrapped_data_keys IS 'Data keys, stored only wrapped by their tenant''s master key';

SELECT pg_catalog.pg_extension_config_dump('byok.tenant_config', '');
SELECT pg_catalog.pg_extension_config_dump('byok.wrapped_data_keys', '');
SELECT pg_catalog.pg_extension_config_dump('byok.data_key_id_seq', '');

-- Any change to the catalog, by our functions or by hand, tells every backend
-- (at commit, through PostgreSQL's own invalidation messages) to drop its ready keys.
CREATE FUNCTION byok.invalidate_key_caches() RETURNS trigger
    AS 'MODULE_PATHNAME', 'byok_invalidate_key_caches' LANGUAGE C;
CREATE TRIGGER invalidate_key_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON byok.tenant_config
    FOR EACH STATEMENT EXECUTE FUNCTION byok.invalidate_key_caches();
CREATE TRIGGER invalidate_key_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON byok.wrapped_data_keys
    FOR EACH STATEMENT EXECUTE FUNCTION byok.invalidate_key_caches();

-- Views without key material.
CREATE VIEW byok.tenants AS
    SELECT tenant_id, customer, provider, master_key_id,
           previous_master_key_id, previous_master_key_retires_at, provider_options,
           rotation_enabled, rotation_interval_days,
           cache_ttl_seconds, cache_max_entries, cache_grace_period_seconds,
           audit_log_all_operations, audit_alert_on_failures,
           created_at, updated_at
      FROM byok.tenant_config;
COMMENT ON VIEW byok.tenants IS 'Tenants and their settings (no key material)';

CREATE VIEW byok.data_keys AS
    SELECT dek_id, tenant_id, provider, cmk_id, cmk_version, state,
           created_at, rotated_at, destroyed_at
      FROM byok.wrapped_data_keys;
COMMENT ON VIEW byok.data_keys IS 'Data keys and their states (no key material)';

-- Only administrators touch the catalog; applications reach keys through the
-- encrypt/decrypt functions, which read it with the extension owner's rights.
REVOKE ALL ON byok.tenant_config, byok.wrapped_data_keys, byok.data_key_id_seq FROM PUBLIC;
REVOKE ALL ON byok.tenants, byok.data_keys FROM PUBLIC;
GRANT USAGE ON SCHEMA byok TO PUBLIC;

-- ---------------------------------------------------------------------------
-- Re-encryption jobs. Registered columns are rewritten under their tenants'
-- active data keys by a background worker, one short transaction per batch;
-- progress (including a scan cursor) is checkpointed in the job row, so a job
-- interrupted by a crash resumes where it stopped without rewriting any row
-- twice (only values under decrypt-only keys are ever rewritten).

CREATE TABLE byok.protected_column_registry (
    relid regclass NOT NULL,
    column_name name NOT NULL,
    tenant_column name,
    -- the context every value of the column is sealed with ('' = none)
    context text NOT NULL DEFAULT '',
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relid, column_name)
);
COMMENT ON TABLE byok.protected_column_registry IS 'Columns of type byok.encrypted that re-encryption jobs rewrite';

CREATE TABLE byok.reencrypt_jobs (
    job_id bigserial PRIMARY KEY,
    tenant_id text,
    relid regclass,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'paused', 'verifying', 'done', 'failed', 'cancelled')),
    rows_total bigint NOT NULL DEFAULT 0,
    rows_done bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    -- the checkpoint: which column, where the scan is, and whether it is sweeping stragglers
    cursor_relid regclass,
    cursor_column name,
    cursor_ctid tid NOT NULL DEFAULT '(0,0)',
    sweeping boolean NOT NULL DEFAULT false,
    scan_done boolean NOT NULL DEFAULT false,
    keys_retired bigint NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    -- The current (or last) run: when a worker last took the job up (first start,
    -- resume after a pause, restart after a crash) and how many rows were done then.
    -- Rate and ETA count only this run, not the time the job sat paused or down.
    run_started_at timestamptz,
    run_rows_start bigint NOT NULL DEFAULT 0,
    -- The transaction that started the job: until it commits no worker can see the
    -- job, so wait_job called in it does the work itself. (Not xmin: under a
    -- savepoint the row's xmin is the subtransaction's.)
    created_xact xid8 NOT NULL DEFAULT pg_current_xact_id(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
COMMENT ON TABLE byok.reencrypt_jobs IS 'Re-encryption jobs and their checkpoints';
SELECT pg_catalog.pg_extension_config_dump('byok.protected_column_registry', '');

CREATE VIEW byok.protected_columns AS
SELECT relid AS table_name, column_name, tenant_column, context, registered_at
  FROM byok.protected_column_registry;
COMMENT ON VIEW byok.protected_columns IS 'Columns registered with byok.protect_column()';

CREATE VIEW byok.jobs AS
SELECT job_id, tenant_id, relid AS table_name, state, rows_done, rows_total,
       CASE WHEN rows_total > 0 THEN round(100.0 * least(rows_done, rows_total) / rows_total, 1) ELSE 100.0 END AS percent_done,
       -- Over the current (or last) run only: a pause or a crash does not drag the rate down.
       CASE WHEN run_started_at IS NOT NULL AND updated_at > run_started_at
            THEN round((rows_done - run_rows_start) / extract(epoch FROM updated_at - run_started_at))::bigint END AS rows_per_second,
       CASE WHEN state IN ('running', 'pending') AND rows_done > run_rows_start AND updated_at > run_started_at
            THEN (greatest(rows_total - rows_done, 0) * (updated_at - run_started_at) / (rows_done - run_rows_start)) END AS eta,
       batches, keys_retired, last_error, created_at, started_at, updated_at, finished_at
  FROM byok.reencrypt_jobs;
COMMENT ON VIEW byok.jobs IS 'Re-encryption jobs: state, progress, rate, ETA, last error';

CREATE FUNCTION byok.protect_column(tbl regclass, col name, tenant_col name DEFAULT NULL,
                                    context text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $fn$
DECLARE
    coltype regtype;
BEGIN
    SELECT a.atttypid::regtype INTO coltype FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF coltype IS NULL THEN
        RAISE EXCEPTION 'column "%" of % does not exist', col, tbl USING ERRCODE = '42703';
    END IF;
    -- Jobs rewrite registered columns as the extension's owner: only someone who
    -- may update the table registers it (this function runs as its caller).
    IF NOT has_column_privilege(tbl, col, 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied: % may not update column % of %', current_user, col, tbl
            USING ERRCODE = '42501';
    END IF;
    IF coltype <> 'byok.encrypted'::regtype THEN
        RAISE EXCEPTION 'column "%" of % is of type %, not byok.encrypted', col, tbl, coltype
            USING ERRCODE = '42804', HINT = 'encrypt it first: ALTER TABLE ... ALTER COLUMN ... TYPE byok.encrypted USING byok.encrypt(...)';
    END IF;
    IF tenant_col IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl
               AND a.attname = tenant_col AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'tenant column "%" of % does not exist', tenant_col, tbl USING ERRCODE = '42703';
    END IF;
    INSERT INTO byok.protected_column_registry (relid, column_name, tenant_column, context)
    VALUES (tbl, col, tenant_col, coalesce(context, ''))
    ON CONFLICT (relid, column_name) DO UPDATE
       SET tenant_column = EXCLUDED.tenant_column, context = EXCLUDED.context;
END
$fn$;
COMMENT ON FUNCTION byok.protect_column(regclass, name, name, text) IS
    'Registers a byok.encrypted column (and the context its values are sealed with) for re-encryption jobs';

-- The data keys whose values a job rewrites: decrypt-only keys of its tenant(s).
CREATE FUNCTION byok.job_old_keys(p_tenant text) RETURNS bigint[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    SELECT coalesce(array_agg(dek_id), '{}') FROM byok.wrapped_data_keys
     WHERE state = 'decrypt-only' AND (p_tenant IS NULL OR tenant_id = p_tenant)
$fn$;

-- How many values of a job's columns are still under old keys.
CREATE FUNCTION byok.job_remaining(p_tenant text, p_relid regclass) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    c record;
    n bigint;
    total bigint := 0;
    old_keys bigint[] := byok.job_old_keys(p_tenant);
BEGIN
    FOR c IN SELECT * FROM byok.protected_column_registry
              WHERE p_relid IS NULL OR relid = p_relid ORDER BY relid::oid, column_name LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE byok.data_key_id(%I) = ANY($1)', c.relid, c.column_name)
           INTO n USING old_keys;
        total := total + n;
    END LOOP;
    RETURN total;
END
$fn$;

CREATE FUNCTION byok.start_reencrypt(tenant_id text DEFAULT NULL, tbl regclass DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    job bigint;
BEGIN
    IF tenant_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM byok.tenant_config t WHERE t.tenant_id = start_reencrypt.tenant_id) THEN
        RAISE EXCEPTION 'unknown tenant "%"', tenant_id USING ERRCODE = '42704';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM byok.protected_column_registry r WHERE tbl IS NULL OR r.relid = tbl) THEN
        RAISE EXCEPTION 'no registered column%', CASE WHEN tbl IS NULL THEN '' ELSE ' in ' || tbl::text END
            USING ERRCODE = '55000', HINT = 'register columns with byok.protect_column(table, column)';
    END IF;
    INSERT INTO byok.reencrypt_jobs (tenant_id, relid, rows_total)
    VALUES (tenant_id, tbl, byok.job_remaining(tenant_id, tbl))
    RETURNING job_id INTO job;
    PERFORM byok.audit_event('reencrypt_start', tenant_id, NULL, 'ok', NULL,
                             jsonb_build_object('job_id', job, 'table', tbl::text));
    -- The worker starts once this transaction commits (it waits for the row).
    PERFORM byok.launch_job(job);
    RETURN job;
END
$fn$;
COMMENT ON FUNCTION byok.start_reencrypt(text, regclass) IS
    'Starts a background job rewriting registered columns under the active data keys; returns its id (see byok.jobs)';

CREATE FUNCTION byok.set_job_state(p_job bigint, p_from text[], p_to text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    current text;
BEGIN
    SELECT state INTO current FROM byok.reencrypt_jobs WHERE job_id = p_job FOR UPDATE;
    IF current IS NULL THEN
        RAISE EXCEPTION 'no re-encryption job %', p_job USING ERRCODE = '42704';
    END IF;
    IF current = p_to THEN
        RETURN current;
    END IF;
    IF NOT current = ANY(p_from) THEN
        RAISE EXCEPTION 'job % is %; it cannot become %', p_job, current, p_to USING ERRCODE = '55000';
    END IF;
    UPDATE byok.reencrypt_jobs SET state = p_to, updated_at = now(),
           finished_at = CASE WHEN p_to = 'cancelled' THEN now() END
     WHERE job_id = p_job;
    RETURN p_to;
END
$fn$;

CREATE FUNCTION byok.pause_job(job_id bigint) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
AS $fn$ SELECT byok.set_job_state(job_id, '{pending,running}', 'paused') $fn$;
CREATE FUNCTION byok.cancel_job(job_id bigint) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
AS $fn$ SELECT byok.set_job_state(job_id, '{pending,running,paused,failed}', 'cancelled') $fn$;
CREATE FUNCTION byok.resume_job(job_id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    state text := byok.set_job_state(job_id, '{paused,failed}', 'running');
BEGIN
    UPDATE byok.reencrypt_jobs j SET last_error = NULL WHERE j.job_id = resume_job.job_id;
    PERFORM byok.launch_job(job_id);
    RETURN state;
END
$fn$;

-- Waits until the job ends (done, failed or cancelled) or the timeout passes; returns its state.
CREATE FUNCTION byok.wait_job(job_id bigint, timeout interval DEFAULT '1 hour') RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    current text;
    started_here boolean;
    n bigint;
BEGIN
    SELECT j.state, coalesce(j.created_xact = pg_current_xact_id_if_assigned(), false) INTO current, started_here
      FROM byok.reencrypt_jobs j WHERE j.job_id = wait_job.job_id;
    IF current IS NULL THEN
        RAISE EXCEPTION 'no re-encryption job %', job_id USING ERRCODE = '42704';
    END IF;
    IF started_here THEN
        -- Started in this very transaction (a migration run as one transaction): no
        -- worker can see the job before it commits, so the work is done here, in it.
        UPDATE byok.reencrypt_jobs j SET state = 'running', started_at = coalesce(started_at, now()),
               run_started_at = now(), run_rows_start = j.rows_done
         WHERE j.job_id = wait_job.job_id AND j.state = 'pending';
        LOOP
            n := byok.reencrypt_step(job_id, current_setting('byok.reencrypt_batch_size')::integer);
            IF n = -3 THEN
                -- The last values are in rows other transactions hold locked.
                EXIT WHEN clock_timestamp() >= deadline;
                PERFORM pg_sleep(0.1);
            END IF;
            EXIT WHEN n < 0 AND n <> -3;
        END LOOP;
        IF n = -2 THEN
            PERFORM byok.finish_job(job_id);
        END IF;
        SELECT j.state INTO current FROM byok.reencrypt_jobs j WHERE j.job_id = wait_job.job_id;
        RETURN current;
    END IF;
    LOOP
        SELECT j.state INTO current FROM byok.reencrypt_jobs j WHERE j.job_id = wait_job.job_id;
        EXIT WHEN current IN ('done', 'failed', 'cancelled') OR clock_timestamp() >= deadline;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN current;
END
$fn$;
COMMENT ON FUNCTION byok.wait_job(bigint, interval) IS
    'For migrations: waits for a job to end (or the timeout) and returns its state; in the transaction that started the job, does the work itself';

-- One batch of a job, in the caller's transaction: returns the values rewritten,
-- -1 when the job is not running, -2 when every column is done, -3 when the only
-- values left under old keys are in rows other transactions hold locked (try again
-- shortly). Errors are recorded in the job (state failed) instead of being raised.
CREATE FUNCTION byok.reencrypt_step(p_job bigint, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    j byok.reencrypt_jobs;
    c byok.protected_column_registry;
    old_keys bigint[];
    n bigint := 0;
    start_page bigint;
    pages bigint;
    table_pages bigint;
    per_page float8;
    locked_rows_left boolean;
BEGIN
    SELECT * INTO j FROM byok.reencrypt_jobs WHERE job_id = p_job FOR UPDATE;
    IF j.state IS DISTINCT FROM 'running' THEN
        RETURN -1;
    END IF;
    IF j.scan_done THEN
        RETURN -2;
    END IF;
    old_keys := byok.job_old_keys(j.tenant_id);
    -- The current column, or the first one after it.
    SELECT * INTO c FROM byok.protected_column_registry r
     WHERE (j.relid IS NULL OR r.relid = j.relid)
       AND (j.cursor_relid IS NULL OR (r.relid::oid, r.column_name) >= (j.cursor_relid::oid, j.cursor_column))
     ORDER BY r.relid::oid, r.column_name LIMIT 1;
    IF c.relid IS NULL THEN
        UPDATE byok.reencrypt_jobs SET scan_done = true WHERE job_id = p_job;
        RETURN -2;
    END IF;
    IF j.cursor_relid IS DISTINCT FROM c.relid OR j.cursor_column IS DISTINCT FROM c.column_name THEN
        j.cursor_ctid := '(0,0)';
        j.sweeping := false;
    END IF;
    BEGIN
        IF NOT j.sweeping THEN
            -- A range of pages from the checkpoint (a TID range scan), sized to about
            -- one batch of rows; only rows under old keys are rewritten (and locked).
            start_page := (j.cursor_ctid::text::point)[0]::bigint;
            table_pages := pg_relation_size(c.relid) / current_setting('block_size')::bigint;
            SELECT CASE WHEN relpages > 0 AND reltuples > 0 THEN reltuples / relpages ELSE 50 END
              INTO per_page FROM pg_class WHERE oid = c.relid;
            pages := greatest(1, ceil(p_batch / greatest(per_page, 1)))::bigint;
            IF start_page >= table_pages THEN
                j.sweeping := true;   -- end of the table: next, values that moved behind the cursor
            ELSE
                EXECUTE format(
                    'WITH rewritten AS (UPDATE %1$s t SET %2$I = byok.reencrypt(t.%2$I, $2)
                                         WHERE t.ctid >= $3 AND t.ctid < $4 AND byok.data_key_id(t.%2$I) = ANY($1)
                                         RETURNING 1)
                     SELECT count(*) FROM rewritten',
                    c.relid, c.column_name)
                   INTO n USING old_keys, c.context, j.cursor_ctid,
                                format('(%s,0)', start_page + pages)::tid;
                j.cursor_ctid := format('(%s,0)', start_page + pages)::tid;
            END IF;
        ELSE
            -- Stragglers: rows moved behind the cursor or locked when it passed.
            EXECUTE format(
                'WITH todo AS (SELECT ctid FROM %1$s WHERE byok.data_key_id(%2$I) = ANY($1) LIMIT $2 FOR UPDATE SKIP LOCKED),
                      rewritten AS (UPDATE %1$s t SET %2$I = byok.reencrypt(t.%2$I, $3) FROM todo
                                     WHERE t.ctid = todo.ctid AND byok.data_key_id(t.%2$I) = ANY($1) RETURNING 1)
                 SELECT count(*) FROM rewritten',
                c.relid, c.column_name)
               INTO n USING old_keys, p_batch, c.context;
            IF n = 0 THEN
                -- Nothing the sweep could lock is left. Values still under old keys
                -- are in rows other transactions hold locked (SKIP LOCKED passed
                -- them): wait for those rather than finish with values under a key
                -- the job is there to retire. The worker retries shortly.
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %1$s WHERE byok.data_key_id(%2$I) = ANY($1))',
                               c.relid, c.column_name)
                   INTO locked_rows_left USING old_keys;
                IF locked_rows_left THEN
                    UPDATE byok.reencrypt_jobs SET updated_at = now() WHERE job_id = p_job;
                    RETURN -3;
                END IF;
                -- Column done: on to the next one, or the end of the scan.
                SELECT r.relid, r.column_name INTO j.cursor_relid, j.cursor_column
                  FROM byok.protected_column_registry r
                 WHERE (j.relid IS NULL OR r.relid = j.relid)
                   AND (r.relid::oid, r.column_name) > (c.relid::oid, c.column_name)
                 ORDER BY r.relid::oid, r.column_name LIMIT 1;
                UPDATE byok.reencrypt_jobs SET cursor_relid = j.cursor_relid, cursor_column = j.cursor_column,
                       cursor_ctid = '(0,0)', sweeping = false, scan_done = NOT FOUND,
                       batches = batches + 1, updated_at = now()
                 WHERE job_id = p_job;
                RETURN 0;
            END IF;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        UPDATE byok.reencrypt_jobs SET state = 'failed', updated_at = now(),
               last_error = format('%s.%s: %s (SQLSTATE %s)', c.relid, c.column_name, SQLERRM, SQLSTATE)
         WHERE job_id = p_job;
        PERFORM byok.audit_event('reencrypt_finish', j.tenant_id, NULL, 'failed',
                                 format('%s.%s: %s', c.relid, c.column_name, SQLERRM),
                                 jsonb_build_object('job_id', p_job));
        RETURN -1;
    END;
    UPDATE byok.reencrypt_jobs SET cursor_relid = c.relid, cursor_column = c.column_name,
           cursor_ctid = j.cursor_ctid, sweeping = j.sweeping, rows_done = rows_done + n,
           batches = batches + 1, updated_at = now()
     WHERE job_id = p_job;
    RETURN n;
END
$fn$;

-- The end of a job: every registered value of its scope must open (the guide's
-- "verify all data accessible"); then its old data keys that nothing registered
-- references any more become retired.
CREATE FUNCTION byok.finish_job(p_job bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    j byok.reencrypt_jobs;
    c byok.protected_column_registry;
    bad bigint;
    referenced bigint[] := '{}';
    ids bigint[];
    retired bigint;
BEGIN
    SELECT * INTO j FROM byok.reencrypt_jobs WHERE job_id = p_job FOR UPDATE;
    IF j.state IS DISTINCT FROM 'running' THEN
        RETURN j.state;
    END IF;
    UPDATE byok.reencrypt_jobs SET state = 'verifying', updated_at = now() WHERE job_id = p_job;
    FOR c IN SELECT * FROM byok.protected_column_registry r WHERE j.relid IS NULL OR r.relid = j.relid LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NOT NULL AND NOT byok.value_opens(%I, $1)',
                       c.relid, c.column_name, c.column_name) INTO bad USING c.context;
        IF bad > 0 THEN
            UPDATE byok.reencrypt_jobs SET state = 'failed', updated_at = now(),
                   last_error = format('verification: %s value(s) of %s.%s do not open', bad, c.relid, c.column_name)
             WHERE job_id = p_job;
            PERFORM byok.audit_event('reencrypt_finish', j.tenant_id, NULL, 'failed',
                                     format('verification: %s value(s) of %s.%s do not open', bad, c.relid, c.column_name),
                                     jsonb_build_object('job_id', p_job));
            RETURN 'failed';
        END IF;
    END LOOP;
    -- Keys still referenced by any registered column (in any scope) stay decrypt-only.
    FOR c IN SELECT * FROM byok.protected_column_registry LOOP
        EXECUTE format('SELECT array_agg(DISTINCT byok.data_key_id(%I)) FROM %s', c.column_name, c.relid) INTO ids;
        referenced := referenced || coalesce(ids, '{}');
    END LOOP;
    UPDATE byok.wrapped_data_keys SET state = 'retired'
     WHERE state = 'decrypt-only' AND (j.tenant_id IS NULL OR tenant_id = j.tenant_id)
       AND NOT dek_id = ANY(referenced);
    GET DIAGNOSTICS retired = ROW_COUNT;
    UPDATE byok.reencrypt_jobs SET state = 'done', keys_retired = retired, finished_at = now(), updated_at = now()
     WHERE job_id = p_job;
    PERFORM byok.audit_event('reencrypt_finish', j.tenant_id, NULL, 'ok', NULL,
                             jsonb_build_object('job_id', p_job, 'rows_done', j.rows_done, 'keys_retired', retired));
    RETURN 'done';
END
$fn$;

-- How many values of registered columns a data key seals (destroy_data_key refuses while > 0).
CREATE FUNCTION byok.data_key_references(p_dek bigint) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    c byok.protected_column_registry;
    n bigint;
    total bigint := 0;
BEGIN
    FOR c IN SELECT * FROM byok.protected_column_registry LOOP
        EXECUTE format('SELECT count(*) FROM %s WHERE byok.data_key_id(%I) = $1', c.relid, c.column_name)
           INTO n USING p_dek;
        total := total + n;
    END LOOP;
    RETURN total;
END
$fn$;

-- Automatic data-key rotation, run by the scheduler: tenants with
-- key_rotation.enabled whose active key is older than interval_days.
CREATE FUNCTION byok.rotate_due_data_keys() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    t record;
    n bigint := 0;
BEGIN
    FOR t IN SELECT c.tenant_id FROM byok.tenant_config c
               JOIN byok.wrapped_data_keys k ON k.tenant_id = c.tenant_id AND k.state = 'active'
              WHERE c.rotation_enabled
                AND k.created_at < now() - make_interval(days => c.rotation_interval_days) LOOP
        BEGIN
            PERFORM byok.rotate_data_key(t.tenant_id);
            n := n + 1;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'byok: scheduled data-key rotation of tenant % failed: %', t.tenant_id, SQLERRM;
        END;
    END LOOP;
    RETURN n;
END
$fn$;

REVOKE ALL ON byok.protected_column_registry, byok.reencrypt_jobs, byok.protected_columns, byok.jobs FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.protect_column(regclass, name, name, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.start_reencrypt(text, regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.set_job_state(bigint, text[], text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.pause_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.resume_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.cancel_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.reencrypt_step(bigint, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.finish_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.rotate_due_data_keys() FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- The audit trail. Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE,
-- and every row carries a SHA-256 hash chained to the previous row's, so an
-- edit made with the trigger disabled is still found by byok.verify_audit_chain().

CREATE TABLE byok.audit_log (
    id bigserial PRIMARY KEY,
    logged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    event text NOT NULL,
    tenant_id text,
    dek_id bigint,
    role_name name NOT NULL DEFAULT session_user,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'failed')),
    reason text,
    details jsonb,
    prev_hash bytea,
    hash bytea NOT NULL
);
COMMENT ON TABLE byok.audit_log IS 'Key-level events, append-only, hash-chained (see byok.verify_audit_chain())';
SELECT pg_catalog.pg_extension_config_dump('byok.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('byok.audit_log_id_seq', '');

-- The text a row's hash covers: every field, unambiguously separated.
CREATE FUNCTION byok.audit_row_text(a byok.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $fn$
    SELECT convert_to(concat_ws(chr(31), a.id::text, to_char(a.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                                a.event, coalesce(a.tenant_id, chr(30)), coalesce(a.dek_id::text, chr(30)),
                                a.role_name::text, a.outcome, coalesce(a.reason, chr(30)),
                                coalesce(a.details::text, chr(30))), 'UTF8')
$fn$;

CREATE FUNCTION byok.audit_event(p_event text, p_tenant text, p_dek bigint, p_outcome text,
                                 p_reason text DEFAULT NULL, p_details jsonb DEFAULT NULL,
                                 p_role oid DEFAULT NULL, p_at timestamptz DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    row byok.audit_log;
    log_all boolean := true;
    alert boolean := true;
BEGIN
    SELECT audit_log_all_operations, audit_alert_on_failures INTO log_all, alert
      FROM byok.tenant_config WHERE tenant_id = p_tenant;
    IF p_outcome = 'ok' AND log_all IS FALSE THEN
        RETURN NULL;   -- the tenant's audit.log_all_operations is off: failures only
    END IF;
    -- One writer at a time extends the chain.
    PERFORM pg_advisory_xact_lock(1652125547, 1);
    row.id := nextval('byok.audit_log_id_seq');
    -- When it happened (queued records: the key broker's call, an aborted operation).
    row.logged_at := coalesce(p_at, clock_timestamp());
    row.event := p_event;
    row.tenant_id := p_tenant;
    row.dek_id := p_dek;
    -- The acting role (administrative functions pass it; SQL ones run as the owner,
    -- so they record the login role).
    row.role_name := coalesce((SELECT rolname FROM pg_roles WHERE oid = p_role), session_user);
    row.outcome := p_outcome;
    row.reason := p_reason;
    row.details := p_details;
    SELECT hash INTO row.prev_hash FROM byok.audit_log ORDER BY id DESC LIMIT 1;
    row.hash := sha256(coalesce(row.prev_hash, '\x'::bytea) || byok.audit_row_text(row));
    INSERT INTO byok.audit_log VALUES (row.*);
    IF p_outcome = 'failed' AND alert IS NOT FALSE THEN
        RAISE WARNING 'byok: % failed for tenant %: %', p_event, coalesce(p_tenant, '-'), coalesce(p_reason, '');
        PERFORM pg_notify('byok_alerts', json_build_object('audit_id', row.id, 'event', p_event,
                          'tenant_id', p_tenant, 'dek_id', p_dek, 'reason', p_reason,
                          'at', row.logged_at)::text);
    END IF;
    RETURN row.id;
END
$fn$;
COMMENT ON FUNCTION byok.audit_event(text, text, bigint, text, text, jsonb, oid, timestamptz) IS
    'Appends an event to the audit trail (and alerts on failures, per the tenant''s audit settings)';

CREATE FUNCTION byok.audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'byok.audit_log is append-only' USING ERRCODE = '42501',
        HINT = 'audit rows are never changed or removed';
END
$fn$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON byok.audit_log
    FOR EACH ROW EXECUTE FUNCTION byok.audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON byok.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION byok.audit_refuse_change();

-- Recomputes the chain; returns the rows where it breaks (none: intact).
CREATE FUNCTION byok.verify_audit_chain()
RETURNS TABLE (id bigint, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    a byok.audit_log;
    previous bytea;
BEGIN
    FOR a IN SELECT * FROM byok.audit_log ORDER BY audit_log.id LOOP
        IF a.prev_hash IS DISTINCT FROM previous THEN
            id := a.id; problem := 'prev_hash does not match the hash of the row before it (a row was removed or reordered)';
            RETURN NEXT;
        ELSIF a.hash <> sha256(coalesce(a.prev_hash, '\x'::bytea) || byok.audit_row_text(a)) THEN
            id := a.id; problem := 'hash does not match the row''s contents (the row was changed)';
            RETURN NEXT;
        END IF;
        previous := a.hash;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.verify_audit_chain() IS
    'Checks the audit trail''s hash chain; returns each row where it breaks';

REVOKE ALL ON byok.audit_log FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.audit_event(text, text, bigint, text, text, jsonb, oid, timestamptz) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Least privilege: two roles, nothing for PUBLIC beyond using the type.
--   byok_user:  encrypt and decrypt (the per-row functions) only;
--   byok_admin: the above, plus administration: tenants, rotation, jobs, caches,
--               destruction, validation, the audit trail and the views.
-- Administrative functions run their catalog work as the extension's owner; who
-- may call them is decided here.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'byok_admin') THEN
        CREATE ROLE byok_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'byok_user') THEN
        CREATE ROLE byok_user NOLOGIN;
    END IF;
END
$roles$;

REVOKE EXECUTE ON FUNCTION byok.encrypt(text, bytea, text), byok.encrypt_text(text, text, text),
    byok.decrypt(byok.encrypted, text), byok.decrypt_text(byok.encrypted, text),
    byok.data_key_id(byok.encrypted), byok.value_opens(byok.encrypted, text),
    byok.verify_audit_chain(), byok.pause_job(bigint), byok.resume_job(bigint), byok.cancel_job(bigint),
    byok.wait_job(bigint, interval), byok.data_key_references(bigint), byok.job_old_keys(text),
    byok.job_remaining(text, regclass), byok.backend_cache_stats(), byok.broker_status(),
    byok.metrics_counters(), byok.rotate_data_key(text)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION byok.encrypt(text, bytea, text), byok.encrypt_text(text, text, text),
    byok.decrypt(byok.encrypted, text), byok.decrypt_text(byok.encrypted, text),
    byok.data_key_id(byok.encrypted), byok.value_opens(byok.encrypted, text)
  TO byok_user, byok_admin;
GRANT EXECUTE ON FUNCTION byok.configure_tenant(jsonb), byok.rotate_data_key(text),
    byok.set_data_key_state(bigint, text), byok.destroy_data_key(bigint, bigint),
    byok.destroy_tenant_keys(text, text), byok.flush_cache(text), byok.validate_tenant(text),
    byok.rotate_master_key_step(text, text, interval), byok.protect_column(regclass, name, name, text),
    byok.start_reencrypt(text, regclass), byok.pause_job(bigint), byok.resume_job(bigint),
    byok.cancel_job(bigint), byok.wait_job(bigint, interval), byok.data_key_references(bigint),
    byok.verify_audit_chain(), byok.backend_cache_stats(), byok.broker_status(), byok.metrics_counters()
  TO byok_admin;
GRANT EXECUTE ON PROCEDURE byok.rotate_master_key(text, text, interval) TO byok_admin;
-- protect_column runs as its caller, so the caller's rights on the table decide.
GRANT SELECT, INSERT, UPDATE ON byok.protected_column_registry TO byok_admin;
GRANT SELECT ON byok.tenants, byok.data_keys, byok.jobs, byok.protected_columns, byok.metrics,
    byok.audit_log
  TO byok_admin;

-- ---------------------------------------------------------------------------
-- Per-tenant grants. A role may encrypt for and decrypt a tenant's values only
-- when it (or a role it belongs to) is granted the tenant; superusers always
-- may. The per-row functions check it once per (role, data key) and cache the
-- answer with the key; a change here (or to role membership) drops every
-- backend's ready keys at commit, so a revoke takes effect at once.

CREATE TABLE byok.tenant_grants (
    grantee regrole NOT NULL,
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id) ON DELETE CASCADE,
    granted_by name NOT NULL DEFAULT session_user,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grantee, tenant_id)
);
COMMENT ON TABLE byok.tenant_grants IS 'Which roles may encrypt and decrypt which tenants'' values (byok.grant_tenant)';
SELECT pg_catalog.pg_extension_config_dump('byok.tenant_grants', '');
CREATE TRIGGER invalidate_key_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON byok.tenant_grants
    FOR EACH STATEMENT EXECUTE FUNCTION byok.invalidate_key_caches();

-- Whether role p_role may use tenant p_tenant's keys (superuser, or granted
-- directly or through membership).
CREATE FUNCTION byok.may_use_tenant(p_role oid, p_tenant text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_roles WHERE oid = p_role AND rolsuper)
        OR EXISTS (SELECT 1 FROM byok.tenant_grants g
                    WHERE g.tenant_id = p_tenant AND pg_has_role(p_role, g.grantee::oid, 'USAGE'))
$fn$;

-- Row-level security on the catalog: administrators see every tenant, other
-- roles the tenants they are granted. (The extension's own functions read the
-- tables as their owner, which RLS does not restrict.)
CREATE FUNCTION byok.tenant_visible(p_role name, p_tenant text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $fn$
    SELECT pg_has_role(p_role, 'byok_admin', 'USAGE')
        OR byok.may_use_tenant((SELECT oid FROM pg_roles WHERE rolname = p_role), p_tenant)
$fn$;
ALTER TABLE byok.tenant_config ENABLE ROW LEVEL SECURITY;
ALTER TABLE byok.wrapped_data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE byok.tenant_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_visibility ON byok.tenant_config FOR SELECT
    USING (byok.tenant_visible(current_user, tenant_id));
CREATE POLICY tenant_visibility ON byok.wrapped_data_keys FOR SELECT
    USING (byok.tenant_visible(current_user, tenant_id));
CREATE POLICY tenant_visibility ON byok.tenant_grants FOR SELECT
    USING (byok.tenant_visible(current_user, tenant_id));
-- The views read the tables with the caller's rights, so the policies apply;
-- the columns they show (never wrapped keys) are all a caller can select.
ALTER VIEW byok.tenants SET (security_invoker = true);
ALTER VIEW byok.data_keys SET (security_invoker = true);
CREATE VIEW byok.tenant_access WITH (security_invoker = true) AS
    SELECT grantee, tenant_id, granted_by, granted_at FROM byok.tenant_grants;
COMMENT ON VIEW byok.tenant_access IS 'Per-tenant grants (byok.grant_tenant), as far as the caller may see them';
GRANT SELECT (tenant_id, customer, provider, master_key_id, previous_master_key_id,
              previous_master_key_retires_at, provider_options, rotation_enabled,
              rotation_interval_days, cache_ttl_seconds, cache_max_entries,
              cache_grace_period_seconds, audit_log_all_operations, audit_alert_on_failures,
              created_at, updated_at)
    ON byok.tenant_config TO byok_admin, byok_user;
GRANT SELECT (dek_id, tenant_id, provider, cmk_id, cmk_version, state, created_at, rotated_at,
              destroyed_at)
    ON byok.wrapped_data_keys TO byok_admin, byok_user;
GRANT SELECT ON byok.tenant_grants TO byok_admin, byok_user;
GRANT SELECT ON byok.tenants, byok.data_keys, byok.tenant_access TO byok_admin, byok_user;
REVOKE EXECUTE ON FUNCTION byok.may_use_tenant(oid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.grant_tenant(text, text), byok.revoke_tenant(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION byok.tenant_visible(name, text) TO byok_admin, byok_user;
REVOKE EXECUTE ON FUNCTION byok.tenant_visible(name, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION byok.grant_tenant(text, text), byok.revoke_tenant(text, text)
  TO byok_admin;

-- ---------------------------------------------------------------------------
-- Dual control (PCI DSS): in an environment whose segregation policy requires
-- approval (production), destroying, rotating and granting run only through a
-- request by one byok_admin and its approval by another, within
-- byok.approval_expiry_minutes. Both steps are in the audit trail.

CREATE TABLE byok.operation_requests (
    request_id bigserial PRIMARY KEY,
    operation text NOT NULL CHECK (operation IN ('rotate_data_key', 'rotate_master_key',
        'destroy_data_key', 'destroy_tenant_keys', 'grant_tenant')),
    tenant_id text NOT NULL,
    args jsonb NOT NULL DEFAULT '{}',
    requested_by name NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'cancelled')),
    approved_by name,
    approved_at timestamptz,
    result text
);
COMMENT ON TABLE byok.operation_requests IS 'Operations awaiting (or given) a second administrator''s approval';
SELECT pg_catalog.pg_extension_config_dump('byok.operation_requests', '');
SELECT pg_catalog.pg_extension_config_dump('byok.operation_requests_request_id_seq', '');

CREATE VIEW byok.pending_operations AS
SELECT request_id, operation, tenant_id, args, requested_by, requested_at, expires_at,
       CASE WHEN state = 'pending' AND expires_at <= now() THEN 'expired' ELSE state END AS state,
       approved_by, approved_at, result
  FROM byok.operation_requests;
COMMENT ON VIEW byok.pending_operations IS 'Dual-control requests and their state (pending, done, cancelled, expired)';

CREATE FUNCTION byok.request_operation(op text, tenant_id text, args jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    id bigint;
    expected text[];
    extra text[];
    missing text[];
BEGIN
    IF op IS NULL OR tenant_id IS NULL OR args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'request_operation: op and tenant_id are required, args must be a JSON object'
            USING ERRCODE = '22023';
    END IF;
    expected := CASE op
        WHEN 'rotate_data_key' THEN '{}'::text[]
        WHEN 'rotate_master_key' THEN '{new_key_id,grace_period}'
        WHEN 'destroy_data_key' THEN '{dek_id}'
        WHEN 'destroy_tenant_keys' THEN '{}'
        WHEN 'grant_tenant' THEN '{role}'
    END;
    IF expected IS NULL THEN
        RAISE EXCEPTION 'unknown operation "%"', op USING ERRCODE = '22023',
            HINT = 'one of rotate_data_key, rotate_master_key, destroy_data_key, destroy_tenant_keys, grant_tenant';
    END IF;
    SELECT array_agg(k) INTO extra FROM jsonb_object_keys(args) k WHERE NOT k = ANY(expected);
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION 'operation % takes no argument %', op, array_to_string(extra, ', ')
            USING ERRCODE = '22023', HINT = format('its arguments: %s', coalesce(nullif(array_to_string(expected, ', '), ''), 'none'));
    END IF;
    SELECT array_agg(k) INTO missing FROM unnest(expected) k
     WHERE NOT args ? k AND k <> 'grace_period';
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'operation % needs argument %', op, array_to_string(missing, ', ') USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM byok.tenant_config t WHERE t.tenant_id = request_operation.tenant_id) THEN
        RAISE EXCEPTION 'tenant "%" does not exist', tenant_id USING ERRCODE = '42704';
    END IF;
    IF op = 'destroy_data_key' AND NOT EXISTS (SELECT 1 FROM byok.wrapped_data_keys k
            WHERE k.dek_id = (args->>'dek_id')::bigint AND k.tenant_id = request_operation.tenant_id) THEN
        RAISE EXCEPTION 'tenant "%" has no data key %', tenant_id, args->>'dek_id' USING ERRCODE = '42704';
    END IF;
    IF op = 'grant_tenant' AND to_regrole(args->>'role') IS NULL THEN
        RAISE EXCEPTION 'role "%" does not exist', args->>'role' USING ERRCODE = '42704';
    END IF;
    IF op = 'rotate_master_key' THEN
        PERFORM (coalesce(args->>'grace_period', '24 hours'))::interval;
    END IF;
    INSERT INTO byok.operation_requests (operation, tenant_id, args, requested_by, expires_at)
    VALUES (op, tenant_id, args, session_user,
            now() + current_setting('byok.approval_expiry_minutes')::interval)
    RETURNING request_id INTO id;
    PERFORM byok.audit_event('request_operation', tenant_id, NULL, 'ok', NULL,
                             jsonb_build_object('request_id', id, 'operation', op, 'args', args));
    RETURN id;
END
$fn$;
COMMENT ON FUNCTION byok.request_operation(text, text, jsonb) IS
    'Asks for a dual-control operation; another byok_admin runs it with byok.approve_operation(id)';

CREATE FUNCTION byok.approve_operation(id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    r byok.operation_requests;
    outcome text;
BEGIN
    SELECT * INTO r FROM byok.operation_requests o WHERE o.request_id = id FOR UPDATE;
    IF r.request_id IS NULL THEN
        RAISE EXCEPTION 'no operation request %', id USING ERRCODE = '42704';
    END IF;
    IF r.state <> 'pending' THEN
        RAISE EXCEPTION 'operation request % is already %', id, r.state USING ERRCODE = '55000';
    END IF;
    IF r.expires_at <= now() THEN
        PERFORM byok.audit_failure('approve_operation', r.tenant_id, 'the request has expired',
                                   jsonb_build_object('request_id', id, 'operation', r.operation));
        RAISE EXCEPTION 'operation request % has expired', id USING ERRCODE = '55000',
            DETAIL = 'requests wait byok.approval_expiry_minutes for their approval',
            HINT = 'ask again with byok.request_operation()';
    END IF;
    IF NOT pg_has_role(session_user, 'byok_admin', 'USAGE') THEN
        RAISE EXCEPTION 'only a byok_admin may approve operations' USING ERRCODE = '42501';
    END IF;
    IF session_user = r.requested_by THEN
        -- Queued outside this transaction, which the refusal aborts.
        PERFORM byok.audit_failure('approve_operation', r.tenant_id,
                                   'the requester cannot approve their own request',
                                   jsonb_build_object('request_id', id, 'operation', r.operation));
        RAISE EXCEPTION 'operation request % was made by %; a different administrator must approve it', id, r.requested_by
            USING ERRCODE = '42501', DETAIL = 'dual control: two people take part in every destructive or rotating operation';
    END IF;
    outcome := byok.execute_approved_operation(r.operation, r.tenant_id, r.args);
    UPDATE byok.operation_requests o SET state = 'done', approved_by = session_user, approved_at = now(),
           result = outcome
     WHERE o.request_id = id;
    PERFORM byok.audit_event('approve_operation', r.tenant_id, NULL, 'ok', NULL,
                             jsonb_build_object('request_id', id, 'operation', r.operation, 'args', r.args,
                                                'requested_by', r.requested_by, 'result', outcome));
    RETURN outcome;
END
$fn$;
COMMENT ON FUNCTION byok.approve_operation(bigint) IS
    'Approves and runs another administrator''s request (dual control); returns the operation''s result';

CREATE FUNCTION byok.cancel_operation(id bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
    UPDATE byok.operation_requests o SET state = 'cancelled' WHERE o.request_id = id AND o.state = 'pending';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no pending operation request %', id USING ERRCODE = '42704';
    END IF;
    PERFORM byok.audit_event('cancel_operation', (SELECT tenant_id FROM byok.operation_requests o WHERE o.request_id = id),
                             NULL, 'ok', NULL, jsonb_build_object('request_id', id));
    RETURN 'cancelled';
END
$fn$;

REVOKE ALL ON byok.operation_requests, byok.pending_operations FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.audit_failure(text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.request_operation(text, text, jsonb), byok.approve_operation(bigint),
    byok.cancel_operation(bigint), byok.execute_approved_operation(text, text, jsonb),
    byok.segregation_policy()
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION byok.request_operation(text, text, jsonb), byok.approve_operation(bigint),
    byok.cancel_operation(bigint), byok.segregation_policy()
  TO byok_admin;
GRANT SELECT ON byok.pending_operations TO byok_admin;
