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

-- Threat: an audit trail that can be silenced, flooded or rewritten.
-- Audit records of what ran before this file, still in the queue, land first.
SELECT wait_for_audit_queue();
SELECT coalesce(max(id), 0) AS audit_before FROM byok.audit_log \gset
SELECT audit_dropped AS dropped_before FROM byok.broker_status() \gset

-- 1. Administrative events are always recorded, even for a tenant whose
--    audit.log_all_operations is off (including the configure_tenant that turns
--    it off); only successful key fetches of the data path are left out.
SELECT byok.configure_tenant('{"customer": "Hush", "tenant_id": "hush",
  "encryption": {"provider": "local", "local": {"key_id": "hush-cmk"},
                 "audit": {"log_all_operations": false}}}');
SELECT byok.rotate_data_key('hush') > 0 AS rotated;
SELECT byok.flush_cache('hush') >= 0 AS flushed;
SELECT byok.decrypt_text(byok.encrypt_text('hush', 'quiet please'));
SELECT wait_for_audit_queue();
SELECT event, outcome, count(*) FROM byok.audit_log WHERE tenant_id = 'hush' AND id > :audit_before
 GROUP BY 1, 2 ORDER BY 1, 2;

-- 2. A byok_user catching errors in a loop: one record for the first failure,
--    one summary for the repeats, and nothing pushed out of the queue.
CREATE ROLE flooder LOGIN IN ROLE byok_user;
CREATE TABLE hush_rows AS SELECT byok.encrypt_text('hush', 'secret') AS v;
GRANT SELECT ON hush_rows TO flooder;
\c - flooder
DO $$
DECLARE
    failures int := 0;
BEGIN
    FOR i IN 1..3500 LOOP
        BEGIN
            PERFORM byok.decrypt_text(v) FROM hush_rows;
        EXCEPTION WHEN insufficient_privilege THEN
            failures := failures + 1;
        END;
    END LOOP;
    RAISE NOTICE 'failures caught: %', failures;
END $$;
\c - postgres
-- (the summary is queued when the flooder's session ends)
SELECT pg_sleep(0.5);
SELECT wait_for_audit_queue();
SELECT event, role_name, (details->>'repeated')::int AS repeated
  FROM byok.audit_log WHERE role_name = 'flooder' AND id > :audit_before ORDER BY id;
SELECT audit_dropped - :dropped_before AS dropped FROM byok.broker_status();

-- 3. Records the queue had to refuse (here: one role with a burst of distinct
--    failures, past its share of the queue) are reported in the trail, with a
--    warning and a NOTIFY, so an operator learns of the loss.
CREATE ROLE burster LOGIN IN ROLE byok_user;
\c - burster
DO $$
BEGIN
    FOR i IN 1..1500 LOOP
        BEGIN
            -- a different tenant each time: distinct failures, not coalesced
            PERFORM byok.encrypt_text('burst-' || i, 'x');
        EXCEPTION WHEN OTHERS THEN NULL;
        END;
    END LOOP;
END $$;
\c - postgres
SELECT pg_sleep(0.5);
SELECT wait_for_audit_queue();
SELECT (SELECT count(*) FROM byok.audit_log WHERE role_name = 'burster' AND id > :audit_before)
           BETWEEN 1 AND 1500 AS some_recorded,
       (SELECT sum((details->>'dropped')::int) FROM byok.audit_log
         WHERE event = 'audit_records_dropped' AND id > :audit_before)
         = (SELECT audit_dropped - :dropped_before FROM byok.broker_status()) AS every_loss_reported,
       (SELECT audit_dropped - :dropped_before FROM byok.broker_status()) > 0 AS some_lost,
       (SELECT count(*) FROM byok.audit_log WHERE role_name = 'burster' AND id > :audit_before)
         + (SELECT audit_dropped - :dropped_before FROM byok.broker_status()) = 1500 AS none_unaccounted;

-- 4. The chain is keyed: a row rewritten (trigger disabled) and re-hashed with
--    plain SHA-256 is found; so is truncation of the tail, given an anchor kept
--    outside the database.
SELECT id AS anchor_id, encode(hash, 'hex') AS anchor_hash FROM byok.audit_chain_head() \gset
SELECT count(*) AS breaks FROM byok.verify_audit_chain(:anchor_id, decode(:'anchor_hash', 'hex')) WHERE id > :audit_before;
ALTER TABLE byok.audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE byok.audit_log a SET reason = 'nothing to see',
       hash = sha256(coalesce(a.prev_hash, '\x'::bytea) || byok.audit_row_text(a))
 WHERE a.id = (SELECT max(id) FROM byok.audit_log WHERE role_name = 'flooder');
SELECT v.problem FROM byok.verify_audit_chain() v WHERE v.id > :audit_before ORDER BY v.id;
DELETE FROM byok.audit_log WHERE id >= :anchor_id;
ALTER TABLE byok.audit_log ENABLE TRIGGER audit_log_append_only;
SELECT v.problem FROM byok.verify_audit_chain(:anchor_id, decode(:'anchor_hash', 'hex')) v WHERE v.id >= :anchor_id ORDER BY v.id;
-- Without the anchor the shorter chain looks intact: what the chain proves.
SELECT count(*) AS breaks_at_the_end FROM byok.verify_audit_chain() v WHERE v.id >= :anchor_id;
-- The chain key is a file no database role but a superuser can read.
SELECT setting = '' AS default_key_file FROM pg_settings WHERE name = 'byok.audit_key_file';
\c - flooder
SHOW byok.audit_key_file;
SELECT byok.audit_mac('\x', '\x');
\c - postgres

DROP TABLE hush_rows;
SELECT byok.destroy_tenant_keys('hush', 'hush');
DROP ROLE flooder, burster;
DROP FUNCTION wait_for_audit_queue();
