\set VERBOSITY terse
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;

-- Key hygiene: destroyed keys leave every cache; refusals name no tenant;
-- nobody learns other roles' grants; and every data key has a nonce budget.
SELECT byok.configure_tenant('{"customer": "Hyg", "tenant_id": "hyg",
  "encryption": {"provider": "local", "local": {"key_id": "hyg-cmk"}}}');
SELECT byok.configure_tenant('{"customer": "Hyg2", "tenant_id": "hyg_other",
  "encryption": {"provider": "local", "local": {"key_id": "hyg-other-cmk"}}}');

-- 1. destroy_data_key drops the key from the key broker's shared cache at once
--    (it used to stay there, in the clear, until it expired).
CREATE TABLE hyg_rows AS SELECT byok.encrypt_text('hyg', 'old value') AS v;
SELECT byok.decrypt_text(v) FROM hyg_rows;
SELECT dek_id AS hyg_key FROM byok.data_keys WHERE tenant_id = 'hyg' AND state = 'active' \gset
SELECT shared_cache_entries AS before_destroy FROM byok.broker_status() \gset
SELECT byok.rotate_data_key('hyg') > 0 AS rotated;
DROP TABLE hyg_rows;
SELECT byok.destroy_data_key(:hyg_key, :hyg_key);
SELECT shared_cache_entries < :before_destroy AS left_the_shared_cache FROM byok.broker_status();

-- 2. A crafted value naming another tenant's data key tells a role without
--    the grant nothing about whose key it is.
CREATE ROLE prober LOGIN IN ROLE byok_user;
CREATE TABLE hyg_other_rows AS SELECT byok.encrypt_text('hyg_other', 'not yours') AS v;
GRANT SELECT ON hyg_other_rows TO prober;
\c - prober
DO $$
BEGIN
    PERFORM byok.decrypt_text(v) FROM hyg_other_rows;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'refused (%); the message names the tenant: %; it names the data key: %',
        SQLSTATE, position('hyg_other' IN SQLERRM) > 0, SQLERRM ~ 'data key [0-9]+';
END $$;
\c - postgres

-- 3. Grants: a role sees its own, never other roles'; the function behind the
--    catalog's row-level security answers for the current user only.
CREATE ROLE peeker LOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('peeker', 'hyg');
SELECT byok.grant_tenant('prober', 'hyg');
\c - peeker
SELECT grantee, tenant_id FROM byok.tenant_access ORDER BY 1, 2;
SELECT byok.tenant_visible('hyg') AS sees_own, byok.tenant_visible('hyg_other') AS sees_other;
SELECT byok.may_use_tenant('prober'::regrole::oid, 'hyg');
\c - postgres

-- 4. The nonce budget: every value a data key seals is counted (in batches, off
--    the per-row path) and persisted in the catalog; at byok.max_encryptions_per_key
--    the key is rotated automatically, and the audit trail says why.
ALTER SYSTEM SET byok.max_encryptions_per_key = 1000;
SELECT pg_reload_conf();
SELECT pg_sleep(0.2);
SELECT dek_id AS budget_key FROM byok.data_keys WHERE tenant_id = 'hyg' AND state = 'active' \gset
SELECT set_config('hyg.budget_key', :'budget_key', false) IS NOT NULL AS noted;
CREATE TABLE hyg_many AS SELECT byok.encrypt_text('hyg', 'value ' || g) AS v FROM generate_series(1, 1500) g;
-- (the count reaches the catalog within seconds; the rotation follows)
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT state FROM byok.data_keys WHERE dek_id = current_setting('hyg.budget_key')::bigint) <> 'active';
        PERFORM pg_sleep(0.1);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
END $$;
SELECT state, encryptions >= 1500 AS counted FROM byok.data_keys WHERE dek_id = :budget_key;
SELECT count(*) AS active_keys FROM byok.data_keys WHERE tenant_id = 'hyg' AND state = 'active';
SELECT event, details->>'reason' LIKE 'encryption budget: data key % sealed % values (byok.max_encryptions_per_key = 1000)' AS says_why
  FROM byok.audit_log WHERE tenant_id = 'hyg' AND event = 'rotate_data_key' ORDER BY id DESC LIMIT 1;
SELECT count(*) AS readable FROM hyg_many WHERE byok.decrypt_text(v) LIKE 'value %';
ALTER SYSTEM RESET byok.max_encryptions_per_key;
SELECT pg_reload_conf();

DROP TABLE hyg_other_rows, hyg_many;
SELECT byok.destroy_tenant_keys('hyg', 'hyg');
SELECT byok.destroy_tenant_keys('hyg_other', 'hyg_other');
SELECT byok.revoke_tenant('peeker', 'hyg');
SELECT byok.revoke_tenant('prober', 'hyg');
DROP ROLE prober, peeker;
