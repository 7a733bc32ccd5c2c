#!/usr/bin/env bash
# Searchable encryption at scale, in one run: ROWS rows of 100-byte values over
# TENANTS tenants (1,000,000 over 64 by default):
#  1. per-row cost of computing a term: byok.encrypt_text with searchable => true
#     next to without (medians over ROUNDS alternating rounds, microseconds per row);
#  2. the table's load time and the build time of the index on byok.term(v);
#  3. point lookups through the index, the confirming decrypt included
#     (byok.matches): p50 and p99 over LOOKUPS random rows, each timed by
#     clock_timestamp() around the query in the server (no client round trip);
#  4. the decrypt-every-row scan it replaces: the same lookup as
#     WHERE byok.decrypt_text(v, ...) = ... (median of SCANS runs).
# Usage: bash bench/search.sh   [ROWS=1000000 TENANTS=64 ROUNDS=5 TERM_ROWS=200000
#                                LOOKUPS=2000 SCANS=3]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-1000000}
TENANTS=${TENANTS:-64}
ROUNDS=${ROUNDS:-5}
TERM_ROWS=${TERM_ROWS:-200000}
LOOKUPS=${LOOKUPS:-2000}
SCANS=${SCANS:-3}
PORT=54341
ensure_toolchain
PROFILE=release install_extension
start_cluster bench_search $PORT "shared_buffers = '1GB'" "max_parallel_workers_per_gather = 0" "jit = off" \
    "autovacuum = off" "max_wal_size = '8GB'" "checkpoint_timeout = '30min'" "maintenance_work_mem = '512MB'"
trap 'stop_cluster bench_search' EXIT
q() { psql_at bench_search $PORT -d postgres -qAt "$@"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
time_query() { q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1; }

q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant(format('{"customer":"c","tenant_id":"t%s","encryption":{"provider":"local","local":{"key_id":"k%s"}}}', g, g)::jsonb)
  FROM generate_series(0, $TENANTS - 1) g;
SELECT byok.rotate_index_key('t' || g) FROM generate_series(0, $TENANTS - 1) g;
CREATE TABLE items (id int PRIMARY KEY, tenant text NOT NULL, v byok.encrypted NOT NULL);
SELECT byok.protect_column('items', 'v', 'tenant', 'items.v');
SELECT byok.make_searchable('items', 'v');
-- 100-byte values, unique per row: an id, then filler.
CREATE TABLE plain AS
SELECT g AS id, 't' || (g % $TENANTS) AS tenant,
       rpad('value-' || g || '-', 100, md5(g::text)) AS v
  FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE plain;
SQL

log "1. term cost: $ROUNDS rounds over $TERM_ROWS rows, in one warm session"
plain_sql="SELECT count(byok.encrypt_text(tenant, v, 'items.v')) FROM plain WHERE id <= $TERM_ROWS"
term_sql="SELECT count(byok.encrypt_text(tenant, v, 'items.v', searchable => true)) FROM plain WHERE id <= $TERM_ROWS"
# One session throughout: a new connection would load 64 tenants' keys again
# (twice as many for searchable sealing: data and index keys), which is the
# cold-start cost, not the per-row one. Alternating order, medians.
script="\\timing on"$'\n'"$plain_sql;"$'\n'"$term_sql;"$'\n'
for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then script+="$plain_sql;"$'\n'"$term_sql;"$'\n'; else script+="$term_sql;"$'\n'"$plain_sql;"$'\n'; fi
done
mapfile -t times < <(q <<<"$script" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -n $((ROUNDS * 2)))
plain_ms=""; term_ms=""
for r in $(seq 0 $((ROUNDS - 1))); do
    a=${times[$((2 * r))]}; b=${times[$((2 * r + 1))]}
    if (( (r + 1) % 2 )); then plain_ms+=" $a"; term_ms+=" $b"; else term_ms+=" $a"; plain_ms+=" $b"; fi
done
plain_us=$(echo "$plain_ms" | median | awk -v n="$TERM_ROWS" '{printf "%.3f", $1 * 1000 / n}')
term_us=$(echo "$term_ms" | median | awk -v n="$TERM_ROWS" '{printf "%.3f", $1 * 1000 / n}')

log "2. loading $ROWS searchable rows, then the index"
load_ms=$(time_query "INSERT INTO items SELECT id, tenant, byok.encrypt_text(tenant, v, 'items.v', searchable => true) FROM plain")
index_ms=$(time_query "CREATE INDEX items_v_term ON items (byok.term(v))")
q -c "VACUUM ANALYZE items" >/dev/null
plan=$(q -c "EXPLAIN (COSTS OFF) SELECT id FROM items WHERE byok.matches(v, 't1', 'x', 'items.v')" | head -1)
index_mb=$(q -c "SELECT round(pg_relation_size('items_v_term') / 1048576.0)")

log "3. $LOOKUPS point lookups through the index"
q >/dev/null <<SQL
CREATE TABLE lookup_times (ms float8, found int, expected int);
DO \$\$
DECLARE k int; t text; val text; started timestamptz; found int;
BEGIN
  FOR i IN 1..$LOOKUPS LOOP
    k := 1 + floor(random() * $ROWS)::int;
    SELECT p.tenant, p.v INTO t, val FROM plain p WHERE p.id = k;
    started := clock_timestamp();
    SELECT count(*) INTO found FROM items WHERE byok.matches(items.v, t, val, 'items.v');
    INSERT INTO lookup_times VALUES (extract(epoch FROM clock_timestamp() - started) * 1000, found, 1);
  END LOOP;
END
\$\$;
SQL
read -r p50 p99 wrong <<<"$(q -F ' ' -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3),
                                            round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 3),
                                            count(*) FILTER (WHERE found <> expected) FROM lookup_times")"

log "4. the decrypt-every-row scan, $SCANS runs"
scan_ms=""
for r in $(seq "$SCANS"); do
    k=$(( (RANDOM * 32768 + RANDOM) % ROWS + 1 ))
    scan_ms+=" $(time_query "SELECT count(*) FROM items i, plain p WHERE p.id = $k AND byok.decrypt_text(i.v, 'items.v') = p.v")"
done
scan=$(echo "$scan_ms" | median)

echo
echo "searchable encryption: $ROWS rows of 100 bytes, $TENANTS tenants, 8-byte terms"
printf '  encrypt_text per row:              %8s us   (searchable => true: %s us; a term costs %s us)\n' \
    "$plain_us" "$term_us" "$(awk -v a="$term_us" -v b="$plain_us" 'BEGIN {printf "%.3f", a - b}')"
printf '  load (INSERT ... searchable):      %8.0f ms   (%.2f us per row)\n' "$load_ms" "$(awk -v m="$load_ms" -v n="$ROWS" 'BEGIN {print m * 1000 / n}')"
printf '  CREATE INDEX on byok.term(v):      %8.0f ms   (%s MB)\n' "$index_ms" "$index_mb"
printf '  lookup through the index:     p50 %8s ms   p99 %s ms   (%s lookups, %s wrong; plan: %s)\n' "$p50" "$p99" "$LOOKUPS" "$wrong" "$plan"
printf '  decrypt-every-row scan:           %8.0f ms   (median of %s)\n' "$scan" "$SCANS"
