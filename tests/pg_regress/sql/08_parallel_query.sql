\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

SELECT byok.configure_tenant('{"customer": "Even", "tenant_id": "par_even",
  "encryption": {"provider": "local", "local": {"key_id": "par-even-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Odd", "tenant_id": "par_odd",
  "encryption": {"provider": "local", "local": {"key_id": "par-odd-cmk"}}}');

-- decrypt and encrypt are PARALLEL SAFE: parallel workers read the key catalog and
-- ask the key broker themselves. Force a parallel plan on a small table.
CREATE TABLE par AS
SELECT g AS id, byok.encrypt_text(CASE WHEN g % 2 = 0 THEN 'par_even' ELSE 'par_odd' END, 'row ' || g) AS v
  FROM generate_series(1, 20000) g;
ANALYZE par;
SET max_parallel_workers_per_gather = 2;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET parallel_leader_participation = off;
EXPLAIN (COSTS OFF) SELECT count(*) FROM par WHERE byok.decrypt_text(v) = 'row ' || id;
SELECT byok.flush_cache() >= 0 AS cold;
SELECT count(*) AS opened FROM par WHERE byok.decrypt_text(v) = 'row ' || id;
-- byok.tenant reaches the workers too.
SET byok.tenant = 'par_odd';
SELECT count(*) FROM par WHERE id % 2 = 1 AND byok.decrypt_text(v) = 'row ' || id;
SELECT count(*) FROM par WHERE byok.decrypt_text(v) IS NOT NULL;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET byok.tenant;
-- Sealing in parallel workers.
SELECT count(DISTINCT byok.encrypt_text('par_odd', 'x')::text) AS distinct_values FROM par;
RESET ALL;

DROP TABLE par;
SELECT byok.destroy_tenant_keys('par_even', 'par_even');
SELECT byok.destroy_tenant_keys('par_odd', 'par_odd');
