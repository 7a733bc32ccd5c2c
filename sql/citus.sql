-- Scale-out on Citus (README, "Citus"). Run once by a superuser on the
-- coordinator, byok.citus_distribute_catalog() makes the key catalog a set of
-- Citus reference tables: every node holds a copy, and every change made on
-- the coordinator reaches every node in the same distributed transaction
-- (two-phase commit), where the catalog triggers drop that node's ready keys.
-- Nodes added later get the copy from Citus itself. Wrapped keys travel as
-- they are stored: each node's key broker unwraps them from the key manager.
CREATE FUNCTION byok.citus_distribute_catalog() RETURNS SETOF regclass
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t pg_catalog.regclass;
    distributed pg_catalog.regclass[] := '{}';
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = '0A000', HINT = 'CREATE EXTENSION citus, on every node, first';
    END IF;
    IF (SELECT groupid FROM pg_catalog.pg_dist_local_group) OPERATOR(pg_catalog.<>) 0 THEN
        RAISE EXCEPTION 'byok.citus_distribute_catalog() runs on the coordinator'
            USING ERRCODE = '0A000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node WHERE groupid OPERATOR(pg_catalog.=) 0) THEN
        RAISE EXCEPTION 'the coordinator is not in the Citus metadata'
            USING ERRCODE = '55000',
                  DETAIL = 'the coordinator keeps a copy of the key catalog too, which its own backends and key broker read',
                  HINT = 'SELECT citus_set_coordinator_host(''<host>'', <port>) first';
    END IF;
    -- The catalog's statement triggers run on each node's copy (byok.invalidate_key_caches).
    PERFORM pg_catalog.set_config('citus.enable_unsafe_triggers', 'on', true);
    -- Every table of the foreign-key graph becomes a reference table here, in
    -- this transaction; none may be turned into a Citus local table meanwhile.
    PERFORM pg_catalog.set_config('citus.enable_local_reference_table_foreign_keys', 'off', true);
    FOREACH t IN ARRAY ARRAY['byok.tenant_config', 'byok.wrapped_data_keys', 'byok.tenant_grants',
                             'byok.retired_master_keys', 'byok.scheduled_rotations',
                             'byok.compromise_responses']::pg_catalog.regclass[] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition
                        WHERE logicalrelid OPERATOR(pg_catalog.=) t) THEN
            PERFORM pg_catalog.create_reference_table(t);
            distributed := distributed OPERATOR(pg_catalog.||) t;
            RETURN NEXT t;
        END IF;
    END LOOP;
    -- The rows now live in the reference tables' shards. The coordinator's own
    -- tables are emptied, referencing tables first: wrapped keys must not
    -- linger where a later destruction would not reach them.
    FOR i IN REVERSE pg_catalog.cardinality(distributed)..1 LOOP
        PERFORM pg_catalog.truncate_local_data_after_distributing_table(distributed[i]);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_distribute_catalog() IS
    'On a Citus coordinator: make the key catalog reference tables, kept on every node; returns the tables it distributed';

-- Each node keeps its own metrics and audit trail (its own key broker, its own
-- backends). From the coordinator, these read every node's, through Citus's
-- run_command_on_all_nodes: each node answers with the caller's own rights; a
-- node that does not answer is an error naming it (58000), not a gap.
CREATE FUNCTION byok.citus_metrics()
RETURNS TABLE (nodename text, nodeport integer, tenant_id text, provider text,
               kms_calls bigint, kms_failures bigint, dek_generations bigint,
               decrypts bigint, decrypt_failures bigint, encrypts bigint,
               key_cache_hit_ratio double precision)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    answer record;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database' USING ERRCODE = '0A000';
    END IF;
    FOR answer IN EXECUTE 'SELECT r.nodeid, r.success, r.result FROM pg_catalog.run_command_on_all_nodes($1) r ORDER BY r.nodeid'
        USING 'SELECT coalesce(pg_catalog.json_agg(m), ''[]'') FROM byok.metrics m
                WHERE m.database OPERATOR(pg_catalog.=) pg_catalog.current_database()'
    LOOP
        IF NOT answer.success THEN
            RAISE EXCEPTION 'Citus node % did not answer: %', answer.nodeid, answer.result USING ERRCODE = '58000';
        END IF;
        RETURN QUERY EXECUTE
            'SELECT n.nodename::pg_catalog.text, n.nodeport, m.tenant_id, m.provider, m.kms_calls,
                    m.kms_failures, m.dek_generations, m.decrypts, m.decrypt_failures, m.encrypts,
                    m.key_cache_hit_ratio
               FROM pg_catalog.pg_dist_node n,
                    pg_catalog.json_populate_recordset(NULL::byok.metrics, $2::pg_catalog.json) m
              WHERE n.nodeid OPERATOR(pg_catalog.=) $1
              ORDER BY m.tenant_id, m.provider'
            USING answer.nodeid, answer.result;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_metrics() IS
    'On a Citus coordinator: byok.metrics of every node (per node, tenant and provider)';

CREATE FUNCTION byok.citus_audit_log(since timestamptz DEFAULT pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 day')
RETURNS TABLE (nodename text, nodeport integer, id bigint, logged_at timestamptz, event text,
               tenant_id text, dek_id bigint, role_name name, outcome text, reason text, details jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    answer record;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RAISE EXCEPTION 'Citus is not installed in this database' USING ERRCODE = '0A000';
    END IF;
    FOR answer IN EXECUTE 'SELECT r.nodeid, r.success, r.result FROM pg_catalog.run_command_on_all_nodes($1) r ORDER BY r.nodeid'
        USING pg_catalog.format('SELECT coalesce(pg_catalog.json_agg(a ORDER BY a.id), ''[]'')
                                   FROM byok.audit_log a WHERE a.logged_at OPERATOR(pg_catalog.>=) %L', since)
    LOOP
        IF NOT answer.success THEN
            RAISE EXCEPTION 'Citus node % did not answer: %', answer.nodeid, answer.result USING ERRCODE = '58000';
        END IF;
        RETURN QUERY EXECUTE
            'SELECT n.nodename::pg_catalog.text, n.nodeport, a.id, a.logged_at, a.event, a.tenant_id,
                    a.dek_id, a.role_name, a.outcome, a.reason, a.details
               FROM pg_catalog.pg_dist_node n,
                    pg_catalog.json_populate_recordset(NULL::byok.audit_log, $2::pg_catalog.json) a
              WHERE n.nodeid OPERATOR(pg_catalog.=) $1
              ORDER BY a.id'
            USING answer.nodeid, answer.result;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION byok.citus_audit_log(timestamptz) IS
    'On a Citus coordinator: the audit trail of every node since a time (each node read with the caller''s rights)';
