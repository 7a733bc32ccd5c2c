\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Key-manager calls and failed operations reach byok.audit_log through a queue
-- the audit writer drains within a second or so; this helper waits for it (up to 30 s).
CREATE OR REPLACE FUNCTION wait_for_audit_queue() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        PERFORM pg_stat_clear_snapshot();
        IF (SELECT audit_queued FROM byok.broker_status()) = 0
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'byok catalog writer') THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END
$$;
-- Data key ids in messages start at 12001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 12000) \gset

-- Audit records of what ran before this file, still in the queue, land first.
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
-- Least privilege: byok_user encrypts and decrypts, byok_admin administers, and
-- other roles get nothing (PUBLIC has no rights beyond using the type).
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('byok_admin', 'byok_user') ORDER BY 1;
SELECT byok.configure_tenant('{"customer": "wayne", "tenant_id": "wayne",
  "encryption": {"provider": "local", "local": {"key_id": "wayne-cmk"}}}');
CREATE ROLE app_writer LOGIN IN ROLE byok_user;
CREATE ROLE key_officer LOGIN IN ROLE byok_admin;
CREATE ROLE stranger LOGIN;
CREATE TABLE vault_items (id int, secret byok.encrypted);
GRANT SELECT, INSERT ON vault_items TO app_writer, stranger;
GRANT SELECT, UPDATE ON vault_items TO key_officer;

-- The application role: encrypt and decrypt the tenants it is granted, nothing else.
SELECT byok.grant_tenant('app_writer', 'wayne');
SET ROLE app_writer;
INSERT INTO vault_items VALUES (1, byok.encrypt_text('wayne', 'cape'));
SELECT byok.decrypt_text(secret) FROM vault_items;
SELECT byok.rotate_data_key('wayne');
SELECT byok.configure_tenant('{}');
SELECT byok.destroy_tenant_keys('wayne', 'wayne');
SELECT count(*) FROM byok.audit_log;
-- The catalog shows it its own tenant only, and never a wrapped key.
SELECT tenant_id FROM byok.tenants;
SELECT tenant_id, state FROM byok.data_keys;
SELECT wrapped_dek FROM byok.wrapped_data_keys;
RESET ROLE;

-- A role with neither: not even decrypt.
SET ROLE stranger;
SELECT byok.decrypt_text(secret) FROM vault_items;
SELECT byok.encrypt_text('wayne', 'x');
RESET ROLE;

-- The key officer administers, without any right on the catalog tables themselves.
SET ROLE key_officer;
SELECT byok.rotate_data_key('wayne') > 0 AS rotated;
SELECT state FROM byok.data_keys WHERE tenant_id = 'wayne' ORDER BY dek_id;
SELECT byok.protect_column('vault_items', 'secret');
SELECT byok.wait_job(byok.start_reencrypt('wayne'), '1 minute') AS job;
SELECT check_name, ok FROM byok.validate_tenant('wayne') WHERE NOT ok;
SELECT wrapped_dek FROM byok.wrapped_data_keys;
-- The audit trail records who acted.
SELECT event, role_name, outcome FROM byok.audit_log
 WHERE tenant_id = 'wayne' AND event NOT LIKE 'kms\_%' ORDER BY id;
RESET ROLE;

-- Administrative functions do their catalog work as the extension's owner: a
-- hostile search_path must not let an administrator run its own operator there.
CREATE SCHEMA spy;
CREATE FUNCTION spy.texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE WARNING 'hijacked: running as %', current_user;
    RETURN $1 OPERATOR(pg_catalog.=) $2;
END $$;
CREATE OPERATOR spy.= (LEFTARG = text, RIGHTARG = text, FUNCTION = spy.texteq);
GRANT USAGE ON SCHEMA spy TO key_officer;
SET ROLE key_officer;
SET search_path = spy, pg_catalog, public;
SELECT 'a'::text = 'a'::text AS the_spy_works_in_the_session;
SELECT byok.rotate_data_key('wayne') > 0 AS rotated;
SELECT byok.flush_cache('wayne') >= 0 AS flushed;
SELECT count(*) AS failed_checks FROM byok.validate_tenant('wayne') WHERE NOT ok;
RESET search_path;
RESET ROLE;
DROP SCHEMA spy CASCADE;

-- An administrator may only register columns it may update.
CREATE TABLE not_theirs (id int, secret byok.encrypted);
SET ROLE key_officer;
SELECT byok.protect_column('not_theirs', 'secret');
RESET ROLE;

-- Per-tenant grants: a second tenant the application role is not granted.
SELECT byok.configure_tenant('{"customer": "kent", "tenant_id": "kent",
  "encryption": {"provider": "local", "local": {"key_id": "kent-cmk"}}}');
INSERT INTO vault_items VALUES (2, byok.encrypt_text('kent', 'glasses'));
SET ROLE app_writer;
SELECT tenant_id FROM byok.tenants ORDER BY 1;
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 2;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.encrypt_text('kent', 'x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- its own tenant still works, from the cache
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 1;
RESET ROLE;
-- The superuser session read kent's value first: the cached key is re-checked
-- for each role that uses it, so switching roles does not inherit the access.
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 2;
SET ROLE app_writer;
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 2;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- A grant to a group role reaches its members; revoking the membership takes it away at once.
CREATE ROLE kent_readers NOLOGIN;
GRANT kent_readers TO app_writer;
SELECT byok.grant_tenant('kent_readers', 'kent');
SELECT grantee, tenant_id FROM byok.tenant_access WHERE tenant_id IN ('wayne', 'kent') ORDER BY 1, 2;
SET ROLE app_writer;
SELECT byok.decrypt_text(secret) FROM vault_items ORDER BY id;
-- A query that switches roles row by row (a SECURITY DEFINER function owned by
-- another granted role, next to a direct call) is checked per role, not per row.
RESET ROLE;
GRANT byok_user TO kent_readers;
CREATE FUNCTION kent_secret(v byok.encrypted) RETURNS text LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog AS 'SELECT byok.decrypt_text(v)';
ALTER FUNCTION kent_secret(byok.encrypted) OWNER TO kent_readers;
SET track_functions = 'all';
BEGIN;
SET LOCAL ROLE app_writer;
SELECT count(*) AS rows_equal FROM vault_items, generate_series(1, 100)
 WHERE id = 2 AND byok.decrypt_text(secret) = kent_secret(secret);
-- catalog checks of the grant in this transaction: one per role at most, not one per row
SELECT pg_stat_get_xact_function_calls('byok.may_use_tenant(oid, text)'::regprocedure) BETWEEN 1 AND 2 AS checked_once_per_role;
COMMIT;
RESET track_functions;
DROP FUNCTION kent_secret(byok.encrypted);
REVOKE byok_user FROM kent_readers;
REVOKE kent_readers FROM app_writer;
SET ROLE app_writer;
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 2;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- Revoking the tenant itself, likewise.
SELECT byok.revoke_tenant('app_writer', 'wayne');
SET ROLE app_writer;
SELECT byok.decrypt_text(secret) FROM vault_items WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- Only administrators grant; unknown roles and tenants are refused.
SET ROLE app_writer;
SELECT byok.grant_tenant('app_writer', 'kent');
RESET ROLE;
SELECT byok.grant_tenant('nobody_at_all', 'kent');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.grant_tenant('app_writer', 'no-such-tenant');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT event, role_name, details->>'role' AS role FROM byok.audit_log
 WHERE event IN ('grant_tenant', 'revoke_tenant') AND id > :audit_before ORDER BY id;

DELETE FROM byok.protected_column_registry WHERE relid IN ('vault_items'::regclass, 'not_theirs'::regclass);
DROP TABLE vault_items, not_theirs;
DELETE FROM byok.tenant_grants WHERE grantee::text IN ('app_writer', 'kent_readers');
DROP ROLE app_writer, key_officer, stranger, kent_readers;
SELECT byok.destroy_tenant_keys('wayne', 'wayne');
SELECT byok.destroy_tenant_keys('kent', 'kent');
DROP FUNCTION wait_for_audit_queue();
