\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_io",
  "encryption": {"provider": "local", "local": {"key_id": "acme-io-cmk"}}}');

-- The text form is "byok:" followed by base64 of the sealed bytes, so values survive
-- COPY, pg_dump and any text channel; binary COPY carries the raw bytes.
SELECT left(byok.encrypt_text('acme_io', 'x')::text, 5) AS prefix;

-- Malformed literals are refused with the reason (SQLSTATE 22P02), never a crash.
SELECT 'hello'::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ''::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT 'byok:***'::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT 'byok:AAAA'::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ('byok:' || encode('\x03'::bytea || decode(repeat('00', 40), 'hex'), 'base64'))::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ('byok:' || encode('\x0107'::bytea || decode(repeat('00', 40), 'hex'), 'base64'))::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ('byok:' || encode('\x0101'::bytea || decode(repeat('00', 40), 'hex'), 'base64'))::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- COPY out and back in, in text and in binary: every value still opens.
CREATE TABLE notes (id int, body byok.encrypted);
INSERT INTO notes SELECT g, byok.encrypt_text('acme_io', 'note ' || g, 'notes.body')
  FROM generate_series(1, 100) g;
CREATE TABLE notes_text (LIKE notes);
CREATE TABLE notes_binary (LIKE notes);
COPY notes TO '/tmp/byok_pg_regress_notes.txt';
COPY notes_text FROM '/tmp/byok_pg_regress_notes.txt';
COPY notes TO '/tmp/byok_pg_regress_notes.bin' WITH (FORMAT binary);
COPY notes_binary FROM '/tmp/byok_pg_regress_notes.bin' WITH (FORMAT binary);
SELECT count(*) FILTER (WHERE byok.decrypt_text(t.body, 'notes.body') = 'note ' || t.id) AS text_ok,
       count(*) FILTER (WHERE byok.decrypt_text(b.body, 'notes.body') = 'note ' || b.id) AS binary_ok,
       count(*) FILTER (WHERE t.body::text = n.body::text AND b.body::text = n.body::text) AS identical
  FROM notes n JOIN notes_text t USING (id) JOIN notes_binary b USING (id);

-- Binary input checks the structure too: a binary COPY file holding a 10-byte
-- value is refused (SQLSTATE 22P03). (The file is written through perl.)
COPY (SELECT encode('\x5047434f50590aff0d0a00'::bytea   -- signature
                 || '\x0000000000000000'::bytea         -- flags, header extension
                 || '\x0001'::bytea || '\x0000000a'::bytea -- one field of 10 bytes
                 || '\x01010000000000000001'::bytea     -- version, algorithm, key id: nothing else
                 || '\xffff'::bytea, 'hex'))
  TO PROGRAM 'perl -ne ''chomp; print pack("H*", $_)'' > /tmp/byok_pg_regress_short.bin';
CREATE TABLE one_value (v byok.encrypted);
COPY one_value FROM '/tmp/byok_pg_regress_short.bin' WITH (FORMAT binary);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) AS loaded FROM one_value;

-- Casts with bytea, for drivers in binary mode (their parameters arrive as
-- bytea): the bytes are the binary format. byok.encrypted::bytea is free and
-- explicit; bytea converts back on assignment or when cast, checked like every
-- input.
SELECT castsource::regtype, casttarget::regtype,
       CASE castcontext WHEN 'e' THEN 'explicit' WHEN 'a' THEN 'assignment' ELSE 'implicit' END AS applies,
       CASE castmethod WHEN 'b' THEN 'same bytes' ELSE castfunc::regproc::text END AS how
  FROM pg_cast WHERE 'byok.encrypted'::regtype IN (castsource, casttarget) ORDER BY 1::text;
SELECT body::bytea = byok.encrypted_send(body) AS same_as_send FROM notes WHERE id = 1;
-- A bytea parameter into a byok.encrypted column: assignment.
PREPARE put(int, bytea) AS INSERT INTO one_value VALUES ($2);
SELECT body::bytea AS note7 FROM notes WHERE id = 7 \gset
EXECUTE put(1, :'note7');
SELECT byok.decrypt_text(v, 'notes.body') FROM one_value;
-- In an expression the cast is written out:
SELECT byok.decrypt_text((SELECT body::bytea FROM notes WHERE id = 8)::byok.encrypted, 'notes.body');
-- never taken implicitly, so no function silently reads arbitrary bytes as a value:
SELECT byok.decrypt_text((SELECT body::bytea FROM notes WHERE id = 8), 'notes.body');
-- Bytes that are not a sealed value fail like text input does (22P02).
SELECT '\x0101000000000000000102'::bytea::byok.encrypted;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
EXECUTE put(2, '\x02');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) AS stored FROM one_value;

DROP TABLE notes, notes_text, notes_binary, one_value;
SELECT byok.destroy_tenant_keys('acme_io', 'acme_io');
