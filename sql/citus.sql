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
