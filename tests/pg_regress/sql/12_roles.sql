\set VERBOSITY default
\set SHOW_CONTEXT never
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

-- The application role: encrypt and decrypt, nothing else.
SET ROLE app_writer;
INSERT INTO vault_items VALUES (1, byok.encrypt_text('wayne', 'cape'));
SELECT byok.decrypt_text(secret) FROM vault_items;
SELECT byok.rotate_data_key('wayne');
SELECT byok.configure_tenant('{}');
SELECT byok.destroy_tenant_keys('wayne', 'wayne');
SELECT count(*) FROM byok.audit_log;
SELECT count(*) FROM byok.tenants;
SELECT count(*) FROM byok.wrapped_data_keys;
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
SELECT count(*) FROM byok.wrapped_data_keys;
-- The audit trail records who acted.
SELECT event, role_name, outcome FROM byok.audit_log WHERE tenant_id = 'wayne' ORDER BY id;
RESET ROLE;

-- An administrator may only register columns it may update.
CREATE TABLE not_theirs (id int, secret byok.encrypted);
SET ROLE key_officer;
SELECT byok.protect_column('not_theirs', 'secret');
RESET ROLE;

DELETE FROM byok.protected_column_registry WHERE relid IN ('vault_items'::regclass, 'not_theirs'::regclass);
DROP TABLE vault_items, not_theirs;
DROP ROLE app_writer, key_officer, stranger;
