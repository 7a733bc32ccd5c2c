\set VERBOSITY terse
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- Threat: code owned by an untrusted role run with the extension's rights.
-- Re-encryption jobs and key-reference counts read and rewrite registered
-- tables. Such a table's owner controls its triggers, defaults, row-level
-- security policies, index expressions and rules, so every statement byok_pg
-- runs against a user table runs as that table's owner, inside a
-- security-restricted operation (as VACUUM and REFRESH MATERIALIZED VIEW do),
-- also in the background job worker. Only permanent ordinary or partitioned
-- tables can be registered.
SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "owner_t",
  "encryption": {"provider": "local", "local": {"key_id": "owner-t-cmk"}}}');
CREATE ROLE sly_owner LOGIN IN ROLE byok_user;
CREATE ROLE owner_officer LOGIN IN ROLE byok_admin;
GRANT CREATE ON SCHEMA public TO sly_owner;
CREATE TABLE owner_log (ran_as name, note text);
GRANT INSERT ON owner_log TO PUBLIC;

\c - sly_owner
-- The owner's table: every hook a table has, each trying to use the rights of
-- whoever runs it (and, as a superuser, to make the owner one).
CREATE FUNCTION public.sly(note text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.owner_log VALUES (current_user, note);
    BEGIN
        EXECUTE 'ALTER ROLE sly_owner SUPERUSER';
        INSERT INTO public.owner_log VALUES (current_user, note || ': became superuser');
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END $$;
CREATE FUNCTION public.sly_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.sly(TG_OP || ' trigger');
    RETURN NEW;
END $$;
CREATE FUNCTION public.sly_immutable(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM public.sly('index expression');
    RETURN $1;
END $$;
CREATE TABLE sly_table (id int, tenant text DEFAULT 'owner_t', v byok.encrypted,
                        note text DEFAULT (public.sly('default') :: text));
CREATE TRIGGER sly BEFORE UPDATE ON sly_table FOR EACH ROW EXECUTE FUNCTION public.sly_trigger();
CREATE INDEX sly_index ON sly_table (public.sly_immutable(length(v::text)));
ALTER TABLE sly_table ENABLE ROW LEVEL SECURITY;
ALTER TABLE sly_table FORCE ROW LEVEL SECURITY;
CREATE POLICY sly_policy ON sly_table USING (public.sly('policy'));
CREATE VIEW sly_view AS SELECT * FROM sly_table WHERE public.sly('view');
CREATE TEMP TABLE sly_temp (v byok.encrypted);
GRANT SELECT, UPDATE ON sly_table, sly_view TO owner_officer;
\c - postgres
SELECT byok.grant_tenant('sly_owner', 'owner_t');
\c - sly_owner
INSERT INTO sly_table (id, v) SELECT g, byok.encrypt_text('owner_t', 'value ' || g) FROM generate_series(1, 20) g;
\c - postgres
TRUNCATE owner_log;

-- Only permanent ordinary or partitioned tables can be registered.
\c - owner_officer
SELECT byok.protect_column('sly_view', 'v');
SELECT byok.protect_column('pg_catalog.pg_class', 'relname');
SELECT byok.protect_column('byok.tenant_config', 'config');
-- The registry itself is not writable by administrators (that skipped
-- protect_column's checks): only protect_column and the extension write it.
INSERT INTO byok.protected_column_registry (relid, column_name) VALUES ('sly_table', 'v');
UPDATE byok.protected_column_registry SET context = 'x';
DELETE FROM byok.protected_column_registry;
SELECT byok.protect_column('sly_table', 'v', 'tenant');
SELECT table_name, column_name, tenant_column FROM byok.protected_columns WHERE table_name = 'sly_table'::regclass;
\c - postgres
-- A temporary table belongs to one session: refused too.
CREATE TEMP TABLE super_temp (v byok.encrypted);
SELECT byok.protect_column('super_temp', 'v');
DROP TABLE super_temp;

-- The key is rotated. The table forces row-level security on its owner: a job
-- (or a count) would read it as the owner with the owner's policy applied and
-- could miss rows, so it refuses instead; the policy never runs for it.
SELECT byok.rotate_data_key('owner_t') > 0 AS rotated;
SELECT dek_id AS old_key FROM byok.data_keys WHERE tenant_id = 'owner_t' AND state = 'decrypt-only' \gset
\c - owner_officer
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT byok.start_reencrypt('owner_t');
\c - sly_owner
ALTER TABLE sly_table NO FORCE ROW LEVEL SECURITY;
-- Now the job rewrites the table: the owner's trigger and index expression
-- run, but as the owner and in a restricted context, never as a superuser.
\c - owner_officer
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT byok.start_reencrypt('owner_t') AS job \gset
SELECT byok.wait_job(:job, '1 minute');
SELECT state, rows_done, last_error FROM byok.jobs WHERE job_id = :job;
SELECT byok.data_key_references(:old_key) AS old_key_values;
\c - postgres
-- The same through the background worker (it connects as the bootstrap superuser).
SELECT byok.rotate_data_key('owner_t') > 0 AS rotated;
SELECT byok.start_reencrypt('owner_t') AS job \gset
SELECT byok.wait_job(:job, '1 minute');
SELECT state, rows_done, last_error FROM byok.jobs WHERE job_id = :job;
SELECT DISTINCT ran_as, note FROM owner_log ORDER BY 1, 2;
SELECT rolsuper FROM pg_roles WHERE rolname = 'sly_owner';

-- Owner code leaves no settings behind in the backend that ran it, and cannot
-- act as an administrator, even when the owner is one. The trigger now also
-- changes settings with plain SET (which would outlive the function) and
-- tries to grant its owner a tenant it may not use.
SELECT byok.configure_tenant('{"customer": "Other", "tenant_id": "owner_other",
  "encryption": {"provider": "local", "local": {"key_id": "owner-other-cmk"}}}');
GRANT byok_admin TO sly_owner;
\c - sly_owner
CREATE OR REPLACE FUNCTION public.sly_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.sly(TG_OP || ' trigger');
    SET search_path = public, pg_temp;
    SET work_mem = '77kB';
    BEGIN
        PERFORM byok.grant_tenant('sly_owner', 'owner_other');
        INSERT INTO public.owner_log VALUES (current_user, 'granted itself owner_other');
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO public.owner_log VALUES (current_user, 'grant_tenant refused: ' || SQLSTATE);
    END;
    RETURN NEW;
END $$;
\c - postgres
TRUNCATE owner_log;
SELECT byok.rotate_data_key('owner_t') > 0 AS rotated;
-- One batch in this superuser's own backend and transaction:
BEGIN;
SELECT byok.start_reencrypt('owner_t') AS job \gset
UPDATE byok.reencrypt_jobs SET state = 'running' WHERE job_id = :job;
SELECT byok.reencrypt_step(:job, 100);
SHOW search_path;
SHOW work_mem;
COMMIT;
-- and the rest through the background worker.
SELECT byok.wait_job(:job, '1 minute');
SELECT DISTINCT ran_as, note FROM owner_log ORDER BY 1, 2;
SELECT count(*) AS self_grants FROM byok.tenant_grants WHERE tenant_id = 'owner_other';
SELECT rolsuper FROM pg_roles WHERE rolname = 'sly_owner';
REVOKE byok_admin FROM sly_owner;

-- A registered table turned into a view (PostgreSQL 15 still lets an owner
-- give an empty table an ON SELECT rule) leaves the registry at once, so no
-- job or count ever reads the view's code.
\c - sly_owner
CREATE TABLE sly_empty (id int, tenant text, v byok.encrypted, note text);
GRANT SELECT, UPDATE ON sly_empty TO owner_officer;
\c - owner_officer
SELECT byok.protect_column('sly_empty', 'v', 'tenant');
\c - sly_owner
CREATE RULE "_RETURN" AS ON SELECT TO sly_empty DO INSTEAD
    SELECT id, tenant, v, note FROM public.sly_table WHERE public.sly('rule');
\c - postgres
TRUNCATE owner_log;
SELECT relkind FROM pg_class WHERE oid = 'sly_empty'::regclass;
SELECT count(*) AS registered FROM byok.protected_column_registry WHERE relid = 'sly_empty'::regclass;
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT count(*) AS rule_ran FROM owner_log;
\c - sly_owner
DROP VIEW sly_empty;
\c - postgres

-- A registered table that is dropped leaves the registry (and nothing breaks).
SELECT dek_id AS old_key FROM byok.data_keys WHERE tenant_id = 'owner_t' AND state IN ('decrypt-only', 'retired') ORDER BY dek_id LIMIT 1 \gset
DROP VIEW sly_view;
DROP TABLE sly_table;
SELECT count(*) AS registered FROM byok.protected_column_registry WHERE relid::oid NOT IN (SELECT oid FROM pg_class);
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT byok.destroy_data_key(:old_key, :old_key);
-- A registered column that is dropped, or renamed, is followed.
CREATE TABLE owner_followed (id int, tenant text, a byok.encrypted, b byok.encrypted);
SELECT byok.protect_column('owner_followed', 'a', 'tenant');
SELECT byok.protect_column('owner_followed', 'b', 'tenant');
ALTER TABLE owner_followed RENAME COLUMN a TO a_renamed;
ALTER TABLE owner_followed DROP COLUMN b;
SELECT table_name, column_name FROM byok.protected_columns WHERE table_name = 'owner_followed'::regclass ORDER BY 1, 2;
SELECT byok.wait_job(byok.start_reencrypt('owner_t'), '1 minute');

DROP TABLE owner_followed, owner_log;
\c - sly_owner
DROP FUNCTION public.sly_trigger(), public.sly_immutable(int), public.sly(text);
\c - postgres
SELECT byok.destroy_tenant_keys('owner_t', 'owner_t');
SELECT byok.destroy_tenant_keys('owner_other', 'owner_other');
REVOKE CREATE ON SCHEMA public FROM sly_owner;
SELECT byok.revoke_tenant('sly_owner', 'owner_t');
DROP ROLE sly_owner, owner_officer;
