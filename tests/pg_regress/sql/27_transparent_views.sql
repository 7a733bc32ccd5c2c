\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- Transparent mode: for applications (and ORMs) that should read and write
-- plaintext while the table stores byok.encrypted. The table keeps its
-- encrypted columns, registered as usual; byok.make_transparent gives it a
-- view that decrypts them and seals what is written through it.
SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "acme_tv",
  "encryption": {"provider": "local", "local": {"key_id": "acme-tv-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Globex", "tenant_id": "globex_tv",
  "encryption": {"provider": "local", "local": {"key_id": "globex-tv-cmk"}}}');
CREATE TABLE patients (
    id serial PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    ssn byok.encrypted,
    notes byok.encrypted,
    created_at date NOT NULL DEFAULT '2026-01-01'
);
SELECT byok.protect_column('patients', 'ssn', 'tenant', 'patients.ssn');
SELECT byok.protect_column('patients', 'notes', 'tenant', 'patients.notes');
-- The owner names the tenant column (it must match the registry, which
-- re-encryption jobs read).
SELECT byok.make_transparent('patients', tenant_column => 'tenant');
\d patients_decrypted

-- The application role is granted acme_tv only, and reaches the data through
-- the view; the table's own privileges apply (the view is security_invoker).
CREATE ROLE tv_app LOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('tv_app', 'acme_tv');
GRANT SELECT, INSERT, UPDATE, DELETE ON patients, patients_decrypted TO tv_app;
GRANT USAGE ON SEQUENCE patients_id_seq TO tv_app;
SET ROLE tv_app;

-- INSERT through the view seals; RETURNING shows what was stored (the
-- table's defaults included) with the plaintext.
INSERT INTO patients_decrypted (tenant, name, ssn, notes)
VALUES ('acme_tv', 'Ada', '123-45-6789', 'allergic to penicillin'),
       ('acme_tv', 'Bob', '987-65-4321', NULL)
RETURNING *;
SELECT id, name, ssn, notes FROM patients_decrypted ORDER BY id;
-- The table holds ciphertext only.
SELECT id, left(ssn::text, 5) AS ssn_stored, ssn::text LIKE '%6789%' AS readable
  FROM patients ORDER BY id;

-- UPDATE computes on the plaintext: col = col || 'x' appends to the value.
UPDATE patients_decrypted SET notes = notes || ' (confirmed)' WHERE name = 'Ada' RETURNING id, notes;
-- An unchanged column keeps its ciphertext; a changed one is sealed anew.
CREATE TEMP TABLE before AS SELECT id, ssn::text AS ssn, notes::text AS notes FROM patients;
UPDATE patients_decrypted SET notes = 'new note' WHERE name = 'Bob';
SELECT p.id, p.ssn::text = b.ssn AS ssn_kept, p.notes::text IS NOT DISTINCT FROM b.notes AS notes_kept
  FROM patients p JOIN before b USING (id) ORDER BY id;
-- A tenant the role is not granted: refused, nothing written.
INSERT INTO patients_decrypted (tenant, name, ssn) VALUES ('globex_tv', 'Eve', '000-00-0000');
UPDATE patients_decrypted SET tenant = 'globex_tv' WHERE name = 'Bob';
-- A value with no tenant is refused, never stored as NULL.
INSERT INTO patients_decrypted (tenant, name, ssn) VALUES (NULL, 'Nobody', '1');
SELECT count(*) AS rows FROM patients;
DELETE FROM patients_decrypted WHERE name = 'Bob' RETURNING name, ssn;
DROP TABLE before;
RESET ROLE;

-- Row-level security on the table holds through the view.
ALTER TABLE patients ENABLE ROW LEVEL SECURITY;
CREATE POLICY only_ada ON patients USING (name = 'Ada');
INSERT INTO patients (tenant, name, ssn) VALUES ('acme_tv', 'Hidden', byok.encrypt_text('acme_tv', 'x', 'patients.ssn'));
SET ROLE tv_app;
SELECT name, ssn FROM patients_decrypted ORDER BY id;
UPDATE patients_decrypted SET ssn = 'changed' WHERE name = 'Hidden';
RESET ROLE;
SELECT name, byok.decrypt_text(ssn, 'patients.ssn') AS ssn FROM patients WHERE name = 'Hidden';
DROP POLICY only_ada ON patients;
ALTER TABLE patients DISABLE ROW LEVEL SECURITY;

-- After the table changes, make_transparent regenerates the view, keeping
-- its grants.
ALTER TABLE patients ADD COLUMN phone byok.encrypted;
SELECT byok.protect_column('patients', 'phone', 'tenant', 'patients.phone');
SELECT byok.make_transparent('patients', 'tenant');
SELECT column_name FROM information_schema.columns WHERE table_name = 'patients_decrypted' ORDER BY ordinal_position;
SELECT grantee, string_agg(privilege_type, ', ' ORDER BY privilege_type) FROM information_schema.role_table_grants
 WHERE table_name = 'patients_decrypted' AND grantee = 'tv_app' GROUP BY 1;
SET ROLE tv_app;
INSERT INTO patients_decrypted (tenant, name, phone) VALUES ('acme_tv', 'Cy', '555-0100') RETURNING name, phone;
RESET ROLE;
-- A registration that disagrees with the tenant column named is refused.
SELECT byok.protect_column('patients', 'phone', 'name', 'patients.phone');
SELECT byok.make_transparent('patients', 'tenant');
SELECT byok.protect_column('patients', 'phone', 'tenant', 'patients.phone');
-- The contexts the view was made with stay: a registration changed since
-- (any role with UPDATE on the column may register it) is refused.
SELECT byok.protect_column('patients', 'phone', 'tenant', 'patients.phone.v2');
SELECT byok.make_transparent('patients', 'tenant');
SELECT byok.protect_column('patients', 'phone', 'tenant', 'patients.phone');
-- After a rename, writes through the view stop (another role could create a
-- table of the old name) until the view is regenerated.
ALTER TABLE patients RENAME TO patients_old;
INSERT INTO patients_decrypted (tenant, name, ssn) VALUES ('acme_tv', 'Dee', '1');
ALTER TABLE patients_old RENAME TO patients;
-- It never replaces a view it did not make (even one dressed up as its own),
-- and only the table's owner may call it.
CREATE ROLE tv_officer IN ROLE byok_admin;
GRANT CREATE ON SCHEMA public TO tv_officer;
SET ROLE tv_officer;
CREATE VIEW squatted AS SELECT 1 AS x;
COMMENT ON VIEW squatted IS 'byok_pg transparent view of public.patients';
RESET ROLE;
SELECT byok.make_transparent('patients', 'tenant', 'squatted');
SET ROLE tv_officer;
DROP VIEW squatted;
SELECT byok.make_transparent('patients', 'tenant');
RESET ROLE;
REVOKE CREATE ON SCHEMA public FROM tv_officer;
-- A context is any text a key officer chose: it stays a string literal in the
-- generated trigger function, whatever quotes it holds.
CREATE TABLE quoted (id int PRIMARY KEY, tenant text, v byok.encrypted);
SELECT byok.protect_column('quoted', 'v', 'tenant', $ctx$x' || pg_sleep(0) || '$body$ $$ '' %I$ctx$);
SELECT byok.make_transparent('quoted', 'tenant');
INSERT INTO quoted_decrypted VALUES (1, 'acme_tv', 'quoted ok');
SELECT v, (SELECT byok.decrypt_text(q.v, $ctx$x' || pg_sleep(0) || '$body$ $$ '' %I$ctx$) FROM quoted q) AS direct
  FROM quoted_decrypted;
DROP VIEW quoted_decrypted;
DROP FUNCTION quoted_decrypted_write();
DROP TABLE quoted;
-- Without a tenant column, values are sealed for byok.tenant; an identity key
-- is drawn through the view.
CREATE TABLE memos (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int NOT NULL DEFAULT 0, body byok.encrypted);
SELECT byok.protect_column('memos', 'body', NULL, 'memos.body');
SELECT byok.make_transparent('memos');
INSERT INTO memos_decrypted (body) VALUES ('no tenant set');
SET byok.tenant = 'acme_tv';
INSERT INTO memos_decrypted (body) VALUES ('first'), ('second') RETURNING *;
UPDATE memos_decrypted SET body = upper(body) WHERE id = 2 RETURNING *;
RESET byok.tenant;
SELECT id, n, byok.decrypt_text(body, 'memos.body') FROM memos ORDER BY id;
-- A primary key changed behind the view's back: a write matching several
-- rows is refused (and undone), not applied to all of them.
ALTER TABLE memos DROP CONSTRAINT memos_pkey, ADD PRIMARY KEY (id, n);
INSERT INTO memos OVERRIDING SYSTEM VALUE SELECT 2, 1, body FROM memos WHERE id = 3;
SET byok.tenant = 'acme_tv';
DELETE FROM memos_decrypted WHERE body = 'FIRST';
RESET byok.tenant;
SELECT count(*) AS still_three FROM memos;
DROP VIEW memos_decrypted;
DROP FUNCTION memos_decrypted_write();
DROP TABLE memos;
-- A table without registered columns, or without a primary key:
CREATE TABLE plain_t (id int PRIMARY KEY, v text);
SELECT byok.make_transparent('plain_t');
SELECT byok.make_transparent('plain_t', 'no_such_column');
CREATE TABLE no_pk (v byok.encrypted);
SELECT byok.protect_column('no_pk', 'v', NULL, 'no_pk.v');
SELECT byok.make_transparent('no_pk');

DROP VIEW patients_decrypted;
DROP FUNCTION patients_decrypted_write();
DROP TABLE patients, plain_t, no_pk;
DROP ROLE tv_app, tv_officer;
SELECT byok.destroy_tenant_keys('acme_tv', 'acme_tv');
SELECT byok.destroy_tenant_keys('globex_tv', 'globex_tv');
