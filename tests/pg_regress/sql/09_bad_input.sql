\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_bulk",
  "encryption": {"provider": "local", "local": {"key_id": "acme-bulk-cmk"}}}');
CREATE TABLE earlier_rows AS
SELECT g AS id, byok.encrypt_text('acme_bulk', 'row ' || g) AS v FROM generate_series(1, 2) g;

-- Large values: 100 MB in, the same 100 MB out.
SELECT length(byok.encrypted_send(v)) AS sealed_bytes,
       md5(byok.decrypt(v)) = md5(p) AS same
  FROM (SELECT p, byok.encrypt('acme_bulk', p) AS v
          FROM (SELECT convert_to(repeat('0123456789', 10000000), 'UTF8') AS p) s1
        OFFSET 0) s2;

-- Key ids are opaque data: quotes and semicolons are kept as they are, never executed.
SELECT byok.configure_tenant($${"customer": "x", "tenant_id": "quoted",
  "encryption": {"provider": "local", "local": {"key_id": "k'); DROP TABLE byok.tenant_config; --"}}}$$);
SELECT master_key_id FROM byok.tenants WHERE tenant_id = 'quoted';
SELECT byok.decrypt_text(byok.encrypt_text('quoted', 'still fine'));
SELECT count(*) > 0 AS catalog_intact FROM byok.tenant_config;
-- Control characters and overlong ids are refused.
SELECT byok.configure_tenant(jsonb_build_object('customer', 'x', 'tenant_id', 'ctl',
  'encryption', jsonb_build_object('provider', 'local', 'local', jsonb_build_object('key_id', E'line\nbreak'))));
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant(jsonb_build_object('customer', 'x', 'tenant_id', repeat('t', 129),
  'encryption', jsonb_build_object('provider', 'local', 'local', jsonb_build_object('key_id', 'k'))));
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.encrypt_text(repeat('t', 10000), 'x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- A value sealed for one tenant and presented as another's: the tenant comes from
-- the key, so it simply opens for its own tenant and is refused to a restricted session.
BEGIN;
SET LOCAL byok.tenant = 'quoted';
SELECT byok.decrypt_text(byok.encrypt_text('acme_bulk', 'not yours')) IS NULL;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
-- Nothing was lost along the way: the rows sealed before all this still open.
SELECT count(*) FILTER (WHERE byok.decrypt_text(v) = 'row ' || id) AS rows_ok FROM earlier_rows;

-- The byok.* settings are the extension's own: a misspelt one is refused rather
-- than kept as a placeholder that leaves the real setting at its default.
SET byok.kms_timeout = 100;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SHOW byok.kms_timeout_ms;

DROP TABLE earlier_rows;
SELECT byok.destroy_tenant_keys('acme_bulk', 'acme_bulk');
SELECT byok.destroy_tenant_keys('quoted', 'quoted');
