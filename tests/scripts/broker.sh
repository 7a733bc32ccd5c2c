#!/usr/bin/env bash
# The key broker under stress, through SQL and several sessions. A FIFO put in
# place of the local key file stands in for a key manager that hangs: opening it
# blocks until someone writes the key into it.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
# Every outcome is checked explicitly below; expected SQL errors must not end the script.
set +e
PORT=54338
NAME=broker
start_cluster $NAME $PORT "max_connections = 120"
trap 'release_fifo >/dev/null 2>&1; stop_cluster $NAME; stop_cluster nopreload' EXIT
DATA="$BYOK_WORK/$NAME/data"
KEY="$DATA/byok_local_master.key"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }
qe() { psql_at $NAME $PORT -d postgres -qAt -v ON_ERROR_STOP=1 "$@" 2>&1; }

hang_key_store() {   # the key manager stops answering
    as_postgres mv "$KEY" "$KEY.real"
    as_postgres mkfifo -m 600 "$KEY"
}
release_fifo() {     # ...and answers again: feed blocked readers, then put the file back
    [ -p "$KEY" ] || return 0
    for _ in 1 2 3 4 5 6 7 8; do timeout 1 bash -c "cat '$KEY.real' > '$KEY'" 2>/dev/null || break; done
    as_postgres rm -f "$KEY"
    as_postgres mv "$KEY.real" "$KEY"
}
busy_slots() { q -c "SELECT busy_slots FROM byok.broker_status()"; }
wait_for() { # wait_for SECONDS 'shell condition': until the condition holds
    local limit=$1 condition=$2
    for _ in $(seq 1 $((limit * 10))); do eval "$condition" && return 0; sleep 0.1; done
    return 1
}
# Unwraps (and generations) that succeeded: kms_calls would also count the
# broker's periodic revocation checks, one of which may fall in the window.
unwraps() { q -c "SELECT coalesce(sum(dek_generations), 0) FROM byok.metrics WHERE tenant_id = '$1'"; }

q >/dev/null <<'SQL'
CREATE EXTENSION byok_pg;
SELECT byok.configure_tenant('{"customer":"c","tenant_id":"t1","encryption":{"provider":"local","local":{"key_id":"k1"}}}');
SELECT byok.configure_tenant('{"customer":"c","tenant_id":"t2","encryption":{"provider":"local","local":{"key_id":"k2"}}}');
CREATE TABLE v1 AS SELECT g AS id, byok.encrypt_text('t1', 'value ' || g) AS v FROM generate_series(1, 1000) g;
CREATE TABLE v2 AS SELECT g AS id, byok.encrypt_text('t2', 'other ' || g) AS v FROM generate_series(1, 10) g;
SQL

echo "== the broker runs"
check "broker is up with 64 slots, none busy" "$(q -c "SELECT broker_pid IS NOT NULL, total_slots, busy_slots FROM byok.broker_status()")" "t|64|0"
check "the broker process is named for ps" "$(ps -o args= -p "$(q -c "SELECT broker_pid FROM byok.broker_status()")" | xargs)" "postgres: byok key broker"

echo "== 16 sessions missing the same key at once make one key-manager call"
q -c "SELECT byok.flush_cache()" >/dev/null
before=$(unwraps t1)
hang_key_store
pids=()
for i in $(seq 1 16); do
    q -c "SET byok.kms_timeout_ms = 30000" -c "SELECT count(*) FROM v1 WHERE byok.decrypt_text(v) = 'value ' || id" > "$BYOK_WORK/coalesce.$i" 2>&1 &
    pids+=($!)
done
wait_for 10 'test "$(busy_slots)" -ge 16' && ok "16 requests waiting in slots" || not_ok "waiting requests: $(busy_slots)"
release_fifo
for p in "${pids[@]}"; do wait "$p" || true; done
check "all 16 sessions decrypted every row" "$(cat "$BYOK_WORK"/coalesce.* | sort | uniq -c | xargs -0 echo | xargs)" "16 1000"
check "exactly one unwrap call for them all" "$(( $(unwraps t1) - before ))" "1"
check "slots all free again" "$(busy_slots)" "0"

echo "== a request that outlives byok.kms_timeout_ms fails clearly"
q -c "SELECT byok.flush_cache()" >/dev/null
hang_key_store
start=$(date +%s%N)
err=$(qe -c "SET byok.kms_timeout_ms = 500" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 1")
ms=$(( ($(date +%s%N) - start) / 1000000 ))
grep -q "the key broker did not answer within 500 ms" <<<"$err" && ok "timeout error after ${ms} ms" || not_ok "timeout: $err"
[ "$ms" -lt 3000 ] && ok "the wait ended on time" || not_ok "took ${ms} ms"

echo "== query cancel and statement_timeout interrupt the wait at once"
start=$(date +%s%N)
err=$(qe -c "SET byok.kms_timeout_ms = 30000" -c "SET statement_timeout = 300" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 1")
ms=$(( ($(date +%s%N) - start) / 1000000 ))
grep -q "canceling statement due to statement timeout" <<<"$err" && ok "statement_timeout cancelled the wait after ${ms} ms" || not_ok "cancel: $err"
[ "$ms" -lt 3000 ] && ok "cancel was prompt" || not_ok "cancel took ${ms} ms"
q -c "SET byok.kms_timeout_ms = 30000" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 1" >/dev/null 2>&1 &
waiter=$!
wait_for 5 'test "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '"'"'%FROM v1 WHERE id = 1%'"'"' AND wait_event_type = '"'"'Extension'"'"'")" = 1' \
    && ok "a session waits on the broker (wait event Extension)" || not_ok "no waiting session"
q -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%FROM v1 WHERE id = 1%' AND pid <> pg_backend_pid()" >/dev/null
wait "$waiter" && not_ok "cancelled query succeeded" || ok "pg_cancel_backend ended the wait"

echo "== a terminated backend leaves no slot behind, and its answer reaches nobody else"
q -c "SET byok.kms_timeout_ms = 30000" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 1" >/dev/null 2>&1 &
waiter=$!
wait_for 5 'test "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '"'"'%FROM v1 WHERE id = 1%'"'"' AND wait_event_type = '"'"'Extension'"'"'")" = 1' || true
q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%FROM v1 WHERE id = 1%' AND pid <> pg_backend_pid()" >/dev/null
wait "$waiter" || true
release_fifo
wait_for 10 'test "$(busy_slots)" = 0' && ok "every slot freed once the hung calls ended" || not_ok "busy slots: $(busy_slots)"
check "another tenant's request gets its own answer" "$(q -c "SELECT byok.decrypt_text(v) FROM v2 WHERE id = 3")" "other 3"
check "and the first tenant's key still works" "$(q -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 7")" "value 7"

echo "== all slots busy: requests queue, then fail clearly; nothing deadlocks"
q -c "SELECT byok.flush_cache()" >/dev/null
hang_key_store
pids=()
for i in $(seq 1 72); do
    q -c "SET byok.kms_timeout_ms = 2000" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = $i" > "$BYOK_WORK/busy.$i" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
busy_errors=$(cat "$BYOK_WORK"/busy.* | grep -c "all 64 key broker request slots stayed busy" || true)
timeout_errors=$(cat "$BYOK_WORK"/busy.* | grep -c "did not answer within 2000 ms" || true)
[ "$busy_errors" -ge 1 ] && ok "$busy_errors requests found every slot busy and said so" || not_ok "no busy-slot error"
check "every request ended with one of the two errors" "$((busy_errors + timeout_errors))" "72"
release_fifo
wait_for 10 'test "$(busy_slots)" = 0' && ok "slots freed after the key manager came back" || not_ok "busy slots: $(busy_slots)"
check "requests succeed again" "$(q -c "SELECT count(*) FROM v1 WHERE byok.decrypt_text(v) = 'value ' || id")" "1000"

echo "== grace period: cached keys are served past their TTL while the key manager is down, then not"
q >/dev/null <<'SQL'
SELECT byok.configure_tenant('{"customer":"c","tenant_id":"g1","encryption":{"provider":"local","local":{"key_id":"kg"},"cache_config":{"ttl_seconds":1,"grace_period_seconds":4}}}');
SELECT byok.configure_tenant('{"customer":"c","tenant_id":"g0","encryption":{"provider":"local","local":{"key_id":"kg0"},"cache_config":{"ttl_seconds":1}}}');
CREATE TABLE vg AS SELECT 'g1' AS t, byok.encrypt_text('g1', 'graceful') AS v UNION ALL SELECT 'g0', byok.encrypt_text('g0', 'strict');
SQL
q -c "SELECT count(byok.decrypt_text(v)) FROM vg" >/dev/null
as_postgres mv "$KEY" "$KEY.real"
sleep 1.5
check "g1 is served from the shared cache in its grace period" "$(q -c "SELECT byok.decrypt_text(v) FROM vg WHERE t = 'g1'" 2>&1)" "graceful"
err=$(qe -c "SELECT byok.decrypt_text(v) FROM vg WHERE t = 'g0'")
grep -q "local master key file .* does not exist" <<<"$err" && ok "g0 (no grace period) fails closed at once" || not_ok "g0: $err"
check "the stale use is counted" "$(q -c "SELECT served_stale > 0 FROM byok.metrics WHERE tenant_id = 'g1'")" "t"
sleep 4
err=$(qe -c "SELECT byok.decrypt_text(v) FROM vg WHERE t = 'g1'")
grep -q "does not exist" <<<"$err" && ok "past TTL + grace, g1 fails closed" || not_ok "g1 after grace: $err"
as_postgres mv "$KEY.real" "$KEY"
check "and works again when the key manager is back" "$(q -c "SELECT byok.decrypt_text(v) FROM vg WHERE t = 'g1'")" "graceful"

echo "== flush_cache reaches every backend's cache at commit"
out=$(q <<SQL
SELECT 'before:' || cached_keys FROM byok.backend_cache_stats() WHERE byok.decrypt_text((SELECT v FROM v2 WHERE id = 1)) IS NOT NULL;
\! psql -X -h $BYOK_WORK/$NAME -p $PORT -U postgres -d postgres -qAt -c "SELECT byok.flush_cache('t2')" >/dev/null
SELECT 'after:' || cached_keys FROM byok.backend_cache_stats();
SQL
)
grep -qx "before:[1-9][0-9]*" <<<"$out" && grep -qx "after:0" <<<"$out" && ok "another session's flush emptied this session's cache" || not_ok "flush: $out"

echo "== metrics"
row=$(q -c "SELECT kms_api_success_rate > 0, key_cache_hit_ratio > 0.9, dek_generation_p99_ms > 0, decrypt_failures_rate = 0, l1_hits > 0, l2_hits > 0, decrypts > 1000 FROM byok.metrics WHERE tenant_id = 't1'")
check "t1: success rate, hit ratio near 1, p99, no failures, counters" "$row" "t|t|t|t|t|t|t"
q -c "SELECT byok.decrypt_text(v, 'wrong context') FROM v2 WHERE id = 1" >/dev/null 2>&1 || true
check "a failed decrypt is counted" "$(q -c "SELECT decrypt_failures >= 1 AND decrypt_failures_rate > 0 FROM byok.metrics WHERE tenant_id = 't2'")" "t"

echo "== the broker is restarted after it dies"
gen=$(q -c "SELECT generation FROM byok.broker_status()")
old_pid=$(q -c "SELECT broker_pid FROM byok.broker_status()")
q -c "SELECT byok.flush_cache()" >/dev/null
hang_key_store
q -c "SET byok.kms_timeout_ms = 30000" -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 2" > "$BYOK_WORK/restart.out" 2>&1 &
waiter=$!
sleep 1
# SIGTERM, as a DBA would send it (pg_terminate_backend cannot reach a worker with no database).
kill -TERM "$old_pid"
wait "$waiter" || true
grep -q "the key broker restarted while handling this request" "$BYOK_WORK/restart.out" && ok "the waiting request got an error, not a hang" || not_ok "waiter: $(cat "$BYOK_WORK/restart.out")"
release_fifo
wait_for 10 'test "$(q -c "SELECT generation FROM byok.broker_status()")" -gt "$gen"' && ok "a new broker started (generation $(q -c "SELECT generation FROM byok.broker_status()"))" || not_ok "no restart"
check "requests succeed with the new broker" "$(q -c "SELECT byok.decrypt_text(v) FROM v1 WHERE id = 2")" "value 2"

pid=$(q -c "SELECT broker_pid FROM byok.broker_status()")
kill -9 "$pid"
# A process killed with SIGKILL makes the postmaster reset all sessions and shared memory.
wait_for 30 'q -c "SELECT broker_pid FROM byok.broker_status()" 2>/dev/null | grep -q "[0-9]"' \
    && ok "after kill -9 the server recovered and the broker is back" || not_ok "broker not back after kill -9"
new_pid=$(q -c "SELECT broker_pid FROM byok.broker_status()")
[ "$new_pid" != "$pid" ] && ok "new broker pid $new_pid" || not_ok "same pid"
check "requests succeed after kill -9" "$(q -c "SELECT count(*) FROM v1 WHERE byok.decrypt_text(v) = 'value ' || id")" "1000"

echo "== without shared_preload_libraries, CREATE EXTENSION says what to add"
start_cluster nopreload 54339 "shared_preload_libraries = ''"
err=$(psql_at nopreload 54339 -d postgres -qAt -v ON_ERROR_STOP=1 -c "CREATE EXTENSION byok_pg" 2>&1 || true)
grep -q "byok_pg is not loaded through shared_preload_libraries" <<<"$err" && grep -q "shared_preload_libraries = 'byok_pg'" <<<"$err" \
    && ok "CREATE EXTENSION refused with the fix in the hint" || not_ok "nopreload: $err"
stop_cluster nopreload
exit $fail
