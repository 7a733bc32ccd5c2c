#!/usr/bin/env bash
# The guide's rotation workflow around a master-key rotation, on the local
# provider: the customer's notice of a pending rotation is scheduled (visible,
# cancellable), survives a crash and runs at its time; the replaced key's grace
# period ends by rewrapping stragglers and refusing the old key from then on;
# every step is audited and sent on NOTIFY byok_alerts.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54348
NAME=rotation_workflow
FIXTURES="$BYOK_WORK/$NAME-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES"; : > "$FIXTURES/errors.log"
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
# The launcher visits every database each second here (60 s by default).
# Payloads of byok_alerts with the tenant and details (byok.alert_details).
start_cluster $NAME $PORT "byok.scheduler_naptime_seconds = 1" "byok.alert_details = on"
trap 'kill $(jobs -p) 2>/dev/null; stop_cluster $NAME' EXIT
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }
listen() { # listen FILE: a session printing byok_alerts notifications into FILE
    { echo 'LISTEN byok_alerts;'; for i in $(seq 900); do echo 'SELECT pg_sleep(0.2);'; done; } \
        | psql_at $NAME $PORT -d postgres -qAt > "$1" 2>&1 &
}
wait_until() { # wait_until SECONDS SQL EXPECTED
    local i
    for i in $(seq $(( $1 * 5 ))); do [ "$(q -c "$2" 2>/dev/null)" = "$3" ] && return 0; sleep 0.2; done
    return 1
}
q -c "CREATE EXTENSION byok_pg" >/dev/null
q -c "SELECT byok.configure_tenant('{\"customer\":\"acme_corp\",\"tenant_id\":\"acme\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"acme-cmk-1\"}}}')" >/dev/null
q -c "CREATE TABLE t AS SELECT g AS id, byok.encrypt_text('acme', 'v' || g, 't') AS v FROM generate_series(1, 50) g" >/dev/null
listen "$FIXTURES/alerts-before"

echo "== the customer's notice, as the guide writes it, checked"
notice() { printf '{"tenant_id": "%s", "new_key_id": "%s", "rotation_time": "%s", "grace_period_hours": %s}' "$@"; }
expect_error "an unknown field" 22023 'unknown field "when"' \
    "SELECT byok.schedule_master_key_rotation('{\"tenant_id\": \"acme\", \"new_key_id\": \"k\", \"when\": 1}')"
expect_error "a missing field" 22023 'needs "rotation_time"' \
    "SELECT byok.schedule_master_key_rotation('{\"tenant_id\": \"acme\", \"new_key_id\": \"k\", \"grace_period_hours\": 1}')"
expect_error "an unknown tenant" 42704 'tenant "nobody" does not exist' \
    "SELECT byok.schedule_master_key_rotation('$(notice nobody k 2030-01-01T00:00:00Z 1)')"
expect_error "a negative grace period" 22023 "grace_period_hours must be between 0 and 8760" \
    "SELECT byok.schedule_master_key_rotation('$(notice acme k 2030-01-01T00:00:00Z -1)')"
expect_error "a time that is not one" 22007 "invalid input syntax for type timestamp with time zone" \
    "SELECT byok.schedule_master_key_rotation('$(notice acme k next-tuesday 1)')"

echo "== scheduled: visible and cancellable before it starts"
later=$(q -c "SELECT to_char(now() AT TIME ZONE 'UTC' + interval '1 day', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
cancelled=$(q -c "SELECT byok.schedule_master_key_rotation('$(notice acme acme-cmk-9 "$later" 24)')")
check "the notice is listed as scheduled" "$(q -c "SELECT tenant_id, new_key_id, state, grace_period FROM byok.scheduled_rotations WHERE rotation_id = $cancelled")" "acme|acme-cmk-9|scheduled|24:00:00"
check "cancel it" "$(q -c "SELECT byok.cancel_scheduled_rotation('acme', $cancelled)")" "scheduled rotation $cancelled cancelled"
expect_error "a cancelled rotation cannot be cancelled again" 22023 "is cancelled; only a rotation that has not started" \
    "SELECT byok.cancel_scheduled_rotation('acme', $cancelled)"
expect_error "another tenant's rotation is not found under this one" 22023 "has no scheduled rotation" \
    "SELECT byok.cancel_scheduled_rotation('globex', $cancelled)"

echo "== scheduled in 4 s, then the server crashes: the rotation still runs, at its time"
soon=$(q -c "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC' + interval '4 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
id=$(q -c "SELECT byok.schedule_master_key_rotation('$(notice acme acme-cmk-2 "$soon" 0)')")
check "scheduled" "$(q -c "SELECT state FROM byok.scheduled_rotations WHERE rotation_id = $id")" "scheduled"
sleep 1
kill %1 2>/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/$NAME/data" -m immediate stop >/dev/null 2>&1
as_postgres "$PG_BIN/pg_ctl" -D "$BYOK_WORK/$NAME/data" -l "$BYOK_WORK/$NAME/server.log" -w start >/dev/null 2>&1
for i in $(seq 50); do q -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
listen "$FIXTURES/alerts-after"
check "still scheduled after the crash" "$(q -c "SELECT state FROM byok.scheduled_rotations WHERE rotation_id = $id")" "scheduled"
wait_until 30 "SELECT state FROM byok.scheduled_rotations WHERE rotation_id = $id" done \
    && ok "the rotation ran after its time" || not_ok "the rotation did not run: $(q -c "SELECT state, result FROM byok.scheduled_rotations WHERE rotation_id = $id")"
check "not before its time" "$(q -c "SELECT started_at >= rotation_time FROM byok.scheduled_rotations WHERE rotation_id = $id")" "t"
check "every data key under the new master key" "$(q -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys WHERE tenant_id = 'acme'")" "acme-cmk-2"
check "every value still decrypts" "$(q -c "SELECT count(*) FROM t WHERE byok.decrypt_text(v, 't') = 'v' || id")" "50"

echo "== grace period 0: the previous key is retired at the next visit"
wait_until 15 "SELECT count(*) FROM byok.retired_master_keys WHERE tenant_id = 'acme' AND master_key_id = 'acme-cmk-1'" 1 \
    && ok "acme-cmk-1 retired" || not_ok "acme-cmk-1 not retired"
check "the tenant has no key in a grace period any more" "$(q -c "SELECT previous_master_key_id IS NULL FROM byok.tenants WHERE tenant_id = 'acme'")" "t"

echo "== the end of a grace period rewraps a straggler, then refuses the old key"
q -c "SELECT byok.rotate_data_key('acme')" >/dev/null
old=$(q -c "SELECT dek_id || '|' || encode(wrapped_dek, 'hex') || '|' || cmk_id || '|' || cmk_version FROM byok.wrapped_data_keys WHERE tenant_id = 'acme' ORDER BY dek_id LIMIT 1")
IFS='|' read -r dek blob cmk version <<<"$old"
q -c "CALL byok.rotate_master_key('acme', 'acme-cmk-3', '1 hour')" >/dev/null 2>&1
check "in its grace period: the previous key is acme-cmk-2" "$(q -c "SELECT previous_master_key_id, previous_master_key_retires_at > now() FROM byok.tenants WHERE tenant_id = 'acme'")" "acme-cmk-2|t"
put_back() { q -c "UPDATE byok.wrapped_data_keys SET wrapped_dek = decode('$blob', 'hex'), cmk_id = '$cmk', cmk_version = '$version' WHERE dek_id = $dek" >/dev/null; }
put_back   # a data key still under acme-cmk-2 (restored from an older copy, say)
check "the straggler opens during the grace period" "$(q -c "SELECT count(*) FROM t WHERE byok.decrypt_text(v, 't') = 'v' || id")" "50"
q -c "UPDATE byok.tenant_config SET previous_master_key_retires_at = now() WHERE tenant_id = 'acme'" >/dev/null
wait_until 15 "SELECT data_keys_rewrapped FROM byok.retired_master_keys WHERE tenant_id = 'acme' AND master_key_id = 'acme-cmk-2'" 1 \
    && ok "at the end of the grace period the straggler was rewrapped" || not_ok "no retirement with one rewrap: $(q -c "SELECT * FROM byok.retired_master_keys")"
check "every data key under acme-cmk-3" "$(q -c "SELECT string_agg(DISTINCT cmk_id, ',') FROM byok.data_keys WHERE tenant_id = 'acme'")" "acme-cmk-3"
check "every value decrypts" "$(q -c "SELECT count(*) FROM t WHERE byok.decrypt_text(v, 't') = 'v' || id")" "50"
put_back   # the old copy comes back once more: now refused
expect_error "a data key wrapped by a retired master key is refused" 55000 "retired at the end of its rotation's grace period" \
    "SELECT count(byok.decrypt_text(v, 't')) FROM t"
check "retire_previous_master_key with nothing in a grace period changes nothing" \
    "$(q -c "SELECT byok.retire_previous_master_key('acme')")" 'tenant "acme" has no previous master key in a grace period'

echo "== a failed scheduled rotation says why"
now=$(q -c "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
bad=$(q -c "SELECT byok.schedule_master_key_rotation('$(notice acme acme-cmk-4 "$now" 1)')")
as_postgres sh -c "echo acme-cmk-4 > '$BYOK_WORK/$NAME/data/byok_local_master.key.revoked'"
wait_until 15 "SELECT state FROM byok.scheduled_rotations WHERE rotation_id = $bad" failed \
    && ok "failed, with the reason: $(q -c "SELECT left(result, 80) FROM byok.scheduled_rotations WHERE rotation_id = $bad")" \
    || not_ok "scheduled rotation $bad: $(q -c "SELECT state, result FROM byok.scheduled_rotations WHERE rotation_id = $bad")"
as_postgres rm -f "$BYOK_WORK/$NAME/data/byok_local_master.key.revoked"

echo "== dual control: in production a schedule, a cancel and a retirement need a second administrator"
unapproved=$(q -c "SELECT byok.schedule_master_key_rotation('$(notice acme acme-cmk-5 "$(q -c "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC' + interval '3 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")" 1)')")
q -c "ALTER SYSTEM SET byok.environment = 'production'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
expect_error "scheduling" 42501 "schedule_master_key_rotation needs dual control" \
    "SELECT byok.schedule_master_key_rotation('$(notice acme prod-acme-1 2030-01-01T00:00:00Z 1)')"
expect_error "cancelling" 42501 "cancel_scheduled_rotation needs dual control" \
    "SELECT byok.cancel_scheduled_rotation('acme', $unapproved)"
expect_error "ending a grace period early" 42501 "retire_previous_master_key needs dual control" \
    "SELECT byok.retire_previous_master_key('acme')"
wait_until 15 "SELECT state FROM byok.scheduled_rotations WHERE rotation_id = $unapproved" failed \
    && ok "a rotation scheduled before dual control applied does not run unapproved: $(q -c "SELECT left(result, 90) FROM byok.scheduled_rotations WHERE rotation_id = $unapproved")" \
    || not_ok "unapproved scheduled rotation: $(q -c "SELECT state, result FROM byok.scheduled_rotations WHERE rotation_id = $unapproved")"
check "the tenant stayed on its key" "$(q -c "SELECT master_key_id FROM byok.tenants WHERE tenant_id = 'acme'")" "acme-cmk-3"
q -c "ALTER SYSTEM RESET byok.environment" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1

echo "== the trail, and the notices sent on byok_alerts"
q -c "SELECT byok.rotate_data_key('acme')" >/dev/null
wait_for_audit_queue
check "audited in order" "$(q -c "SELECT string_agg(event, ',' ORDER BY id) FROM byok.audit_log WHERE tenant_id = 'acme' AND event IN ('schedule_master_key_rotation', 'cancel_scheduled_rotation', 'rotate_master_key_start', 'rotate_master_key', 'master_key_retired') AND outcome = 'ok'")" \
    "schedule_master_key_rotation,cancel_scheduled_rotation,schedule_master_key_rotation,rotate_master_key_start,rotate_master_key,master_key_retired,rotate_master_key_start,rotate_master_key,master_key_retired,schedule_master_key_rotation,schedule_master_key_rotation"
sleep 1
for event in schedule_master_key_rotation cancel_scheduled_rotation; do
    grep -q "\"event\" : \"$event\"" "$FIXTURES/alerts-before" && ok "byok_alerts: $event" || not_ok "byok_alerts: no $event"
done
for event in rotate_master_key_start rotate_master_key master_key_retired rotate_data_key; do
    grep -q "\"event\" : \"$event\"" "$FIXTURES/alerts-after" && ok "byok_alerts: $event" || not_ok "byok_alerts: no $event"
done
grep -q '"event" : "rotate_master_key", .*"tenant_id" : "acme".*"data_keys"' "$FIXTURES/alerts-after" \
    && ok "the rotation's end carries its data key count" || not_ok "rotate_master_key notice without details"
exit $fail
