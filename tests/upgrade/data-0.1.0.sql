-- Data created with byok_pg 0.1.0's API (tests/scripts/upgrade.sh), in a database
-- where tenant acme is already configured: three tenants on the local provider,
-- encrypted values (and a user view over them), data-key rotations, two finished
-- re-encryption jobs and values left under a decrypt-only key, a master-key
-- rotation, a destroyed key, roles with per-tenant grants, one dual-control
-- request approved and one pending, and audit rows of all that and of failures.
\set ON_ERROR_STOP 1
SELECT byok.configure_tenant('{"customer":"globex","tenant_id":"globex","encryption":{"provider":"local","local":{"key_id":"globex-cmk"},"key_rotation":{"enabled":true,"interval_days":30}}}');
SELECT byok.configure_tenant('{"customer":"initech","tenant_id":"initech","encryption":{"provider":"local","local":{"key_id":"initech-cmk"}}}');
CREATE TABLE people (id int PRIMARY KEY, tenant text NOT NULL, ssn byok.encrypted, note byok.encrypted);
INSERT INTO people
SELECT g, t, byok.encrypt_text(t, 'ssn-' || g, 'people.ssn'), byok.encrypt(t, convert_to('note ' || g, 'UTF8'))
  FROM generate_series(1, 600) g, LATERAL (SELECT (ARRAY['acme', 'globex', 'initech'])[1 + g % 3] AS t) x;
-- Objects of the user's depending on the extension's: the update must keep them.
CREATE VIEW people_clear AS SELECT id, byok.decrypt_text(ssn, 'people.ssn') AS ssn FROM people;
SELECT byok.protect_column('people', 'ssn', tenant_col => 'tenant', context => 'people.ssn');
SELECT byok.protect_column('people', 'note', tenant_col => 'tenant');
SELECT byok.rotate_data_key('acme') > 0 AS rotated;
SELECT byok.wait_job(byok.start_reencrypt('acme', 'people'), '2 minutes') AS job_state;
-- globex: a rotation without a job, so values stay under its decrypt-only key
SELECT byok.rotate_data_key('globex') > 0 AS rotated;
INSERT INTO people SELECT g, 'globex', byok.encrypt_text('globex', 'ssn-' || g, 'people.ssn'),
       byok.encrypt('globex', convert_to('note ' || g, 'UTF8')) FROM generate_series(601, 650) g;
CALL byok.rotate_master_key('initech', 'initech-cmk-2', '1 hour');
SELECT byok.rotate_data_key('initech') > 0 AS rotated;
SELECT byok.wait_job(byok.start_reencrypt('initech'), '2 minutes') AS job_state;
SELECT byok.destroy_data_key(dek_id, dek_id) FROM byok.data_keys WHERE tenant_id = 'initech' AND state = 'retired';
CREATE ROLE upg_app LOGIN IN ROLE byok_user;
CREATE ROLE upg_ada LOGIN IN ROLE byok_admin;
CREATE ROLE upg_bob LOGIN IN ROLE byok_admin;
GRANT SELECT, INSERT, UPDATE ON people TO upg_app;
GRANT SELECT ON people_clear TO upg_app;
SELECT byok.grant_tenant('upg_app', 'acme');
SELECT byok.grant_tenant('upg_app', 'globex');
SET SESSION AUTHORIZATION upg_ada;
SELECT byok.request_operation('grant_tenant', 'initech', '{"role": "upg_app"}') AS req \gset
SELECT byok.request_operation('rotate_data_key', 'acme') AS pending_request;
SET SESSION AUTHORIZATION upg_bob;
SELECT byok.approve_operation(:req);
RESET SESSION AUTHORIZATION;
-- Refused (the key still seals values): a failure in the audit trail.
\set ON_ERROR_STOP 0
SELECT byok.destroy_data_key(dek_id, dek_id) FROM byok.data_keys WHERE tenant_id = 'globex' AND state = 'decrypt-only';
