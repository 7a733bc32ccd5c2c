\set VERBOSITY default
\set SHOW_CONTEXT never
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
