#!/usr/bin/env bash
# Load test: pgbench with CLIENTS clients for DURATION seconds across TENANTS
# tenants, mixing encrypted inserts, decrypting reads (which check every value
# they open) and encrypted updates. At the end: no errors, no lost rows (count and
# checksum of the decrypted values equal those of a plaintext shadow column kept
# in the same transactions), and the key-manager calls it took.
# Usage: bash bench/load.sh   [CLIENTS=16 DURATION=60 TENANTS=64 PROFILE=release]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-60}
TENANTS=${TENANTS:-64}
PORT=54347
ensure_toolchain
# The test command runs this with PROFILE=debug, reusing the build it installed.
PROFILE=${PROFILE:-release} install_extension
start_cluster bench_load $PORT "max_connections = 60" "shared_buffers = '256MB'"
trap 'stop_cluster bench_load' EXIT
q() { psql_at bench_load $PORT -d postgres -qAt "$@"; }
q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant(format('{"customer":"load","tenant_id":"t%s","encryption":{"provider":"local","local":{"key_id":"cmk-%s"}}}', g, g)::jsonb)
  FROM generate_series(1, $TENANTS) g;
CREATE TABLE items (id bigserial PRIMARY KEY, tenant text NOT NULL, shadow text NOT NULL, secret byok.encrypted NOT NULL);
INSERT INTO items (tenant, shadow, secret)
SELECT 't' || (g % $TENANTS + 1), 'v' || g, byok.encrypt_text('t' || (g % $TENANTS + 1), 'v' || g, 'items.secret')
  FROM generate_series(1, 10000) g;
-- A read that finds a value different from its shadow raises, failing the transaction.
CREATE FUNCTION check_read(bigint) RETURNS int LANGUAGE plpgsql AS \$\$
DECLARE r record;
BEGIN
    SELECT tenant, shadow, byok.decrypt_text(secret, 'items.secret') AS opened INTO r FROM items WHERE id = \$1;
    IF FOUND AND r.opened <> r.shadow THEN
        RAISE EXCEPTION 'row % decrypted to the wrong value', \$1;
    END IF;
    RETURN 1;
END \$\$;
SQL
cat > "$BYOK_WORK/bench_load/workload.sql" <<SQL
\set t random(1, $TENANTS)
\set n random(1, 1000000000)
\set r random(1, 10000)
BEGIN;
INSERT INTO items (tenant, shadow, secret) VALUES ('t' || :t, 'w' || :n, byok.encrypt_text('t' || :t, 'w' || :n, 'items.secret'));
SELECT check_read(:r);
SELECT check_read(:r + 1);
UPDATE items SET shadow = 'u' || :n, secret = byok.encrypt_text(tenant, 'u' || :n, 'items.secret') WHERE id = :r;
END;
SQL
before=$(q -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics")
q -c "SELECT byok.flush_cache()" >/dev/null
log "pgbench: $CLIENTS clients, ${DURATION}s, $TENANTS tenants"
"$PG_BIN/pgbench" -h "$BYOK_WORK/bench_load" -p $PORT -U postgres -n -c "$CLIENTS" -j 2 -T "$DURATION" -f "$BYOK_WORK/bench_load/workload.sql" postgres \
    > "$BYOK_WORK/bench_load/pgbench.out" 2>&1
status=$?
grep -E "transactions actually processed|failed|tps =|latency average" "$BYOK_WORK/bench_load/pgbench.out"
errors=$(grep -c "ERROR" "$BYOK_WORK/bench_load/pgbench.out" || true)
read -r rows matching < <(q -F ' ' -c "SELECT count(*), count(*) FILTER (WHERE byok.decrypt_text(secret, 'items.secret') = shadow) FROM items")
checksum_ok=$(q -c "SELECT md5(string_agg(byok.decrypt_text(secret, 'items.secret'), ',' ORDER BY id)) = md5(string_agg(shadow, ',' ORDER BY id)) FROM items")
calls=$(( $(q -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics") - before ))
echo
echo "rows: $rows, decrypting to their shadow value: $matching, checksum equal: $checksum_ok"
echo "errors during the run: $errors (pgbench exit $status)"
echo "key-manager calls during the run: $calls (tenants: $TENANTS)"
[ "$status" = 0 ] && [ "$errors" = 0 ] && [ "$rows" = "$matching" ] && [ "$checksum_ok" = t ]
