#!/usr/bin/env bash
# The key broker under load: 16 sessions decrypt a cold table of 64 tenants at
# once. Prints the key-manager calls (which must equal the number of distinct
# data keys), rows/s next to a plain scan by the same sessions, and the latency a
# cold key fetch adds over the local provider's own unwrap.
# Usage: bash bench/broker.sh   [SESSIONS=16 TENANTS=64 ROWS_PER_TENANT=3000 PROBES=300]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
SESSIONS=${SESSIONS:-16}
TENANTS=${TENANTS:-64}
ROWS_PER_TENANT=${ROWS_PER_TENANT:-3000}
PROBES=${PROBES:-300}
PORT=54342
ensure_toolchain
PROFILE=release install_extension
start_cluster bench_broker $PORT "shared_buffers = '512MB'" "max_parallel_workers_per_gather = 0" "jit = off"
trap 'stop_cluster bench_broker' EXIT
q() { psql_at bench_broker $PORT -d postgres -qAt "$@"; }

log "loading $TENANTS tenants x $ROWS_PER_TENANT rows of 100-byte values"
q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant(format('{"customer":"bench","tenant_id":"t%s","encryption":{"provider":"local","local":{"key_id":"cmk-%s"}}}', g, g)::jsonb)
  FROM generate_series(1, $TENANTS) g;
CREATE TABLE t AS
SELECT row_number() OVER () AS id, 't' || tn AS tenant, p AS plain, byok.encrypt('t' || tn, p) AS sealed
  FROM generate_series(1, $TENANTS) tn, generate_series(1, $ROWS_PER_TENANT) r,
       LATERAL (SELECT decode(repeat(md5(tn || ':' || r), 4), 'hex')::bytea || '\x0102030405060708090a0b0c0d0e0f1011121314'::bytea AS p) s;
VACUUM ANALYZE t;
SQL
rows=$(q -c "SELECT count(*) FROM t")
deks=$(q -c "SELECT count(DISTINCT byok.data_key_id(sealed)) FROM t")

run_sessions() { # run_sessions 'select expression' -> wall ms
    local expr=$1 start end
    start=$(date +%s%N)
    for s in $(seq 0 $((SESSIONS - 1))); do
        q -c "SELECT count($expr) FROM t WHERE id % $SESSIONS = $s" >/dev/null &
    done
    wait
    end=$(date +%s%N)
    echo $(( (end - start) / 1000000 ))
}
kms() { q -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics"; }

log "cold decrypt by $SESSIONS sessions"
q -c "SELECT byok.flush_cache()" >/dev/null
before=$(kms)
cold_ms=$(run_sessions "byok.decrypt(sealed)")
calls=$(( $(kms) - before ))
warm_ms=$(run_sessions "byok.decrypt(sealed)")
plain_ms=$(run_sessions "length(plain)")
plain_ms=$(( plain_ms < 1 ? 1 : plain_ms ))

log "cold key fetch latency ($PROBES probes)"
q >/dev/null <<SQL
CREATE TABLE probe (cold_us float8, warm_us float8);
DO \$\$
DECLARE
    one byok.encrypted := (SELECT sealed FROM t LIMIT 1);
    t0 timestamptz;
    cold float8;
BEGIN
    FOR i IN 1 .. $PROBES LOOP
        PERFORM byok.flush_cache();
        t0 := clock_timestamp();
        PERFORM byok.decrypt(one);
        cold := extract(epoch FROM clock_timestamp() - t0) * 1e6;
        t0 := clock_timestamp();
        PERFORM byok.decrypt(one);
        INSERT INTO probe VALUES (cold, extract(epoch FROM clock_timestamp() - t0) * 1e6);
    END LOOP;
END \$\$;
SQL
read -r cold50 cold99 warm50 warm99 < <(q -F ' ' -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY cold_us)::numeric, 1),
    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY cold_us)::numeric, 1),
    round(percentile_cont(0.5) WITHIN GROUP (ORDER BY warm_us)::numeric, 1),
    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY warm_us)::numeric, 1) FROM probe")
provider_line=$(cd "$BYOK_ROOT" && cargo run --release -q -p byok-kms --example local_unwrap_latency -- "$BYOK_WORK/bench_broker/provider-probe.key" 2000)
provider99=$(sed -n 's/.*p99 \([0-9.]*\) us.*/\1/p' <<<"$provider_line")

echo
echo "rows=$rows tenants=$TENANTS distinct data keys=$deks sessions=$SESSIONS"
echo "key-manager calls for the cold run: $calls (distinct data keys: $deks)"
printf '%-32s %10s %14s\n' "run ($SESSIONS sessions)" "wall ms" "rows/s"
for pair in "cold decrypt:$cold_ms" "warm decrypt:$warm_ms" "plain scan:$plain_ms"; do
    printf '%-32s %10s %14s\n' "${pair%%:*}" "${pair##*:}" "$(( rows * 1000 / ${pair##*:} ))"
done
echo
echo "single-value decrypt: cold (cache flushed) p50 ${cold50} us, p99 ${cold99} us; warm p50 ${warm50} us, p99 ${warm99} us"
echo "$provider_line"
awk -v c="$cold99" -v w="$warm99" -v p="$provider99" 'BEGIN {
    printf "cold-fetch cost over a warm decrypt, less the provider'"'"'s own unwrap (catalog read + broker round trip), p99: %.1f us (target < 1000)\n", c - w - p }'
[ "$calls" = "$deks" ] && echo "OK: one key-manager call per data key" || echo "MISMATCH: $calls calls for $deks data keys"
