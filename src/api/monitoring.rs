//! Monitoring, named as in the guide's `monitoring_rules.yaml`: `byok.metrics`
//! shows, per database, provider and tenant, `kms_api_success_rate`,
//! `dek_generation_p99_ms`, `key_cache_hit_ratio` and `decrypt_failures_rate`,
//! with the raw counters behind them (`byok.metrics_counters`, from shared
//! memory), and `byok.broker_status` the key broker's state. `byok.alerts`
//! shows the monitors the key broker evaluates over their windows, and
//! `byok.prometheus_metrics()` the text the broker's metrics endpoint serves.

use std::sync::atomic::Ordering;

use byok_core::counters::Counter;
use pgrx::prelude::*;

use crate::errors::ByokError;
use crate::{keyring, shmem};

/// The counters behind `byok.metrics`, one row per database, provider and tenant.
// pgrx reads the column names from the inline tuple, so it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn metrics_counters() -> TableIterator<
    'static,
    (
        name!(database_oid, pg_sys::Oid),
        name!(provider, String),
        name!(tenant_id, String),
        name!(kms_calls, i64),
        name!(kms_failures, i64),
        name!(dek_generations, i64),
        name!(dek_generation_p99_ms, Option<f64>),
        name!(l1_hits, i64),
        name!(l1_misses, i64),
        name!(l2_hits, i64),
        name!(l2_misses, i64),
        name!(served_stale, i64),
        name!(served_by_replica, i64),
        name!(served_by_backup, i64),
        name!(decrypts, i64),
        name!(decrypt_failures, i64),
        name!(encrypts, i64),
        name!(key_checks, i64),
        name!(kms_latency_histogram, Vec<i64>),
    ),
> {
    // This backend's own pending counts first, so a session sees its own work.
    keyring::flush_metrics();
    let totals = shmem::shared()
        .map(|shared| shared.metrics.totals())
        .unwrap_or_default();
    let rows: Vec<_> = totals
        .into_iter()
        .map(|(database, provider, tenant, t)| {
            let n = |c: Counter| t.get(c) as i64;
            (
                pg_sys::Oid::from(database),
                provider.name().to_string(),
                tenant,
                n(Counter::KmsCalls),
                n(Counter::KmsFailures),
                n(Counter::DekGenerations),
                byok_core::histogram::p99_ms(&t.dek_latency),
                n(Counter::L1Hits),
                n(Counter::L1Misses),
                n(Counter::L2Hits),
                n(Counter::L2Misses),
                n(Counter::ServedStale),
                n(Counter::ServedByReplica),
                n(Counter::ServedByBackup),
                n(Counter::Decrypts),
                n(Counter::DecryptFailures),
                n(Counter::Encrypts),
                n(Counter::KeyChecks),
                t.kms_latency.iter().map(|n| *n as i64).collect(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The key broker's state: its process, how often it started, and its slots.
// (pgrx reads the column names from the signature, so no type alias)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn broker_status() -> TableIterator<
    'static,
    (
        name!(broker_pid, Option<i32>),
        name!(generation, i64),
        name!(busy_slots, i32),
        name!(total_slots, i32),
        name!(requests_served, i64),
        name!(audit_queued, i32),
        name!(audit_dropped, i64),
        name!(shared_cache_entries, i64),
        name!(key_usage_unattributed, i64),
        name!(watched_master_keys, i64),
        name!(key_epoch, i64),
    ),
> {
    let Some(shared) = shmem::shared() else {
        ByokError::NotPreloaded.raise();
    };
    let pid = shared.broker_pid.load(Ordering::Acquire);
    TableIterator::once((
        (pid != 0).then_some(pid),
        shared.generation.load(Ordering::Acquire) as i64,
        shared.slots.busy() as i32,
        shmem::SLOT_COUNT as i32,
        shared.requests_served.load(Ordering::Relaxed) as i64,
        // Records waiting for (or being taken by) the catalog writer.
        shared.audit.queued() as i32,
        shared.audit.dropped_total() as i64,
        shared.shared_cache_entries.load(Ordering::Relaxed) as i64,
        shared.key_usage.unattributed() as i64,
        shared.watched_master_keys.load(Ordering::Relaxed) as i64,
        shared.key_epoch.load(Ordering::Acquire) as i64,
    ))
}

/// What the key broker's revocation checks last found about each tenant's
/// master key, for this database's tenants (`byok.tenant_key_status`).
// (pgrx reads the column names from the signature, so no type alias)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn key_status() -> TableIterator<
    'static,
    (
        name!(provider, String),
        name!(tenant_id, String),
        name!(status, String),
        name!(reason, Option<String>),
        name!(checked_at, Option<TimestampWithTimeZone>),
        name!(last_ok_at, Option<TimestampWithTimeZone>),
        name!(status_since, Option<TimestampWithTimeZone>),
    ),
> {
    let database = crate::postgres::session::database();
    let totals = shmem::shared()
        .map(|shared| shared.metrics.totals())
        .unwrap_or_default();
    let rows: Vec<_> = totals
        .into_iter()
        .filter(|(db, _, _, t)| *db == database && t.health.checked_at != 0)
        .map(|(_, provider, tenant, t)| {
            let h = t.health;
            (
                provider.name().to_string(),
                tenant,
                match h.status {
                    1 => "ok",
                    2 => "revoked",
                    3 => "unreachable",
                    _ => "unchecked",
                }
                .to_string(),
                (h.reason as usize)
                    .checked_sub(1)
                    .and_then(|i| byok_kms::ErrorKind::ALL.get(i))
                    .map(|kind| kind.name().to_string()),
                timestamp(h.checked_at),
                timestamp(h.ok_at),
                timestamp(h.since),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The guide's monitors for this database's tenants, as the key broker last
/// evaluated them over their windows (`byok.alerts`).
// (pgrx reads the column names from the signature, so no type alias)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn alert_states() -> TableIterator<
    'static,
    (
        name!(provider, String),
        name!(tenant_id, String),
        name!(monitor, String),
        name!(metric, String),
        name!(value, Option<f64>),
        name!(threshold, f64),
        name!(unit, String),
        name!(time_window, String),
        name!(severity, String),
        name!(state, String),
        name!(since, Option<TimestampWithTimeZone>),
        name!(evaluated_at, Option<TimestampWithTimeZone>),
    ),
> {
    let database = crate::postgres::session::database();
    let alerts = shmem::shared()
        .map(|shared| shared.metrics.alerts())
        .unwrap_or_default();
    let rows: Vec<_> = alerts
        .into_iter()
        .filter(|(db, _, _, _)| *db == database)
        .flat_map(|(_, provider, tenant, records)| {
            records.into_iter().map(move |r| {
                (
                    provider.name().to_string(),
                    tenant.clone(),
                    r.metric.monitor().to_string(),
                    r.metric.name().to_string(),
                    r.value,
                    r.rule.threshold,
                    r.metric.unit().to_string(),
                    byok_core::monitors::format_window(r.rule.window_seconds),
                    r.rule.severity.name().to_string(),
                    match (r.rule.enabled, r.firing) {
                        (false, _) => "disabled",
                        (true, true) => "firing",
                        (true, false) => "ok",
                    }
                    .to_string(),
                    timestamp(r.since * 1_000_000),
                    timestamp(r.evaluated_at * 1_000_000),
                )
            })
        })
        .collect();
    TableIterator::new(rows)
}

/// The Prometheus text exposition the key broker serves on
/// `byok.metrics_listen_address`, for this database, for scraping through
/// SQL exporters.
#[pg_extern(volatile, parallel_safe)]
fn prometheus_metrics() -> String {
    let Some(_) = shmem::shared() else {
        ByokError::NotPreloaded.raise();
    };
    // This backend's own pending counts first, as for byok.metrics.
    keyring::flush_metrics();
    // This database's series only: a role of one database learns nothing of
    // another's (the endpoint, served to a scraper, has them all).
    shmem::exposition(
        Some(crate::postgres::session::database()),
        crate::gucs::metrics_tenant_labels(),
    )
}

/// Microseconds since the Unix epoch as a timestamptz (`None` for 0: never).
fn timestamp(micros: i64) -> Option<TimestampWithTimeZone> {
    const UNIX_TO_POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
    (micros != 0)
        .then(|| TimestampWithTimeZone::try_from(micros - UNIX_TO_POSTGRES_EPOCH_MICROS).ok())
        .flatten()
}

/// What byok_pg's cryptography runs on (a standard or a FIPS build, the
/// aws-lc module and its mode, the AES-256-GCM implementations in use) and
/// whether a NIST known-answer test passes through every implementation in
/// use, run again by this call. `CREATE EXTENSION` refuses to install, and the
/// server to start, when `problem` is set. (The FIPS module's own power-on
/// self-tests ran when it started: a failure aborts the process.)
// (pgrx reads the column names from the signature, so no type alias)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn crypto_info() -> TableIterator<
    'static,
    (
        name!(fips_build, bool),
        name!(fips_mode, bool),
        name!(module, String),
        name!(aes_gcm, String),
        name!(known_answer_passed, bool),
        name!(problem, Option<String>),
    ),
> {
    let status = byok_core::crypto::CryptoStatus::check();
    TableIterator::once((
        byok_core::aws_lc::FIPS_BUILD,
        status.module.fips_mode,
        status.module.version.clone(),
        status.aes_gcm(),
        status.known_answer_passed,
        status.problem().map(str::to_string),
    ))
}
