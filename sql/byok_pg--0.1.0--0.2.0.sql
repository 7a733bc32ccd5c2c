-- byok_pg 0.1.0 -> 0.2.0 (the security hardening). Run by ALTER EXTENSION byok_pg UPDATE,
-- after the 0.2.0 package is installed and the server restarted (the library is in
-- shared_preload_libraries): docs/upgrading.md.
--
-- Every tenant, data key, grant, job, dual-control request and audit row is kept.
-- The 0.1.0 catalog is sql/archive/byok_pg--0.1.0.sql; the result must equal a fresh
-- 0.2.0 install object for object, privilege for privilege (tests/scripts/upgrade.sh
-- compares them). The rule: every change to sql/*.sql or to a #[pg_extern] of the
-- unreleased version is mirrored here.
--
-- Only the 0.2.0 library is loaded when this runs. 0.1.0's C functions point at
-- symbols that are gone or changed, so nothing here calls a 0.1.0 function: old
-- functions are dropped or replaced before anything calls them.

\echo Use "ALTER EXTENSION byok_pg UPDATE" to load this file. \quit

-- The server must run the 0.2.0 library (preloaded), as CREATE EXTENSION requires.
CREATE FUNCTION byok.require_preload() RETURNS void
    AS 'MODULE_PATHNAME', 'byok_require_preload' LANGUAGE C;
SELECT byok.require_preload();
DROP FUNCTION byok.require_preload();

-- ---------------------------------------------------------------------------
-- 1. What 0.2.0 removes or redefines incompatibly (another signature, return
--    type or parameter name). Not CASCADE: an object of yours depending on one
--    of these stops the update, naming it, rather than disappearing.

-- Row-level security now asks byok.tenant_visible(tenant_id) about the current user.
DROP POLICY tenant_visibility ON byok.tenant_config;
DROP POLICY tenant_visibility ON byok.wrapped_data_keys;
DROP POLICY tenant_visibility ON byok.tenant_grants;

-- Grants name their role by byok.role_ref (no binary form: Citus copies the
-- grants between nodes as role names, each node resolving its own OIDs). The
-- view over the column is re-created below.
DROP VIEW byok.tenant_access;
-- byok.role_ref: a role, stored as its OID like regrole, written and read only
-- as the role's name. It has no binary send/receive on purpose: Citus copies a
-- reference table between nodes in binary when every column allows it, and a
-- role's OID differs from node to node (README, "Citus"). Its input refuses a
-- bare number (an OID from another node or of a dropped role).
CREATE TYPE byok.role_ref;
CREATE FUNCTION byok.role_ref_in(cstring) RETURNS byok.role_ref
    AS 'MODULE_PATHNAME', 'byok_role_ref_in' LANGUAGE C STRICT STABLE PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_out(byok.role_ref) RETURNS cstring
    AS 'regroleout' LANGUAGE internal STRICT STABLE PARALLEL SAFE;
CREATE TYPE byok.role_ref (INPUT = byok.role_ref_in, OUTPUT = byok.role_ref_out, LIKE = pg_catalog.oid);
COMMENT ON TYPE byok.role_ref IS 'A role, stored as its OID, written and read as its name only (no binary form: Citus copies it between nodes as text)';
CREATE CAST (byok.role_ref AS pg_catalog.oid) WITHOUT FUNCTION;
CREATE CAST (pg_catalog.oid AS byok.role_ref) WITHOUT FUNCTION;
CREATE CAST (byok.role_ref AS pg_catalog.regrole) WITHOUT FUNCTION AS IMPLICIT;
CREATE CAST (pg_catalog.regrole AS byok.role_ref) WITHOUT FUNCTION AS ASSIGNMENT;
-- Comparison (OID order), for the grants' primary key.
CREATE FUNCTION byok.role_ref_eq(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oideq' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_ne(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidne' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_lt(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidlt' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_le(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidle' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_gt(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidgt' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_ge(byok.role_ref, byok.role_ref) RETURNS boolean
    AS 'oidge' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_cmp(byok.role_ref, byok.role_ref) RETURNS integer
    AS 'btoidcmp' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE FUNCTION byok.role_ref_hash(byok.role_ref) RETURNS integer
    AS 'hashoid' LANGUAGE internal IMMUTABLE STRICT LEAKPROOF PARALLEL SAFE;
CREATE OPERATOR byok.= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_eq,
    COMMUTATOR = OPERATOR(byok.=), NEGATOR = OPERATOR(byok.<>), RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR byok.<> (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_ne,
    COMMUTATOR = OPERATOR(byok.<>), NEGATOR = OPERATOR(byok.=), RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR byok.< (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_lt,
    COMMUTATOR = OPERATOR(byok.>), NEGATOR = OPERATOR(byok.>=), RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR byok.<= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_le,
    COMMUTATOR = OPERATOR(byok.>=), NEGATOR = OPERATOR(byok.>), RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR byok.> (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_gt,
    COMMUTATOR = OPERATOR(byok.<), NEGATOR = OPERATOR(byok.<=), RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR byok.>= (LEFTARG = byok.role_ref, RIGHTARG = byok.role_ref, FUNCTION = byok.role_ref_ge,
    COMMUTATOR = OPERATOR(byok.<=), NEGATOR = OPERATOR(byok.<), RESTRICT = scalargesel, JOIN = scalargejoinsel);
CREATE OPERATOR CLASS byok.role_ref_ops DEFAULT FOR TYPE byok.role_ref USING btree AS
    OPERATOR 1 byok.<, OPERATOR 2 byok.<=, OPERATOR 3 byok.=, OPERATOR 4 byok.>=, OPERATOR 5 byok.>,
    FUNCTION 1 byok.role_ref_cmp(byok.role_ref, byok.role_ref);
CREATE OPERATOR CLASS byok.role_ref_hash_ops DEFAULT FOR TYPE byok.role_ref USING hash AS
    OPERATOR 1 byok.=, FUNCTION 1 byok.role_ref_hash(byok.role_ref);

ALTER TABLE byok.tenant_grants
    ALTER COLUMN grantee TYPE byok.role_ref USING grantee::pg_catalog.oid::byok.role_ref;
DROP FUNCTION byok.tenant_visible(name, text);

-- The job engine, dual control and the audit helpers moved into the library.
DROP FUNCTION byok.job_old_keys(text);
DROP FUNCTION byok.job_remaining(text, regclass);
DROP FUNCTION byok.set_job_state(bigint, text[], text);
DROP FUNCTION byok.finish_job(bigint);
DROP FUNCTION byok.launch_job(bigint);
DROP FUNCTION byok.rotate_due_data_keys();
DROP FUNCTION byok.execute_approved_operation(text, text, jsonb);
DROP FUNCTION byok.audit_failure(text, text, text, jsonb);
DROP FUNCTION byok.reencrypt_step(bigint, integer);        -- now returns text
DROP FUNCTION byok.data_key_references(bigint);            -- parameter p_dek is now dek_id
DROP FUNCTION byok.protect_column(regclass, name, name, text);  -- column names as text
DROP FUNCTION byok.broker_status();                        -- four more columns
DROP VIEW byok.metrics;                                     -- one more column (key_checks),
DROP FUNCTION byok.metrics_counters();                      -- from its function
DROP FUNCTION byok.verify_audit_chain();                   -- now with an optional anchor
-- one more parameter (p_role_name): the 8-argument one would make calls ambiguous
DROP FUNCTION byok.audit_event(text, text, bigint, text, text, jsonb, oid, timestamptz);

-- ---------------------------------------------------------------------------
-- 2. Tables. Rows are kept; columns land where a fresh install puts them.

-- Data keys count the values they sealed (their nonce budget). 0.1.0 did not
-- count: keys created before the update start from 0.
ALTER TABLE byok.wrapped_data_keys ADD COLUMN encryptions bigint NOT NULL DEFAULT 0;

-- Disaster recovery: a backup master key per tenant (encryption.backup), a
-- second wrap of every data key under it, and DR activation.
ALTER TABLE byok.tenant_config
    ADD COLUMN backup_provider text
        CHECK (backup_provider IN ('local', 'aws_kms', 'azure_kv', 'gcp_kms', 'vault')),
    ADD COLUMN backup_master_key_id text,
    ADD COLUMN backup_provider_options jsonb,
    ADD COLUMN dr_active boolean NOT NULL DEFAULT false,
    ADD COLUMN dr_activated_at timestamptz,
    ADD CONSTRAINT tenant_config_dr_needs_backup CHECK (NOT dr_active OR backup_provider IS NOT NULL);
ALTER TABLE byok.wrapped_data_keys
    ADD COLUMN backup_wrapped_dek bytea,
    ADD COLUMN backup_provider text,
    ADD COLUMN backup_cmk_id text,
    ADD COLUMN backup_cmk_version text,
    ADD COLUMN has_primary_wrap boolean GENERATED ALWAYS AS (wrapped_dek IS NOT NULL) STORED,
    ADD COLUMN has_backup_wrap boolean GENERATED ALWAYS AS (backup_wrapped_dek IS NOT NULL) STORED,
    DROP CONSTRAINT wrapped_data_keys_check,
    ADD CONSTRAINT wrapped_data_keys_check
        CHECK ((state = 'destroyed') = (wrapped_dek IS NULL AND backup_wrapped_dek IS NULL));

-- Searchable encryption: a tenant's index keys live beside its data keys
-- (purpose 'index'), each purpose with its own active key.
ALTER TABLE byok.wrapped_data_keys
    ADD COLUMN purpose text NOT NULL DEFAULT 'data' CHECK (purpose IN ('data', 'index'));
DROP INDEX byok.wrapped_data_keys_one_active_per_tenant;
CREATE UNIQUE INDEX wrapped_data_keys_one_active_per_tenant
    ON byok.wrapped_data_keys (tenant_id, purpose) WHERE state = 'active';

-- A job is kept to one worker by a claim in its row (0.1.0 used an advisory
-- lock, which any role could take first).
ALTER TABLE byok.reencrypt_jobs ADD COLUMN worker_pid integer,
                                ADD COLUMN worker_started_at timestamptz;

-- Dual control: the operations are decided in the library now.
ALTER TABLE byok.operation_requests DROP CONSTRAINT operation_requests_operation_check;

-- The registry of protected columns gains the column's number (attnum, its third
-- column). Rebuilt: the 0.1.0 table is renamed, its rows copied below, and dropped
-- at the end. Rows 0.2.0 would not keep (the column or table is gone, the column
-- is no longer byok.encrypted, the table is not a permanent table) are left out,
-- with a WARNING and a record in the audit trail.
DROP VIEW byok.protected_columns;
ALTER TABLE byok.protected_column_registry RENAME TO protected_column_registry_0_1_0;
ALTER TABLE byok.protected_column_registry_0_1_0
    RENAME CONSTRAINT protected_column_registry_pkey TO protected_column_registry_0_1_0_pkey;
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
INSERT INTO byok.protected_column_registry (relid, column_name, attnum, tenant_column, context, registered_at)
SELECT r.relid, r.column_name, a.attnum, r.tenant_column, r.context, r.registered_at
  FROM byok.protected_column_registry_0_1_0 r
  JOIN pg_catalog.pg_attribute a ON a.attrelid = r.relid::pg_catalog.oid AND a.attname = r.column_name
                                 AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
 WHERE a.atttypid = 'byok.encrypted'::pg_catalog.regtype
   AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p';

-- The guide's rotation workflow: master keys retired at the end of a grace
-- period, and rotations scheduled in advance (new in 0.2.0).
CREATE TABLE byok.retired_master_keys (
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    master_key_id text NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now(),
    -- data keys found still under it at the end of the grace period, and rewrapped
    data_keys_rewrapped bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, master_key_id)
);
COMMENT ON TABLE byok.retired_master_keys IS 'Master keys whose rotation grace period ended; data keys wrapped by them are refused';
CREATE TABLE byok.scheduled_rotations (
    rotation_id bigserial PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    new_key_id text NOT NULL,
    rotation_time timestamptz NOT NULL,
    grace_period interval NOT NULL,
    state text NOT NULL DEFAULT 'scheduled'
        CHECK (state IN ('scheduled', 'running', 'done', 'failed', 'cancelled')),
    -- who made it take effect (under dual control: the approver), and whether
    -- a second administrator approved it (one that was not must not run once
    -- dual control applies)
    scheduled_by name NOT NULL,
    approved boolean NOT NULL DEFAULT false,
    scheduled_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    result text
);
COMMENT ON TABLE byok.scheduled_rotations IS 'Customer-initiated master-key rotations noticed in advance, run by the job launcher at their time';
SELECT pg_catalog.pg_extension_config_dump('byok.retired_master_keys', '');
SELECT pg_catalog.pg_extension_config_dump('byok.scheduled_rotations', '');
SELECT pg_catalog.pg_extension_config_dump('byok.scheduled_rotations_rotation_id_seq', '');
CREATE TRIGGER invalidate_key_caches
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON byok.retired_master_keys
    FOR EACH STATEMENT EXECUTE FUNCTION byok.invalidate_key_caches();

-- ---------------------------------------------------------------------------
-- 3. Functions, views, policies, triggers: the 0.2.0 definitions. CREATE OR
--    REPLACE keeps the functions (and views) your objects may depend on, such as
--    a view calling byok.decrypt_text; the per-row functions and the type are
--    unchanged since 0.1.0 (sql/types.sql), which adds the casts with bytea.

-- sql/types.sql (0.2.0): the casts with bytea.
CREATE FUNCTION byok.encrypted_from_bytea(bytea) RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypted_from_bytea' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE CAST (bytea AS byok.encrypted) WITH FUNCTION byok.encrypted_from_bytea(bytea) AS ASSIGNMENT;
CREATE CAST (byok.encrypted AS bytea) WITHOUT FUNCTION;

-- The library's functions (#[pg_extern]; as `cargo pgrx schema` writes them).
CREATE OR REPLACE FUNCTION byok.make_searchable(
    "tbl" regclass,
    "col" TEXT,
    "term_length" INT DEFAULT 8,
    "normalization" TEXT DEFAULT 'exact'
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'make_searchable_wrapper';
CREATE OR REPLACE FUNCTION byok.rotate_index_key(
    "tenant_id" TEXT
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'rotate_index_key_wrapper';
CREATE OR REPLACE FUNCTION byok.citus_reencrypt_shard(
    "tbl" oid,
    "shard_id" bigint,
    "column_name" TEXT,
    "context" TEXT,
    "tenant_id" TEXT,
    "keys" bigint[],
    "batch" INT
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'citus_reencrypt_shard_wrapper';
CREATE OR REPLACE FUNCTION byok.citus_unopened_in_shard(
    "tbl" oid,
    "shard_id" bigint,
    "column_name" TEXT,
    "context" TEXT,
    "tenant_id" TEXT,
    "keys" bigint[]
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'citus_unopened_in_shard_wrapper';
CREATE OR REPLACE FUNCTION byok.crypto_info() RETURNS TABLE (
    "fips_build" bool,
    "fips_mode" bool,
    "module" TEXT,
    "aes_gcm" TEXT,
    "known_answer_passed" bool,
    "problem" TEXT
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'crypto_info_wrapper';
CREATE OR REPLACE FUNCTION byok.activate_dr(
    "tenant_id" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'activate_dr_wrapper';
CREATE OR REPLACE FUNCTION byok.deactivate_dr(
    "tenant_id" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'deactivate_dr_wrapper';
CREATE OR REPLACE FUNCTION byok.complete_key_wraps_step(
    "tenant_id" TEXT
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'complete_key_wraps_step_wrapper';
CREATE OR REPLACE FUNCTION byok.start_compromise_response(
    "tenant_id" TEXT,
    "new_master_key" TEXT
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'start_compromise_response_wrapper';
CREATE OR REPLACE FUNCTION byok.compromise_response_step(
    "tenant_id" TEXT,
    "job_id" bigint DEFAULT NULL
) RETURNS TEXT
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'compromise_response_step_wrapper';
CREATE OR REPLACE FUNCTION byok.complete_key_wraps_finish(
    "tenant_id" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'complete_key_wraps_finish_wrapper';
CREATE OR REPLACE FUNCTION byok.approve_operation(
    "id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'approve_operation_wrapper';
CREATE OR REPLACE FUNCTION byok.audit_mac(
    "previous" bytea,
    "row_text" bytea
) RETURNS bytea
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'audit_mac_wrapper';
CREATE OR REPLACE FUNCTION byok.backend_cache_stats() RETURNS TABLE (
    "cached_keys" bigint,
    "hits" bigint,
    "misses" bigint,
    "expirations" bigint,
    "evictions" bigint,
    "invalidations" bigint
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'backend_cache_stats_wrapper';
CREATE OR REPLACE FUNCTION byok.broker_status() RETURNS TABLE (
    "broker_pid" INT,
    "generation" bigint,
    "busy_slots" INT,
    "total_slots" INT,
    "requests_served" bigint,
    "audit_queued" INT,
    "audit_dropped" bigint,
    "shared_cache_entries" bigint,
    "key_usage_unattributed" bigint,
    "watched_master_keys" bigint,
    "key_epoch" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'broker_status_wrapper';
CREATE OR REPLACE FUNCTION byok.cancel_job(
    "job_id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'cancel_job_wrapper';
CREATE OR REPLACE FUNCTION byok.cancel_operation(
    "id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'cancel_operation_wrapper';
CREATE OR REPLACE FUNCTION byok.configure_tenant(
    "config" jsonb
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'configure_tenant_wrapper';
CREATE OR REPLACE FUNCTION byok.data_key_references(
    "dek_id" bigint
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'data_key_references_wrapper';
CREATE OR REPLACE FUNCTION byok.destroy_data_key(
    "dek_id" bigint,
    "confirm" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'destroy_data_key_wrapper';
CREATE OR REPLACE FUNCTION byok.destroy_tenant_keys(
    "tenant_id" TEXT,
    "confirm" TEXT
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'destroy_tenant_keys_wrapper';
CREATE OR REPLACE FUNCTION byok.flush_cache(
    "tenant_id" TEXT DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'flush_cache_wrapper';
CREATE OR REPLACE FUNCTION byok.grant_tenant(
    "role_name" TEXT,
    "tenant_id" TEXT
) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'grant_tenant_wrapper';
CREATE OR REPLACE FUNCTION byok.lock_audit_chain() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'lock_audit_chain_wrapper';
CREATE OR REPLACE FUNCTION byok.metrics_counters() RETURNS TABLE (
    "database_oid" oid,
    "provider" TEXT,
    "tenant_id" TEXT,
    "kms_calls" bigint,
    "kms_failures" bigint,
    "dek_generations" bigint,
    "dek_generation_p99_ms" double precision,
    "l1_hits" bigint,
    "l1_misses" bigint,
    "l2_hits" bigint,
    "l2_misses" bigint,
    "served_stale" bigint,
    "served_by_replica" bigint,
    "served_by_backup" bigint,
    "decrypts" bigint,
    "decrypt_failures" bigint,
    "encrypts" bigint,
    "key_checks" bigint,
    "kms_latency_histogram" bigint[]
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'metrics_counters_wrapper';
CREATE FUNCTION byok.key_status() RETURNS TABLE (
    "provider" TEXT,
    "tenant_id" TEXT,
    "status" TEXT,
    "reason" TEXT,
    "checked_at" timestamp with time zone,
    "last_ok_at" timestamp with time zone,
    "status_since" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'key_status_wrapper';
CREATE FUNCTION byok.alert_states() RETURNS TABLE (
    "provider" TEXT,
    "tenant_id" TEXT,
    "monitor" TEXT,
    "metric" TEXT,
    "value" double precision,
    "threshold" double precision,
    "unit" TEXT,
    "time_window" TEXT,
    "severity" TEXT,
    "state" TEXT,
    "since" timestamp with time zone,
    "evaluated_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'alert_states_wrapper';
CREATE FUNCTION byok.prometheus_metrics() RETURNS TEXT
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'prometheus_metrics_wrapper';
CREATE OR REPLACE FUNCTION byok.pause_job(
    "job_id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'pause_job_wrapper';
CREATE OR REPLACE FUNCTION byok.protect_column(
    "tbl" regclass,
    "col" TEXT,
    "tenant_col" TEXT DEFAULT NULL,
    "context" TEXT DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'protect_column_wrapper';
CREATE OR REPLACE FUNCTION byok.reencrypt_step(
    "job_id" bigint,
    "batch" INT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'reencrypt_step_wrapper';
CREATE OR REPLACE FUNCTION byok.request_operation(
    "op" TEXT,
    "tenant_id" TEXT,
    "args" jsonb DEFAULT '{}'
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'request_operation_wrapper';
CREATE OR REPLACE FUNCTION byok.resume_job(
    "job_id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'resume_job_wrapper';
CREATE OR REPLACE FUNCTION byok.revoke_tenant(
    "role_name" TEXT,
    "tenant_id" TEXT
) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'revoke_tenant_wrapper';
CREATE OR REPLACE FUNCTION byok.rotate_data_key(
    "tenant_id" TEXT
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'rotate_data_key_wrapper';
CREATE FUNCTION byok.schedule_master_key_rotation(
    "notice" jsonb
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'schedule_master_key_rotation_wrapper';
CREATE FUNCTION byok.cancel_scheduled_rotation(
    "tenant_id" TEXT,
    "rotation_id" bigint
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'cancel_scheduled_rotation_wrapper';
CREATE FUNCTION byok.retire_previous_master_key(
    "tenant_id" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'retire_previous_master_key_wrapper';
CREATE OR REPLACE FUNCTION byok.rotate_master_key_finish(
    "tenant_id" TEXT,
    "new_key_id" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'rotate_master_key_finish_wrapper';
CREATE OR REPLACE FUNCTION byok.rotate_master_key_step(
    "tenant_id" TEXT,
    "new_key_id" TEXT,
    "grace_period" interval
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'rotate_master_key_step_wrapper';
CREATE OR REPLACE FUNCTION byok.segregation_policy() RETURNS TABLE (
    "environment" TEXT,
    "key_prefix" TEXT,
    "approval_required" bool
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'segregation_policy_wrapper';
CREATE OR REPLACE FUNCTION byok.set_data_key_state(
    "dek_id" bigint,
    "state" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_data_key_state_wrapper';
CREATE OR REPLACE FUNCTION byok.start_reencrypt(
    "tenant_id" TEXT DEFAULT NULL,
    "tbl" regclass DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'start_reencrypt_wrapper';
CREATE OR REPLACE FUNCTION byok.tenant_visible(
    "tenant_id" TEXT
) RETURNS bool
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'tenant_visible_wrapper';
CREATE OR REPLACE FUNCTION byok.validate_tenant(
    "tenant_id" TEXT
) RETURNS TABLE (
    "check_name" TEXT,
    "ok" bool,
    "detail" TEXT
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'validate_tenant_wrapper';
CREATE OR REPLACE FUNCTION byok.wait_job(
    "job_id" bigint,
    "timeout" interval DEFAULT '1 hour'
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'wait_job_wrapper';

-- 0.1.0 commented these (then SQL functions); 0.2.0's library functions carry no comment.
COMMENT ON FUNCTION byok.approve_operation(bigint) IS NULL;
COMMENT ON FUNCTION byok.request_operation(text, text, jsonb) IS NULL;
COMMENT ON FUNCTION byok.start_reencrypt(text, regclass) IS NULL;
COMMENT ON FUNCTION byok.wait_job(bigint, interval) IS NULL;

-- keys.sql
CREATE OR REPLACE FUNCTION byok.invalidate_key_caches() RETURNS trigger
    AS 'MODULE_PATHNAME', 'byok_invalidate_key_caches' LANGUAGE C;
CREATE OR REPLACE VIEW byok.tenants WITH (security_invoker = true) AS
    SELECT tenant_id, customer, provider, master_key_id,
           previous_master_key_id, previous_master_key_retires_at, provider_options,
           rotation_enabled, rotation_interval_days,
           cache_ttl_seconds, cache_max_entries, cache_grace_period_seconds,
           audit_log_all_operations, audit_alert_on_failures,
           created_at, updated_at,
           backup_provider, backup_master_key_id, backup_provider_options,
           dr_active, dr_activated_at
      FROM byok.tenant_config;
COMMENT ON VIEW byok.tenants IS 'Tenants and their settings (no key material)';
CREATE OR REPLACE VIEW byok.data_keys WITH (security_invoker = true) AS
    SELECT dek_id, tenant_id, provider, cmk_id, cmk_version, state,
           created_at, rotated_at, destroyed_at, encryptions,
           has_primary_wrap, backup_provider, backup_cmk_id, backup_cmk_version, has_backup_wrap,
           purpose
      FROM byok.wrapped_data_keys;
COMMENT ON VIEW byok.data_keys IS 'Data keys, their states and how many values each sealed (no key material)';
CREATE OR REPLACE PROCEDURE byok.rotate_master_key(tenant_id text, new_key_id text,
                                        grace_period interval DEFAULT '24 hours')
LANGUAGE plpgsql AS $proc$
DECLARE
    rewrapped bigint;
    total bigint := 0;
BEGIN
    LOOP
        rewrapped := byok.rotate_master_key_step(tenant_id, new_key_id, grace_period);
        total := total OPERATOR(pg_catalog.+) rewrapped;
        COMMIT;
        EXIT WHEN rewrapped OPERATOR(pg_catalog.=) 0;
    END LOOP;
    PERFORM byok.rotate_master_key_finish(tenant_id, new_key_id);
    RAISE NOTICE 'tenant %: % data key(s) rewrapped under master key %', tenant_id, total, new_key_id;
END
$proc$;
COMMENT ON PROCEDURE byok.rotate_master_key(text, text, interval) IS
    'Moves a tenant to a new master key (or its newest version), rewrapping every data key; resumable';
CREATE VIEW byok.metrics AS
SELECT d.datname AS database, m.provider, m.tenant_id,
       CASE WHEN m.kms_calls > 0
            THEN (m.kms_calls - m.kms_failures)::float8 / m.kms_calls END AS kms_api_success_rate,
       m.dek_generation_p99_ms,
       CASE WHEN m.l1_hits + m.l1_misses > 0
            THEN (m.l1_hits + m.l2_hits)::float8 / (m.l1_hits + m.l1_misses) END AS key_cache_hit_ratio,
       CASE WHEN m.decrypts > 0
            THEN m.decrypt_failures::float8 / m.decrypts END AS decrypt_failures_rate,
       m.kms_calls, m.kms_failures, m.dek_generations,
       m.l1_hits, m.l1_misses, m.l2_hits, m.l2_misses, m.served_stale, m.served_by_replica,
       m.served_by_backup, m.decrypts, m.decrypt_failures, m.encrypts, m.key_checks, m.kms_latency_histogram
  FROM byok.metrics_counters() m
  LEFT JOIN pg_catalog.pg_database d ON d.oid = m.database_oid;
COMMENT ON VIEW byok.metrics IS
    'Per provider and tenant: kms_api_success_rate, dek_generation_p99_ms, key_cache_hit_ratio, decrypt_failures_rate, and their counters';

-- Each tenant's master key as the key broker's revocation checks last found it
-- (status unchecked: no key of the tenant is cached, so there is nothing to check).
CREATE VIEW byok.tenant_key_status WITH (security_invoker = true) AS
SELECT t.tenant_id, t.provider, t.master_key_id,
       coalesce(s.status, 'unchecked') AS status, s.reason,
       s.checked_at AS last_checked_at, s.last_ok_at, s.status_since
  FROM byok.tenant_config t
  LEFT JOIN byok.key_status() s ON s.tenant_id = t.tenant_id AND s.provider = t.provider;
COMMENT ON VIEW byok.tenant_key_status IS
    'Per tenant: what the key broker''s last revocation check of its master key found (ok, revoked, unreachable), and when';

-- The guide's monitoring rules, evaluated by the key broker every 10 seconds
-- over each monitor's window (the tenant's monitoring_rules, or the guide's),
-- for the tenants the reader may see.
CREATE VIEW byok.alerts WITH (security_invoker = true) AS
SELECT a.tenant_id, a.provider, a.monitor, a.metric, a.value, a.threshold, a.unit,
       a.time_window, a.severity, a.state, a.since, a.evaluated_at
  FROM byok.alert_states() a
 WHERE EXISTS (SELECT 1 FROM byok.tenant_config t
                WHERE t.tenant_id OPERATOR(pg_catalog.=) a.tenant_id
                  AND t.provider OPERATOR(pg_catalog.=) a.provider);
COMMENT ON VIEW byok.alerts IS
    'Per tenant and monitor of the guide''s monitoring_rules: the value over its window, threshold, severity, state (ok, firing, disabled) and since when';

-- access.sql
CREATE OR REPLACE FUNCTION byok.may_use_tenant(p_role oid, p_tenant text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) p_role AND rolsuper)
        OR EXISTS (SELECT 1 FROM byok.tenant_grants g
                    WHERE g.tenant_id OPERATOR(pg_catalog.=) p_tenant
                      AND pg_catalog.pg_has_role(p_role, g.grantee::pg_catalog.oid, 'USAGE'))
$fn$;
CREATE VIEW byok.tenant_access WITH (security_invoker = true) AS
    SELECT grantee::pg_catalog.regrole AS grantee, tenant_id, granted_by, granted_at FROM byok.tenant_grants;
COMMENT ON VIEW byok.tenant_access IS 'Per-tenant grants (byok.grant_tenant): all of them for administrators, a role''s own for others';
CREATE POLICY tenant_visibility ON byok.tenant_config FOR SELECT
    USING (byok.tenant_visible(tenant_id));
CREATE POLICY tenant_visibility ON byok.wrapped_data_keys FOR SELECT
    USING (byok.tenant_visible(tenant_id));
CREATE POLICY own_grants ON byok.tenant_grants FOR SELECT
    USING (pg_catalog.pg_has_role('byok_admin', 'USAGE')
           OR pg_catalog.pg_has_role(grantee::pg_catalog.oid, 'USAGE'));

-- jobs.sql
CREATE OR REPLACE VIEW byok.protected_columns AS
SELECT relid AS table_name, column_name, tenant_column, context, registered_at,
       search_term_length, search_normalization
  FROM byok.protected_column_registry;
COMMENT ON VIEW byok.protected_columns IS 'Columns registered with byok.protect_column()';
CREATE OR REPLACE VIEW byok.jobs AS
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

-- audit.sql
COMMENT ON TABLE byok.audit_log IS 'Key-level events, append-only, chained with a keyed hash (see byok.verify_audit_chain())';
CREATE OR REPLACE FUNCTION byok.audit_row_text(a byok.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pg_catalog.convert_to(pg_catalog.concat_ws(pg_catalog.chr(31), a.id::text,
                                pg_catalog.to_char(a.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                                a.event, coalesce(a.tenant_id, pg_catalog.chr(30)), coalesce(a.dek_id::text, pg_catalog.chr(30)),
                                a.role_name::text, a.outcome, coalesce(a.reason, pg_catalog.chr(30)),
                                coalesce(a.details::text, pg_catalog.chr(30))), 'UTF8')
$fn$;
CREATE FUNCTION byok.audit_event(p_event text, p_tenant text, p_dek bigint, p_outcome text,
                                 p_reason text DEFAULT NULL, p_details jsonb DEFAULT NULL,
                                 p_role oid DEFAULT NULL, p_at timestamptz DEFAULT NULL,
                                 p_role_name name DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    row byok.audit_log;
    log_all boolean := true;
    alert boolean := true;
BEGIN
    SELECT audit_log_all_operations, audit_alert_on_failures INTO log_all, alert
      FROM byok.tenant_config WHERE tenant_id OPERATOR(pg_catalog.=) p_tenant;
    IF p_outcome OPERATOR(pg_catalog.=) 'ok' AND log_all IS FALSE AND p_event OPERATOR(pg_catalog.=) 'kms_unwrap' THEN
        RETURN NULL;
    END IF;
    -- One writer at a time extends the chain.
    PERFORM byok.lock_audit_chain();
    row.id := pg_catalog.nextval('byok.audit_log_id_seq');
    -- When it happened (queued records: the key broker's call, an aborted operation).
    row.logged_at := coalesce(p_at, pg_catalog.clock_timestamp());
    row.event := p_event;
    row.tenant_id := p_tenant;
    row.dek_id := p_dek;
    -- The acting role: its name as resolved when the event happened (queued
    -- records: the role may be gone since), else by its OID, else the login role.
    row.role_name := coalesce(p_role_name,
                              (SELECT rolname FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) p_role),
                              session_user);
    row.outcome := p_outcome;
    row.reason := p_reason;
    row.details := p_details;
    SELECT hash INTO row.prev_hash FROM byok.audit_log ORDER BY id DESC LIMIT 1;
    row.hash := byok.audit_mac(coalesce(row.prev_hash, '\x'::bytea), byok.audit_row_text(row));
    INSERT INTO byok.audit_log VALUES (row.*);
    IF p_outcome OPERATOR(pg_catalog.=) 'failed' AND alert IS NOT FALSE THEN
        RAISE WARNING 'byok: % failed for tenant %: %', p_event, coalesce(p_tenant, '-'), coalesce(p_reason, '');
    END IF;
    -- byok_alerts: failures (unless the tenant turned alerts off), and the
    -- events of the guide's rotation workflow and of its master key's health,
    -- which the customer is told about whatever the outcome.
    IF (p_outcome OPERATOR(pg_catalog.=) 'failed' AND alert IS NOT FALSE)
       OR p_event OPERATOR(pg_catalog.=) ANY (ARRAY['master_key_revoked', 'master_key_restored',
              'master_key_unreachable', 'master_key_reachable', 'rotate_master_key_start',
              'rotate_master_key', 'master_key_retired', 'rotate_data_key',
              'schedule_master_key_rotation', 'cancel_scheduled_rotation',
              'alert_firing', 'alert_resolved', 'activate_dr', 'deactivate_dr',
              'compromise_response_step', 'compromise_response']) THEN
        -- Any role that may connect can LISTEN: by default the payload names
        -- the audit row only (byok_admin reads it in byok.audit_log); with
        -- byok.alert_details (postgresql.conf) it carries the tenant, key and reason.
        IF pg_catalog.current_setting('byok.alert_details', true) OPERATOR(pg_catalog.=) 'on' THEN
            PERFORM pg_catalog.pg_notify('byok_alerts', pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at, 'tenant_id', p_tenant, 'dek_id', p_dek,
                              'reason', p_reason, 'details', p_details)::text);
        ELSE
            PERFORM pg_catalog.pg_notify('byok_alerts', CASE WHEN p_event OPERATOR(pg_catalog.~~) 'alert\_%'
                -- (a monitor's change also names its metric, severity and state)
                THEN pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at,
                              'metric', p_details OPERATOR(pg_catalog.->>) 'metric',
                              'severity', p_details OPERATOR(pg_catalog.->>) 'severity',
                              'state', p_details OPERATOR(pg_catalog.->>) 'state')
                ELSE pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at) END::text);
        END IF;
    END IF;
    RETURN row.id;
END
$fn$;
COMMENT ON FUNCTION byok.audit_event(text, text, bigint, text, text, jsonb, oid, timestamptz, name) IS
    'Appends an event to the audit trail (and alerts on failures, per the tenant''s audit settings)';
CREATE OR REPLACE FUNCTION byok.audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION 'byok.audit_log is append-only' USING ERRCODE = '42501',
        HINT = 'audit rows are never changed or removed';
END
$fn$;
CREATE FUNCTION byok.audit_chain_head(OUT id bigint, OUT hash bytea, OUT logged_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT a.id, a.hash, a.logged_at FROM byok.audit_log a ORDER BY a.id DESC LIMIT 1
$fn$;
COMMENT ON FUNCTION byok.audit_chain_head() IS
    'The chain''s newest row (id, hash): anchor it outside the database and pass it to verify_audit_chain';
CREATE FUNCTION byok.verify_audit_chain(anchor_id bigint DEFAULT NULL, anchor_hash bytea DEFAULT NULL)
RETURNS TABLE (id bigint, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    a byok.audit_log;
    previous bytea;
    anchored bytea;
BEGIN
    FOR a IN SELECT * FROM byok.audit_log ORDER BY audit_log.id LOOP
        IF a.prev_hash IS DISTINCT FROM previous THEN
            id := a.id; problem := 'prev_hash does not match the hash of the row before it (a row was removed or reordered)';
            RETURN NEXT;
        ELSIF a.hash OPERATOR(pg_catalog.<>) byok.audit_mac(coalesce(a.prev_hash, '\x'::bytea), byok.audit_row_text(a)) THEN
            id := a.id; problem := 'hash does not match the row''s contents (the row was changed, or hashed without the chain key)';
            RETURN NEXT;
        END IF;
        IF a.id OPERATOR(pg_catalog.=) anchor_id THEN
            anchored := a.hash;
        END IF;
        previous := a.hash;
    END LOOP;
    IF anchor_id IS NOT NULL AND anchored IS NULL THEN
        id := anchor_id; problem := 'the anchored row is missing (rows were removed from the end of the trail)';
        RETURN NEXT;
    ELSIF anchor_id IS NOT NULL AND anchored IS DISTINCT FROM anchor_hash THEN
        id := anchor_id; problem := 'the anchored row''s hash differs from the anchor (the trail was rewritten)';
        RETURN NEXT;
    END IF;
END
$fn$;
COMMENT ON FUNCTION byok.verify_audit_chain(bigint, bytea) IS
    'Checks the audit trail''s keyed hash chain (and an external anchor); returns each row where it breaks';

-- dual_control.sql
CREATE OR REPLACE VIEW byok.pending_operations AS
SELECT request_id, operation, tenant_id, args, requested_by, requested_at, expires_at,
       CASE WHEN state = 'pending' AND expires_at <= now() THEN 'expired' ELSE state END AS state,
       approved_by, approved_at, result
  FROM byok.operation_requests;
COMMENT ON VIEW byok.pending_operations IS 'Dual-control requests and their state (pending, done, cancelled, expired)';

-- dr.sql (new in 0.2.0)
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

-- search.sql
-- Searchable encryption: blind index terms (see README, "Searchable encryption").
--
-- A searchable value carries, in its authenticated header, a term: HMAC-SHA-256
-- under its tenant's index key of the tenant, the context and the normalized
-- plaintext, truncated to the column's term length. byok.term() reads it
-- without any key, so an expression index can hold it; byok.search_terms()
-- computes the probes (once per query as an index condition) (under the active index key and, while a rotation's job
-- rewrites terms, the previous one); byok.matches() is both in one call, and
-- confirms each candidate by decrypting it, so a truncated term's false
-- positives never reach the result.

-- The probes and the confirming check: C functions reading their arguments
-- in place (the probe is computed once per query, the check once per candidate).
CREATE FUNCTION byok.search_term(tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_search_term' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.search_term(text, text, text) IS
    'The probe for a value under the tenant''s active index key: WHERE byok.term(col) = byok.search_term(...)';
CREATE FUNCTION byok.search_terms(tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS bytea[]
    AS 'MODULE_PATHNAME', 'byok_search_terms' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.search_terms(text, text, text) IS
    'The probes for a value under every live index key of the tenant (two while an index-key rotation''s job runs)';
CREATE FUNCTION byok.confirm_match(value byok.encrypted, tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS boolean
    AS 'MODULE_PATHNAME', 'byok_confirm_match' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 1000;
COMMENT ON FUNCTION byok.confirm_match(byok.encrypted, text, text, text) IS
    'Whether a candidate found by its term is the tenant''s and decrypts to plaintext (after the column''s normalization)';

-- Sealing with a term: the same C function as the three-argument forms, which
-- reads the fourth argument when there is one.
CREATE FUNCTION byok.encrypt(tenant_id text, plaintext bytea, context text, searchable boolean)
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt(text, bytea, text, boolean) IS
    'Seals bytes for a tenant; with searchable => true the value also carries its blind index term (byok.term)';
CREATE FUNCTION byok.encrypt_text(tenant_id text, plaintext text, context text, searchable boolean)
    RETURNS byok.encrypted
    AS 'MODULE_PATHNAME', 'byok_encrypt' LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.encrypt_text(text, text, text, boolean) IS
    'Seals text for a tenant; with searchable => true the value also carries its blind index term (byok.term)';

-- Metadata of a sealed value, readable without any key: what an index holds.
CREATE FUNCTION byok.term(value byok.encrypted) RETURNS bytea
    AS 'MODULE_PATHNAME', 'byok_value_term' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.term(byok.encrypted) IS
    'A searchable value''s blind index term, prefixed by its index key id (NULL for a value sealed without one): CREATE INDEX ON t (byok.term(col))';
CREATE FUNCTION byok.index_key_id(value byok.encrypted) RETURNS bigint
    AS 'MODULE_PATHNAME', 'byok_value_index_key_id' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION byok.index_key_id(byok.encrypted) IS
    'The id of the index key a searchable value''s term was computed under (NULL for a value without a term)';

-- The one-call lookup. A SQL function the planner inlines, so that
--   WHERE byok.matches(email, 'acme', 'alice@example.com', 'users.email')
-- becomes an index condition on byok.term(email) plus the confirming decrypt.
-- SECURITY INVOKER and without SET (either would stop the inlining): it runs
-- nothing but the schema-qualified functions below, with the caller's rights.
CREATE FUNCTION byok.matches(value byok.encrypted, tenant_id text, plaintext text, context text DEFAULT '')
    RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT byok.term($1) OPERATOR(pg_catalog.=) ANY (byok.search_terms($2, $3, $4))
             AND byok.confirm_match($1, $2, $3, $4) $$;
COMMENT ON FUNCTION byok.matches(byok.encrypted, text, text, text) IS
    'Whether a searchable value equals plaintext (after the column''s normalization), through an index on byok.term(value) when there is one';

-- citus.sql
-- Scale-out on Citus (README, "Citus"). Run once by a superuser on the
-- coordinator, byok.citus_distribute_catalog() makes the key catalog a set of
-- Citus reference tables: every node holds a copy, and every change made on
-- the coordinator reaches every node in the same distributed transaction
-- (two-phase commit), where the catalog triggers drop that node's ready keys.
-- Nodes added later get the copy from Citus itself. Wrapped keys travel as
-- they are stored: each node's key broker unwraps them from the key manager.
CREATE FUNCTION byok.citus_distribute_catalog() RETURNS SETOF regclass
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t pg_catalog.regclass;
    distributed pg_catalog.regclass[] := '{}';
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = '0A000', HINT = 'CREATE EXTENSION citus, on every node, first';
    END IF;
    IF (SELECT groupid FROM pg_catalog.pg_dist_local_group) OPERATOR(pg_catalog.<>) 0 THEN
        RAISE EXCEPTION 'byok.citus_distribute_catalog() runs on the coordinator'
            USING ERRCODE = '0A000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node WHERE groupid OPERATOR(pg_catalog.=) 0) THEN
        RAISE EXCEPTION 'the coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'the coordinator keeps a copy of the key catalog too, which its own backends and key broker read',
                  HINT = 'SELECT citus_set_coordinator_host(''<host>'', <port>) first';
    END IF;
    -- The catalog's statement triggers run on each node's copy (byok.invalidate_key_caches).
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Every table of the foreign-key graph becomes a reference table here, in
    -- this transaction; none may be turned into a Citus local table meanwhile.
    PERFORM pg_catalog.set_config('citus.enable_local_reference_table_foreign_keys', 'off', true);
    FOREACH t IN ARRAY ARRAY['byok.tenant_config', 'byok.wrapped_data_keys', 'byok.tenant_grants',
                             'byok.retired_master_keys', 'byok.scheduled_rotations',
                             'byok.compromise_responses']::pg_catalog.regclass[] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition
                        WHERE logicalrelid OPERATOR(pg_catalog.=) t) THEN
            PERFORM pg_catalog.create_reference_table(t);
            distributed := distributed OPERATOR(pg_catalog.||) t;
            RETURN NEXT t;
        END IF;
    END LOOP;
    -- The rows now live in the reference tables' shards. The coordinator's own
    -- tables are emptied, referencing tables first: wrapped keys must not
    -- linger where a later destruction would not reach them.
    FOR i IN REVERSE pg_catalog.cardinality(distributed)..1 LOOP
        PERFORM pg_catalog.truncate_local_data_after_distributing_table(distributed[i]);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_distribute_catalog() IS
    'On a Citus coordinator: make the key catalog reference tables, kept on every node; returns the tables it distributed';

-- Each node keeps its own metrics and audit trail (its own key broker, its own
-- backends). From the coordinator, these read every node's, through Citus's
-- run_command_on_all_nodes: each node answers with the caller's own rights; a
-- node that does not answer is an error naming it (58000), not a gap.
CREATE FUNCTION byok.citus_metrics()
RETURNS TABLE (nodename text, nodeport integer, tenant_id text, provider text,
               kms_calls bigint, kms_failures bigint, dek_generations bigint,
               decrypts bigint, decrypt_failures bigint, encrypts bigint,
               key_cache_hit_ratio double precision)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    answer record;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database' USING ERRCODE = '0A000';
    END IF;
    FOR answer IN EXECUTE 'SELECT r.nodeid, r.success, r.result FROM pg_catalog.run_command_on_all_nodes($1) r ORDER BY r.nodeid'
        USING 'SELECT coalesce(pg_catalog.json_agg(m), ''[]'') FROM byok.metrics m
                WHERE m.database OPERATOR(pg_catalog.=) pg_catalog.current_database()'
    LOOP
        IF NOT answer.success THEN
            RAISE EXCEPTION 'Citus node % did not answer: %', answer.nodeid, answer.result USING ERRCODE = '58000';
        END IF;
        RETURN QUERY EXECUTE
            'SELECT n.nodename::pg_catalog.text, n.nodeport, m.tenant_id, m.provider, m.kms_calls,
                    m.kms_failures, m.dek_generations, m.decrypts, m.decrypt_failures, m.encrypts,
                    m.key_cache_hit_ratio
               FROM pg_catalog.pg_dist_node n,
                    pg_catalog.json_populate_recordset(NULL::byok.metrics, $2::pg_catalog.json) m
              WHERE n.nodeid OPERATOR(pg_catalog.=) $1
              ORDER BY m.tenant_id, m.provider'
            USING answer.nodeid, answer.result;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_metrics() IS
    'On a Citus coordinator: byok.metrics of every node (per node, tenant and provider)';

CREATE FUNCTION byok.citus_audit_log(since timestamptz DEFAULT pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 day')
RETURNS TABLE (nodename text, nodeport integer, id bigint, logged_at timestamptz, event text,
               tenant_id text, dek_id bigint, role_name name, outcome text, reason text, details jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    answer record;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database' USING ERRCODE = '0A000';
    END IF;
    FOR answer IN EXECUTE 'SELECT r.nodeid, r.success, r.result FROM pg_catalog.run_command_on_all_nodes($1) r ORDER BY r.nodeid'
        USING pg_catalog.format('SELECT coalesce(pg_catalog.json_agg(a ORDER BY a.id), ''[]'')
                                   FROM byok.audit_log a WHERE a.logged_at OPERATOR(pg_catalog.>=) %L', since)
    LOOP
        IF NOT answer.success THEN
            RAISE EXCEPTION 'Citus node % did not answer: %', answer.nodeid, answer.result USING ERRCODE = '58000';
        END IF;
        RETURN QUERY EXECUTE
            'SELECT n.nodename::pg_catalog.text, n.nodeport, a.id, a.logged_at, a.event, a.tenant_id,
                    a.dek_id, a.role_name, a.outcome, a.reason, a.details
               FROM pg_catalog.pg_dist_node n,
                    pg_catalog.json_populate_recordset(NULL::byok.audit_log, $2::pg_catalog.json) a
              WHERE n.nodeid OPERATOR(pg_catalog.=) $1
              ORDER BY a.id'
            USING answer.nodeid, answer.result;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_audit_log(timestamptz) IS
    'On a Citus coordinator: the audit trail of every node since a time (each node read with the caller''s rights)';

-- transparent.sql (0.2.0):
-- Transparent mode: a view over a table with registered encrypted columns
-- (byok.protect_column) that shows them decrypted, and INSTEAD OF triggers
-- that seal what is written through it, so an ORM reads and writes plaintext
-- while the table stores byok.encrypted.
--
-- Nothing here runs with rights the caller does not have: the function is
-- SECURITY INVOKER, the view is security_invoker (the base table's privileges
-- and row-level security apply to whoever reads), and the trigger function is
-- SECURITY INVOKER (writes run as the writer, under its per-tenant grants).
-- The view and the trigger function are owned by the table's owner, whose
-- code (triggers, defaults, policies) the table's users already run.
-- The tenant column is the owner's explicit choice, checked against the
-- registry (which roles with UPDATE on a column may write), never taken from it.
-- pg_dump dumps the table's ciphertext and restores it with COPY into the
-- table, never through the view: nothing is sealed twice on restore.
CREATE FUNCTION byok.make_transparent(tbl regclass, tenant_column name DEFAULT NULL, view_name name DEFAULT NULL)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $make_transparent$
DECLARE
    rel record;
    view_ident text;
    fn_ident text;
    v_name name;
    pk_cols text[];
    cols text[] := '{}';
    select_list text[] := '{}';
    insert_values text[] := '{}';
    update_sets text[] := '{}';
    returning_sets text[] := '{}';
    returning_cols text[] := '{}';
    tenant_checks text := '';
    pk_match text;
    att record;
    reg record;
    tenant_expr_new text;
    tenant_expr_old text;
    n_encrypted int := 0;
    existing regclass;
    kept_grants text[] := '{}';
    g text;
    body text;
    overriding text := '';
    contexts jsonb := '{}';
    pinned jsonb;
    marker text;
BEGIN
    SELECT c.oid, c.relname, n.nspname, c.relkind, c.relowner INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'byok.make_transparent: % is not a table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_catalog.pg_has_role(CURRENT_USER, rel.relowner, 'MEMBER') THEN
        RAISE EXCEPTION 'byok.make_transparent: only the owner of table % may give it a transparent view', tbl
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'the view and its trigger function are owned by the table''s owner';
    END IF;
    -- A parent's primary key is not unique across its inheritance children.
    IF rel.relkind OPERATOR(pg_catalog.=) 'r' AND EXISTS (
           SELECT FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) tbl) THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has inheritance children', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'give each child its own view (a partitioned table is supported)';
    END IF;
    IF tenant_column IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_catalog.pg_attribute
            WHERE attrelid OPERATOR(pg_catalog.=) tbl AND attname OPERATOR(pg_catalog.=) tenant_column
              AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no column %', tbl, pg_catalog.quote_ident(tenant_column)
            USING ERRCODE = 'undefined_column';
    END IF;
    -- The primary key identifies the row an UPDATE or DELETE through the view means.
    SELECT pg_catalog.array_agg(pg_catalog.quote_ident(a.attname::text) ORDER BY k.ord) INTO pk_cols
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
     WHERE i.indrelid OPERATOR(pg_catalog.=) tbl AND i.indisprimary;
    IF pk_cols IS NULL THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no primary key', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'updates and deletes through the view find their row by its primary key';
    END IF;

    v_name := coalesce(view_name, (rel.relname || '_decrypted')::name);
    view_ident := pg_catalog.format('%I.%I', rel.nspname, v_name);
    fn_ident := pg_catalog.format('%I.%I', rel.nspname, v_name || '_write');
    IF tenant_column IS NOT NULL THEN
        tenant_expr_new := pg_catalog.format('NEW.%I', tenant_column);
        tenant_expr_old := pg_catalog.format('OLD.%I', tenant_column);
    ELSE
        tenant_expr_new := 'NULLIF(pg_catalog.current_setting(''byok.tenant'', true), '''')';
        tenant_expr_old := tenant_expr_new;
    END IF;

    FOR att IN
        SELECT a.attnum, a.attname, a.atttypid, a.attidentity
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.attgenerated OPERATOR(pg_catalog.=) ''
         ORDER BY a.attnum
    LOOP
        SELECT r.tenant_column, r.context INTO reg FROM byok.protected_columns r
         WHERE r.table_name OPERATOR(pg_catalog.=) tbl AND r.column_name OPERATOR(pg_catalog.=) att.attname::text;
        cols := cols || pg_catalog.quote_ident(att.attname::text);
        IF FOUND THEN
            IF att.atttypid OPERATOR(pg_catalog.<>) 'byok.encrypted'::pg_catalog.regtype THEN
                RAISE EXCEPTION 'byok.make_transparent: registered column %.% is not byok.encrypted', tbl, att.attname
                    USING ERRCODE = 'datatype_mismatch';
            END IF;
            -- Re-encryption jobs read the registry's tenant column: the view must agree.
            IF reg.tenant_column IS DISTINCT FROM tenant_column THEN
                RAISE EXCEPTION 'byok.make_transparent: column %.% is registered with tenant column %, not %',
                        tbl, pg_catalog.quote_ident(att.attname), coalesce(pg_catalog.quote_ident(reg.tenant_column), '(none)'),
                        coalesce(pg_catalog.quote_ident(tenant_column), '(none)')
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          HINT = 'register the column with the tenant column you name here (byok.protect_column), or name the registered one';
            END IF;
            n_encrypted := n_encrypted + 1;
            contexts := contexts || pg_catalog.jsonb_build_object(att.attname::text, reg.context);
            select_list := select_list || pg_catalog.format('byok.decrypt_text(t.%I, %L) AS %I',
                                                            att.attname, reg.context, att.attname);
            insert_values := insert_values || pg_catalog.format('byok.encrypt_text(%s, NEW.%I, %L)',
                                                                tenant_expr_new, att.attname, reg.context);
            -- Unchanged plaintext under an unchanged tenant keeps its ciphertext.
            update_sets := update_sets || pg_catalog.format(
                '%1$I = CASE WHEN NEW.%1$I IS NOT DISTINCT FROM OLD.%1$I AND %2$s IS NOT DISTINCT FROM %3$s THEN t.%1$I ELSE byok.encrypt_text(%2$s, NEW.%1$I, %4$L) END',
                att.attname, tenant_expr_new, tenant_expr_old, reg.context);
            -- A STRICT byok.encrypt_text would turn a value with no tenant into NULL: refuse instead.
            tenant_checks := tenant_checks || pg_catalog.format(
                E'    IF NEW.%I IS NOT NULL AND %s IS NULL THEN\n' OPERATOR(pg_catalog.||)
                E'        RAISE EXCEPTION USING MESSAGE = %L, ERRCODE = ''null_value_not_allowed'', HINT = %L;\n' OPERATOR(pg_catalog.||)
                E'    END IF;\n',
                att.attname, tenant_expr_new,
                pg_catalog.format('no tenant to seal %I.%I under', rel.relname, att.attname),
                CASE WHEN tenant_column IS NOT NULL
                     THEN pg_catalog.format('set the row''s %s', tenant_column)
                     ELSE 'SET byok.tenant first' END);
        ELSE
            select_list := select_list || pg_catalog.format('t.%I', att.attname);
            insert_values := insert_values || pg_catalog.format('NEW.%I', att.attname);
            IF att.attidentity OPERATOR(pg_catalog.=) 'a' THEN
                -- GENERATED ALWAYS: the view's default draws the value, the insert keeps it.
                overriding := ' OVERRIDING SYSTEM VALUE';
            ELSE
                -- A column the writer did not change keeps what is stored (a concurrent change included).
                update_sets := update_sets || pg_catalog.format(
                    '%1$I = CASE WHEN NEW.%1$I IS NOT DISTINCT FROM OLD.%1$I THEN t.%1$I ELSE NEW.%1$I END', att.attname);
            END IF;
            -- What the table made of the row (defaults, other triggers) comes back to RETURNING.
            returning_cols := returning_cols || pg_catalog.format('t.%I', att.attname);
            returning_sets := returning_sets || pg_catalog.format('NEW.%I', att.attname);
        END IF;
    END LOOP;
    IF n_encrypted OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no registered encrypted column', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'register each one first: SELECT byok.protect_column(table, column, tenant_column, context)';
    END IF;
    IF pg_catalog.cardinality(returning_cols) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'byok.make_transparent: every column of % is encrypted', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'the primary key must be a plain column';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('t.%1$s = OLD.%1$s', c), ' AND ') INTO pk_match
      FROM pg_catalog.unnest(pk_cols) c;

    -- Regenerating (after ALTER TABLE): only the view this function made of
    -- this table is replaced: owned by the table's owner, reading this table,
    -- written through this function's trigger. Its SELECT, INSERT, UPDATE and
    -- DELETE grants made by the owner are given again; nothing else is.
    existing := pg_catalog.to_regclass(view_ident);
    IF existing IS NOT NULL THEN
        IF NOT EXISTS (
               SELECT FROM pg_catalog.pg_class v
                WHERE v.oid OPERATOR(pg_catalog.=) existing AND v.relkind OPERATOR(pg_catalog.=) 'v'
                  AND v.relowner OPERATOR(pg_catalog.=) rel.relowner
                  AND EXISTS (SELECT FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d
                                ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                               AND d.objid OPERATOR(pg_catalog.=) r.oid
                               WHERE r.ev_class OPERATOR(pg_catalog.=) existing
                                 AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                 AND d.refobjid OPERATOR(pg_catalog.=) tbl)
                  AND EXISTS (SELECT FROM pg_catalog.pg_trigger tg
                               WHERE tg.tgrelid OPERATOR(pg_catalog.=) existing
                                 AND tg.tgname OPERATOR(pg_catalog.=) 'byok_write'
                                 AND tg.tgfoid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(fn_ident OPERATOR(pg_catalog.||) '()'))) THEN
            RAISE EXCEPTION 'byok.make_transparent: % exists and is not byok_pg''s transparent view of %', view_ident, tbl
                USING ERRCODE = 'duplicate_table', HINT = 'pass another view_name, or drop it';
        END IF;
        -- The contexts the view was made with stay (the registry can be
        -- written by roles with UPDATE on a column): a column whose registered
        -- context changed since is refused until the owner drops the view.
        marker := pg_catalog.obj_description(existing, 'pg_class');
        pinned := CASE WHEN marker LIKE '%; contexts: {%'
                       THEN pg_catalog.substr(marker, pg_catalog.strpos(marker, '; contexts: ') + 12)::jsonb END;
        IF pinned IS NULL OR EXISTS (
               SELECT FROM pg_catalog.jsonb_each_text(pinned) p
                WHERE contexts ? p.key AND (contexts OPERATOR(pg_catalog.->>) p.key) IS DISTINCT FROM p.value) THEN
            RAISE EXCEPTION 'byok.make_transparent: a column of % is registered with another context than % was made with', tbl, view_ident
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = pg_catalog.format('made with %s, registered now %s', coalesce(pinned::text, '(unknown)'), contexts::text),
                      HINT = 'check byok.protected_columns; to accept the registration, drop the view (and its grants) and make it again';
        END IF;
        SELECT pg_catalog.array_agg(pg_catalog.format('GRANT %s ON %s TO %s', a.privilege_type, view_ident,
                   CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                        ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END))
          INTO kept_grants
          FROM pg_catalog.pg_class c, LATERAL pg_catalog.aclexplode(c.relacl) a
         WHERE c.oid OPERATOR(pg_catalog.=) existing AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
           AND a.grantor OPERATOR(pg_catalog.=) c.relowner
           AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE');
        EXECUTE pg_catalog.format('DROP VIEW %s', view_ident);
        EXECUTE pg_catalog.format('DROP FUNCTION %s()', fn_ident);
    END IF;

    EXECUTE pg_catalog.format('CREATE VIEW %s WITH (security_invoker = true) AS SELECT %s FROM %s t',
                              view_ident, pg_catalog.array_to_string(select_list, ', '), tbl);
    -- The table's defaults (and identity sequences) apply to rows inserted through the view.
    FOR att IN
        SELECT a.attname,
               coalesce(pg_catalog.pg_get_expr(d.adbin, d.adrelid),
                        CASE WHEN a.attidentity OPERATOR(pg_catalog.<>) '' THEN
                             pg_catalog.format('pg_catalog.nextval(%L::pg_catalog.regclass)',
                                 pg_catalog.pg_get_serial_sequence(tbl::text, a.attname::text)) END) AS default_expr
          FROM pg_catalog.pg_attribute a
          LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum
         WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.attgenerated OPERATOR(pg_catalog.=) ''
    LOOP
        IF att.default_expr IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', view_ident, att.attname, att.default_expr);
        END IF;
    END LOOP;

    -- The body is built apart and passed as one quoted literal: a context (set
    -- by byok_admin) holds any text, and must not be able to end a dollar quote.
    -- The table is written by name (static SQL); each call first checks that the
    -- name still means the table the view reads, so after a rename another
    -- role's table of the old name never receives the plaintext.
    body := pg_catalog.format($body$
DECLARE
    base pg_catalog.regclass;
    n pg_catalog.int8;
BEGIN
    -- The table the view reads (by OID), locked before its name is checked:
    -- once locked it cannot be renamed, so the name resolves to it until commit.
    SELECT DISTINCT d.refobjid::pg_catalog.regclass INTO base
      FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d
        ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid OPERATOR(pg_catalog.=) r.oid
     WHERE r.ev_class OPERATOR(pg_catalog.=) TG_RELID
       AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refobjid OPERATOR(pg_catalog.<>) TG_RELID;
    EXECUTE pg_catalog.format('LOCK TABLE ONLY %%s IN ROW EXCLUSIVE MODE', base);
    IF pg_catalog.to_regclass(%1$L) IS DISTINCT FROM base THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = pg_catalog.format('the table behind %%s is no longer %%s', TG_RELID::pg_catalog.regclass, %1$L),
            HINT = 'the table was renamed or moved: regenerate the view with byok.make_transparent';
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        DELETE FROM %1$s t WHERE %2$s;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n OPERATOR(pg_catalog.=) 0 THEN RETURN NULL; END IF;
        IF n OPERATOR(pg_catalog.>) 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'cardinality_violation',
                MESSAGE = pg_catalog.format('a row of %%s matched %%s rows of %%s', TG_RELID::pg_catalog.regclass, n, base),
                HINT = 'the table''s primary key changed: regenerate the view with byok.make_transparent';
        END IF;
        RETURN OLD;
    END IF;
%3$s
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO %1$s AS t (%4$s)%9$s VALUES (%5$s)
        RETURNING %6$s INTO %7$s;
    ELSE
        UPDATE %1$s t SET %8$s WHERE %2$s
        RETURNING %6$s INTO %7$s;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n OPERATOR(pg_catalog.=) 0 THEN RETURN NULL; END IF;
        IF n OPERATOR(pg_catalog.>) 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'cardinality_violation',
                MESSAGE = pg_catalog.format('a row of %%s matched %%s rows of %%s', TG_RELID::pg_catalog.regclass, n, base),
                HINT = 'the table''s primary key changed: regenerate the view with byok.make_transparent';
        END IF;
    END IF;
    RETURN NEW;
END
$body$,
        tbl::text, pk_match, tenant_checks,
        pg_catalog.array_to_string(cols, ', '), pg_catalog.array_to_string(insert_values, ', '),
        pg_catalog.array_to_string(returning_cols, ', '),
        pg_catalog.array_to_string(returning_sets, ', '),
        pg_catalog.array_to_string(update_sets, ', '), overriding);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS %L',
        fn_ident, body);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER byok_write INSTEAD OF INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
        view_ident, fn_ident);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', view_ident,
                              pg_catalog.format('byok_pg transparent view of %s; contexts: %s', tbl, contexts::text));
    EXECUTE pg_catalog.format('ALTER VIEW %s OWNER TO %I', view_ident, pg_catalog.pg_get_userbyid(rel.relowner));
    EXECUTE pg_catalog.format('ALTER FUNCTION %s() OWNER TO %I', fn_ident, pg_catalog.pg_get_userbyid(rel.relowner));
    FOREACH g IN ARRAY coalesce(kept_grants, '{}') LOOP
        EXECUTE g;
    END LOOP;
    RETURN view_ident::regclass;
END
$make_transparent$;
COMMENT ON FUNCTION byok.make_transparent(regclass, name, name) IS
    'Creates (or regenerates) a view of a table showing its registered encrypted columns decrypted, sealing what is written through it';

-- crypto_check.sql (0.2.0):
-- CREATE EXTENSION (and ALTER EXTENSION ... UPDATE) refuses to install over
-- cryptography that fails its checks: in a FIPS build, a module not in FIPS
-- mode; in any build, an AES-256-GCM implementation failing a NIST
-- known-answer test. byok.crypto_info() runs the checks and names the problem.
-- (The server runs them too when it loads the library, and refuses to start.)
DO $crypto_check$
DECLARE
    info record;
BEGIN
    SELECT * INTO info FROM byok.crypto_info();
    IF info.problem IS NOT NULL THEN
        RAISE EXCEPTION 'byok_pg cannot be installed: %', info.problem
            USING ERRCODE = '58000',
                  DETAIL = format('module %s, FIPS build %s, FIPS mode %s',
                                  info.module, info.fips_build, info.fips_mode),
                  HINT = 'Check the server''s CPU and the byok_pg library''s build (docs/security.md, "FIPS build").';
    END IF;
END
$crypto_check$;

-- ---------------------------------------------------------------------------
-- 4. Privileges: exactly a fresh install's. What 0.1.0 granted to PUBLIC,
--    byok_admin and byok_user is revoked, then sql/privileges.sql is applied as
--    it stands. Grants you made to other roles are left as they are.
REVOKE ALL ON ALL TABLES IN SCHEMA byok FROM PUBLIC, byok_admin, byok_user;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA byok FROM PUBLIC, byok_admin, byok_user;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA byok FROM PUBLIC, byok_admin, byok_user;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA byok FROM PUBLIC, byok_admin, byok_user;
REVOKE EXECUTE ON FUNCTION byok.reencrypt(byok.encrypted, text) FROM PUBLIC;

-- sql/privileges.sql (0.2.0):
GRANT USAGE ON SCHEMA byok TO PUBLIC;

-- Functions: closed by default (including any added later), then opened one by one.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA byok FROM PUBLIC;
REVOKE EXECUTE ON ALL PROCEDURES IN SCHEMA byok FROM PUBLIC;
-- The type's input and output (used by COPY, pg_dump, drivers) and its cast from bytea.
GRANT EXECUTE ON FUNCTION byok.encrypted_in(cstring), byok.encrypted_out(byok.encrypted),
    byok.encrypted_recv(internal), byok.encrypted_send(byok.encrypted),
    byok.encrypted_from_bytea(bytea)
  TO PUBLIC;
-- byok.role_ref's input, output and comparisons (OIDs and names only).
GRANT EXECUTE ON FUNCTION byok.role_ref_in(cstring), byok.role_ref_out(byok.role_ref),
    byok.role_ref_eq(byok.role_ref, byok.role_ref), byok.role_ref_ne(byok.role_ref, byok.role_ref),
    byok.role_ref_lt(byok.role_ref, byok.role_ref), byok.role_ref_le(byok.role_ref, byok.role_ref),
    byok.role_ref_gt(byok.role_ref, byok.role_ref), byok.role_ref_ge(byok.role_ref, byok.role_ref),
    byok.role_ref_cmp(byok.role_ref, byok.role_ref), byok.role_ref_hash(byok.role_ref)
  TO PUBLIC;
-- Called inside re-encryption jobs' statements, which run as each table's owner.
GRANT EXECUTE ON FUNCTION byok.data_key_id(byok.encrypted), byok.reencrypt(byok.encrypted, text),
    byok.value_opens(byok.encrypted, text)
  TO PUBLIC;
-- A searchable value's term and index key id: bytes of the value, no key
-- (an index on byok.term(col) is built and used with the table owner's rights).
GRANT EXECUTE ON FUNCTION byok.term(byok.encrypted), byok.index_key_id(byok.encrypted) TO PUBLIC;

-- byok_user: the per-row functions, and what the catalog views need.
GRANT EXECUTE ON FUNCTION byok.encrypt(text, bytea, text), byok.encrypt_text(text, text, text),
    byok.decrypt(byok.encrypted, text), byok.decrypt_text(byok.encrypted, text),
    byok.tenant_visible(text),
    byok.encrypt(text, bytea, text, boolean), byok.encrypt_text(text, text, text, boolean),
    byok.search_term(text, text, text), byok.search_terms(text, text, text),
    byok.confirm_match(byok.encrypted, text, text, text), byok.matches(byok.encrypted, text, text, text)
  TO byok_user, byok_admin;
GRANT SELECT (tenant_id, customer, provider, master_key_id, previous_master_key_id,
              previous_master_key_retires_at, provider_options, rotation_enabled,
              rotation_interval_days, cache_ttl_seconds, cache_max_entries,
              cache_grace_period_seconds, audit_log_all_operations, audit_alert_on_failures,
              created_at, updated_at, backup_provider, backup_master_key_id,
              backup_provider_options, dr_active, dr_activated_at)
    ON byok.tenant_config TO byok_admin, byok_user;
GRANT SELECT (dek_id, tenant_id, provider, cmk_id, cmk_version, state, created_at, rotated_at,
              destroyed_at, encryptions, has_primary_wrap, backup_provider, backup_cmk_id,
              backup_cmk_version, has_backup_wrap, purpose)
    ON byok.wrapped_data_keys TO byok_admin, byok_user;
GRANT SELECT ON byok.tenant_grants TO byok_admin, byok_user;
GRANT SELECT ON byok.tenants, byok.data_keys, byok.tenant_access TO byok_admin, byok_user;

-- byok_admin: administration.
GRANT EXECUTE ON FUNCTION byok.configure_tenant(jsonb), byok.rotate_data_key(text),
    byok.set_data_key_state(bigint, text), byok.destroy_data_key(bigint, bigint),
    byok.destroy_tenant_keys(text, text), byok.flush_cache(text), byok.validate_tenant(text),
    byok.grant_tenant(text, text), byok.revoke_tenant(text, text),
    byok.request_operation(text, text, jsonb), byok.approve_operation(bigint),
    byok.cancel_operation(bigint), byok.segregation_policy(),
    byok.rotate_master_key_step(text, text, interval), byok.rotate_master_key_finish(text, text),
    byok.protect_column(regclass, text, text, text), byok.start_reencrypt(text, regclass),
    byok.pause_job(bigint), byok.resume_job(bigint), byok.cancel_job(bigint),
    byok.wait_job(bigint, interval), byok.data_key_references(bigint),
    byok.verify_audit_chain(bigint, bytea), byok.audit_chain_head(),
    byok.backend_cache_stats(), byok.broker_status(), byok.metrics_counters(),
    byok.key_status(), byok.schedule_master_key_rotation(jsonb),
    byok.cancel_scheduled_rotation(text, bigint), byok.retire_previous_master_key(text),
    byok.alert_states(), byok.prometheus_metrics(),
    byok.complete_key_wraps_step(text), byok.complete_key_wraps_finish(text),
    byok.activate_dr(text), byok.deactivate_dr(text),
    byok.citus_metrics(), byok.citus_audit_log(timestamptz), byok.crypto_info(),
    byok.start_compromise_response(text, text), byok.compromise_response_step(text, bigint),
    byok.rotate_index_key(text), byok.make_searchable(regclass, text, integer, text),
    byok.make_transparent(regclass, name, name)
  TO byok_admin;
-- SQL exporters (postgres_exporter and the like) run as members of pg_monitor.
GRANT EXECUTE ON FUNCTION byok.prometheus_metrics(), byok.crypto_info() TO pg_monitor;
GRANT EXECUTE ON PROCEDURE byok.rotate_master_key(text, text, interval),
    byok.complete_key_wraps(text), byok.respond_to_compromise(text, text)
  TO byok_admin;
GRANT SELECT ON byok.jobs, byok.protected_columns, byok.metrics, byok.tenant_key_status, byok.alerts, byok.audit_log,
    byok.pending_operations, byok.scheduled_rotations, byok.retired_master_keys,
    byok.compromise_responses
  TO byok_admin;
-- (No role but the owner writes the catalog tables: byok_admin's changes go
-- through the functions above, which check what they are asked to do.)

-- ---------------------------------------------------------------------------
-- 5. The audit trail. 0.1.0 chained rows with plain SHA-256; 0.2.0 with
--    HMAC-SHA-256 under the server's chain key (byok.audit_key_file). The 0.1.0
--    chain is verified first, by 0.1.0's rule: if it is broken (a row changed,
--    removed or reordered since it was written) the update stops, because
--    re-chaining would hide the break. To upgrade anyway, after investigating:
--        SET byok_upgrade.accept_broken_audit_chain = on;
--    the breaks are then recorded in the update's audit row. Otherwise every row
--    is re-chained under the key, unchanged but for prev_hash and hash, and one
--    row records the update, with the 0.1.0 chain's head (to match anchors kept
--    outside the database) and the registry rows left out (section 2).
DO $upgrade$
DECLARE
    a byok.audit_log;
    previous bytea;
    breaks jsonb := '[]';
    old_head jsonb;
    chained bigint := 0;
    dropped jsonb;
BEGIN
    PERFORM byok.lock_audit_chain();
    FOR a IN SELECT * FROM byok.audit_log ORDER BY id LOOP
        IF a.prev_hash IS DISTINCT FROM previous THEN
            breaks := breaks || jsonb_build_object('id', a.id, 'problem', 'prev_hash does not match the hash of the row before it');
        ELSIF a.hash <> sha256(coalesce(a.prev_hash, '\x'::bytea) || byok.audit_row_text(a)) THEN
            breaks := breaks || jsonb_build_object('id', a.id, 'problem', 'hash does not match the row''s contents');
        END IF;
        previous := a.hash;
        old_head := jsonb_build_object('id', a.id, 'hash', encode(a.hash, 'hex'));
    END LOOP;
    IF jsonb_array_length(breaks) > 0
       AND coalesce(current_setting('byok_upgrade.accept_broken_audit_chain', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'byok_pg update: the audit trail''s 0.1.0 hash chain is broken at % row(s): %',
                        jsonb_array_length(breaks), left(breaks::text, 2000)
            USING ERRCODE = '55000',
                  DETAIL = 'the update re-chains the trail under the server''s key; doing so over a break would hide it',
                  HINT = 'investigate first (SELECT * FROM byok.verify_audit_chain() on 0.1.0); to update anyway, recording the breaks: SET byok_upgrade.accept_broken_audit_chain = on';
    END IF;

    -- Re-chain, oldest first (the append-only trigger set aside for this only).
    ALTER TABLE byok.audit_log DISABLE TRIGGER audit_log_append_only;
    previous := NULL;
    FOR a IN SELECT * FROM byok.audit_log ORDER BY id LOOP
        a.prev_hash := previous;
        a.hash := byok.audit_mac(coalesce(previous, '\x'::bytea), byok.audit_row_text(a));
        UPDATE byok.audit_log l SET prev_hash = a.prev_hash, hash = a.hash WHERE l.id = a.id;
        previous := a.hash;
        chained := chained + 1;
    END LOOP;
    ALTER TABLE byok.audit_log ENABLE TRIGGER audit_log_append_only;

    SELECT coalesce(jsonb_agg(jsonb_build_object('table', o.relid::text, 'column', o.column_name)), '[]')
      INTO dropped
      FROM byok.protected_column_registry_0_1_0 o
     WHERE NOT EXISTS (SELECT 1 FROM byok.protected_column_registry n
                        WHERE n.relid = o.relid AND n.column_name = o.column_name);
    IF jsonb_array_length(dropped) > 0 THEN
        RAISE WARNING 'byok_pg update: % registered column(s) no longer exist as permanent byok.encrypted columns and were unregistered: %',
                      jsonb_array_length(dropped), dropped;
    END IF;

    PERFORM byok.audit_event('extension_update', NULL, NULL, 'ok', NULL,
        jsonb_build_object('from', '0.1.0', 'to', '0.2.0',
                           'rows_rechained', chained,
                           'previous_chain_head', old_head,
                           'previous_chain_breaks', breaks,
                           'unregistered_columns', dropped));
END
$upgrade$;

-- (Leaving the extension first takes it off the list of configuration tables pg_dump dumps.)
ALTER EXTENSION byok_pg DROP TABLE byok.protected_column_registry_0_1_0;
DROP TABLE byok.protected_column_registry_0_1_0;
