\set VERBOSITY default
\set SHOW_CONTEXT never
-- Large values: 100 MB in, the same 100 MB out.
SELECT length(byok.encrypted_send(v)) AS sealed_bytes,
       md5(byok.decrypt(v)) = md5(p) AS same
  FROM (SELECT p, byok.encrypt('tenant_12345', p) AS v
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
SELECT byok.decrypt_text(byok.encrypt_text('tenant_12345', 'not yours')) IS NULL;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
-- Nothing was lost along the way: the rows of earlier tests still open.
SELECT count(*) FILTER (WHERE byok.decrypt_text(email) IS NOT NULL) AS customers_ok FROM customers WHERE id IN (2, 3);
