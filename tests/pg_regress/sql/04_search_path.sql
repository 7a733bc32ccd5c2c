\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex_path",
  "encryption": {"provider": "local", "local": {"key_id": "globex-path-cmk"}}}');
CREATE TABLE customers (id int PRIMARY KEY, email byok.encrypted);
INSERT INTO customers VALUES (2, byok.encrypt_text('globex_path', 'bob@example.org'));
\c

-- This session has no keys cached yet, so decrypt must read the catalog.
SELECT cached_keys FROM byok.backend_cache_stats();
-- A hostile search_path cannot hijack the catalog lookups (they qualify every operator).
CREATE SCHEMA evil;
CREATE FUNCTION evil.int8eq_always(bigint, bigint) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.int8eq_always);
SET search_path = evil, pg_catalog, public;
SELECT byok.decrypt_text(email) FROM customers WHERE id = 2;
RESET search_path;
DROP SCHEMA evil CASCADE;

SELECT cached_keys FROM byok.backend_cache_stats();

DROP TABLE customers;
SELECT byok.destroy_tenant_keys('globex_path', 'globex_path');
