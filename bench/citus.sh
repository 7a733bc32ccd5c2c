#!/usr/bin/env bash
# byok_pg on Citus, one run: encrypted inserts through the coordinator and
# decrypting scans on the workers, with one worker and then two (the second
# added and the shards rebalanced onto it), ROWS rows of 100-byte values over
# 32 tenants in a table distributed by tenant id (32 shards). Every node is on
# this machine: they share its cores, which is what limits the second worker.
# Usage: bash bench/citus.sh   [ROWS=200000 SCANS=3]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-200000}
SCANS=${SCANS:-3}
PORT=54395
ensure_toolchain
ensure_citus
PROFILE=release install_extension
KEY="$BYOK_WORK/bench_citus_master.key"
rm -f "$KEY"
conf=("shared_preload_libraries = 'citus,byok_pg'" "byok.local_master_key_file = '$KEY'"
      "citus.node_conninfo = 'sslmode=disable'" "max_prepared_transactions = 100"
      "shared_buffers = '512MB'" "jit = off" "autovacuum = off" "max_wal_size = '4GB'")
for n in 0 1 2; do start_cluster bench_citus_$n $((PORT + n)) "${conf[@]}"; done
trap 'for n in 0 1 2; do stop_cluster bench_citus_$n; done' EXIT
c() { psql_at bench_citus_0 $PORT -d postgres -qAt "$@"; }
for n in 0 1 2; do psql_at bench_citus_$n $((PORT + n)) -d postgres -qAt -c "CREATE EXTENSION citus" >/dev/null; done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
time_query() { c -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1; }
c >/dev/null <<SQL
SELECT citus_set_coordinator_host('127.0.0.1', $PORT);
SELECT citus_add_node('127.0.0.1', $((PORT + 1)));
CREATE EXTENSION byok_pg;
SELECT byok.citus_distribute_catalog();
SELECT byok.configure_tenant(format('{"customer":"c","tenant_id":"t%s","encryption":{"provider":"local","local":{"key_id":"k%s"}}}', g, g)::jsonb)
  FROM generate_series(0, 31) g;
CREATE TABLE d (tenant_id text NOT NULL, id bigint NOT NULL, v byok.encrypted NOT NULL);
SELECT create_distributed_table('d', 'tenant_id', shard_count => 32);
SQL
insert="INSERT INTO d SELECT 't' || (g % 32), g, byok.encrypt_text('t' || (g % 32), rpad('user' || g || '@example.com ', 100, 'x'), 'd.v') FROM generate_series(1, $ROWS) g"
scan="SELECT count(*) FROM d WHERE byok.decrypt_text(v, 'd.v') LIKE 'user%'"
measure() { # measure LABEL: prints "label|insert rows/s|scan rows/s"
    c -c "TRUNCATE d" >/dev/null
    local ins; ins=$(time_query "$insert")
    c -c "VACUUM ANALYZE d" >/dev/null
    c -c "$scan" >/dev/null   # (every node's keys ready, pages cached)
    local scans=() i
    for i in $(seq "$SCANS"); do scans+=("$(time_query "$scan")"); done
    local scan_ms; scan_ms=$(echo "${scans[*]}" | median)
    awk -v l="$1" -v r="$ROWS" -v i="$ins" -v s="$scan_ms" \
        'BEGIN { printf "| %s | %.0f | %.0f |\n", l, r / (i / 1000), r / (s / 1000) }'
}
echo "byok_pg on Citus: $ROWS rows of 100 bytes, 32 tenants, 32 shards; $(nproc) cores shared by every node; release build"
echo "| workers | encrypted inserts through the coordinator (rows/s) | decrypting scan on the workers (rows/s, median of $SCANS) |"
echo "|---|---|---|"
measure 1
c -c "SELECT citus_add_node('127.0.0.1', $((PORT + 2)))" >/dev/null
c -c "SELECT rebalance_table_shards('d', shard_transfer_mode => 'block_writes')" >/dev/null 2>&1
measure "2 ($(c -c "SELECT count(DISTINCT nodeport) FROM pg_dist_placement JOIN pg_dist_node USING (groupid) JOIN pg_dist_shard USING (shardid) WHERE logicalrelid = 'd'::regclass") holding shards)"
