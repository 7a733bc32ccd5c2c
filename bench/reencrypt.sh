#!/usr/bin/env bash
# Re-encryption job throughput, and what it costs a concurrent write load.
# 1. rows/s of a job over ROWS rows of 100-byte values (no throttle);
# 2. pgbench write throughput (CLIENTS clients updating random rows of another
#    table) for SECONDS s without a job, then the same while a job re-encrypts the
#    ROWS-row table; prints both and the ratio (the target is at least 80%).
# Usage: bash bench/reencrypt.sh   [ROWS=1000000 SECONDS=20 CLIENTS=4 PROFILE=release]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-1000000}
SECONDS_RUN=${SECONDS:-20}
CLIENTS=${CLIENTS:-4}
PORT=54349
ensure_toolchain
PROFILE=${PROFILE:-release} install_extension
start_cluster bench_reencrypt $PORT "shared_buffers = '1GB'" "max_wal_size = '8GB'" "jit = off" \
    "byok.reencrypt_batch_size = 5000"
trap 'stop_cluster bench_reencrypt' EXIT
q() { psql_at bench_reencrypt $PORT -d postgres -qAt "$@"; }
q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"bench","tenant_id":"bench","encryption":{"provider":"local","local":{"key_id":"bench-cmk"}}}');
CREATE TABLE big (id int PRIMARY KEY, v byok.encrypted);
INSERT INTO big SELECT g, byok.encrypt('bench', substring(decode(repeat(md5(g::text), 8), 'hex') FROM 1 FOR 100))
  FROM generate_series(1, $ROWS) g;
CREATE TABLE app (id int PRIMARY KEY, v byok.encrypted);
INSERT INTO app SELECT g, byok.encrypt_text('bench', 'row ' || g) FROM generate_series(1, 100000) g;
VACUUM ANALYZE big, app;
SELECT byok.protect_column('big', 'v');
SQL

log "1. re-encrypting $ROWS rows (no throttle, no other load)"
q -c "SELECT byok.rotate_data_key('bench')" >/dev/null
job=$(q -c "SELECT byok.start_reencrypt('bench', 'big')")
q -c "SELECT byok.wait_job($job, '1 hour')" >/dev/null
q -c "SELECT format('job %s: %s rows in %s s = %s rows/s, %s batches', job_id, rows_done,
                    round(extract(epoch FROM finished_at - started_at)::numeric, 1),
                    round(rows_done / extract(epoch FROM finished_at - started_at)), batches)
        FROM byok.jobs WHERE job_id = $job"

cat > "$BYOK_WORK/bench_reencrypt.sql" <<'SQL'
\set id random(1, 100000)
UPDATE app SET v = byok.encrypt_text('bench', 'row ' || :id || ' ' || random()) WHERE id = :id;
SQL
chmod 644 "$BYOK_WORK/bench_reencrypt.sql"
pgb() { as_postgres "$PG_BIN/pgbench" -h "$BYOK_WORK/bench_reencrypt" -p $PORT -U postgres -n -M prepared \
        -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_RUN" -f "$BYOK_WORK/bench_reencrypt.sql" postgres 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
log "2. pgbench writes, $CLIENTS clients x ${SECONDS_RUN}s, without a job"
alone=$(pgb)
log "   ... and while a job re-encrypts $ROWS rows"
q -c "SELECT byok.rotate_data_key('bench')" >/dev/null
job=$(q -c "SELECT byok.start_reencrypt('bench', 'big')")
during=$(pgb)
progress=$(q -c "SELECT rows_done FROM byok.jobs WHERE job_id = $job")
q -c "SELECT byok.wait_job($job, '1 hour')" >/dev/null
echo "write tps without a job: $alone"
echo "write tps during the job: $during (the job re-encrypted $progress rows meanwhile)"
python3 -c "import sys; print(f'ratio: {float(sys.argv[2]) / float(sys.argv[1]):.0%}')" "$alone" "$during"
