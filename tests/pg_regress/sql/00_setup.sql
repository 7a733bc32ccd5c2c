-- byok_pg needs to be in shared_preload_libraries; then:
CREATE EXTENSION byok_pg;
-- Everything lives in schema byok.
SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'byok' ORDER BY 1;
-- Errors in these tests show their message, detail and hint, then their SQLSTATE.
-- Key-manager calls and failed operations reach byok.audit_log through a queue
-- the audit writer drains within a second or so; tests that read those records
-- wait for it with this helper (up to 30 s).
CREATE FUNCTION wait_for_audit_queue() RETURNS boolean LANGUAGE plpgsql AS $$
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
