-- The audit trail. Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE,
-- and every row carries a hash chained to the previous row's, keyed with a
-- secret of the server's (HMAC-SHA-256; byok.audit_key_file), so an edit made
-- with the trigger disabled is found by byok.verify_audit_chain(). What the
-- chain proves, and what it does not: src/audit/chain.rs and the README.

CREATE TABLE byok.audit_log (
    id bigserial PRIMARY KEY,
    logged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    event text NOT NULL,
    tenant_id text,
    dek_id bigint,
    role_name name NOT NULL DEFAULT session_user,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'failed')),
    reason text,
    details jsonb,
    prev_hash bytea,
    hash bytea NOT NULL
);
COMMENT ON TABLE byok.audit_log IS 'Key-level events, append-only, chained with a keyed hash (see byok.verify_audit_chain())';
SELECT pg_catalog.pg_extension_config_dump('byok.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('byok.audit_log_id_seq', '');

-- The text a row's hash covers: every field, unambiguously separated.
CREATE FUNCTION byok.audit_row_text(a byok.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pg_catalog.convert_to(pg_catalog.concat_ws(pg_catalog.chr(31), a.id::text,
                                pg_catalog.to_char(a.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                                a.event, coalesce(a.tenant_id, pg_catalog.chr(30)), coalesce(a.dek_id::text, pg_catalog.chr(30)),
                                a.role_name::text, a.outcome, coalesce(a.reason, pg_catalog.chr(30)),
                                coalesce(a.details::text, pg_catalog.chr(30))), 'UTF8')
$fn$;

-- Appends an event. Administrative events are always recorded; a tenant whose
-- audit.log_all_operations is off leaves out only the successful key-manager
-- calls of the data path (kms_unwrap). Failures alert per audit.alert_on_failures.
CREATE FUNCTION byok.audit_event(p_event text, p_tenant text, p_dek bigint, p_outcome text,
                                 p_reason text DEFAULT NULL, p_details jsonb DEFAULT NULL,
                                 p_role oid DEFAULT NULL, p_at timestamptz DEFAULT NULL,
                                 p_role_name name DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    row byok.audit_log;
    log_all boolean := true;
    alert boolean := true;
BEGIN
    SELECT audit_log_all_operations, audit_alert_on_failures INTO log_all, alert
      FROM byok.tenant_config WHERE tenant_id OPERATOR(pg_catalog.=) p_tenant;
    IF p_outcome OPERATOR(pg_catalog.=) 'ok' AND log_all IS FALSE AND p_event OPERATOR(pg_catalog.=) 'kms_unwrap' THEN
        RETURN NULL;
    END IF;
    -- One writer at a time extends the chain.
    PERFORM byok.lock_audit_chain();
    row.id := pg_catalog.nextval('byok.audit_log_id_seq');
    -- When it happened (queued records: the key broker's call, an aborted operation).
    row.logged_at := coalesce(p_at, pg_catalog.clock_timestamp());
    row.event := p_event;
    row.tenant_id := p_tenant;
    row.dek_id := p_dek;
    -- The acting role: its name as resolved when the event happened (queued
    -- records: the role may be gone since), else by its OID, else the login role.
    row.role_name := coalesce(p_role_name,
                              (SELECT rolname FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) p_role),
                              session_user);
    row.outcome := p_outcome;
    row.reason := p_reason;
    row.details := p_details;
    SELECT hash INTO row.prev_hash FROM byok.audit_log ORDER BY id DESC LIMIT 1;
    row.hash := byok.audit_mac(coalesce(row.prev_hash, '\x'::bytea), byok.audit_row_text(row));
    INSERT INTO byok.audit_log VALUES (row.*);
    IF p_outcome OPERATOR(pg_catalog.=) 'failed' AND alert IS NOT FALSE THEN
        RAISE WARNING 'byok: % failed for tenant %: %', p_event, coalesce(p_tenant, '-'), coalesce(p_reason, '');
    END IF;
    -- byok_alerts: failures (unless the tenant turned alerts off), and the
    -- events of the guide's rotation workflow and of its master key's health,
    -- which the customer is told about whatever the outcome.
    IF (p_outcome OPERATOR(pg_catalog.=) 'failed' AND alert IS NOT FALSE)
       OR p_event OPERATOR(pg_catalog.=) ANY (ARRAY['master_key_revoked', 'master_key_restored',
              'master_key_unreachable', 'master_key_reachable', 'rotate_master_key_start',
              'rotate_master_key', 'master_key_retired', 'rotate_data_key',
              'schedule_master_key_rotation', 'cancel_scheduled_rotation',
              'alert_firing', 'alert_resolved', 'activate_dr', 'deactivate_dr',
              'compromise_response_step', 'compromise_response']) THEN
        -- Any role that may connect can LISTEN: by default the payload names
        -- the audit row only (byok_admin reads it in byok.audit_log); with
        -- byok.alert_details (postgresql.conf) it carries the tenant, key and reason.
        IF pg_catalog.current_setting('byok.alert_details', true) OPERATOR(pg_catalog.=) 'on' THEN
            PERFORM pg_catalog.pg_notify('byok_alerts', pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at, 'tenant_id', p_tenant, 'dek_id', p_dek,
                              'reason', p_reason, 'details', p_details)::text);
        ELSE
            PERFORM pg_catalog.pg_notify('byok_alerts', CASE WHEN p_event OPERATOR(pg_catalog.~~) 'alert\_%'
                -- (a monitor's change also names its metric, severity and state)
                THEN pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at,
                              'metric', p_details OPERATOR(pg_catalog.->>) 'metric',
                              'severity', p_details OPERATOR(pg_catalog.->>) 'severity',
                              'state', p_details OPERATOR(pg_catalog.->>) 'state')
                ELSE pg_catalog.json_build_object('audit_id', row.id, 'event', p_event,
                              'outcome', p_outcome, 'at', row.logged_at) END::text);
        END IF;
    END IF;
    RETURN row.id;
END
$fn$;
COMMENT ON FUNCTION byok.audit_event(text, text, bigint, text, text, jsonb, oid, timestamptz, name) IS
    'Appends an event to the audit trail (and alerts on failures, per the tenant''s audit settings)';

CREATE FUNCTION byok.audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION 'byok.audit_log is append-only' USING ERRCODE = '42501',
        HINT = 'audit rows are never changed or removed';
END
$fn$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON byok.audit_log
    FOR EACH ROW EXECUTE FUNCTION byok.audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON byok.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION byok.audit_refuse_change();

-- The newest row of the chain: what to anchor outside the database (a cron job
-- or a SIEM storing it), to detect later truncation or rewriting of the trail.
CREATE FUNCTION byok.audit_chain_head(OUT id bigint, OUT hash bytea, OUT logged_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT a.id, a.hash, a.logged_at FROM byok.audit_log a ORDER BY a.id DESC LIMIT 1
$fn$;
COMMENT ON FUNCTION byok.audit_chain_head() IS
    'The chain''s newest row (id, hash): anchor it outside the database and pass it to verify_audit_chain';

-- Recomputes the chain; returns the rows where it breaks (none: intact). With an
-- anchor (a row's id and hash taken earlier from audit_chain_head), also reports
-- a missing or changed anchor row: rows removed from the end, or rewritten.
CREATE FUNCTION byok.verify_audit_chain(anchor_id bigint DEFAULT NULL, anchor_hash bytea DEFAULT NULL)
RETURNS TABLE (id bigint, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    a byok.audit_log;
    previous bytea;
    anchored bytea;
BEGIN
    FOR a IN SELECT * FROM byok.audit_log ORDER BY audit_log.id LOOP
        IF a.prev_hash IS DISTINCT FROM previous THEN
            id := a.id; problem := 'prev_hash does not match the hash of the row before it (a row was removed or reordered)';
            RETURN NEXT;
        ELSIF a.hash OPERATOR(pg_catalog.<>) byok.audit_mac(coalesce(a.prev_hash, '\x'::bytea), byok.audit_row_text(a)) THEN
            id := a.id; problem := 'hash does not match the row''s contents (the row was changed, or hashed without the chain key)';
            RETURN NEXT;
        END IF;
        IF a.id OPERATOR(pg_catalog.=) anchor_id THEN
            anchored := a.hash;
        END IF;
        previous := a.hash;
    END LOOP;
    IF anchor_id IS NOT NULL AND anchored IS NULL THEN
        id := anchor_id; problem := 'the anchored row is missing (rows were removed from the end of the trail)';
        RETURN NEXT;
    ELSIF anchor_id IS NOT NULL AND anchored IS DISTINCT FROM anchor_hash THEN
        id := anchor_id; problem := 'the anchored row''s hash differs from the anchor (the trail was rewritten)';
        RETURN NEXT;
    END IF;
END
$fn$;
COMMENT ON FUNCTION byok.verify_audit_chain(bigint, bytea) IS
    'Checks the audit trail''s keyed hash chain (and an external anchor); returns each row where it breaks';
