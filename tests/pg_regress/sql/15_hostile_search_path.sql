\set VERBOSITY terse
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
-- Data key ids in messages start at 15001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 15000) \gset

-- Threat: catalog shadowing through pg_temp. A function that runs with
-- elevated rights and whose search_path does not name pg_temp searches it
-- FIRST, so a temporary view called pg_roles would be read with the owner's
-- rights. Every such function in byok_pg pins search_path to
-- "pg_catalog, pg_temp" and qualifies what it reads, so a hostile byok_user or
-- byok_admin that shadows every catalog the extension reads gains nothing.
-- Audit records of what ran before this file, still in the queue, land first.
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "shadow_victim",
  "encryption": {"provider": "local", "local": {"key_id": "shadow-victim-cmk"}}}');
CREATE TABLE shadow_secrets (id int, v byok.encrypted);
INSERT INTO shadow_secrets VALUES (1, byok.encrypt_text('shadow_victim', 'the victim''s secret'));
CREATE ROLE shadow_user LOGIN IN ROLE byok_user;
CREATE ROLE shadow_admin LOGIN IN ROLE byok_admin;
GRANT SELECT ON shadow_secrets TO shadow_user, shadow_admin;
GRANT CREATE ON SCHEMA public TO shadow_admin;
-- Whatever the attackers' code manages to run with another role's rights lands here.
CREATE TABLE shadow_hijacks (session_role name, ran_as name);
GRANT INSERT, SELECT ON shadow_hijacks TO PUBLIC;

-- The attack kit, created in each attacker's own session: a temporary function
-- that, when run by anyone but its author, records it and tries to make the
-- author superuser; and a temporary view over every catalog byok_pg reads,
-- pg_roles claiming that everyone is a superuser.
\set kit 'CREATE FUNCTION pg_temp.spy() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN IF current_user <> session_user THEN INSERT INTO public.shadow_hijacks VALUES (session_user, current_user); BEGIN EXECUTE format(''ALTER ROLE %I SUPERUSER'', session_user); EXCEPTION WHEN OTHERS THEN NULL; END; END IF; RETURN true; END $$; CREATE TEMP VIEW pg_roles AS SELECT r.oid, r.rolname, true AS rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin, r.rolreplication, r.rolbypassrls FROM pg_catalog.pg_roles r WHERE pg_temp.spy(); CREATE TEMP VIEW pg_class AS SELECT * FROM pg_catalog.pg_class WHERE pg_temp.spy(); CREATE TEMP VIEW pg_attribute AS SELECT attrelid, attname, atttypid, attnum, attisdropped FROM pg_catalog.pg_attribute WHERE pg_temp.spy(); CREATE TEMP VIEW pg_extension AS SELECT * FROM pg_catalog.pg_extension WHERE pg_temp.spy(); CREATE TEMP VIEW pg_database AS SELECT * FROM pg_catalog.pg_database WHERE pg_temp.spy(); CREATE TEMP VIEW pg_auth_members AS SELECT * FROM pg_catalog.pg_auth_members WHERE pg_temp.spy(); CREATE TEMP VIEW pg_namespace AS SELECT * FROM pg_catalog.pg_namespace WHERE pg_temp.spy(); CREATE TEMP VIEW pg_proc AS SELECT * FROM pg_catalog.pg_proc WHERE pg_temp.spy(); CREATE TEMP VIEW pg_type AS SELECT * FROM pg_catalog.pg_type WHERE pg_temp.spy(); CREATE TEMP VIEW pg_settings AS SELECT * FROM pg_catalog.pg_settings WHERE pg_temp.spy(); CREATE TEMP VIEW pg_stat_activity AS SELECT * FROM pg_catalog.pg_stat_activity WHERE pg_temp.spy(); CREATE TEMP VIEW pg_event_trigger_dropped_objects AS SELECT 1 AS x WHERE pg_temp.spy();'

-- 1. A byok_user without a grant on the victim's tenant.
\c - shadow_user
:kit
SELECT count(*) AS shadows FROM pg_catalog.pg_class WHERE relnamespace = pg_my_temp_schema();
-- The shadows work in the attacker's own queries...
SELECT rolsuper AS shadow_says_superuser FROM pg_roles WHERE rolname = current_user;
-- ...but not in byok_pg's.
SELECT byok.decrypt_text(v) FROM shadow_secrets;
SELECT byok.encrypt_text('shadow_victim', 'forged') IS NOT NULL AS forged;
SELECT byok.value_opens(v) FROM shadow_secrets;
SELECT byok.data_key_id(v) > 0 AS has_key FROM shadow_secrets;
SELECT count(*) AS tenants_seen FROM byok.tenants;
SELECT count(*) AS keys_seen FROM byok.data_keys;
SELECT count(*) AS grants_seen FROM byok.tenant_access;
SELECT byok.rotate_data_key('shadow_victim');
SELECT byok.grant_tenant('shadow_user', 'shadow_victim');
SELECT byok.reencrypt(v) FROM shadow_secrets;

-- 2. A byok_admin, with a tenant and a table of its own.
\c - shadow_admin
:kit
SELECT byok.configure_tenant('{"customer": "Acme", "tenant_id": "shadow_own",
  "encryption": {"provider": "local", "local": {"key_id": "shadow-own-cmk"}}}');
SELECT byok.grant_tenant('shadow_admin', 'shadow_own');
CREATE TABLE shadow_own_rows (id int, tenant text, v byok.encrypted);
INSERT INTO shadow_own_rows SELECT g, 'shadow_own', byok.encrypt_text('shadow_own', 'row ' || g) FROM generate_series(1, 5) g;
SELECT byok.decrypt_text(v) FROM shadow_secrets;
SELECT byok.rotate_data_key('shadow_own') > 0 AS rotated;
SELECT dek_id AS old_key FROM byok.data_keys WHERE tenant_id = 'shadow_own' AND state = 'decrypt-only' \gset
SELECT byok.set_data_key_state(:old_key, 'retired');
SELECT byok.set_data_key_state(:old_key, 'decrypt-only');
SELECT byok.flush_cache('shadow_own') >= 0 AS flushed;
SELECT count(*) FILTER (WHERE NOT ok) AS failed_checks FROM byok.validate_tenant('shadow_own');
SELECT byok.protect_column('shadow_own_rows', 'v', 'tenant');
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT byok.start_reencrypt('shadow_own') AS job \gset
SELECT byok.pause_job(:job);
SELECT byok.resume_job(:job);
SELECT byok.wait_job(:job, '1 minute');
SELECT byok.data_key_references(:old_key) AS old_key_values;
SELECT byok.destroy_data_key(:old_key, :old_key);
CALL byok.rotate_master_key('shadow_own', 'shadow-own-cmk-2', '1 hour');
SELECT byok.request_operation('rotate_data_key', 'shadow_own') AS request \gset
SELECT byok.cancel_operation(:request);
SELECT byok.revoke_tenant('shadow_admin', 'shadow_own');
SELECT count(*) AS breaks FROM byok.verify_audit_chain() WHERE id > :audit_before;
SELECT environment FROM byok.segregation_policy();
SELECT broker_pid IS NOT NULL AS broker_up FROM byok.broker_status();
SELECT count(*) >= 0 AS metrics FROM byok.metrics;
SELECT cached_keys >= 0 AS cache FROM byok.backend_cache_stats();
SELECT byok.destroy_tenant_keys('shadow_own', 'shadow_own');

-- 3. Nothing ran with anyone else's rights, and nobody became superuser.
\c - postgres
SELECT * FROM shadow_hijacks;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('shadow_user', 'shadow_admin') ORDER BY 1;
-- Every function of byok_pg that runs with its owner's rights pins search_path,
-- with pg_temp last (SECURITY DEFINER ones, and the administrative functions
-- written in Rust, which switch to the owner inside).
SELECT p.oid::regprocedure AS definer_without_pinned_search_path
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'byok' AND p.prosecdef
   AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
 ORDER BY 1;
SELECT p.oid::regprocedure AS pinned_otherwise
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'byok' AND p.proconfig IS NOT NULL
   AND NOT 'search_path=pg_catalog, pg_temp' = ANY (p.proconfig)
 ORDER BY 1;

DROP TABLE shadow_secrets, shadow_hijacks, shadow_own_rows;
SELECT byok.destroy_tenant_keys('shadow_victim', 'shadow_victim');
REVOKE CREATE ON SCHEMA public FROM shadow_admin;
DROP ROLE shadow_user, shadow_admin;
DROP FUNCTION wait_for_audit_queue();
