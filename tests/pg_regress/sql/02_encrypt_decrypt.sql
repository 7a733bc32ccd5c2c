\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Data key ids in messages start at 2001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 2000) \gset

SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme",
  "encryption": {"provider": "local", "local": {"key_id": "acme-enc-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex",
  "encryption": {"provider": "local", "local": {"key_id": "globex-enc-cmk"}}}');

-- Values are sealed under the tenant's active data key and opened with byok.decrypt.
CREATE TABLE customers (
    id int PRIMARY KEY,
    tenant_id text NOT NULL,
    email byok.encrypted,
    card byok.encrypted
);
INSERT INTO customers VALUES
    (1, 'acme',   byok.encrypt_text('acme', 'ann@example.com'),
                  byok.encrypt('acme', '\x0102030405'::bytea, 'customers.card')),
    (2, 'globex', byok.encrypt_text('globex', 'bob@example.org'),
                  byok.encrypt('globex', '\xdeadbeef'::bytea, 'customers.card'));

SELECT id, byok.decrypt_text(email) AS email, byok.decrypt(card, 'customers.card') AS card
  FROM customers ORDER BY id;

-- The tenant comes from the value's data key, which byok.data_key_id() shows.
SELECT c.id, k.tenant_id FROM customers c JOIN byok.data_keys k ON k.dek_id = byok.data_key_id(c.email)
 ORDER BY c.id;

-- A sealed value is 38 bytes longer than its plaintext; every seal uses a fresh nonce.
SELECT length(byok.encrypted_send(byok.encrypt_text('acme', 'abc'))) AS sealed_bytes;
SELECT byok.encrypt_text('acme', 'same') :: text <> byok.encrypt_text('acme', 'same') :: text
    AS differs_each_time;

-- Empty values round-trip; NULL in gives NULL out (the functions are STRICT).
SELECT byok.decrypt_text(byok.encrypt_text('acme', '')) = '' AS empty_ok,
       byok.encrypt('acme', NULL) IS NULL AS null_in_null_out,
       byok.decrypt(NULL) IS NULL AS null_decrypts_to_null;

-- Large values are fine (stored out of line, never compressed).
SELECT length(byok.decrypt_text(byok.encrypt_text('acme', repeat('x', 1000000)))) AS len;

-- The context binds a value to where it belongs: the same context must be given to decrypt.
SELECT byok.decrypt(card) FROM customers WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.decrypt(card, 'customers.email') FROM customers WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- A modified value never opens. Flip each byte of a sealed value in turn:
-- version/algorithm bytes are refused on input (22P02), a changed key id names no
-- key (42704), and any change to nonce, ciphertext or tag fails authentication (22000).
CREATE FUNCTION pg_temp.flip_each_byte(v byok.encrypted) RETURNS TABLE (pos int, outcome text)
LANGUAGE plpgsql AS $f$
DECLARE
    raw bytea := decode(substr(v::text, 6), 'base64');
BEGIN
    FOR i IN 0 .. length(raw) - 1 LOOP
        pos := i;
        BEGIN
            PERFORM byok.decrypt(('byok:' || encode(set_byte(raw, i, get_byte(raw, i) # 1), 'base64'))::byok.encrypted);
            outcome := 'OPENED';
        EXCEPTION WHEN OTHERS THEN
            outcome := SQLSTATE;
        END;
        RETURN NEXT;
    END LOOP;
END $f$;
SELECT outcome, min(pos) AS first_byte, max(pos) AS last_byte, count(*) AS positions
  FROM pg_temp.flip_each_byte(byok.encrypt_text('acme', 'tamper me'))
 GROUP BY outcome ORDER BY first_byte;

-- Truncated values: too short to be a value at all (22P02), or failing authentication (22000).
CREATE FUNCTION pg_temp.truncate_each_length(v byok.encrypted) RETURNS TABLE (len int, outcome text)
LANGUAGE plpgsql AS $f$
DECLARE
    raw bytea := decode(substr(v::text, 6), 'base64');
BEGIN
    FOR i IN 0 .. length(raw) - 1 LOOP
        len := i;
        BEGIN
            PERFORM byok.decrypt(('byok:' || encode(substr(raw, 1, i), 'base64'))::byok.encrypted);
            outcome := 'OPENED';
        EXCEPTION WHEN OTHERS THEN
            outcome := SQLSTATE;
        END;
        RETURN NEXT;
    END LOOP;
END $f$;
SELECT outcome, min(len) AS shortest, max(len) AS longest, count(*) AS lengths
  FROM pg_temp.truncate_each_length(byok.encrypt_text('acme', 'tamper me'))
 GROUP BY outcome ORDER BY shortest;

-- One failure in full: the message says the value or its context does not match, never which byte.
-- (A bit is flipped: setting a byte to a fixed value would leave it unchanged
-- whenever the random ciphertext already held that value.)
SELECT byok.decrypt_text(('byok:' || encode(set_byte(b, 30, get_byte(b, 30) # 1), 'base64'))::byok.encrypted)
  FROM (SELECT decode(substr(byok.encrypt_text('acme', 'tamper me')::text, 6), 'base64') AS b) s;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- A value cannot be moved to another row: bind it to the row with the context.
UPDATE customers SET email = byok.encrypt_text(tenant_id, 'ann@example.com', 'customers.email:' || id) WHERE id = 1;
SELECT byok.decrypt_text(email, 'customers.email:' || id) FROM customers WHERE id = 1;
SELECT byok.decrypt_text(c1.email, 'customers.email:' || c2.id) FROM customers c1, customers c2 WHERE c1.id = 1 AND c2.id = 2;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- decrypt_text refuses bytes that are not text in the database encoding (SQLSTATE 22021).
SELECT byok.decrypt_text(byok.encrypt('acme', '\xff00fe'::bytea));
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.decrypt(byok.encrypt('acme', '\xff00fe'::bytea)) AS bytes_are_fine;

-- Unknown tenants (42704) and malformed tenant ids (22023).
SELECT byok.encrypt_text('no_such_tenant', 'x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.encrypt_text('bad tenant id!', 'x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- byok.tenant restricts a session (or a transaction, with SET LOCAL) to one tenant (42501).
BEGIN;
SET LOCAL byok.tenant = 'globex';
SELECT id, byok.decrypt_text(email) FROM customers WHERE id = 2;
SELECT byok.decrypt_text(email, 'customers.email:' || id) FROM customers WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN;
SET LOCAL byok.tenant = 'globex';
SELECT byok.encrypt_text('acme', 'x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;
SHOW byok.tenant;

-- Applications need no rights on the key catalog to encrypt and decrypt: the
-- byok_user role and a grant of the tenant (byok.grant_tenant) are enough.
CREATE ROLE byok_app_test LOGIN IN ROLE byok_user;
GRANT SELECT, INSERT ON customers TO byok_app_test;
SELECT byok.grant_tenant('byok_app_test', 'globex');
SET ROLE byok_app_test;
SELECT * FROM byok.wrapped_data_keys;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO customers VALUES (3, 'globex', byok.encrypt_text('globex', 'carol@example.org'), NULL);
SELECT id, byok.decrypt_text(email) FROM customers WHERE id IN (2, 3) ORDER BY id;
-- but may not administer keys
SELECT byok.rotate_data_key('globex');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;

-- The backend keeps the ready cipher of each data key: repeated use hits the cache.
SELECT cached_keys > 0 AS has_keys, hits > 0 AS has_hits FROM byok.backend_cache_stats();
SELECT byok.revoke_tenant('byok_app_test', 'globex');
DROP OWNED BY byok_app_test;
DROP ROLE byok_app_test;

DROP TABLE customers;
SELECT byok.destroy_tenant_keys('acme', 'acme');
SELECT byok.destroy_tenant_keys('globex', 'globex');
