\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- The guide's customer-initiated rotation: move a tenant to a new master key.
SELECT byok.configure_tenant('{"customer": "initech", "tenant_id": "initech",
  "encryption": {"provider": "local", "local": {"key_id": "initech-cmk-1"}}}');
CREATE TABLE memos (id int, body byok.encrypted);
INSERT INTO memos SELECT g, byok.encrypt_text('initech', 'memo ' || g) FROM generate_series(1, 5) g;
SELECT byok.rotate_data_key('initech') > 0 AS rotated;
INSERT INTO memos SELECT g, byok.encrypt_text('initech', 'memo ' || g) FROM generate_series(6, 10) g;
SELECT cmk_id, count(*) FROM byok.data_keys WHERE tenant_id = 'initech' GROUP BY 1;

-- Every data key is rewrapped under the new master key (in batches, committing as it
-- goes); the old key is recorded with the end of its grace period.
CALL byok.rotate_master_key('initech', 'initech-cmk-2', '1 hour');
SELECT cmk_id, state, count(*) FROM byok.data_keys WHERE tenant_id = 'initech' GROUP BY 1, 2 ORDER BY 2;
SELECT master_key_id, previous_master_key_id,
       previous_master_key_retires_at BETWEEN now() + interval '59 minutes' AND now() + interval '61 minutes' AS retires_in_an_hour
  FROM byok.tenants WHERE tenant_id = 'initech';

-- Nothing changed for the data: every value opens, new values use the new key.
SELECT count(*) FILTER (WHERE byok.decrypt_text(body) = 'memo ' || id) AS readable FROM memos;
SELECT byok.rotate_data_key('initech') > 0 AS rotated_again;
SELECT cmk_id FROM byok.data_keys WHERE tenant_id = 'initech' AND state = 'active';

-- Calling it again is harmless (and after a crash, it finishes the job).
CALL byok.rotate_master_key('initech', 'initech-cmk-2');
SELECT count(*) AS under_new_key FROM byok.data_keys WHERE tenant_id = 'initech' AND cmk_id = 'initech-cmk-2';

-- configure_tenant now expects the new key; the old one is refused with the way forward.
SELECT byok.configure_tenant('{"customer": "initech", "tenant_id": "initech",
  "encryption": {"provider": "local", "local": {"key_id": "initech-cmk-1"}}}');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT byok.configure_tenant('{"customer": "initech", "tenant_id": "initech",
  "encryption": {"provider": "local", "local": {"key_id": "initech-cmk-2"}}}');

-- Errors.
CALL byok.rotate_master_key('no_such_tenant', 'k');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CALL byok.rotate_master_key('initech', '');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

DROP TABLE memos;
SELECT byok.destroy_tenant_keys('initech', 'initech');
