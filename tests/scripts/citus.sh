#!/usr/bin/env bash
# byok_pg on Citus: a coordinator and two workers on this machine, the key
# catalog distributed as reference tables (byok.citus_distribute_catalog), a
# table distributed by tenant id over 32 tenants. Encrypted inserts through the
# coordinator; reads pushed down to the workers (router and multi-shard) under
# each node's own key broker (one key-manager call per data key per node);
# grants and byok.tenant on every node; rotation, revocation of a grant and
# shredding seen by every node at once; administration refused on workers; a
# node added later gets the catalog; a shard move keeps every value readable;
# searchable columns of a distributed table (probed on the workers).
# Citus is built from the vendored source once per machine (lib.sh: ensure_citus).
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
NAME=citus_0; PORT=${BYOK_CITUS_PORT:-54390}   # (the workers: the next three ports)
W1=$((PORT + 1)); W2=$((PORT + 2)); W3=$((PORT + 3))
trap '[ -n "${KEEP_CLUSTERS:-}" ] || for n in 0 1 2 3; do stop_cluster citus_$n; done' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
ensure_citus || { not_ok "Citus could not be built"; exit 1; }

KEY="$BYOK_WORK/citus_local_master.key"
rm -f "$KEY"
node_conf=("shared_preload_libraries = 'citus,byok_pg'"
           "byok.local_master_key_file = '$KEY'"   # one local master key for every node
           "citus.node_conninfo = 'sslmode=disable'"
           "max_prepared_transactions = 100" "wal_level = logical"
           "citus.propagate_set_commands = 'local'"
           "byok.scheduler_naptime_seconds = 1")     # (the coordinator's upkeep, every second)
for n in 0 1 2; do start_cluster citus_$n $((PORT + n)) "${node_conf[@]}"; done
c() { psql_at citus_0 $PORT -d postgres -qAt "$@"; }
w() { local n=$1; shift; psql_at citus_$n $((PORT + n)) -d postgres -qAt "$@"; }
for n in 0 1 2; do w $n -c "CREATE EXTENSION citus" >/dev/null; done
c >/dev/null <<SQL
SELECT citus_set_coordinator_host('127.0.0.1', $PORT);
SELECT citus_add_node('127.0.0.1', $W1);
SELECT citus_add_node('127.0.0.1', $W2);
CREATE EXTENSION byok_pg;
SQL
check "CREATE EXTENSION on the coordinator reaches every worker" \
    "$(w 1 -c "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")|$(w 2 -c "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")" \
    "$(c -c "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")|$(c -c "SELECT extversion FROM pg_extension WHERE extname = 'byok_pg'")"

echo "== the key catalog on every node"
# A tenant configured before the catalog is distributed goes with it.
c -c "SELECT byok.configure_tenant('{\"customer\":\"c\",\"tenant_id\":\"t0\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k0\"}}}')" >/dev/null
NAME=citus_1 PORT=$W1 expect_error "distributing from a worker is refused" 0A000 "runs on the coordinator" \
    "SELECT byok.citus_distribute_catalog()"
check "byok.citus_distribute_catalog() makes the catalog reference tables" \
    "$(c -c "SELECT string_agg(t::text, ',') FROM byok.citus_distribute_catalog() t")" \
    "byok.tenant_config,byok.wrapped_data_keys,byok.tenant_grants,byok.retired_master_keys,byok.scheduled_rotations,byok.compromise_responses"
check "a second call has nothing left to do" "$(c -c "SELECT count(*) FROM byok.citus_distribute_catalog()")" "0"
check "the tenant configured before is on every worker" "$(w 1 -c "SELECT tenant_id FROM byok.tenants")|$(w 2 -c "SELECT tenant_id FROM byok.tenants")" "t0|t0"
c -c "SELECT byok.configure_tenant(format('{\"customer\":\"c\",\"tenant_id\":\"t%s\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k%s\"}}}', g, g)::jsonb) FROM generate_series(1, 31) g" >/dev/null
for n in 1 2; do
    check "worker $n knows the 32 tenants and their data keys, configured on the coordinator" \
        "$(w $n -c "SELECT count(*), count(DISTINCT dek_id) FILTER (WHERE state = 'active') FROM byok.data_keys")" "32|32"
done
# Roles are Citus's to propagate; grants name them (byok.role_ref), each node its own OIDs.
w 1 -c "CREATE ROLE only_here_1; CREATE ROLE only_here_2" >/dev/null   # (shifts worker 1's OIDs)
c >/dev/null <<'SQL'
CREATE ROLE app LOGIN IN ROLE byok_user;
SELECT byok.grant_tenant('app', 't' || g) FROM generate_series(0, 15) g;
SQL
for n in 1 2; do
    check "worker $n: the grants name its own role app" \
        "$(w $n -c "SELECT count(*) FROM byok.tenant_access WHERE grantee::oid = 'app'::regrole::oid")" "16"
done

# A dropped role's grants go, on every node, against each node's own roles;
# nobody else's go with them.
c -c "CREATE ROLE gone LOGIN IN ROLE byok_user" -c "SELECT byok.grant_tenant('gone', 't1')" >/dev/null
c -c "DROP ROLE gone" >/dev/null
for i in $(seq 50); do
    [ "$(c -c "SELECT count(*) FROM byok.tenant_grants")" = 16 ] && break; sleep 0.2
done
sleep 2   # (and a few more passes of the coordinator's upkeep)
for n in 0 1 2; do
    check "node $n: the dropped role's grant is gone, app's 16 remain (each copy against its own roles)" \
        "$(w $n -c "SELECT count(*) || '/' || count(*) FILTER (WHERE grantee::oid = 'app'::regrole::oid) FROM byok.tenant_grants")" "16/16"
done
check "the removal is in the coordinator's audit trail" \
    "$(c -c "SELECT count(*) FROM byok.audit_log WHERE event = 'grant_dropped_with_role' AND tenant_id = 't1'")" "1"
expect_error "a role is named, never given by OID or as '-'" 22P02 "invalid input syntax for type byok.role_ref" \
    "SELECT '-'::byok.role_ref"

echo "== a distributed table, written through the coordinator, read on the workers"
c >/dev/null <<'SQL'
CREATE TABLE accounts (tenant_id text NOT NULL, id int NOT NULL, secret byok.encrypted NOT NULL);
SELECT create_distributed_table('accounts', 'tenant_id', shard_count => 8);
GRANT SELECT, INSERT ON accounts TO app;
INSERT INTO accounts
SELECT 't' || (g % 32), g, byok.encrypt_text('t' || (g % 32), 'secret ' || g, 'accounts.secret')
  FROM generate_series(1, 3200) g;
SQL
check "every row decrypts (multi-shard, on the workers)" \
    "$(c -c "SELECT count(*) FROM accounts WHERE byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" "3200"
check "a tenant's rows decrypt (router query)" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id = 't7' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" "100"
plan=$(c -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT byok.decrypt_text(secret, 'accounts.secret') FROM accounts WHERE tenant_id = 't7'")
grep -q "Task Count: 1" <<<"$plan" && grep -q "Query: SELECT byok.decrypt_text(secret, 'accounts.secret'::text) AS decrypt_text FROM public.accounts_[0-9]* accounts WHERE (tenant_id OPERATOR(pg_catalog.=) 't7'::text)" <<<"$plan" \
    && ok "EXPLAIN: the router query sends byok.decrypt_text to the one worker holding the tenant" || not_ok "router plan: $plan"
plan=$(c -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT byok.decrypt_text(secret, 'accounts.secret') FROM accounts")
grep -q "Task Count: 8" <<<"$plan" && grep -q "Query: SELECT byok.decrypt_text(secret, 'accounts.secret'::text) AS decrypt_text FROM public.accounts_[0-9]* accounts WHERE true" <<<"$plan" \
    && ok "EXPLAIN: the multi-shard query decrypts on the workers, shard by shard" || not_ok "multi-shard plan: $plan"
# Which node holds which tenant, and how many key-manager calls each made.
c >/dev/null <<'SQL'
CREATE VIEW tenant_nodes AS
SELECT t.tenant_id, n.nodeport
  FROM (SELECT DISTINCT tenant_id FROM accounts) t
  JOIN pg_dist_placement p ON p.shardid = get_shard_id_for_distribution_column('accounts', t.tenant_id)
  JOIN pg_dist_node n ON n.groupid = p.groupid;
SQL
for n in 1 2; do
    port=$((PORT + n))
    # (each worker's key broker unwrapped each of its tenants' data keys once, however many backends asked)
    c -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts" >/dev/null
    # (dek_generations: successful unwraps and generations; a worker generates
    # nothing. kms_calls would also count the periodic revocation checks.)
    check "worker $n: one unwrap per data key it used (its tenants: $(c -c "SELECT count(*) FROM tenant_nodes WHERE nodeport = $port"))" \
        "$(w $n -c "SELECT coalesce(sum(dek_generations), 0), coalesce(max(dek_generations), 0) FROM byok.metrics WHERE tenant_id LIKE 't%'")" \
        "$(c -c "SELECT count(*) FROM tenant_nodes WHERE nodeport = $port")|1"
done

# The golden test (tests/citus): where encryption and decryption run, EXPLAIN included.
rm -rf "$BYOK_WORK/citus-regress-out"; mkdir -p "$BYOK_WORK/citus-regress-out"
status=0
PGOPTIONS="-c client_min_messages=warning" \
"/usr/lib/postgresql/${PG_MAJOR}/lib/pgxs/src/test/regress/pg_regress" \
    --use-existing --host="$BYOK_WORK/citus_0" --port=$PORT --user=postgres --dbname=postgres \
    --bindir="$PG_BIN" --inputdir="$BYOK_ROOT/tests/citus" --outputdir="$BYOK_WORK/citus-regress-out" \
    citus_pushdown >/dev/null || status=$?
[ $status -ne 0 ] && [ -f "$BYOK_WORK/citus-regress-out/regression.diffs" ] && head -80 "$BYOK_WORK/citus-regress-out/regression.diffs"
check "golden test tests/citus/citus_pushdown (EXPLAIN: decryption on the workers)" "$status" "0"

echo "== grants and byok.tenant hold on every node"
a() { psql_at citus_0 $PORT -d postgres -qAt -U app -v VERBOSITY=verbose "$@"; }
check "app reads a granted tenant through the coordinator" \
    "$(a -c "SELECT count(*) FROM accounts WHERE tenant_id = 't3' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" "100"
out=$(a -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't20'" 2>&1)
grep -q "ERROR:  42501:  *role \"app\" may not use data key" <<<"$out" && grep -q "while executing command on 127.0.0.1:" <<<"$out" \
    && ok "app cannot read an ungranted tenant's shard (42501, raised on the worker)" || not_ok "ungranted: $out"
out=$(a -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts" 2>&1)
grep -q "ERROR:  42501:" <<<"$out" && ok "nor through a multi-shard query" || not_ok "multi-shard ungranted: $out"
# (citus.propagate_set_commands = 'local' carries SET LOCAL to the workers;
# each statement on its own, as Citus forwards the SET's own text)
out=$(a -v ON_ERROR_STOP=1 2>&1 <<'SQL'
BEGIN;
SET LOCAL byok.tenant = 't3';
SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't3';
SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't4';
COMMIT;
SQL
)
grep -q "^100$" <<<"$out" && grep -q "ERROR:  42501:.*t3" <<<"$out" && ok "SET LOCAL byok.tenant = t3: t3's rows read, t4's refused on the worker" || not_ok "byok.tenant: $out"
# What Citus does not carry to the workers is refused on the coordinator
# (0A000), rather than decrypted there unrestricted.
a_on() { a -v ON_ERROR_STOP=0 "$@"; }   # (every statement, whatever fails)
read_t() { echo "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = '$1';"; }
out=$(a -c "SET byok.tenant = 't3'" -c "$(read_t t4)" 2>&1)
grep -q "ERROR:  0A000:  *byok.tenant would not reach the Citus worker nodes" <<<"$out" \
    && ok "a session-level SET byok.tenant = t3 cannot read t4's shard through the coordinator (0A000)" || not_ok "session-level: $out"
out=$(a_on -c "SET byok.tenant = 't3'" -c "SELECT count(*) FROM accounts" -c "$(read_t t3)" 2>&1)
grep -c "ERROR:  0A000:" <<<"$out" | grep -qx 2 \
    && ok "nor any distributed query, its own tenant's included (the workers would not be restricted)" || not_ok "session-level own: $out"
out=$(a_on -c "SET byok.tenant = 't3'" -c "SELECT byok.decrypt_text(byok.encrypt_text('t3', 'here', 'c'), 'c')" -c "SELECT byok.decrypt_text(byok.encrypt_text('t4', 'here', 'c'), 'c')" 2>&1)
grep -q "^here$" <<<"$out" && grep -q "ERROR:  42501:" <<<"$out" \
    && ok "a session-level byok.tenant still holds on the coordinator's own queries" || not_ok "session-level local: $out"
out=$(a 2>&1 <<SQL
BEGIN;
SELECT set_config('byok.tenant', 't3', true) IS NOT NULL;
$(read_t t4)
ROLLBACK;
SQL
)
grep -q "ERROR:  0A000:" <<<"$out" && ok "set_config('byok.tenant', ..., true) in a transaction block is not carried: refused" || not_ok "set_config: $out"
out=$(a_on 2>&1 <<SQL
BEGIN;
SET LOCAL byok.tenant = 't3';
SAVEPOINT s;
SET LOCAL byok.tenant = 't4';
ROLLBACK TO SAVEPOINT s;
$(read_t t3)
$(read_t t4)
COMMIT;
BEGIN;
SET LOCAL byok.tenant = 't3';
SAVEPOINT s;
SET LOCAL byok.tenant = 't4';
RELEASE SAVEPOINT s;
$(read_t t4)
COMMIT;
SQL
)
grep -q "^100$" <<<"$out" && grep -q "ERROR:  42501:.*t3" <<<"$out" && grep -q "ERROR:  0A000:" <<<"$out" \
    && ok "savepoints: a rolled-back SET LOCAL leaves t3 in force; one in a released savepoint (which Citus forgets) is refused" \
    || not_ok "savepoints: $out"
out=$(a_on 2>&1 <<SQL
BEGIN;
SET LOCAL byok.tenant = 't3' \; SELECT 1;
$(read_t t3)
ROLLBACK;
BEGIN;
SET LOCAL citus.select_opens_transaction_block = off;
SET LOCAL byok.tenant = 't3';
$(read_t t3)
ROLLBACK;
SQL
)
grep -c "ERROR:  0A000:" <<<"$out" | grep -qx 2 \
    && ok "refused too: a SET LOCAL sharing its query string (Citus forwards the whole string), reads outside a remote transaction block" \
    || not_ok "string / select_opens: $out"
c >/dev/null <<'SQL'
CREATE PROCEDURE read_tenant(p_tenant text) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = p_tenant;
END $$;
SELECT create_distributed_function('read_tenant(text)', 'p_tenant', colocate_with => 'accounts');
GRANT EXECUTE ON PROCEDURE read_tenant(text) TO app;
SQL
out=$(a -c "SET byok.tenant = 't3'" -c "CALL read_tenant('t4')" 2>&1)
grep -q "ERROR:  0A000:" <<<"$out" && ok "a CALL Citus would run on a worker by itself is refused under a session-level byok.tenant" || not_ok "call: $out"
check "the same CALL without byok.tenant runs (on the worker)" "$(a -c "CALL read_tenant('t4')" 2>&1)" ""
# Ways the workers' connections could end up restricted otherwise than this
# session (found by a hostile review), each refused.
out=$(PGOPTIONS="-c citus.propagate_set_commands=none -c byok.tenant=t3" a_on 2>&1 <<SQL
BEGIN;
SET LOCAL citus.propagate_set_commands = 'local';
SET LOCAL byok.tenant = 't3';
RESET ALL;
$(read_t t4)
ROLLBACK;
SQL
)
grep -q "ERROR:  0A000:" <<<"$out" && ok "RESET ALL (sent by Citus, which was propagating when it ran) counts as carrying no tenant" || not_ok "reset all: $out"
out=$(a_on 2>&1 <<SQL
BEGIN;
SET LOCAL byok.tenant = 't3';
SAVEPOINT s;
SET LOCAL byok.tenant = '';
SELECT count(*) FROM accounts;
RELEASE SAVEPOINT s;
SET byok.tenant = 't3';
$(read_t t4)
ROLLBACK;
SQL
)
grep -q "ERROR:  0A000:" <<<"$out" && ok "after a released savepoint whose SET LOCAL the open connections keep, nothing counts as carried" || not_ok "released: $out"
out=$(a_on 2>&1 <<SQL
SET standard_conforming_strings = off;
BEGIN;
SET LOCAL byok.tenant = 't3\'; RESET byok.tenant; --';
$(read_t t3)
ROLLBACK;
SQL
)
grep -q "ERROR:  0A000:" <<<"$out" && ok "a SET parsed with standard_conforming_strings off (the workers parse it with it on) is not carried" || not_ok "scs: $out"
out=$(a_on 2>&1 <<SQL
BEGIN;
DECLARE early CURSOR FOR SELECT byok.decrypt_text(secret, 'accounts.secret') FROM accounts WHERE tenant_id = 't4';
SET byok.tenant = 't3';
FETCH 1 FROM early;
ROLLBACK;
SQL
)
grep -q "ERROR:  0A000:" <<<"$out" && ok "a cursor declared before byok.tenant was set is refused at FETCH (Citus runs its tasks then)" || not_ok "cursor: $out"
c >/dev/null <<'SQL'
CREATE FUNCTION read_tenant_count(p_tenant text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = p_tenant);
END $$;
SELECT create_distributed_function('read_tenant_count(text)', 'p_tenant', colocate_with => 'accounts', force_delegation => true);
GRANT EXECUTE ON FUNCTION read_tenant_count(text) TO app;
SQL
out=$(a_on 2>&1 <<SQL
BEGIN;
SET LOCAL byok.tenant = 't3';
SELECT read_tenant_count('t3');
ROLLBACK;
BEGIN;
SET LOCAL byok.tenant = 't3';
SELECT read_tenant_count('t4');
ROLLBACK;
SQL
)
grep -q "^10[01]$" <<<"$out" && grep -q "ERROR:  42501:.*t3" <<<"$out" \
    && ok "a function Citus delegates to a worker (force_delegation) runs under the SET LOCAL: its own tenant reads, another is refused there" || not_ok "delegated function: $out"
a -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't5'" >/dev/null
c -c "SELECT byok.revoke_tenant('app', 't5')" >/dev/null
out=$(a -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't5'" 2>&1)
grep -q "ERROR:  42501:" <<<"$out" && ok "a revoke on the coordinator takes effect on the worker at once" || not_ok "revoke: $out"
check "app inserts through the coordinator for a granted tenant" \
    "$(a -c "INSERT INTO accounts VALUES ('t3', 5000, byok.encrypt_text('t3', 'secret 5000', 'accounts.secret')) RETURNING id")" "5000"

echo "== administration: from the coordinator, for every node"
NAME=citus_1 PORT=$W1 expect_error "rotating a data key on a worker is refused" 0A000 "cannot rotate_data_key on a Citus worker node" \
    "SELECT byok.rotate_data_key('t1')"
NAME=citus_1 PORT=$W1 expect_error "registering a column on a worker is refused" 0A000 "cannot protect_column on a Citus worker node" \
    "SELECT byok.protect_column('accounts', 'secret')"
old=$(c -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 't1' AND state = 'active'")
new=$(c -c "SELECT byok.rotate_data_key('t1')")
for n in 1 2; do
    check "worker $n sees the rotation at once (new key active, old decrypt-only)" \
        "$(w $n -c "SELECT string_agg(dek_id || ':' || state, ',' ORDER BY dek_id) FROM byok.data_keys WHERE tenant_id = 't1'")" "$old:decrypt-only,$new:active"
done
c -c "INSERT INTO accounts SELECT 't1', g, byok.encrypt_text('t1', 'secret ' || g, 'accounts.secret') FROM generate_series(6001, 6050) g" >/dev/null
check "rows under the old and the new key decrypt" \
    "$(c -c "SELECT count(*) FILTER (WHERE byok.data_key_id(secret) = $old) || '+' || count(*) FILTER (WHERE byok.data_key_id(secret) = $new) FROM accounts WHERE tenant_id = 't1' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" "100+50"
c -c "SELECT byok.set_data_key_state($old, 'retired')" >/dev/null
out=$(c -v VERBOSITY=verbose -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't1'" 2>&1)
grep -q "is retired" <<<"$out" && ok "a key retired on the coordinator is refused on the worker holding its rows" || not_ok "retired: $out"
c -c "SELECT byok.set_data_key_state($old, 'decrypt-only')" >/dev/null

echo "== rotation and re-encryption of every shard while a writer runs"
c -c "SELECT byok.protect_column('accounts', 'secret', 'tenant_id', 'accounts.secret')" >/dev/null
olds=$(c -c "SELECT string_agg(dek_id::text, ',' ORDER BY dek_id) FROM byok.data_keys WHERE tenant_id IN ('t8', 't9', 't10') AND state = 'active'")
c -c "SELECT byok.rotate_data_key('t' || g) FROM generate_series(8, 10) g" >/dev/null
# A writer: inserts (sealed on the coordinator) and updates (an UPDATE of a
# distributed table calls byok.encrypt_text in a subquery: Citus evaluates it
# on the coordinator, as it runs no volatile function per row on a shard).
( for i in $(seq 1 60); do
    c -c "INSERT INTO accounts VALUES ('t9', 7000 + $i, byok.encrypt_text('t9', 'secret ' || (7000 + $i), 'accounts.secret'))" \
      -c "UPDATE accounts SET secret = (SELECT byok.encrypt_text('t8', 'secret ' || 8, 'accounts.secret')) WHERE tenant_id = 't8' AND id = 8" >/dev/null 2>>"$BYOK_WORK/citus_writer.err"
  done ) &
writer=$!
job=$(c -c "SELECT byok.start_reencrypt()")
check "the job ends done" "$(c -c "SELECT byok.wait_job($job, '120 s')")" "done"
wait $writer
check "the writer's statements all succeeded" "$(cat "$BYOK_WORK/citus_writer.err" 2>/dev/null | head -3)" ""
check "no value of the table is under the rotated keys" \
    "$(c -c "SELECT count(*) FROM accounts WHERE byok.data_key_id(secret) IN ($olds)")" "0"
check "the rotated keys are retired, on every node" \
    "$(c -c "SELECT string_agg(DISTINCT state, ',') FROM byok.data_keys WHERE dek_id IN ($olds)")|$(w 1 -c "SELECT string_agg(DISTINCT state, ',') FROM byok.data_keys WHERE dek_id IN ($olds)")|$(w 2 -c "SELECT string_agg(DISTINCT state, ',') FROM byok.data_keys WHERE dek_id IN ($olds)")" \
    "retired|retired|retired"
check "every row still decrypts to its plaintext (the writer's too)" \
    "$(c -c "SELECT count(*) FILTER (WHERE byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id), count(*) FROM accounts WHERE tenant_id <> 't31'")" \
    "$(c -c "SELECT count(*), count(*) FROM accounts WHERE tenant_id <> 't31'")"
# (each node counts what it seals; the workers' catalog writers add their
# counts to the shared catalog through Citus, a few seconds behind)
for i in $(seq 100); do
    [ "$(c -c "SELECT encryptions >= 100 FROM byok.data_keys WHERE tenant_id = 't10' AND state = 'active'")" = t ] && break; sleep 0.2
done
check "the values the workers sealed count toward t10's new key's budget, in the shared catalog" \
    "$(w 1 -c "SELECT encryptions >= 100 FROM byok.data_keys WHERE tenant_id = 't10' AND state = 'active'")" "t"
check "the job rewrote the rotated tenants' rows on the workers" \
    "$(c -c "SELECT rows_done >= 300 FROM byok.jobs WHERE job_id = $job")" "t"

echo "== a master-key rotation and a revocation, on every node"
c -c "CALL byok.rotate_master_key('t2', 'k2-next')" >/dev/null
check "after rotate_master_key on the coordinator, every worker reads t2 (its keys rewrapped everywhere)" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id = 't2' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")|$(w 1 -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys WHERE tenant_id = 't2'")|$(w 2 -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys WHERE tenant_id = 't2'")" \
    "100|k2-next|k2-next"
c -c "SELECT byok.configure_tenant('{\"customer\":\"c\",\"tenant_id\":\"t13\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k13\"},\"cache_config\":{\"ttl_seconds\":86400,\"revocation_check_seconds\":1}}}')" >/dev/null
read13="SELECT count(*) FROM accounts WHERE tenant_id = 't13' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id"
check "t13 reads (its key cached on its worker)" "$(c -c "$read13")" "100"
as_postgres sh -c "printf 'k13\n' > '$KEY.revoked'"   # (the customer disables the key)
sleep 3
out=$(c -v VERBOSITY=verbose -c "$read13" 2>&1)
grep -q "ERROR:  55000: .*local master key \"k13\" is revoked" <<<"$out" \
    && ok "within revocation_check_seconds + 1 s, the worker's broker refuses t13 (55000, revoked)" || not_ok "revoked: $out"
as_postgres rm -f "$KEY.revoked"
sleep 3
check "restored, t13 reads again, with no administrator" "$(c -c "$read13")" "100"

echo "== shredding one tenant"
c -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id IN ('t30', 't31')" >/dev/null   # (keys cached on the workers)
c -c "SELECT byok.destroy_tenant_keys('t31', 't31')" >/dev/null
out=$(c -v VERBOSITY=verbose -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't31'" 2>&1)
grep -q "ERROR:  55000:" <<<"$out" && grep -q "destroyed" <<<"$out" && ok "t31 is unreadable on the worker holding it (55000, destroyed)" || not_ok "shredded: $out"
for n in 1 2; do
    check "worker $n: t31's wrapped keys are gone from its copy" \
        "$(w $n -c "SELECT count(*) FILTER (WHERE state = 'destroyed') || '/' || count(*) FROM byok.data_keys WHERE tenant_id = 't31'")" "1/1"
done
check "the other tenants are untouched" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id <> 't31' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id <> 't31'")"

echo "== cluster-wide caches, metrics and audit trail, from the coordinator"
check "flush_cache on the coordinator empties every node's shared cache (keys were cached on both workers)" \
    "$(c -c "SELECT byok.flush_cache() > 0")|$(w 1 -c "SELECT shared_cache_entries FROM byok.broker_status()")|$(w 2 -c "SELECT shared_cache_entries FROM byok.broker_status()")" "t|0|0"
c -c "SELECT count(byok.decrypt_text(secret, 'accounts.secret')) FROM accounts WHERE tenant_id = 't12'" >/dev/null
check "byok.citus_metrics(): of the workers, only the one holding t12 unwrapped its key, once before the flush and once after" \
    "$(c -c "SELECT string_agg(nodeport || ':' || dek_generations, ',') FROM byok.citus_metrics() WHERE tenant_id = 't12' AND dek_generations > 0 AND nodeport <> $PORT")" \
    "$(c -c "SELECT nodeport FROM tenant_nodes WHERE tenant_id = 't12'"):2"
check "byok.citus_audit_log(): every node recorded the flush" \
    "$(c -c "SELECT count(DISTINCT nodeport) FROM byok.citus_audit_log(now() - interval '10 minutes') WHERE event = 'flush_cache' AND outcome = 'ok'")" "3"
check "byok.citus_audit_log(): the refused decryptions, on the worker that refused them" \
    "$(c -c "SELECT count(*) > 0 FROM byok.citus_audit_log() WHERE nodeport <> $PORT AND outcome = 'failed' AND role_name = 'app'")" "t"

echo "== a node added later, and a shard move"
start_cluster citus_3 $W3 "${node_conf[@]}"
w 3 -c "CREATE EXTENSION citus; CREATE ROLE only_here_3; CREATE ROLE only_here_4; CREATE ROLE only_here_5" >/dev/null
c -c "SELECT citus_add_node('127.0.0.1', $W3)" >/dev/null
# (Citus copies reference tables to a new node here, or when shards move there)
c -c "SELECT replicate_reference_tables()" >/dev/null
check "the new node holds its own copy of the catalog" \
    "$(c -c "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) JOIN pg_dist_shard s USING (shardid) WHERE n.nodeport = $W3 AND s.logicalrelid::text LIKE 'byok.%'")" "6"
check "the new node has the catalog" "$(w 3 -c "SELECT count(*) FROM byok.tenants")" "32"
check "its grants name its own roles" \
    "$(w 3 -c "SELECT count(*) FROM byok.tenant_access WHERE grantee::oid = 'app'::regrole::oid")" "15"
shard=$(c -c "SELECT get_shard_id_for_distribution_column('accounts', 't7')")
from=$(c -c "SELECT nodeport FROM tenant_nodes WHERE tenant_id = 't7'")
c -c "SELECT citus_move_shard_placement($shard, '127.0.0.1', $from, '127.0.0.1', $W3, shard_transfer_mode => 'block_writes')" >/dev/null
check "t7's shard moved to the new node" "$(c -c "SELECT nodeport FROM tenant_nodes WHERE tenant_id = 't7'")" "$W3"
check "its rows decrypt there, under that node's key broker" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id = 't7' AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id")" "100"
check "the new node's broker unwrapped t7's key itself, once" "$(w 3 -c "SELECT sum(dek_generations) FROM byok.metrics WHERE tenant_id = 't7'")" "1"
# The rebalancer (Citus's background tasks) spreads the shards over the three workers.
c -c "SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')" -c "SELECT citus_rebalance_wait()" >/dev/null
check "after citus_rebalance_start, every worker holds shards of accounts" \
    "$(c -c "SELECT count(DISTINCT nodeport) FROM pg_dist_shard_placement p JOIN pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'accounts'::regclass")" "3"
check "and every value still decrypts, wherever its shard went" \
    "$(c -c "SELECT count(*) FILTER (WHERE byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || id) = count(*) FROM accounts WHERE tenant_id <> 't31'")" "t"

echo "== COPY into a distributed table"
c -c "COPY (SELECT tenant_id, id + 100000, secret FROM accounts WHERE tenant_id = 't2') TO STDOUT" > "$BYOK_WORK/citus_copy.txt"
c -c "\\copy accounts FROM '$BYOK_WORK/citus_copy.txt'" >/dev/null
check "copied encrypted values decrypt" \
    "$(c -c "SELECT count(*) FROM accounts WHERE tenant_id = 't2' AND id > 100000 AND byok.decrypt_text(secret, 'accounts.secret') = 'secret ' || (id - 100000)")" "100"

echo "== a coordinator crash in the middle of a re-encryption job"
c >/dev/null <<'SQL'
CREATE TABLE ledger (tenant_id text NOT NULL, id int NOT NULL, v byok.encrypted NOT NULL);
SELECT create_distributed_table('ledger', 'tenant_id', colocate_with => 'accounts');
INSERT INTO ledger SELECT 't' || (g % 8), g, byok.encrypt_text('t' || (g % 8), 'entry ' || g, 'ledger.v') FROM generate_series(1, 40000) g;
SELECT byok.protect_column('ledger', 'v', 'tenant_id', 'ledger.v');
ALTER SYSTEM SET byok.reencrypt_batch_size = 500;
ALTER SYSTEM SET byok.reencrypt_max_rows_per_second = 8000;
SELECT pg_reload_conf();
SQL
olds=$(c -c "SELECT string_agg(dek_id::text, ',' ORDER BY dek_id) FROM byok.data_keys WHERE tenant_id IN (SELECT 't' || g FROM generate_series(0, 7) g) AND state = 'active'")
c -c "SELECT byok.rotate_data_key('t' || g) FROM generate_series(0, 7) g" >/dev/null
job=$(c -c "SELECT byok.start_reencrypt(NULL, 'ledger')")
for _ in $(seq 300); do
    done_rows=$(c -c "SELECT rows_done FROM byok.jobs WHERE job_id = $job" 2>/dev/null)
    [ "${done_rows:-0}" -ge 10000 ] && break; sleep 0.1
done
[ "${done_rows:-0}" -ge 10000 ] && [ "${done_rows:-0}" -lt 40000 ] && ok "the crash comes mid-job ($done_rows of 40000 rows)" || not_ok "not mid-job: $done_rows"
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/citus_0/data" -m immediate -w stop >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/citus_0/data" -l "$BYOK_WORK/citus_0/server.log" -w -t 60 start >/dev/null
check "after the restart the job is unfinished" "$(c -c "SELECT state IN ('running', 'pending') FROM byok.jobs WHERE job_id = $job")" "t"
check "it resumes by itself and ends done" "$(c -c "SELECT byok.wait_job($job, '180 s')")" "done"
check "no value of ledger is under the rotated keys, on any shard" \
    "$(c -c "SELECT count(*) FROM ledger WHERE byok.data_key_id(v) IN ($olds)")" "0"
check "every value decrypts to its plaintext" \
    "$(c -c "SELECT count(*) FROM ledger WHERE byok.decrypt_text(v, 'ledger.v') = 'entry ' || id")" "40000"
c -c "ALTER SYSTEM RESET byok.reencrypt_batch_size" -c "ALTER SYSTEM RESET byok.reencrypt_max_rows_per_second" -c "SELECT pg_reload_conf()" >/dev/null

echo "== searchable columns on a distributed table"
c >/dev/null <<'SQL'
SELECT byok.rotate_index_key('t' || g) FROM generate_series(16, 23) g;
CREATE TABLE users (tenant_id text NOT NULL, id int NOT NULL, email byok.encrypted NOT NULL);
SELECT create_distributed_table('users', 'tenant_id', shard_count => 8, colocate_with => 'none');
SELECT byok.protect_column('users', 'email', 'tenant_id', 'users.email');
SQL
expect_error "other term settings than the defaults are refused on a Citus table (the workers would not apply them)" 0A000 \
    "a searchable column of Citus table public.users must keep the default term settings" \
    "SELECT byok.make_searchable('users', 'email', normalization => 'lowercase')"
check "the defaults are accepted" "$(c -c "SELECT byok.make_searchable('users', 'email')")" "exact"
c >/dev/null <<'SQL'
INSERT INTO users
SELECT 't' || (16 + g % 8), g, byok.encrypt_text('t' || (16 + g % 8), 'user' || g || '@example.com', 'users.email', searchable => true)
  FROM generate_series(1, 800) g;
CREATE INDEX ON users (byok.term(email));
SQL
check "a router lookup finds the row (terms sealed on the coordinator, probed on the worker)" \
    "$(c -c "SELECT id FROM users WHERE tenant_id = 't17' AND byok.matches(email, 't17', 'user9@example.com', 'users.email')")" "9"
check "so does a multi-shard lookup" \
    "$(c -c "SELECT id FROM users WHERE byok.matches(email, 't18', 'user10@example.com', 'users.email')")" "10"
check "another tenant's probe for the same value finds nothing" \
    "$(c -c "SELECT count(*) FROM users WHERE byok.matches(email, 't19', 'user10@example.com', 'users.email')")" "0"
plan=$(c -c "SET citus.explain_all_tasks = off" -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT id FROM users WHERE byok.matches(email, 't18', 'user10@example.com', 'users.email')")
grep -q "Task Count: 8" <<<"$plan" && grep -q "Index Cond: (byok.term(users.email) = ANY (byok.search_terms('t18'::text, 'user10@example.com'::text, 'users.email'::text)))" <<<"$plan" \
    && grep -q "Filter: byok.confirm_match(users.email, 't18'::text" <<<"$plan" \
    && ok "EXPLAIN: each shard's task probes its term index on the worker and confirms there" || not_ok "search plan: $plan"
# (INSERT ... SELECT between colocated shards runs on the workers: terms sealed there)
c -c "INSERT INTO users SELECT tenant_id, id + 10000, byok.encrypt_text(tenant_id, byok.decrypt_text(email, 'users.email'), 'users.email', searchable => true) FROM users" >/dev/null
check "terms sealed on the workers match the coordinator's probes" \
    "$(c -c "SELECT string_agg(id::text, ',' ORDER BY id) FROM users WHERE byok.matches(email, 't20', 'user12@example.com', 'users.email')")" "12,10012"
out=$(a -c "SELECT count(*) FROM users WHERE byok.matches(email, 't20', 'user12@example.com', 'users.email')" 2>&1)
grep -q "ERROR:  42501:" <<<"$out" && ok "app cannot probe an ungranted tenant's column" || not_ok "ungranted probe: $out"
c >/dev/null <<'SQL'
CREATE TABLE contacts (tenant_id text NOT NULL, id int NOT NULL, email byok.encrypted);
SELECT byok.protect_column('contacts', 'email', 'tenant_id', 'contacts.email');
SELECT byok.make_searchable('contacts', 'email', normalization => 'lowercase');
SELECT create_distributed_table('contacts', 'tenant_id', colocate_with => 'none');
SQL
expect_error "a table distributed after make_searchable with other settings: its terms are refused, not computed differently per node" 0A000 \
    "a searchable column of Citus table public.contacts must keep the default term settings" \
    "INSERT INTO contacts VALUES ('t16', 1, byok.encrypt_text('t16', 'A@example.com', 'contacts.email', searchable => true))"
exit $fail
