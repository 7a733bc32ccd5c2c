#!/usr/bin/env bash
# Re-encryption job throughput, and what it costs a concurrent write load.
# 1. rows/s of a job over ROWS rows of 100-byte values (no throttle);
# 2. pgbench write throughput (CLIENTS clients updating random rows of another
#    table) for DURATION s without a job, then the same while a job re-encrypts the
#    ROWS-row table, throttled to RATE rows/s so that it runs the whole time (and
#    once more unthrottled, where the job ends early); prints each and the ratio
#    (the target is at least 80%).
# Usage: bash bench/reencrypt.sh   [ROWS=1000000 DURATION=20 CLIENTS=4 RATE=40000 PROFILE=release]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-1000000}
SECONDS_RUN=${DURATION:-20}
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
during_job() { # during_job MAX_ROWS_PER_SECOND: write tps while a job runs
    q -c "ALTER SYSTEM SET byok.reencrypt_max_rows_per_second = $1" -c "SELECT pg_reload_conf()" >/dev/null
    q -c "SELECT byok.rotate_data_key('bench')" >/dev/null
    local job tps progress
    job=$(q -c "SELECT byok.start_reencrypt('bench', 'big')")
    tps=$(pgb)
    progress=$(q -c "SELECT rows_done FROM byok.jobs WHERE job_id = $job")
    q -c "SELECT byok.wait_job($job, '1 hour')" >/dev/null
    echo "$tps $progress"
}
RATE=${RATE:-40000}
log "   ... and while a job re-encrypts $ROWS rows at up to $RATE rows/s"
read -r throttled throttled_rows <<<"$(during_job "$RATE")"
log "   ... and while an unthrottled job re-encrypts $ROWS rows"
read -r unthrottled unthrottled_rows <<<"$(during_job 0)"
echo "write tps without a job: $alone"
echo "write tps during a job throttled to $RATE rows/s: $throttled (the job re-encrypted $throttled_rows rows in the ${SECONDS_RUN} s)"
echo "write tps during an unthrottled job: $unthrottled (the job re-encrypted $unthrottled_rows rows in the ${SECONDS_RUN} s)"
"$PY" -c "import sys; a, t, u = map(float, sys.argv[1:]); print(f'ratio, throttled job: {t / a:.0%}; unthrottled job: {u / a:.0%}')" "$alone" "$throttled" "$unthrottled"
