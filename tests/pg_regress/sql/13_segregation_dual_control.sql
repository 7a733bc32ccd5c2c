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
-- Data key and request ids in messages start at 13001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 13000), setval('byok.operation_requests_request_id_seq', 13000) \gset

-- Key segregation, the guide's segregation_matrix: byok.environment (set by a
-- superuser in postgresql.conf) names the environment; its master keys must carry
-- its key prefix, and production needs dual control for destructive operations.
SELECT * FROM byok.segregation_policy();
SET byok.environment = 'production';
SELECT * FROM byok.segregation_policy();
-- A key without the prefix is refused, whatever the provider calls it.
SELECT byok.configure_tenant('{"customer": "Oscorp", "tenant_id": "oscorp",
  "encryption": {"provider": "local", "local": {"key_id": "oscorp-cmk"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "Oscorp", "tenant_id": "oscorp",
  "encryption": {"provider": "local", "local": {"key_id": "keys/staging/stage-oscorp"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "Oscorp", "tenant_id": "oscorp",
  "encryption": {"provider": "local", "local": {"key_id": "prod-oscorp"}}}');
-- A rotation to another environment's key is refused the same way.
CALL byok.rotate_master_key('oscorp', 'stage-oscorp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The prefix can be set explicitly (byok.key_prefix), e.g. for a naming scheme of one's own.
SET byok.key_prefix = 'p1-';
SELECT key_prefix FROM byok.segregation_policy();
RESET byok.key_prefix;

CREATE TABLE lab_results (id int, tenant text, result byok.encrypted);
INSERT INTO lab_results SELECT g, 'oscorp', byok.encrypt_text('oscorp', 'sample ' || g) FROM generate_series(1, 3) g;

-- Dual control: two administrators (two logins: session_user is the person).
CREATE ROLE officer_ada LOGIN IN ROLE byok_admin;
CREATE ROLE officer_bob LOGIN IN ROLE byok_admin;
CREATE ROLE clerk LOGIN IN ROLE byok_user;
GRANT SELECT ON lab_results TO clerk;
-- (audit records still in the queue land first)
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
SET SESSION AUTHORIZATION officer_ada;
-- Neither may change the environment...
SET byok.environment = 'development';
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- ...nor run a destructive, rotating or granting operation alone.
SELECT byok.rotate_data_key('oscorp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.destroy_tenant_keys('oscorp', 'oscorp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.grant_tenant('clerk', 'oscorp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL byok.rotate_master_key('oscorp', 'prod-oscorp-2');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Ada asks; she cannot approve her own request.
SELECT byok.request_operation('rotate_data_key', 'oscorp') AS rotate_request \gset
SELECT byok.approve_operation(:rotate_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- Requests are checked when made.
SELECT byok.request_operation('drop_everything', 'oscorp');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('grant_tenant', 'oscorp', '{"role": "clerk", "extra": 1}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('grant_tenant', 'oscorp', '{}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('grant_tenant', 'no-such-tenant', '{"role": "clerk"}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.request_operation('grant_tenant', 'oscorp', '{"role": "clerk"}') AS grant_request \gset
SELECT byok.request_operation('rotate_master_key', 'oscorp',
                              '{"new_key_id": "prod-oscorp-2", "grace_period": "1 hour"}') AS master_request \gset
RESET SESSION AUTHORIZATION;

-- Bob approves: each operation runs then, in his transaction.
SET SESSION AUTHORIZATION officer_bob;
SELECT byok.approve_operation(:rotate_request) LIKE 'new active data key %' AS rotated;
SELECT byok.approve_operation(:rotate_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.approve_operation(:grant_request);
SELECT byok.approve_operation(:master_request);
SELECT operation, requested_by, approved_by, state FROM byok.pending_operations
 WHERE tenant_id = 'oscorp' ORDER BY request_id;
RESET SESSION AUTHORIZATION;
SELECT master_key_id FROM byok.tenants WHERE tenant_id = 'oscorp';
SELECT state, cmk_id FROM byok.data_keys WHERE tenant_id = 'oscorp' ORDER BY dek_id;
-- The clerk was granted through dual control and reads the values.
SET ROLE clerk;
SELECT byok.decrypt_text(result) FROM lab_results ORDER BY id;
RESET ROLE;

-- A user cannot approve; requests expire.
SET SESSION AUTHORIZATION officer_ada;
SELECT byok.request_operation('destroy_tenant_keys', 'oscorp') AS destroy_request \gset
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION clerk;
SELECT byok.approve_operation(:destroy_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;
UPDATE byok.operation_requests SET expires_at = now() - interval '1 second' WHERE request_id = :destroy_request;
SELECT state FROM byok.pending_operations WHERE request_id = :destroy_request;
SET SESSION AUTHORIZATION officer_bob;
SELECT byok.approve_operation(:destroy_request);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
RESET SESSION AUTHORIZATION;

-- Crypto-shredding under dual control: asked by one, approved by the other.
SET SESSION AUTHORIZATION officer_ada;
SELECT byok.request_operation('destroy_tenant_keys', 'oscorp') AS destroy_request \gset
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION officer_bob;
SELECT byok.approve_operation(:destroy_request);
RESET SESSION AUTHORIZATION;
SELECT byok.decrypt_text(result) FROM lab_results WHERE id = 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Every step is in the audit trail, with who asked and who approved, and every
-- refusal (they abort their own transactions, so they come through the queue).
SELECT wait_for_audit_queue();
SELECT event, role_name, outcome, details->>'operation' AS operation,
       details->>'requested_by' AS requested_by, reason
  FROM byok.audit_log
 WHERE event IN ('request_operation', 'approve_operation') AND id > :audit_before ORDER BY logged_at, id;
SELECT event, role_name, outcome, reason FROM byok.audit_log
 WHERE tenant_id = 'oscorp' AND event IN ('rotate_data_key', 'rotate_master_key', 'grant_tenant', 'destroy_tenant_keys')
 ORDER BY logged_at, id;
SELECT count(*) AS breaks FROM byok.verify_audit_chain() WHERE id > :audit_before;

-- Outside production no approval is needed (staging: prefix only).
SET byok.environment = 'staging';
SELECT byok.configure_tenant('{"customer": "Cyberdyne", "tenant_id": "cyberdyne",
  "encryption": {"provider": "local", "local": {"key_id": "stage-cyberdyne"}}}');
SELECT byok.rotate_data_key('cyberdyne') > 0 AS rotated_directly;
RESET byok.environment;

DROP TABLE lab_results;
DELETE FROM byok.operation_requests WHERE tenant_id = 'oscorp';
SELECT byok.destroy_tenant_keys('cyberdyne', 'cyberdyne');
DELETE FROM byok.tenant_grants WHERE grantee::text = 'clerk';
DROP ROLE officer_ada, officer_bob, clerk;
DROP FUNCTION wait_for_audit_queue();
