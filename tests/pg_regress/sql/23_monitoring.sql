\set VERBOSITY default
\set SHOW_CONTEXT never
-- This file sets up what it uses and cleans up after itself, so it runs alone.
CREATE EXTENSION IF NOT EXISTS byok_pg;
-- Data key ids in messages start at 23001 in this file, wherever it runs.
SELECT setval('byok.data_key_id_seq', 23000) \gset

-- Monitoring, as the guide's monitoring_rules.yaml asks: four monitors, each a
-- metric over a window against a threshold, with a severity. The key broker
-- evaluates them every 10 seconds for every tenant, from windowed counts it keeps
-- in shared memory; byok.alerts shows the result. These helpers wait for the
-- broker's next evaluation, and for a tenant's monitor to reach a state.
CREATE FUNCTION wait_for_evaluation(tenant text, after timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..300 LOOP
        IF EXISTS (SELECT 1 FROM byok.alerts WHERE tenant_id = tenant AND evaluated_at > after) THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END
$$;
CREATE FUNCTION wait_for_state(tenant text, monitored text, wanted text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..900 LOOP
        IF EXISTS (SELECT 1 FROM byok.alerts
                    WHERE tenant_id = tenant AND metric = monitored AND state = wanted) THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END
$$;

-- A tenant's configuration may override the guide's rules (the same shape as
-- monitoring_rules.yaml: a byok_monitors list); what it leaves out stays the guide's.
-- Here: failed decryptions over 30 seconds with a 1% threshold, and no cache monitor.
SELECT byok.configure_tenant('{"customer": "Pym Technologies", "tenant_id": "pym",
    "encryption": {"provider": "local", "local": {"key_id": "pym-master"}},
    "monitoring_rules": {"byok_monitors": [
        {"name": "Failed Decryption Attempts", "metric": "decrypt_failures_rate",
         "threshold": 0.01, "window": "30s", "severity": "critical"},
        {"metric": "key_cache_hit_ratio", "enabled": false}]}}');
-- Stored in full, beside the rest of the configuration.
SELECT jsonb_pretty(config #> '{encryption,monitoring_rules}') AS monitoring_rules
  FROM byok.tenant_config WHERE tenant_id = 'pym';

-- Mistakes are refused with the field that is wrong.
SELECT byok.configure_tenant('{"customer": "c", "tenant_id": "bad1",
    "encryption": {"provider": "local", "local": {"key_id": "k"}},
    "monitoring_rules": {"byok_monitors": [{"metric": "cpu_load"}]}}');
SELECT byok.configure_tenant('{"customer": "c", "tenant_id": "bad2",
    "encryption": {"provider": "local", "local": {"key_id": "k"}},
    "monitoring_rules": {"byok_monitors": [{"metric": "kms_api_success_rate", "threshold": 150}]}}');
SELECT byok.configure_tenant('{"customer": "c", "tenant_id": "bad3",
    "encryption": {"provider": "local", "local": {"key_id": "k"}},
    "monitoring_rules": {"byok_monitors": [{"metric": "dek_generation_p99", "window": "10s"}]}}');
SELECT byok.configure_tenant('{"customer": "c", "tenant_id": "bad4",
    "encryption": {"provider": "local", "local": {"key_id": "k"}},
    "monitoring_rules": {"byok_monitors": [{"metric": "dek_generation_p99", "severity": "page"}]}}');

-- Traffic: 100 values sealed and opened.
CREATE TABLE pym_files AS
SELECT g AS id, byok.encrypt_text('pym', 'file ' || g, 'pym_files') AS body
  FROM generate_series(1, 100) g;
SELECT count(*) FROM pym_files WHERE byok.decrypt_text(body, 'pym_files') = 'file ' || id;
-- byok.metrics has the counters since the server started (reading it also adds
-- this session's pending per-row counts, which a session otherwise adds at most
-- once a second); the monitors look at windows of them.
SELECT tenant_id, encrypts, decrypts, decrypt_failures FROM byok.metrics
 WHERE database = current_database() AND tenant_id = 'pym';
SELECT wait_for_evaluation('pym', now());
-- Every monitor of the tenant, with its value over its window. The success rate
-- is in percent (the guide's 99.9), the p99 in ms, the rates as fractions. The
-- cache monitor is disabled; the p99 depends on the machine, so only its presence shows.
SELECT monitor, metric,
       CASE WHEN metric = 'dek_generation_p99' THEN (value IS NOT NULL)::text
            ELSE round(value::numeric, 4)::text END AS value,
       threshold, unit, time_window, severity, state
  FROM byok.alerts WHERE tenant_id = 'pym' ORDER BY metric;

-- Two values opened under the wrong context fail: 2 failures in about 100
-- attempts is above 1%, and the monitor fires at the broker's next evaluation.
SELECT byok.decrypt_text(body, 'another_table') FROM pym_files WHERE id = 1;
SELECT byok.decrypt_text(body, 'another_table') FROM pym_files WHERE id = 2;
SELECT wait_for_state('pym', 'decrypt_failures_rate', 'firing');
SELECT metric, round(value::numeric, 2) AS value, threshold, time_window, state,
       since >= now() - interval '1 minute' AS since_just_now
  FROM byok.alerts WHERE tenant_id = 'pym' AND state <> 'ok' ORDER BY metric;

-- The change was recorded once (not per failure), in the audit trail, which also
-- sent NOTIFY byok_alerts (docs/monitoring.md).
SELECT pg_sleep(2);
SELECT event, role_name, outcome, regexp_replace(reason, 'is [0-9.]+', 'is N') AS reason,
       details->>'metric' AS metric, details->>'severity' AS severity, details->>'state' AS state
  FROM byok.audit_log WHERE tenant_id = 'pym' AND event LIKE 'alert\_%' ORDER BY id;

-- The same state, in the Prometheus text the key broker serves on
-- byok.metrics_listen_address (byok.prometheus_metrics() returns it through SQL):
-- summed per database and provider, without tenant labels unless
-- byok.metrics_tenant_labels is on.
SELECT line ~ ' [1-9][0-9]*$' AS firing
  FROM regexp_split_to_table(byok.prometheus_metrics(), E'\n') AS line
 WHERE line LIKE 'byok_monitor_firing{database="' || current_database() || '",provider="local",metric="decrypt_failures_rate",%';
SELECT count(*) FILTER (WHERE line LIKE '# TYPE %') AS families,
       count(*) FILTER (WHERE line LIKE '%tenant="%') AS tenant_labelled
  FROM regexp_split_to_table(byok.prometheus_metrics(), E'\n') AS line;

-- Once the window has no failure left in it, the monitor resolves (once).
SELECT wait_for_state('pym', 'decrypt_failures_rate', 'ok');
SELECT pg_sleep(2);
SELECT event, details->>'state' AS state
  FROM byok.audit_log WHERE tenant_id = 'pym' AND event LIKE 'alert\_%' ORDER BY id;

-- Who may look: byok_admin reads byok.alerts and byok.prometheus_metrics() (as
-- may pg_monitor, for SQL exporters); byok_user and other roles may not.
CREATE ROLE pym_app IN ROLE byok_user;
SET ROLE pym_app;
SELECT count(*) FROM byok.alerts;
SELECT byok.prometheus_metrics();
RESET ROLE;
CREATE ROLE pym_monitor IN ROLE pg_monitor;
SET ROLE pym_monitor;
SELECT length(byok.prometheus_metrics()) > 0 AS scraped;
RESET ROLE;

DROP ROLE pym_app, pym_monitor;
DROP TABLE pym_files;
SELECT byok.destroy_tenant_keys('pym', 'pym');
DROP FUNCTION wait_for_evaluation(text, timestamptz), wait_for_state(text, text, text);
