//! The Prometheus text exposition (format 0.0.4) of byok_pg's shared-memory
//! counters: what the key broker serves on `byok.metrics_listen_address` and
//! `byok.prometheus_metrics()` returns. Built from a [`Snapshot`], so both
//! give the same text and neither needs PostgreSQL to render it.
//!
//! Cardinality: by default series are labelled by database and provider
//! only (tenants are summed), so a server with 10,000 tenants emits the same
//! few hundred series as one with ten. Per-tenant labels are opt-in
//! (`byok.metrics_tenant_labels`); even then the shared-memory table holds at
//! most a fixed number of (database, provider, tenant) slots.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::config::ProviderKind;
use crate::counters::{AlertRecord, Counter, KeyHealthRecord, Totals};
use crate::histogram::{BOUNDS_US, BUCKETS};
use crate::monitors::{MONITORS, Metric};

/// The key broker's gauges and counters (one per server).
#[derive(Debug, Default, Clone)]
pub struct BrokerFigures {
    pub up: bool,
    pub starts: u64,
    pub busy_slots: u64,
    pub total_slots: u64,
    pub requests_served: u64,
    pub audit_queued: u64,
    pub audit_dropped: u64,
    pub shared_cache_entries: u64,
    pub watched_master_keys: u64,
    pub metric_slots_used: u64,
    pub metric_slots: u64,
    pub jobs_running: u64,
    pub job_rows_rewritten: u64,
    pub jobs_failed: u64,
}

/// Everything one exposition shows.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub broker: BrokerFigures,
    /// Per (database, provider, tenant): counters ([`crate::counters::MetricTable::totals`]).
    pub totals: Vec<(u32, ProviderKind, String, Totals)>,
    /// Per (database, provider, tenant): monitors as last evaluated.
    pub alerts: Vec<(u32, ProviderKind, String, [AlertRecord; MONITORS])>,
    /// Database names by OID (a database without one is labelled by its OID).
    pub database_names: BTreeMap<u32, String>,
    /// Per database: the largest share of its encryption budget an active
    /// data key has used.
    pub key_budget_used: BTreeMap<u32, f64>,
    /// Label series by tenant too.
    pub tenant_labels: bool,
}

/// Which counter of a group's totals a series shows.
type Pick = fn(&Totals) -> u64;

/// The labels of one series group: database, provider and (optionally) tenant.
type Group = (String, &'static str, Option<String>);

struct Writer {
    out: String,
}

impl Writer {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn group_labels(group: &Group) -> Vec<(&str, &str)> {
    let mut labels = vec![("database", group.0.as_str()), ("provider", group.1)];
    if let Some(tenant) = &group.2 {
        labels.push(("tenant", tenant.as_str()));
    }
    labels
}

impl Snapshot {
    fn database(&self, oid: u32) -> String {
        self.database_names
            .get(&oid)
            .cloned()
            .unwrap_or_else(|| oid.to_string())
    }

    fn group(&self, database: u32, provider: ProviderKind, tenant: &str) -> Group {
        (
            self.database(database),
            provider.name(),
            self.tenant_labels.then(|| tenant.to_string()),
        )
    }

    /// The counters summed per series group.
    fn grouped_totals(&self) -> BTreeMap<Group, Totals> {
        let mut groups: BTreeMap<Group, Totals> = BTreeMap::new();
        for (database, provider, tenant, t) in &self.totals {
            let g = groups
                .entry(self.group(*database, *provider, tenant))
                .or_default();
            for (total, n) in g.counters.iter_mut().zip(&t.counters) {
                *total += n;
            }
            for i in 0..BUCKETS {
                g.kms_latency[i] += t.kms_latency[i];
                g.dek_latency[i] += t.dek_latency[i];
            }
            g.kms_latency_sum_us += t.kms_latency_sum_us;
            g.dek_latency_sum_us += t.dek_latency_sum_us;
        }
        groups
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut w = Writer {
            out: String::with_capacity(16 * 1024),
        };
        let groups = self.grouped_totals();
        let counter =
            |w: &mut Writer, name: &str, help: &str, which: &[(Pick, &[(&str, &str)])]| {
                w.header(name, "counter", help);
                for (group, t) in &groups {
                    for (c, extra) in which {
                        let mut labels = group_labels(group);
                        labels.extend_from_slice(extra);
                        w.sample(name, &labels, c(t) as f64);
                    }
                }
            };
        counter(
            &mut w,
            "byok_kms_requests_total",
            "Calls the key broker made to key managers, by outcome.",
            &[
                (
                    |t| {
                        t.get(Counter::KmsCalls)
                            .saturating_sub(t.get(Counter::KmsFailures))
                    },
                    &[("outcome", "success")],
                ),
                (|t| t.get(Counter::KmsFailures), &[("outcome", "failure")]),
            ],
        );
        histogram(
            &mut w,
            &groups,
            "byok_kms_request_duration_seconds",
            "Latency of the key broker's calls to key managers.",
            |t| (&t.kms_latency, t.kms_latency_sum_us),
        );
        histogram(
            &mut w,
            &groups,
            "byok_dek_fetch_duration_seconds",
            "Latency of obtaining a data key from the key manager (generate or unwrap): the guide's dek_generation_p99.",
            |t| (&t.dek_latency, t.dek_latency_sum_us),
        );
        counter(
            &mut w,
            "byok_key_cache_requests_total",
            "Data-key lookups by cache level (backend: each session's; shared: the key broker's) and result.",
            &[
                (
                    |t| t.get(Counter::L1Hits),
                    &[("level", "backend"), ("result", "hit")],
                ),
                (
                    |t| t.get(Counter::L1Misses),
                    &[("level", "backend"), ("result", "miss")],
                ),
                (
                    |t| t.get(Counter::L2Hits),
                    &[("level", "shared"), ("result", "hit")],
                ),
                (
                    |t| t.get(Counter::L2Misses),
                    &[("level", "shared"), ("result", "miss")],
                ),
            ],
        );
        counter(
            &mut w,
            "byok_decrypts_total",
            "Values opened (attempts that found their data key).",
            &[(|t| t.get(Counter::Decrypts), &[])],
        );
        counter(
            &mut w,
            "byok_decrypt_failures_total",
            "Values that failed to open (tampered, wrong tenant or context, key unavailable).",
            &[(|t| t.get(Counter::DecryptFailures), &[])],
        );
        counter(
            &mut w,
            "byok_encrypts_total",
            "Values sealed.",
            &[(|t| t.get(Counter::Encrypts), &[])],
        );
        counter(
            &mut w,
            "byok_served_stale_total",
            "Data keys served from the broker's cache past their TTL during a key-manager outage (grace period).",
            &[(|t| t.get(Counter::ServedStale), &[])],
        );
        counter(
            &mut w,
            "byok_served_by_replica_total",
            "Data keys unwrapped by a replica key after the primary was unavailable.",
            &[(|t| t.get(Counter::ServedByReplica), &[])],
        );
        counter(
            &mut w,
            "byok_served_by_backup_total",
            "Data keys unwrapped by the tenant's backup key manager (primary unavailable, or DR active).",
            &[(|t| t.get(Counter::ServedByBackup), &[])],
        );
        counter(
            &mut w,
            "byok_key_checks_total",
            "Revocation checks of master keys.",
            &[(|t| t.get(Counter::KeyChecks), &[])],
        );
        self.master_keys(&mut w);
        self.monitors(&mut w);
        self.broker(&mut w);
        w.out
    }

    fn master_keys(&self, w: &mut Writer) {
        const STATUSES: [&str; 4] = ["unchecked", "ok", "revoked", "unreachable"];
        let mut counts: BTreeMap<Group, [u64; 4]> = BTreeMap::new();
        for (database, provider, tenant, t) in &self.totals {
            let KeyHealthRecord { status, .. } = t.health;
            let slot = counts
                .entry(self.group(*database, *provider, tenant))
                .or_default();
            slot[(status as usize).min(3)] += 1;
        }
        w.header(
            "byok_master_keys",
            "gauge",
            "Tenants by what the last revocation check found of their master key (unchecked: no cached key to check).",
        );
        for (group, per_status) in &counts {
            for (status, n) in STATUSES.iter().zip(per_status) {
                let mut labels = group_labels(group);
                labels.push(("status", status));
                w.sample("byok_master_keys", &labels, *n as f64);
            }
        }
    }

    fn monitors(&self, w: &mut Writer) {
        // (severity is part of the key: tenants may override a monitor's severity)
        let mut firing: BTreeMap<(Group, Metric, &'static str), u64> = BTreeMap::new();
        for (database, provider, tenant, records) in &self.alerts {
            let group = self.group(*database, *provider, tenant);
            for r in records {
                *firing
                    .entry((group.clone(), r.metric, r.rule.severity.name()))
                    .or_default() += u64::from(r.firing);
            }
        }
        w.header(
            "byok_monitor_firing",
            "gauge",
            "Tenants whose monitor (the guide's monitoring_rules, evaluated by the key broker over its window, with per-tenant overrides) fires: the same answer as byok.alerts.",
        );
        for ((group, metric, severity), n) in &firing {
            let mut labels = group_labels(group);
            labels.push(("metric", metric.name()));
            labels.push(("severity", severity));
            w.sample("byok_monitor_firing", &labels, *n as f64);
        }
        w.header(
            "byok_data_key_budget_used_ratio",
            "gauge",
            "Largest share of byok.max_encryptions_per_key used by an active data key of the database (rotated automatically at 1).",
        );
        for (database, ratio) in &self.key_budget_used {
            w.sample(
                "byok_data_key_budget_used_ratio",
                &[("database", &self.database(*database))],
                *ratio,
            );
        }
    }

    fn broker(&self, w: &mut Writer) {
        let b = &self.broker;
        let gauges: [(&str, &str, &str, u64); 14] = [
            (
                "byok_broker_up",
                "gauge",
                "1 while the key broker runs.",
                u64::from(b.up),
            ),
            (
                "byok_broker_starts_total",
                "counter",
                "Times the key broker started since the server did (more than 1: it restarted).",
                b.starts,
            ),
            (
                "byok_broker_busy_slots",
                "gauge",
                "Request slots between sessions and the key broker in use.",
                b.busy_slots,
            ),
            (
                "byok_broker_slots",
                "gauge",
                "Request slots between sessions and the key broker.",
                b.total_slots,
            ),
            (
                "byok_broker_requests_total",
                "counter",
                "Requests the key broker answered.",
                b.requests_served,
            ),
            (
                "byok_audit_queued",
                "gauge",
                "Audit records waiting in shared memory for their database's catalog writer.",
                b.audit_queued,
            ),
            (
                "byok_audit_dropped_total",
                "counter",
                "Audit records dropped because the shared-memory queue was full.",
                b.audit_dropped,
            ),
            (
                "byok_shared_cache_entries",
                "gauge",
                "Data keys in the key broker's shared cache.",
                b.shared_cache_entries,
            ),
            (
                "byok_watched_master_keys",
                "gauge",
                "Master keys the key broker checks for revocation.",
                b.watched_master_keys,
            ),
            (
                "byok_metric_slots_used",
                "gauge",
                "Shared-memory counter slots in use, one per (database, provider, tenant); when all are used, new tenants are not counted.",
                b.metric_slots_used,
            ),
            (
                "byok_metric_slots",
                "gauge",
                "Shared-memory counter slots.",
                b.metric_slots,
            ),
            (
                "byok_reencrypt_jobs_running",
                "gauge",
                "Re-encryption jobs running.",
                b.jobs_running,
            ),
            (
                "byok_reencrypt_rows_total",
                "counter",
                "Values rewritten by re-encryption jobs.",
                b.job_rows_rewritten,
            ),
            (
                "byok_reencrypt_jobs_failed_total",
                "counter",
                "Re-encryption jobs that failed.",
                b.jobs_failed,
            ),
        ];
        for (name, kind, help, value) in gauges {
            w.header(name, kind, help);
            w.sample(name, &[], value as f64);
        }
    }
}

fn histogram(
    w: &mut Writer,
    groups: &BTreeMap<Group, Totals>,
    name: &str,
    help: &str,
    pick: impl Fn(&Totals) -> (&[u64; BUCKETS], u64),
) {
    w.header(name, "histogram", help);
    let bucket = format!("{name}_bucket");
    for (group, t) in groups {
        let (buckets, sum_us) = pick(t);
        let mut cumulative = 0;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            let le = BOUNDS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| number(*us as f64 / 1e6));
            let mut labels = group_labels(group);
            labels.push(("le", &le));
            w.sample(&bucket, &labels, cumulative as f64);
        }
        let labels = group_labels(group);
        w.sample(&format!("{name}_sum"), &labels, sum_us as f64 / 1e6);
        w.sample(&format!("{name}_count"), &labels, cumulative as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::MetricTable;

    fn snapshot(tenant_labels: bool) -> Snapshot {
        let table = MetricTable::<8>::new_boxed();
        for (tenant, calls) in [("acme", 10), ("globex", 5)] {
            let slot = table.slot(16384, ProviderKind::Vault, tenant).unwrap();
            slot.add(Counter::KmsCalls, calls);
            slot.add(Counter::KmsFailures, 1);
            slot.kms_latency(2_000);
            slot.dek_latency(300_000);
        }
        table
            .slot(16384, ProviderKind::Local, "initech")
            .unwrap()
            .add(Counter::Decrypts, 7);
        table.tick(100);
        let mut names = BTreeMap::new();
        names.insert(16384, "app \"prod\"".to_string());
        Snapshot {
            broker: BrokerFigures {
                up: true,
                starts: 2,
                ..Default::default()
            },
            totals: table.totals(),
            alerts: table.alerts(),
            database_names: names,
            key_budget_used: BTreeMap::from([(16384, 0.25)]),
            tenant_labels,
        }
    }

    #[test]
    fn tenants_are_summed_unless_asked_for() {
        let text = snapshot(false).render();
        assert!(text.contains(
            "byok_kms_requests_total{database=\"app \\\"prod\\\"\",provider=\"vault\",outcome=\"success\"} 13\n"
        ));
        assert!(text.contains(
            "byok_kms_requests_total{database=\"app \\\"prod\\\"\",provider=\"vault\",outcome=\"failure\"} 2\n"
        ));
        assert!(!text.contains("tenant="));
        // Histograms: cumulative buckets, +Inf equal to the count, a sum in seconds.
        assert!(text.contains(
            "byok_dek_fetch_duration_seconds_bucket{database=\"app \\\"prod\\\"\",provider=\"vault\",le=\"0.25\"} 0\n"
        ));
        assert!(text.contains(
            "byok_dek_fetch_duration_seconds_bucket{database=\"app \\\"prod\\\"\",provider=\"vault\",le=\"0.5\"} 2\n"
        ));
        assert!(text.contains(
            "byok_dek_fetch_duration_seconds_bucket{database=\"app \\\"prod\\\"\",provider=\"vault\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains(
            "byok_dek_fetch_duration_seconds_sum{database=\"app \\\"prod\\\"\",provider=\"vault\"} 0.6\n"
        ));
        assert!(text.contains("byok_broker_starts_total 2\n"));
        assert!(
            text.contains("byok_data_key_budget_used_ratio{database=\"app \\\"prod\\\"\"} 0.25\n")
        );
        // The guide's monitor fires: 2 failures in 15 calls.
        assert!(text.contains(
            "byok_monitor_firing{database=\"app \\\"prod\\\"\",provider=\"vault\",metric=\"kms_api_success_rate\",severity=\"critical\"} 2\n"
        ));
        // Every series has its HELP and TYPE first.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} histogram")),
                "{line}"
            );
        }
    }

    #[test]
    fn tenant_labels_when_asked_for() {
        let text = snapshot(true).render();
        assert!(text.contains(
            "byok_kms_requests_total{database=\"app \\\"prod\\\"\",provider=\"vault\",tenant=\"acme\",outcome=\"success\"} 9\n"
        ));
        assert!(text.contains(
            "byok_decrypts_total{database=\"app \\\"prod\\\"\",provider=\"local\",tenant=\"initech\"} 7\n"
        ));
    }
}
