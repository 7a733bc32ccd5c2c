\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_broker",
  "encryption": {"provider": "local", "local": {"key_id": "acme-broker-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex_broker",
  "encryption": {"provider": "local", "local": {"key_id": "globex-broker-cmk"}}}');
CREATE TABLE customers (id int PRIMARY KEY, email byok.encrypted);
INSERT INTO customers VALUES (2, byok.encrypt_text('globex_broker', 'bob@example.org'));

-- One key broker serves every backend: it owns the key-provider clients and a
-- shared data-key cache. Backends reach it through 64 request slots.
SELECT broker_pid IS NOT NULL AS running, generation >= 1 AS started, total_slots, busy_slots
  FROM byok.broker_status();

-- Its settings: the wait limit (any user may lower it for a session), and the
-- cache defaults for tenants whose cache_config leaves them out.
SELECT name, setting, unit, context FROM pg_settings
 WHERE name IN ('byok.kms_timeout_ms', 'byok.cache_ttl_seconds', 'byok.cache_max_entries',
                'byok.local_master_key_file', 'byok.tenant', 'byok.backend_cache_max_entries')
 ORDER BY name;

-- byok.flush_cache() drops cached keys: the broker's shared entries for this database
-- (or one tenant), and every backend's ready keys when the transaction commits.
SELECT byok.flush_cache() >= 0 AS flushed;
SELECT count(byok.decrypt_text(email)) AS decrypted FROM customers WHERE id = 2;
SELECT byok.flush_cache('globex_broker') AS shared_entries_flushed;
SELECT byok.flush_cache('globex_broker') AS nothing_left;
SELECT cached_keys FROM byok.backend_cache_stats();

-- byok.metrics follows the guide's monitoring_rules.yaml: one row per provider and tenant.
SELECT column_name FROM information_schema.columns
 WHERE table_schema = 'byok' AND table_name = 'metrics' ORDER BY ordinal_position;

-- Every decrypt below is counted; a cold start costs one key-manager call per data key.
CREATE TABLE readings AS
SELECT g AS id, byok.encrypt_text('acme_broker', 'reading ' || g, 'readings') AS v FROM generate_series(1, 100) g;
SELECT byok.flush_cache() > 0 AS flushed;
SELECT kms_calls AS kms_before, l1_hits AS hits_before FROM byok.metrics
 WHERE database = current_database() AND tenant_id = 'acme_broker' \gset
SELECT count(*) AS opened FROM readings WHERE byok.decrypt_text(v, 'readings') = 'reading ' || id;
SELECT kms_calls - :kms_before AS new_kms_calls, l1_hits - :hits_before AS new_cache_hits,
       kms_api_success_rate = 1 AS all_calls_succeeded, key_cache_hit_ratio > 0.5 AS mostly_hits
  FROM byok.metrics WHERE database = current_database() AND tenant_id = 'acme_broker';

-- Only administrators flush caches.
CREATE ROLE byok_flush_test;
SET ROLE byok_flush_test;
SELECT byok.flush_cache();
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
DROP ROLE byok_flush_test;

DROP TABLE readings, customers;
SELECT byok.destroy_tenant_keys('acme_broker', 'acme_broker');
SELECT byok.destroy_tenant_keys('globex_broker', 'globex_broker');
