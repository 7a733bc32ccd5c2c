\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- For errors whose text carries a key id or a sealed value (both differ from
-- run to run): the SQLSTATE and the message with numbers replaced.
CREATE FUNCTION error_of(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE statement;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9]+', 'N', 'g');
END
$$;

-- Searchable encryption: equality lookups through an ordinary index on an
-- encrypted column, per tenant, under the tenant's own keys.
--
-- A tenant needs an index key (256 bits, made and wrapped by its master key
-- like a data key). byok.rotate_index_key makes the first one.
SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_s",
  "encryption": {"provider": "local", "local": {"key_id": "acme-search-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex_s",
  "encryption": {"provider": "local", "local": {"key_id": "globex-search-cmk"}}}');
SELECT byok.rotate_index_key('acme_s') > 0 AS acme_index_key,
       byok.rotate_index_key('globex_s') > 0 AS globex_index_key;
-- Index keys are listed with the data keys, by purpose.
SELECT tenant_id, purpose, state, cmk_id, has_primary_wrap FROM byok.data_keys
 WHERE tenant_id IN ('acme_s', 'globex_s') ORDER BY tenant_id, purpose;

-- A registered column declares how its terms are made: their length (bytes
-- of HMAC-SHA-256 kept; 8 by default) and the normalization applied to a
-- value before its term is computed, on write and on probe alike.
CREATE TABLE users (id int PRIMARY KEY, tenant text NOT NULL, email byok.encrypted NOT NULL);
SELECT byok.protect_column('users', 'email', 'tenant', 'users.email');
SELECT byok.make_searchable('users', 'email', normalization => 'nfkc,lowercase,trim');
SELECT column_name, context, search_term_length, search_normalization FROM byok.protected_columns
 WHERE table_name = 'users'::regclass;

-- Writing with searchable => true stores the term inside the value.
INSERT INTO users
SELECT g, t, byok.encrypt_text(t, 'user' || g || '@example.com', 'users.email', searchable => true)
  FROM generate_series(1, 2000) g, LATERAL (SELECT CASE WHEN g % 2 = 0 THEN 'acme_s' ELSE 'globex_s' END) AS x(t);

-- byok.term reads the term from the value's bytes, without any key, so it
-- can be indexed: the index key id (8 bytes), the term length, the term.
SELECT length(byok.term(email)) AS term_bytes, byok.index_key_id(email) = k.dek_id AS under_index_key
  FROM users JOIN byok.data_keys k ON k.tenant_id = users.tenant AND k.purpose = 'index' WHERE id = 2;
CREATE INDEX users_email_term ON users (byok.term(email));
ANALYZE users;

-- The probe, computed once per query under the tenant's index key:
SELECT id FROM users
 WHERE byok.term(email) = byok.search_term('acme_s', 'user42@example.com', 'users.email');
-- The one-call form: finds candidates through the index, then decrypts each
-- to confirm it (a truncated term's false positives never reach the result).
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');
-- The planner uses the index:
EXPLAIN (COSTS OFF)
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');

-- Normalization applies to the probe as to the values: NFKC folds the
-- full-width letters, then lowercase, then trimming.
SELECT id FROM users WHERE byok.matches(email, 'acme_s', '  USER42@Example.COM ', 'users.email');
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'ｕｓｅｒ４２@example.com', 'users.email');
-- Different values do not match.
SELECT count(*) FROM users WHERE byok.matches(email, 'acme_s', 'user4@example.co', 'users.email');

-- Terms are per tenant: globex's row 43 is not found with acme's probe, and
-- the same plaintext has unrelated terms in different tenants and contexts.
SELECT count(*) FROM users WHERE byok.matches(email, 'acme_s', 'user43@example.com', 'users.email');
SELECT id FROM users WHERE byok.matches(email, 'globex_s', 'user43@example.com', 'users.email');
SELECT byok.search_term('acme_s', 'x', 'users.email') <> byok.search_term('globex_s', 'x', 'users.email') AS per_tenant,
       byok.search_term('acme_s', 'x', 'users.email') <> byok.search_term('acme_s', 'x', 'users.name') AS per_context;

-- Edge cases: an empty string is a value like any other; NULL finds nothing.
INSERT INTO users VALUES (9000, 'acme_s', byok.encrypt_text('acme_s', '', 'users.email', searchable => true));
SELECT id FROM users WHERE byok.matches(email, 'acme_s', '', 'users.email');
SELECT id FROM users WHERE byok.matches(email, 'acme_s', '   ', 'users.email');  -- trimmed to ''
SELECT count(*) FROM users WHERE byok.matches(email, 'acme_s', NULL, 'users.email');
SELECT byok.search_term('acme_s', NULL, 'users.email') IS NULL AS strict;
-- Combining characters: NFKC composes e + U+0301 into é.
INSERT INTO users VALUES (9001, 'acme_s', byok.encrypt_text('acme_s', 'José@example.com', 'users.email', searchable => true));
SELECT id FROM users WHERE byok.matches(email, 'acme_s', E'Jose\u0301@EXAMPLE.com', 'users.email');

-- A value sealed without searchable => true has no term: NULL, never found.
-- (A CHECK constraint keeps such values out of a searchable column.)
INSERT INTO users VALUES (9002, 'acme_s', byok.encrypt_text('acme_s', 'plain@example.com', 'users.email'));
SELECT byok.term(email) IS NULL AS no_term, byok.index_key_id(email) IS NULL AS no_index_key FROM users WHERE id = 9002;
SELECT count(*) FROM users WHERE byok.matches(email, 'acme_s', 'plain@example.com', 'users.email');
DELETE FROM users WHERE id = 9002;
ALTER TABLE users ADD CONSTRAINT email_searchable CHECK (byok.term(email) IS NOT NULL);
SELECT error_of($$INSERT INTO users VALUES (9002, 'acme_s', byok.encrypt_text('acme_s', 'plain@example.com', 'users.email'))$$);

-- A column's settings: a term length out of range, an unknown normalization,
-- a column not registered, another column with the same context and other settings.
SELECT byok.make_searchable('users', 'email', term_length => 1);
SELECT byok.make_searchable('users', 'email', normalization => 'soundex');
-- Once a column holds values with terms its settings are fixed (lookups would
-- miss those rows); repeating them is fine.
SELECT byok.make_searchable('users', 'email', term_length => 16, normalization => 'nfkc,lowercase,trim');
SELECT byok.make_searchable('users', 'email', normalization => 'nfkc,lowercase,trim');
CREATE TABLE contacts (id int, email byok.encrypted);
SELECT byok.make_searchable('contacts', 'email');
SELECT byok.protect_column('contacts', 'email', NULL, 'users.email');
DROP TABLE contacts;

-- A searchable column's context is its own, and a context belongs to the
-- owner of the columns registered with it: another table owner can neither
-- share a searchable context nor take over one in use (and so cannot change
-- how another column's terms are made).
CREATE TABLE plain_notes (id int, body byok.encrypted);
SELECT byok.protect_column('plain_notes', 'body', NULL, 'plain_notes.body');
CREATE ROLE search_squatter;
GRANT byok_admin TO search_squatter;
CREATE TABLE squat (id int, v byok.encrypted);
ALTER TABLE squat OWNER TO search_squatter;
SET ROLE search_squatter;
SELECT byok.protect_column('squat', 'v', NULL, 'users.email');
SELECT byok.protect_column('squat', 'v', NULL, 'plain_notes.body');
SELECT byok.protect_column('squat', 'v', NULL, 'squat.v');
SELECT byok.make_searchable('squat', 'v');
-- and once registered, it cannot move onto a context in use either
SELECT byok.protect_column('squat', 'v', NULL, 'plain_notes.body');
RESET ROLE;
-- The empty context is every unnamed column's: a searchable column needs its own.
CREATE TABLE unnamed (id int, v byok.encrypted);
SELECT byok.protect_column('unnamed', 'v');
SELECT byok.make_searchable('unnamed', 'v');
SELECT byok.protect_column('users', 'email', 'tenant', '');
DROP TABLE unnamed;
-- The owner of plain_notes cannot make it searchable while another column shares its context.
CREATE TABLE more_notes (id int, body byok.encrypted);
SELECT byok.protect_column('more_notes', 'body', NULL, 'plain_notes.body');
SELECT byok.make_searchable('plain_notes', 'body');
DROP TABLE squat, plain_notes, more_notes;

-- Terms are public (byok.term): a value forged with a copy of another row's
-- term is not a match, whether its data key is another tenant's or the
-- tenant's own (then it fails authentication, which the audit trail records).
CREATE FUNCTION raw_bytes(v byok.encrypted) RETURNS bytea LANGUAGE sql AS $$ SELECT decode(substr(v::text, 6), 'base64') $$;
CREATE FUNCTION sealed(b bytea) RETURNS byok.encrypted LANGUAGE sql AS $$ SELECT ('byok:' || encode(b, 'base64'))::byok.encrypted $$;
INSERT INTO users
SELECT 9100 + n, 'acme_s', sealed('\x0201'::bytea || int8send(k.dek_id) || substr(raw_bytes(u.email), 11, 17) || decode(repeat('00', 40), 'hex'))
  FROM users u, byok.data_keys k, (VALUES (0, 'globex_s'), (1, 'acme_s')) AS f(n, t)
 WHERE u.id = 42 AND k.tenant_id = f.t AND k.purpose = 'data' AND k.state = 'active';
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');
DELETE FROM users WHERE id >= 9100;
DROP FUNCTION raw_bytes(byok.encrypted), sealed(bytea);

-- Errors. A searchable value (envelope version 2) whose header is malformed
-- is refused on input, like any malformed value:
SELECT ('byok:' || encode('\x0201'::bytea || int8send(7) || int8send(9) || '\x00'::bytea
                          || decode(repeat('00', 40), 'hex'), 'base64'))::byok.encrypted;
-- A tenant without an index key:
SELECT byok.configure_tenant('{"customer": "Initech", "tenant_id": "initech_s",
  "encryption": {"provider": "local", "local": {"key_id": "initech-search-cmk"}}}');
SELECT byok.encrypt_text('initech_s', 'a', 'users.email', searchable => true);
SELECT byok.search_term('initech_s', 'a', 'users.email');
-- An unknown tenant:
SELECT byok.search_term('nobody', 'a');
-- A role without the tenant's grant computes no probe (a probe is a
-- dictionary oracle) and confirms nothing.
CREATE ROLE search_user LOGIN;
GRANT byok_user TO search_user;
SELECT byok.grant_tenant('search_user', 'acme_s');
GRANT SELECT ON users TO search_user;
SET ROLE search_user;
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');
SELECT id FROM users WHERE byok.matches(email, 'globex_s', 'user43@example.com', 'users.email');
SELECT byok.search_terms('globex_s', 'user43@example.com', 'users.email');
-- byok.tenant restricts a session to one tenant's probes too.
SET byok.tenant = 'acme_s';
SELECT byok.search_term('globex_s', 'x');
RESET byok.tenant;
-- Index keys are for terms only: rotating one is an administrator's act.
SELECT byok.rotate_index_key('acme_s');
RESET ROLE;

-- Rotating the index key: the previous key turns decrypt-only, probes use
-- both (byok.search_terms) until a re-encryption job has rewritten every term.
SELECT byok.rotate_index_key('acme_s') > 0 AS rotated;
SELECT purpose, state FROM byok.data_keys WHERE tenant_id = 'acme_s' ORDER BY dek_id;
SELECT array_length(byok.search_terms('acme_s', 'user42@example.com', 'users.email'), 1) AS probes;
INSERT INTO users VALUES (9003, 'acme_s', byok.encrypt_text('acme_s', 'new@example.com', 'users.email', searchable => true));
-- Old and new rows are both found while the job has not run.
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email')
                        OR byok.matches(email, 'acme_s', 'new@example.com', 'users.email') ORDER BY id;
SELECT byok.wait_job(byok.start_reencrypt('acme_s'), '5 minutes');
SELECT count(*) FILTER (WHERE byok.index_key_id(email) = (SELECT dek_id FROM byok.data_keys
                         WHERE tenant_id = 'acme_s' AND purpose = 'index' AND state = 'active')) = count(*) AS all_rewritten
  FROM users WHERE tenant = 'acme_s';
SELECT purpose, state FROM byok.data_keys WHERE tenant_id = 'acme_s' ORDER BY dek_id;
SELECT array_length(byok.search_terms('acme_s', 'user42@example.com', 'users.email'), 1) AS probes;
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');
-- The job kept every value's term and plaintext.
SELECT count(*) FROM users WHERE tenant = 'acme_s' AND byok.decrypt_text(email, 'users.email') NOT LIKE '%@example.com'
                                                    AND id < 9000;

-- A tenant without an index key keeps unsearchable values in a searchable
-- column: its re-encryption jobs reseal them without a term.
CREATE TABLE notes_s (id int, tenant text, body byok.encrypted);
SELECT byok.protect_column('notes_s', 'body', 'tenant', 'notes_s.body');
SELECT byok.make_searchable('notes_s', 'body');
INSERT INTO notes_s VALUES (1, 'initech_s', byok.encrypt_text('initech_s', 'memo', 'notes_s.body'));
SELECT byok.rotate_data_key('initech_s') > 0 AS rotated;
SELECT byok.wait_job(byok.start_reencrypt('initech_s'), '5 minutes');
SELECT byok.term(body) IS NULL AS no_term, byok.decrypt_text(body, 'notes_s.body') FROM notes_s;
DROP TABLE notes_s;

-- Crypto-shredding destroys the index keys too: every probe fails.
SELECT byok.destroy_tenant_keys('globex_s', 'globex_s');
SELECT purpose, state FROM byok.data_keys WHERE tenant_id = 'globex_s' ORDER BY dek_id;
SELECT error_of($$SELECT id FROM users WHERE byok.matches(email, 'globex_s', 'user43@example.com', 'users.email')$$);
SELECT error_of($$SELECT byok.encrypt_text('globex_s', 'x', 'users.email', searchable => true)$$);
-- acme is untouched.
SELECT id FROM users WHERE byok.matches(email, 'acme_s', 'user42@example.com', 'users.email');

DROP TABLE users;
DROP OWNED BY search_user;
DROP ROLE search_user;
DROP OWNED BY search_squatter;
DROP ROLE search_squatter;
DROP FUNCTION error_of(text);
