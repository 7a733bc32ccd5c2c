\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- A tenant is configured from the customer's byok_config.yaml document, as JSON.
-- The "local" provider keeps its master key in a file on the server: no cloud needed.
SELECT byok.configure_tenant($$
{
  "customer": "acme_corp",
  "tenant_id": "tenant_12345",
  "encryption": {
    "provider": "local",
    "local": {"key_id": "acme-cmk-1"},
    "key_rotation": {"enabled": true, "interval_days": 90},
    "cache_config": {"ttl_seconds": 86400, "max_entries": 1000},
    "audit": {"log_all_operations": true, "alert_on_failures": true}
  }
}$$);

-- Its settings, and its first data key, wrapped by the master key.
SELECT tenant_id, customer, provider, master_key_id, rotation_enabled, rotation_interval_days,
       cache_ttl_seconds, cache_max_entries, cache_grace_period_seconds
  FROM byok.tenants WHERE tenant_id = 'tenant_12345';
SELECT dek_id > 0 AS has_id, tenant_id, provider, cmk_id, length(cmk_version) AS kcv_len, state,
       rotated_at IS NULL AS never_rotated
  FROM byok.data_keys WHERE tenant_id = 'tenant_12345';

-- The views hold no key material; the wrapped key sits in the catalog table only.
SELECT count(*) AS columns_with_key_material FROM information_schema.columns
 WHERE table_schema = 'byok' AND table_name IN ('tenants', 'data_keys')
   AND column_name LIKE '%wrapped%';

-- Sections left out take defaults: rotation off (every 90 days when on), audit on, and
-- the server's cache settings (byok.cache_ttl_seconds, byok.cache_max_entries), shown as NULL.
SELECT byok.configure_tenant('{"customer": "globex", "tenant_id": "globex-eu",
  "encryption": {"provider": "local", "local": {"key_id": "globex-cmk"}}}');
SELECT tenant_id, rotation_enabled, rotation_interval_days, cache_ttl_seconds, cache_max_entries,
       audit_log_all_operations
  FROM byok.tenants WHERE tenant_id = 'globex-eu';

-- Configuring again updates the settings and keeps the data key.
SELECT byok.configure_tenant('{"customer": "globex", "tenant_id": "globex-eu",
  "encryption": {"provider": "local", "local": {"key_id": "globex-cmk"},
                 "cache_config": {"ttl_seconds": 600, "max_entries": 10}}}');
SELECT t.cache_ttl_seconds, t.cache_max_entries, count(k.*) AS data_keys
  FROM byok.tenants t JOIN byok.data_keys k USING (tenant_id)
 WHERE tenant_id = 'globex-eu' GROUP BY 1, 2;

-- Every configuration error names its field (SQLSTATE 22023).
SELECT count(*) AS tenants_before FROM byok.tenants \gset
SELECT byok.configure_tenant('{"customer": "x", "encryption": {"provider": "local", "local": {"key_id": "k"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "rot13"}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "local", "local": {}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "local"}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "local", "local": {"key_id": "k"},
  "cache_config": {"ttl_seconds": 0}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "local", "local": {"key_id": "k"},
  "cache_config": {"ttl_second": 60}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "local", "local": {"key_id": "k"},
  "key_rotation": {"enabled": "yes"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Tenant ids are letters, digits and _ . : @ -, so they are safe to print and to log.
SELECT byok.configure_tenant($${"customer": "x", "tenant_id": "t1'; DROP TABLE byok.tenant_config; --",
  "encryption": {"provider": "local", "local": {"key_id": "k"}}}$$);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('"just a string"');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Providers other than "local" need their own block and fields...
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "aws_kms",
  "aws_kms": {"role_arn": "arn:aws:iam::123456789:role/byok-access"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- ...and their provider checks the rest of the block before calling anyone (F0000).
SELECT byok.configure_tenant('{"customer": "x", "tenant_id": "t1", "encryption": {"provider": "gcp_kms",
  "gcp_kms": {"key_name": "projects/acme/locations/us/keyRings/byok/cryptoKeys/platform-cmk"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- A tenant's master key is not changed by configure_tenant: that needs its data keys rewrapped.
SELECT byok.configure_tenant('{"customer": "globex", "tenant_id": "globex-eu",
  "encryption": {"provider": "local", "local": {"key_id": "another-cmk"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Nothing was created by the failed calls.
SELECT count(*) - :tenants_before AS new_tenants FROM byok.tenants;

-- Clean-up: crypto-shredding (every data key of a tenant destroyed).
SELECT byok.destroy_tenant_keys('tenant_12345', 'tenant_12345');
SELECT byok.destroy_tenant_keys('globex-eu', 'globex-eu');
