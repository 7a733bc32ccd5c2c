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
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- encryption.backup: a second master key every data key is also wrapped under
    backup_provider text
        CHECK (backup_provider IN ('local', 'aws_kms', 'azure_kv', 'gcp_kms', 'vault')),
    backup_master_key_id text,
    backup_provider_options jsonb,
    -- DR activated (byok.activate_dr): the backup generates and unwraps, the primary is not asked
    dr_active boolean NOT NULL DEFAULT false,
    dr_activated_at timestamptz,
    CONSTRAINT tenant_config_dr_needs_backup CHECK (NOT dr_active OR backup_provider IS NOT NULL)
);
COMMENT ON TABLE byok.tenant_config IS 'One row per tenant, from its byok_config document';

CREATE SEQUENCE byok.data_key_id_seq;

CREATE TABLE byok.wrapped_data_keys (
    dek_id bigint PRIMARY KEY DEFAULT nextval('byok.data_key_id_seq'),
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    -- the data key wrapped by the tenant's master key; NULL once destroyed (or,
    -- for a key made while DR was active, until byok.complete_key_wraps wraps it)
    wrapped_dek bytea,
    provider text NOT NULL,
    cmk_id text NOT NULL,
    cmk_version text NOT NULL,
    state text NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired', 'destroyed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- when it stopped being the tenant's active key
    rotated_at timestamptz,
    destroyed_at timestamptz,
    -- values sealed under it so far (its nonce budget; byok.max_encryptions_per_key),
    -- persisted by the catalog writer a few seconds behind
    encryptions bigint NOT NULL DEFAULT 0,
    -- the same data key wrapped by the tenant's backup master key (encryption.backup)
    backup_wrapped_dek bytea,
    backup_provider text,
    backup_cmk_id text,
    backup_cmk_version text,
    -- which wraps exist, for the views (the wrapped keys themselves are not readable)
    has_primary_wrap boolean GENERATED ALWAYS AS (wrapped_dek IS NOT NULL) STORED,
    has_backup_wrap boolean GENERATED ALWAYS AS (backup_wrapped_dek IS NOT NULL) STORED,
    -- 'data': seals values (AES-256-GCM); 'index': keys the blind index terms
    -- of searchable values (HMAC-SHA-256). Each purpose has its own active key.
    purpose text NOT NULL DEFAULT 'data' CHECK (purpose IN ('data', 'index')),
    CONSTRAINT wrapped_data_keys_check
        CHECK ((state = 'destroyed') = (wrapped_dek IS NULL AND backup_wrapped_dek IS NULL))
);
ALTER SEQUENCE byok.data_key_id_seq OWNED BY byok.wrapped_data_keys.dek_id;
CREATE UNIQUE INDEX wrapped_data_keys_one_active_per_tenant
    ON byok.wrapped_data_keys (tenant_id, purpose) WHERE state = 'active';
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

-- Master keys retired at the end of a rotation's grace period: data keys still
-- wrapped by one are refused (a restored old backup, say) until rewrapped.
CREATE TABLE byok.retired_master_keys (
    tenant_id text NOT NULL REFERENCES byok.tenant_config (tenant_id),
    master_key_id text NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now(),
    -- data keys found still under it at the end of the grace period, and rewrapped
    data_keys_rewrapped bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, master_key_id)
);
COMMENT ON TABLE byok.retired_master_keys IS 'Master keys whose rotation grace period ended; data keys wrapped by them are refused';

-- The guide's customer-initiated rotations, noticed in advance: the job
-- launcher runs each at its rotation_time (scheduled -> running -> done or
-- failed); cancelled before it starts.
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

-- Views without key material. They read the tables with the caller's rights
-- (security_invoker), so the row-level security policies (access.sql) apply.
CREATE VIEW byok.tenants WITH (security_invoker = true) AS
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

CREATE VIEW byok.data_keys WITH (security_invoker = true) AS
    SELECT dek_id, tenant_id, provider, cmk_id, cmk_version, state,
           created_at, rotated_at, destroyed_at, encryptions,
           has_primary_wrap, backup_provider, backup_cmk_id, backup_cmk_version, has_backup_wrap,
           purpose
      FROM byok.wrapped_data_keys;
COMMENT ON VIEW byok.data_keys IS 'Data keys, their states and how many values each sealed (no key material)';

-- The guide's customer-initiated rotation. Commits after every batch, so it can
-- run on a live database and, after a crash, be called again to finish. (A
-- procedure that commits cannot pin search_path; it only calls the
-- schema-qualified functions below, each of which does.)
CREATE PROCEDURE byok.rotate_master_key(tenant_id text, new_key_id text,
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

-- Monitoring, named as in the guide's monitoring_rules.yaml.
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
