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

-- Threat: a CREATEROLE holder borrowing someone else's tenant grant. In
-- PostgreSQL 15 a role with CREATEROLE may make itself a member of any role
-- that is not a superuser, so a grant it reaches through a membership (or
-- SET ROLE) proves nothing. Such a login uses only the tenants granted to
-- itself, directly, while acting as itself. (It can also set other roles'
-- passwords and log in as them, which PostgreSQL 15 cannot prevent: SECURITY.md
-- counts CREATEROLE among an administrator's powers.)
SELECT byok.configure_tenant('{"customer": "Payroll", "tenant_id": "cr_payroll",
  "encryption": {"provider": "local", "local": {"key_id": "cr-payroll-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "HR", "tenant_id": "cr_hr_own",
  "encryption": {"provider": "local", "local": {"key_id": "cr-hr-cmk"}}}');
CREATE ROLE payroll_readers NOLOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('payroll_readers', 'cr_payroll');
CREATE ROLE hr_manager LOGIN CREATEROLE IN ROLE byok_user;
SELECT byok.grant_tenant('hr_manager', 'cr_hr_own');
CREATE TABLE payroll AS SELECT byok.encrypt_text('cr_payroll', 'salary 100') AS v;
GRANT SELECT ON payroll TO PUBLIC;

-- The CREATEROLE login joins the group that holds the grant.
\c - hr_manager
GRANT payroll_readers TO hr_manager;
SELECT pg_has_role('payroll_readers', 'MEMBER') AS joined;
SELECT byok.decrypt_text(v) FROM payroll;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.encrypt_text('cr_payroll', 'forged') IS NOT NULL AS forged;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- SET ROLE to the group changes nothing: the person behind the session is
-- still the CREATEROLE login.
SET ROLE payroll_readers;
SELECT byok.decrypt_text(v) FROM payroll;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET ROLE;
-- The tenant granted to it directly works as usual.
SELECT byok.decrypt_text(byok.encrypt_text('cr_hr_own', 'own data')) AS own_tenant;

-- A login without CREATEROLE in the same group reads the payroll.
\c - postgres
CREATE ROLE payroll_clerk LOGIN IN ROLE payroll_readers;
\c - payroll_clerk
SELECT byok.decrypt_text(v) AS salary FROM payroll;

-- Every refusal is in the audit trail (repeats of one failure are counted in
-- a summary row's "repeated"), under the role it acted as.
\c - postgres
SELECT wait_for_audit_queue();
SELECT role_name, tenant_id, sum(coalesce((details->>'repeated')::int, 1)) AS refused
  FROM byok.audit_log
 WHERE outcome = 'failed' AND tenant_id = 'cr_payroll'
 GROUP BY 1, 2 ORDER BY 1, 2;

DROP TABLE payroll;
SELECT byok.revoke_tenant('payroll_readers', 'cr_payroll');
SELECT byok.revoke_tenant('hr_manager', 'cr_hr_own');
SELECT byok.destroy_tenant_keys('cr_payroll', 'cr_payroll');
SELECT byok.destroy_tenant_keys('cr_hr_own', 'cr_hr_own');
DROP ROLE payroll_clerk, hr_manager, payroll_readers;
DROP FUNCTION wait_for_audit_queue();
