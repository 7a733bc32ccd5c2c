#!/usr/bin/env bash
# Scheduled rotation too, at the end.
# A re-encryption job over 200,000 rows, throttled, with the application updating
# rows meanwhile; the server is stopped with -m immediate in the middle of it and
# started again. The job must resume by itself and finish; every row must decrypt
# to its value, sit under the new data key, have been rewritten at most once, and
# rows the application updated must keep the application's value.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54348
NAME=reencrypt
ROWS=${ROWS:-200000}
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d app -qAt "$@"; }
trap 'stop_cluster $NAME' EXIT

start_cluster $NAME $PORT "byok.reencrypt_batch_size = 2000" "byok.reencrypt_max_rows_per_second = 25000" \
    "byok.scheduler_naptime_seconds = 600"
psql_at $NAME $PORT -d postgres -qAt -c "CREATE DATABASE app" >/dev/null
q -c "CREATE EXTENSION byok_pg" >/dev/null
q -c "SELECT byok.configure_tenant('{\"customer\": \"acme\", \"tenant_id\": \"acme\", \"encryption\": {\"provider\": \"local\", \"local\": {\"key_id\": \"acme-cmk\"}}}')" >/dev/null
# shadow holds each row's plaintext; rewrites counts the job's rewrites of the row
# (a change of data key with the same plaintext), by a trigger.
q <<'SQL' >/dev/null
CREATE TABLE accounts (id int PRIMARY KEY, v byok.encrypted NOT NULL, shadow text NOT NULL, rewrites int NOT NULL DEFAULT 0);
CREATE FUNCTION count_rewrites() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.shadow = OLD.shadow AND byok.data_key_id(NEW.v) <> byok.data_key_id(OLD.v) THEN
        NEW.rewrites := OLD.rewrites + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER count_rewrites BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION count_rewrites();
SQL
q -c "INSERT INTO accounts SELECT g, byok.encrypt_text('acme', 'value ' || g, 'accounts.v'), 'value ' || g FROM generate_series(1, $ROWS) g" >/dev/null
q -c "SELECT byok.protect_column('accounts', 'v', context => 'accounts.v')" >/dev/null
OLD_KEY=$(q -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 'acme' AND state = 'active'")
q -c "SELECT byok.rotate_data_key('acme')" >/dev/null
NEW_KEY=$(q -c "SELECT dek_id FROM byok.data_keys WHERE tenant_id = 'acme' AND state = 'active'")
JOB=$(q -c "SELECT byok.start_reencrypt('acme', 'accounts')")
check "the job counts every row" "$(q -c "SELECT rows_total FROM byok.jobs WHERE job_id = $JOB")" "$ROWS"

# The application keeps writing: 10 rows every 20 ms, spread over the table.
rm -f "$BYOK_WORK/$NAME.stop-writer"
(
    i=0
    while [ ! -f "$BYOK_WORK/$NAME.stop-writer" ]; do
        i=$((i + 1))
        q -c "UPDATE accounts SET v = byok.encrypt_text('acme', 'app ' || $i || ' ' || id, 'accounts.v'), shadow = 'app ' || $i || ' ' || id
               WHERE id IN (SELECT (random() * ($ROWS - 1))::int + 1 FROM generate_series(1, 10))" >/dev/null 2>&1
        sleep 0.02
    done
) &
WRITER=$!

# Mid-job: stop the server the hard way.
for _ in $(seq 1 300); do
    done_rows=$(q -c "SELECT rows_done FROM byok.jobs WHERE job_id = $JOB" 2>/dev/null)
    [ "${done_rows:-0}" -ge $((ROWS / 3)) ] && break
    sleep 0.1
done
echo "rows re-encrypted before the crash: $done_rows of $ROWS"
[ "${done_rows:-0}" -ge $((ROWS / 3)) ] && [ "${done_rows:-0}" -lt "$ROWS" ] && ok "the crash comes mid-job" || not_ok "the crash did not come mid-job ($done_rows)"
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/$NAME/data" -m immediate -w stop >/dev/null
sleep 1
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/$NAME/data" -l "$BYOK_WORK/$NAME/server.log" -w -t 60 start >/dev/null
check "after restart the job is still unfinished" "$(q -c "SELECT state IN ('running', 'pending') FROM byok.jobs WHERE job_id = $JOB")" "t"

# Nobody calls resume: the scheduler finds the job and a worker finishes it.
state=$(q -c "SELECT byok.wait_job($JOB, '3 minutes')")
touch "$BYOK_WORK/$NAME.stop-writer"; wait $WRITER
check "the job resumed by itself and finished" "$state" "done"
check "its rate counts the run after the restart, from the rows checkpointed before the crash" \
    "$(q -c "SELECT run_started_at > started_at AND run_rows_start >= ${done_rows:-0} AND run_rows_start < $ROWS FROM byok.reencrypt_jobs WHERE job_id = $JOB")" "t"
q -c "SELECT state, rows_done, rows_total, rows_per_second, batches, keys_retired FROM byok.jobs WHERE job_id = $JOB"

check "every row decrypts to its value (application updates kept)" \
    "$(q -c "SELECT count(*) FROM accounts WHERE byok.decrypt_text(v, 'accounts.v') = shadow")" "$ROWS"
check "every row is under the new data key" \
    "$(q -c "SELECT string_agg(k || ':' || n, ',') FROM (SELECT byok.data_key_id(v) AS k, count(*) AS n FROM accounts GROUP BY 1) s")" "$NEW_KEY:$ROWS"
check "no row was rewritten twice" "$(q -c "SELECT max(rewrites) <= 1 FROM accounts")" "t"
check "the checkpointed count equals the rows the job rewrote" \
    "$(q -c "SELECT rows_done = (SELECT sum(rewrites) FROM accounts) FROM byok.jobs WHERE job_id = $JOB")" "t"
app_rows=$(q -c "SELECT count(*) FROM accounts WHERE shadow LIKE 'app %'")
echo "rows the application updated: $app_rows, rewritten by the job: $(q -c "SELECT sum(rewrites) FROM accounts")"
check "the application wrote during the job" "$([ "${app_rows:-0}" -gt 0 ] && echo yes)" "yes"
check "the old data key is retired" "$(q -c "SELECT state FROM byok.data_keys WHERE dek_id = $OLD_KEY")" "retired"

echo "== the last values in rows another transaction holds locked: the job waits for them"
q <<'SQL' >/dev/null
SELECT byok.configure_tenant('{"customer": "acme", "tenant_id": "lk", "encryption": {"provider": "local", "local": {"key_id": "lk-cmk"}}}');
CREATE TABLE held (id int PRIMARY KEY, v byok.encrypted NOT NULL);
INSERT INTO held SELECT g, byok.encrypt_text('lk', 'held ' || g, 'held.v') FROM generate_series(1, 10) g;
SELECT byok.protect_column('held', 'v', context => 'held.v');
SELECT byok.rotate_data_key('lk');
SQL
# Another session holds row 3 FOR SHARE for 3 seconds: the sweep's FOR UPDATE SKIP
# LOCKED passes it over.
q -c "BEGIN" -c "SELECT id FROM held WHERE id = 3 FOR SHARE" -c "SELECT pg_sleep(3)" -c "COMMIT" >/dev/null &
LOCKER=$!
for _ in $(seq 1 100); do
    [ "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(3)' AND state = 'active'")" = 1 ] && break
    sleep 0.05
done
# The job is started and driven in this transaction (no worker sees it), put
# straight into its final sweep; each step says what it did (rows rewritten, only
# locked rows left), then wait_job's result.
steps=$(q <<'SQL'
BEGIN;
SELECT byok.start_reencrypt('lk', 'held') AS job \gset
UPDATE byok.reencrypt_jobs SET state = 'running', cursor_relid = 'held', cursor_column = 'v', sweeping = true WHERE job_id = :job;
SELECT byok.reencrypt_step(:job, 100);
SELECT byok.reencrypt_step(:job, 100);
SELECT byok.wait_job(:job, '30 seconds');
COMMIT;
SQL
)
wait $LOCKER
check "the sweep rewrote the 9 free rows, then reported only locked rows left, then waited and finished" \
    "$(echo $steps)" "rewrote 9 waiting for locked rows done"
check "every value is under the new key, the held row too" \
    "$(q -c "SELECT count(*) FILTER (WHERE byok.data_key_id(v) = k.dek_id AND byok.decrypt_text(v, 'held.v') = 'held ' || id) FROM held, byok.data_keys k WHERE k.tenant_id = 'lk' AND k.state = 'active'")" "10"
check "and the old key is retired" "$(q -c "SELECT string_agg(state, ',' ORDER BY dek_id) FROM byok.data_keys WHERE tenant_id = 'lk'")" "retired,active"

echo "== scheduled data-key rotation (key_rotation.enabled, interval_days)"
q -c "SELECT byok.configure_tenant('{\"customer\": \"acme\", \"tenant_id\": \"auto\", \"encryption\": {\"provider\": \"local\", \"local\": {\"key_id\": \"auto-cmk\"}, \"key_rotation\": {\"enabled\": true, \"interval_days\": 30}}}')" >/dev/null
q -c "SELECT byok.configure_tenant('{\"customer\": \"acme\", \"tenant_id\": \"manual\", \"encryption\": {\"provider\": \"local\", \"local\": {\"key_id\": \"manual-cmk\"}, \"key_rotation\": {\"enabled\": false, \"interval_days\": 30}}}')" >/dev/null
# Both tenants' keys are made 31 days old; only the one with rotation enabled is due.
q -c "UPDATE byok.wrapped_data_keys SET created_at = now() - interval '31 days' WHERE tenant_id IN ('auto', 'manual')" >/dev/null
q -c "ALTER SYSTEM SET byok.scheduler_naptime_seconds = 1" -c "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 1 100); do
    [ "$(q -c "SELECT count(*) FROM byok.data_keys WHERE tenant_id = 'auto'")" = 2 ] && break
    sleep 0.1
done
check "the scheduler rotated the due tenant's key by itself" \
    "$(q -c "SELECT string_agg(state, ',' ORDER BY dek_id) FROM byok.data_keys WHERE tenant_id = 'auto'")" "decrypt-only,active"
check "the new key is fresh" "$(q -c "SELECT created_at > now() - interval '1 minute' FROM byok.data_keys WHERE tenant_id = 'auto' AND state = 'active'")" "t"
check "a tenant without key_rotation.enabled is left alone" \
    "$(q -c "SELECT string_agg(state, ',') FROM byok.data_keys WHERE tenant_id = 'manual'")" "active"
exit $fail
