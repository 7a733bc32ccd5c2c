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
-- Request ids in messages start at 18001 in this file, wherever it runs.
SELECT setval('byok.operation_requests_request_id_seq', 18000) \gset
SELECT setval('byok.data_key_id_seq', 18000) \gset

-- Threat: dual control defeated by one person. Approval must come from a
-- different person, and "different" is checked: an approver whose byok_admin
-- membership the requester granted (through any chain of memberships) is
-- refused, and CREATEROLE (the power to mint approvers) is refused on both
-- sides unless a superuser has named the approvers (byok.dual_control_approvers).
SELECT byok.configure_tenant('{"customer": "Dual", "tenant_id": "dual_t",
  "encryption": {"provider": "local", "local": {"key_id": "prod-dual-cmk"}}}');
-- Production (set per role by a superuser; the roles cannot change it).
CREATE ROLE minter LOGIN CREATEROLE IN ROLE byok_admin;
CREATE ROLE granter LOGIN;
CREATE ROLE granter_alt LOGIN;
CREATE ROLE ops_team NOLOGIN;
CREATE ROLE honest LOGIN IN ROLE byok_admin;
CREATE ROLE named_approver LOGIN IN ROLE byok_admin;
GRANT byok_admin TO granter WITH ADMIN OPTION;
GRANT byok_admin TO ops_team;
GRANT ops_team TO granter WITH ADMIN OPTION;
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['minter', 'granter', 'granter_alt', 'honest', 'named_approver'] LOOP
        EXECUTE format('ALTER ROLE %I SET byok.environment = %L', r, 'production');
    END LOOP;
END $$;

-- 1. A CREATEROLE holder mints two more logins and makes them administrators:
--    it may neither ask nor approve itself, and its two puppets may not be
--    each other's second person.
\c - minter
CREATE ROLE minter_alt LOGIN IN ROLE byok_admin;
CREATE ROLE minter_alt2 LOGIN IN ROLE byok_admin;
SELECT pg_has_role('minter_alt', 'byok_admin', 'USAGE') AS alt_is_admin;
SELECT byok.request_operation('destroy_tenant_keys', 'dual_t');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - minter_alt
SELECT byok.request_operation('destroy_tenant_keys', 'dual_t') AS puppet_request \gset
\c - minter_alt2
SELECT byok.approve_operation(:puppet_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - minter
SELECT byok.approve_operation(:puppet_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - honest
SELECT byok.request_operation('rotate_data_key', 'dual_t') AS honest_request \gset

-- 2. An administrator with ADMIN OPTION (no CREATEROLE) hands byok_admin to
--    another existing login, directly and through a group role, and asks it
--    to approve.
\c - granter
GRANT ops_team TO granter_alt;
SELECT byok.request_operation('destroy_tenant_keys', 'dual_t') AS granter_request \gset
\c - granter_alt
SELECT pg_has_role('granter_alt', 'byok_admin', 'USAGE') AS alt_is_admin;
SELECT byok.approve_operation(:granter_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - granter
REVOKE ops_team FROM granter_alt;
GRANT byok_admin TO granter_alt;
\c - granter_alt
SELECT byok.approve_operation(:granter_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The same person, of course, never approves itself.
\c - granter
SELECT byok.approve_operation(:granter_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- 3. A CREATEROLE holder that is no administrator itself mints three logins,
--    gives the first byok_admin WITH ADMIN OPTION, and the first hands it on
--    to the other two. The second asks: the first owes it nothing but gave it
--    its rights, and the third got its rights from the same hands (a common
--    CREATEROLE holder in both histories). Neither may approve; an
--    administrator who came by its rights independently may.
\c - postgres
CREATE ROLE cr_agent LOGIN CREATEROLE;
\c - cr_agent
CREATE ROLE cr_one LOGIN;
CREATE ROLE cr_two LOGIN;
CREATE ROLE cr_three LOGIN;
GRANT byok_admin TO cr_one WITH ADMIN OPTION;
\c - postgres
ALTER ROLE cr_one SET byok.environment = 'production';
ALTER ROLE cr_two SET byok.environment = 'production';
ALTER ROLE cr_three SET byok.environment = 'production';
\c - cr_one
GRANT byok_admin TO cr_two;
GRANT byok_admin TO cr_three;
\c - cr_two
SELECT byok.request_operation('rotate_data_key', 'dual_t') AS chain_request \gset
\c - cr_one
SELECT byok.approve_operation(:chain_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - cr_three
SELECT byok.approve_operation(:chain_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - honest
SELECT byok.approve_operation(:chain_request) LIKE 'new active data key %' AS approved;

-- 4. A superuser-named list of approvers: only those approve, and then a
--    CREATEROLE holder may ask (it cannot mint anyone onto the list).
\c - postgres
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['minter', 'granter', 'granter_alt', 'honest', 'named_approver', 'minter_alt', 'minter_alt2'] LOOP
        EXECUTE format('ALTER ROLE %I SET byok.dual_control_approvers = %L', r, 'named_approver');
    END LOOP;
END $$;
\c - minter
SET byok.dual_control_approvers = 'minter_alt';
SELECT byok.request_operation('rotate_data_key', 'dual_t') AS minter_request \gset
\c - minter_alt
SELECT byok.approve_operation(:minter_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - honest
SELECT byok.approve_operation(:minter_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - named_approver
SELECT byok.approve_operation(:minter_request) LIKE 'new active data key %' AS approved;
SELECT byok.approve_operation(:honest_request) LIKE 'new active data key %' AS approved;

-- 5. Role names that need quoting are taken as they are written: the checks
--    once folded them to lower case, found no such roles, and so found no
--    common history either. Two logins minted by one CREATEROLE holder:
\c - postgres
CREATE ROLE quoted_agent LOGIN CREATEROLE;
\c - quoted_agent
CREATE ROLE "Puppet One" LOGIN IN ROLE byok_admin;
CREATE ROLE "Puppet Two" LOGIN IN ROLE byok_admin;
\c - postgres
ALTER ROLE "Puppet One" SET byok.environment = 'production';
ALTER ROLE "Puppet Two" SET byok.environment = 'production';
\c - "Puppet One"
SELECT byok.request_operation('grant_tenant', 'dual_t', '{"role": "honest"}') AS quoted_request \gset
-- (a role argument names a role exactly, as PostgreSQL's name arguments do)
SELECT byok.request_operation('grant_tenant', 'dual_t', '{"role": "HONEST"}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - "Puppet Two"
SELECT byok.approve_operation(:quoted_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- 6. Changing an existing tenant (its endpoints, credentials, rotation
--    schedule, cache and audit settings) needs a second person as well:
--    otherwise one administrator could point a tenant at a server of its own,
--    or schedule the rotations it may not ask for. Creating a tenant, or
--    repeating its configuration unchanged (a migration run again), does not.
--    Neither may one person retire a data key (its values become unreadable).
\c - honest
SELECT byok.configure_tenant('{"customer": "Dual", "tenant_id": "dual_t",
  "encryption": {"provider": "local", "local": {"key_id": "prod-dual-cmk"}}}') AS unchanged;
SELECT byok.configure_tenant('{"customer": "Dual", "tenant_id": "dual_t",
  "encryption": {"provider": "local", "local": {"key_id": "prod-dual-cmk"}},
  "key_rotation": {"enabled": true, "interval_days": 1}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('configure_tenant', 'dual_t', '{"config": {"customer": "Dual", "tenant_id": "dual_t",
  "encryption": {"provider": "local", "local": {"key_id": "prod-dual-cmk"}},
  "key_rotation": {"enabled": true, "interval_days": 1}}}') AS config_request \gset
SELECT dek_id AS old_key FROM byok.data_keys WHERE tenant_id = 'dual_t' AND state = 'decrypt-only'
 ORDER BY dek_id LIMIT 1 \gset
SELECT byok.set_data_key_state(:old_key, 'retired');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\c - named_approver
SELECT byok.approve_operation(:config_request) AS approved;
\c - postgres
SELECT rotation_enabled, rotation_interval_days FROM byok.tenant_config WHERE tenant_id = 'dual_t';

-- Every refusal is in the audit trail, with who tried.
\c - postgres
SELECT wait_for_audit_queue();
SELECT role_name, count(*) AS refused FROM byok.audit_log
 WHERE event IN ('request_operation', 'approve_operation') AND outcome = 'failed'
   AND role_name IN ('minter', 'minter_alt', 'minter_alt2', 'granter', 'granter_alt', 'honest',
                     'cr_one', 'cr_three', 'Puppet Two')
 GROUP BY role_name ORDER BY role_name;
SELECT count(*) AS approved_by_named FROM byok.operation_requests
 WHERE tenant_id = 'dual_t' AND state = 'done' AND approved_by = 'named_approver';

DELETE FROM byok.operation_requests WHERE tenant_id = 'dual_t';
SELECT byok.destroy_tenant_keys('dual_t', 'dual_t');
DROP ROLE minter_alt, minter_alt2, minter, granter_alt, granter, ops_team, honest, named_approver,
          cr_one, cr_two, cr_three, cr_agent, "Puppet One", "Puppet Two", quoted_agent;
DROP FUNCTION wait_for_audit_queue();
