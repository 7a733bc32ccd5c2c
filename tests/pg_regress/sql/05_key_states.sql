\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Data key ids in messages start at 5001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 5000) \gset

SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_keys",
  "encryption": {"provider": "local", "local": {"key_id": "acme-keys-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex_keys",
  "encryption": {"provider": "local", "local": {"key_id": "globex-keys-cmk"}}}');
CREATE TABLE customers (id int PRIMARY KEY, email byok.encrypted);
INSERT INTO customers VALUES (2, byok.encrypt_text('globex_keys', 'bob@example.org'));

-- Rotating a tenant's data key: new values use the new key, old values still open.
CREATE TABLE docs (id int, body byok.encrypted);
INSERT INTO docs VALUES (1, byok.encrypt_text('acme_keys', 'before rotation'));
SELECT byok.rotate_data_key('acme_keys') AS new_dek_id \gset
INSERT INTO docs VALUES (2, byok.encrypt_text('acme_keys', 'after rotation'));
SELECT id, byok.decrypt_text(body), byok.data_key_id(body) = :new_dek_id AS under_new_key
  FROM docs ORDER BY id;
SELECT dek_id = :new_dek_id AS is_new, state, rotated_at IS NOT NULL AS rotated
  FROM byok.data_keys WHERE tenant_id = 'acme_keys' ORDER BY dek_id;
SELECT byok.data_key_id(body) AS old_dek_id FROM docs WHERE id = 1 \gset

-- A retired key refuses to decrypt (55000), which shows whether data still needs it;
-- it can be set back to decrypt-only.
SELECT byok.set_data_key_state(:old_dek_id, 'retired');
SELECT byok.decrypt_text(body) FROM docs WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.set_data_key_state(:old_dek_id, 'decrypt-only');
SELECT byok.decrypt_text(body) FROM docs WHERE id = 1;

-- The active key cannot be retired or destroyed; states are checked (55000, 22023).
SELECT byok.set_data_key_state(:new_dek_id, 'retired');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.set_data_key_state(:old_dek_id, 'active');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.destroy_data_key(:new_dek_id, :new_dek_id);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.set_data_key_state(999999, 'retired');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Destroying needs the key id repeated; afterwards its values are gone for good (55000).
SELECT byok.destroy_data_key(:old_dek_id, 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.destroy_data_key(:old_dek_id, :old_dek_id);
SELECT byok.decrypt_text(body) FROM docs WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT state, destroyed_at IS NOT NULL AS destroyed FROM byok.data_keys WHERE dek_id = :old_dek_id;
SELECT byok.set_data_key_state(:old_dek_id, 'decrypt-only');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Other values and tenants are untouched.
SELECT byok.decrypt_text(body) FROM docs WHERE id = 2;
SELECT byok.decrypt_text(email) FROM customers WHERE id = 2;

-- A value whose key is not in this database's catalog (copied from elsewhere): 42704.
SELECT byok.decrypt(('byok:' || encode('\x0101000000000000ffff'::bytea || decode(repeat('00', 28), 'hex'), 'base64'))::byok.encrypted);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Rotation of an unknown tenant: 42704.
SELECT byok.rotate_data_key('no_such_tenant');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Catalog changes drop the cached keys: in this session at once, in other sessions
-- when the change commits (tests/scripts/cross_session.sh shows that part).
SELECT byok.encrypt_text('globex_keys', 'x') IS NOT NULL AS warmed;
SELECT byok.rotate_data_key('globex_keys') AS globex_new \gset
SELECT byok.data_key_id(byok.encrypt_text('globex_keys', 'y')) = :globex_new AS uses_new_key;
-- A change by plain SQL invalidates too.
UPDATE byok.wrapped_data_keys SET state = 'retired'
 WHERE tenant_id = 'globex_keys' AND state = 'decrypt-only';
SELECT byok.decrypt_text(email) FROM customers WHERE id = 2;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
UPDATE byok.wrapped_data_keys SET state = 'decrypt-only' WHERE tenant_id = 'globex_keys' AND state = 'retired';
SELECT byok.decrypt_text(email) FROM customers WHERE id = 2;

DROP TABLE docs, customers;
SELECT byok.destroy_tenant_keys('acme_keys', 'acme_keys');
SELECT byok.destroy_tenant_keys('globex_keys', 'globex_keys');
