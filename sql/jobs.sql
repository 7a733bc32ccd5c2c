-- Re-encryption jobs. Registered columns are rewritten under their tenants'
-- active data keys by a background worker, one short transaction per batch;
-- progress (including a scan cursor) is checkpointed in the job row, so a job
-- interrupted by a crash resumes where it stopped without rewriting any row
-- twice (only values under decrypt-only keys are ever rewritten). The state
-- machine is in Rust (src/jobs/engine.rs); these are its tables.

CREATE TABLE byok.protected_column_registry (
    relid regclass NOT NULL,
    column_name name NOT NULL,
    -- the column's number: followed through renames (the event trigger below)
    attnum smallint NOT NULL,
    tenant_column name,
    -- the context every value of the column is sealed with ('' = none)
    context text NOT NULL DEFAULT '',
    registered_at timestamptz NOT NULL DEFAULT now(),
    -- searchable (byok.make_searchable): the length of its terms and how its
    -- values are normalized before their term is computed; NULL: not searchable
    search_term_length smallint CHECK (search_term_length BETWEEN 2 AND 32),
    search_normalization text,
    PRIMARY KEY (relid, column_name),
    CONSTRAINT protected_column_registry_search_check
        CHECK ((search_term_length IS NULL) = (search_normalization IS NULL))
);
COMMENT ON TABLE byok.protected_column_registry IS 'Columns of type byok.encrypted that re-encryption jobs rewrite';
SELECT pg_catalog.pg_extension_config_dump('byok.protected_column_registry', '');
-- A searchable column's context is its own (byok.make_searchable checks it
-- under a table lock; this is the backstop).
CREATE UNIQUE INDEX protected_column_registry_searchable_context
    ON byok.protected_column_registry (context) WHERE search_term_length IS NOT NULL;
-- Backends cache searchable columns' term settings: a change reaches them at
-- commit. Row triggers, fired by those settings only: the event trigger below
-- touches this table on every DROP, which must not empty every key cache.
CREATE TRIGGER invalidate_key_caches_search_settings
    AFTER UPDATE OF search_term_length, search_normalization, context ON byok.protected_column_registry
    FOR EACH ROW EXECUTE FUNCTION byok.invalidate_key_caches();
CREATE TRIGGER invalidate_key_caches_searchable_gone
    AFTER DELETE ON byok.protected_column_registry
    FOR EACH ROW WHEN (OLD.search_term_length IS NOT NULL) EXECUTE FUNCTION byok.invalidate_key_caches();

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
    finished_at timestamptz,
    -- The job worker that runs the job: its pid and when its backend started
    -- (a claim whose backend is gone is free). Not an advisory lock: any role
    -- may take any advisory key first and stall the job.
    worker_pid integer,
    worker_started_at timestamptz
);
COMMENT ON TABLE byok.reencrypt_jobs IS 'Re-encryption jobs and their checkpoints';

CREATE VIEW byok.protected_columns AS
SELECT relid AS table_name, column_name, tenant_column, context, registered_at,
       search_term_length, search_normalization
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

-- The registry follows its tables: a dropped table or column, a column no longer
-- byok.encrypted, a table turned into a view (CREATE RULE) or made unlogged
-- leaves it; a renamed column is renamed in it. Runs as the extension's owner on
-- every DDL command, so it only touches the registry and never raises (a
-- failure here must not block anyone's DDL). The job engine checks the same
-- conditions at every use as well.
CREATE FUNCTION byok.follow_registered_columns() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    DELETE FROM byok.protected_column_registry r
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                         JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
                        WHERE a.attrelid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
                          AND a.attnum OPERATOR(pg_catalog.=) r.attnum AND NOT a.attisdropped
                          AND a.atttypid OPERATOR(pg_catalog.=) 'byok.encrypted'::pg_catalog.regtype
                          AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}')
                          AND c.relpersistence OPERATOR(pg_catalog.=) 'p');
    UPDATE byok.protected_column_registry r SET column_name = a.attname
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) r.attnum
       AND a.attname OPERATOR(pg_catalog.<>) r.column_name;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'byok: could not update the registry of protected columns: %', SQLERRM;
END
$fn$;
CREATE EVENT TRIGGER byok_follow_dropped_columns ON sql_drop
    EXECUTE FUNCTION byok.follow_registered_columns();
CREATE EVENT TRIGGER byok_follow_altered_columns ON ddl_command_end
    EXECUTE FUNCTION byok.follow_registered_columns();
