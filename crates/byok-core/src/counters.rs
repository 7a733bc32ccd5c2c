//! The monitoring counters behind `byok.metrics`: one slot of relaxed atomic
//! counters per (database, provider, tenant), claimed on first use. They live
//! in PostgreSQL shared memory in the extension; all-zero is an empty table.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering, fence};

use crate::config::ProviderKind;
use crate::histogram::BUCKETS;
use crate::monitors::{MONITORS, Metric, Rule, Rules, Severity, WindowCounts};

/// Longest tenant id kept in a label (longer ones are cut).
pub const TENANT_LEN: usize = 128;

const EMPTY: u32 = 0;
const CLAIMING: u32 = 1;
const READY: u32 = 2;

/// A counter of a [`MetricSlot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    KmsCalls,
    KmsFailures,
    DekGenerations,
    L1Hits,
    L1Misses,
    L2Hits,
    L2Misses,
    ServedStale,
    ServedByReplica,
    Decrypts,
    DecryptFailures,
    Encrypts,
    /// Revocation checks of the master key made through this tenant's keys.
    KeyChecks,
    /// Data keys the tenant's backup key manager unwrapped (the primary was
    /// unreachable, or DR is active).
    ServedByBackup,
}

const COUNTERS: usize = 14;

/// What the key broker's revocation checks last found about a tenant's master
/// key. Times are microseconds since the Unix epoch (0: never).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyHealthRecord {
    /// 0 unchecked, 1 ok, 2 revoked, 3 unreachable.
    pub status: u32,
    /// The key manager's reason: an error kind code set by the broker (0: none).
    pub reason: u32,
    /// The last check.
    pub checked_at: i64,
    /// The last check the key manager allowed.
    pub ok_at: i64,
    /// Since when the status has been what it is.
    pub since: i64,
}

/// A [`KeyHealthRecord`] in shared memory: written by the key broker only
/// (field by field; a reader may see one check's status with the previous
/// check's time, which no decision depends on).
#[repr(C)]
struct SharedKeyHealth {
    status: AtomicU32,
    reason: AtomicU32,
    checked_at: AtomicI64,
    ok_at: AtomicI64,
    since: AtomicI64,
}

/// How often the key broker samples every slot into its fine ring, and how
/// many samples that ring keeps (10 s x 64: windows up to 10 minutes).
pub const FINE_STEP_SECONDS: i64 = 10;
const FINE_SAMPLES: usize = 64;
/// The coarse ring: a sample a minute, 64 of them (windows up to an hour).
pub const COARSE_STEP_SECONDS: i64 = 60;
const COARSE_SAMPLES: usize = 64;

/// One sample of a slot's [`WindowCounts`], under a sequence lock: the key
/// broker (the only writer) makes `seq` odd while it writes, so a reader
/// that sees the same even `seq` before and after its reads has a whole sample.
#[repr(C)]
struct Sample {
    seq: AtomicU32,
    /// Unix seconds (0: never written).
    at: AtomicI64,
    counts: [AtomicU64; 6],
    dek_latency: [AtomicU32; BUCKETS],
}

impl Sample {
    fn write(&self, at: i64, counts: &WindowCounts) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::Release);
        self.at.store(at, Ordering::Relaxed);
        for (cell, n) in self.counts.iter().zip(counts_array(counts)) {
            cell.store(n, Ordering::Relaxed);
        }
        for (cell, n) in self.dek_latency.iter().zip(&counts.dek_latency) {
            // (a slot's key-manager fetches stay far below 2^32)
            cell.store(*n as u32, Ordering::Relaxed);
        }
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// The sample and its time, unless it is being written (or never was).
    fn read(&self) -> Option<(i64, WindowCounts)> {
        for _ in 0..4 {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let at = self.at.load(Ordering::Relaxed);
            let c = self.counts.each_ref().map(|n| n.load(Ordering::Relaxed));
            let mut counts = WindowCounts {
                kms_calls: c[0],
                kms_failures: c[1],
                cache_hits: c[2],
                cache_lookups: c[3],
                decrypts: c[4],
                decrypt_failures: c[5],
                ..Default::default()
            };
            for (n, cell) in counts.dek_latency.iter_mut().zip(&self.dek_latency) {
                *n = u64::from(cell.load(Ordering::Relaxed));
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return (at != 0).then_some((at, counts));
            }
        }
        None
    }
}

fn counts_array(c: &WindowCounts) -> [u64; 6] {
    [
        c.kms_calls,
        c.kms_failures,
        c.cache_hits,
        c.cache_lookups,
        c.decrypts,
        c.decrypt_failures,
    ]
}

/// The last `N` samples of a slot, oldest overwritten first.
#[repr(C)]
struct Ring<const N: usize> {
    written: AtomicU64,
    samples: [Sample; N],
}

impl<const N: usize> Ring<N> {
    fn push(&self, at: i64, counts: &WindowCounts) {
        let n = self.written.load(Ordering::Relaxed);
        self.samples[(n % N as u64) as usize].write(at, counts);
        self.written.store(n + 1, Ordering::Release);
    }

    /// The newest sample taken at or before `at`. When every sample is newer:
    /// `None` if none was ever overwritten (the slot began counting, from zero,
    /// after `at`: the whole count is in the window), else the oldest kept
    /// (a window longer than the ring: as much of it as is kept).
    fn at_or_before(&self, at: i64) -> Option<WindowCounts> {
        let n = self.written.load(Ordering::Acquire);
        let mut oldest = None;
        for k in (n.saturating_sub(N as u64)..n).rev() {
            if let Some((sampled, counts)) = self.samples[(k % N as u64) as usize].read() {
                if sampled <= at {
                    return Some(counts);
                }
                oldest = Some(counts);
            }
        }
        if n <= N as u64 { None } else { oldest }
    }
}

/// A tenant's monitoring rules, published by the backends that use its keys
/// (from its configuration's `monitoring_rules`), read by the key broker.
#[repr(C)]
struct SharedRule {
    threshold: AtomicU64,
    window_seconds: AtomicU32,
    severity: AtomicU32,
    enabled: AtomicU32,
}

/// A monitor's state, written by the key broker only, under a sequence lock
/// as [`Sample`] (a reader never mixes two evaluations).
#[repr(C)]
struct SharedAlert {
    seq: AtomicU32,
    firing: AtomicU32,
    /// The value's f64 bits (NaN: nothing to measure in the window).
    value: AtomicU64,
    threshold: AtomicU64,
    window_seconds: AtomicU32,
    severity: AtomicU32,
    enabled: AtomicU32,
    since: AtomicI64,
    evaluated_at: AtomicI64,
}

/// What `byok.alerts` shows for one monitor of one tenant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertRecord {
    pub metric: Metric,
    pub rule: Rule,
    pub firing: bool,
    pub value: Option<f64>,
    /// Unix seconds: since when the state is what it is, and the last evaluation.
    pub since: i64,
    pub evaluated_at: i64,
}

/// A monitor that changed state at the key broker's last evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertChange {
    pub database: u32,
    pub provider: ProviderKind,
    pub tenant: String,
    pub alert: AlertRecord,
}

/// Counters of one (database, provider, tenant).
#[repr(C)]
pub struct MetricSlot {
    state: AtomicU32,
    database: AtomicU32,
    provider: AtomicU32,
    tenant_len: AtomicU32,
    tenant: UnsafeCell<[u8; TENANT_LEN]>,
    counters: [AtomicU64; COUNTERS],
    /// Latency of every key-manager call.
    kms_latency: [AtomicU64; BUCKETS],
    /// Latency of obtaining a data key from the key manager (generate or unwrap).
    dek_latency: [AtomicU64; BUCKETS],
    health: SharedKeyHealth,
    /// Sum of the microseconds behind `kms_latency` and `dek_latency` (for
    /// the histograms' `_sum` in the Prometheus exposition).
    kms_latency_sum_us: AtomicU64,
    dek_latency_sum_us: AtomicU64,
    /// Nonzero once a backend published the tenant's rules (until then, the guide's).
    rules_published: AtomicU32,
    rules: [SharedRule; MONITORS],
    alerts: [SharedAlert; MONITORS],
    fine: Ring<FINE_SAMPLES>,
    coarse: Ring<COARSE_SAMPLES>,
}

impl MetricSlot {
    #[inline]
    pub fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// One key-manager call that took `micros`.
    pub fn kms_latency(&self, micros: u64) {
        let bucket = crate::histogram::bucket(micros);
        self.kms_latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.kms_latency_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Publishes a tenant's monitoring rules (a no-op when they are the ones
    /// already published; two backends publishing different rules at once,
    /// during a configuration change, may mix them until the next publication).
    pub fn set_rules(&self, rules: &Rules) {
        if self.rules_published.load(Ordering::Acquire) != 0 && self.rules() == *rules {
            return;
        }
        for (shared, rule) in self.rules.iter().zip(rules) {
            shared
                .threshold
                .store(rule.threshold.to_bits(), Ordering::Relaxed);
            shared
                .window_seconds
                .store(rule.window_seconds, Ordering::Relaxed);
            shared
                .severity
                .store(rule.severity as u32, Ordering::Relaxed);
            shared
                .enabled
                .store(u32::from(rule.enabled), Ordering::Relaxed);
        }
        self.rules_published.store(1, Ordering::Release);
    }

    /// The published rules, or the guide's.
    fn rules(&self) -> Rules {
        if self.rules_published.load(Ordering::Acquire) == 0 {
            return crate::monitors::default_rules();
        }
        let mut rules = crate::monitors::default_rules();
        for (rule, shared) in rules.iter_mut().zip(&self.rules) {
            rule.threshold = f64::from_bits(shared.threshold.load(Ordering::Relaxed));
            rule.window_seconds = shared.window_seconds.load(Ordering::Relaxed);
            rule.severity = Severity::from_code(shared.severity.load(Ordering::Relaxed))
                .unwrap_or(rule.severity);
            rule.enabled = shared.enabled.load(Ordering::Relaxed) != 0;
        }
        rules
    }

    /// The counts behind the monitors, now.
    fn window_counts(&self) -> WindowCounts {
        let n = |c: Counter| self.counters[c as usize].load(Ordering::Relaxed);
        let mut counts = WindowCounts {
            kms_calls: n(Counter::KmsCalls),
            kms_failures: n(Counter::KmsFailures),
            cache_hits: n(Counter::L1Hits) + n(Counter::L2Hits),
            cache_lookups: n(Counter::L1Hits) + n(Counter::L1Misses),
            decrypts: n(Counter::Decrypts),
            decrypt_failures: n(Counter::DecryptFailures),
            ..Default::default()
        };
        for (total, cell) in counts.dek_latency.iter_mut().zip(&self.dek_latency) {
            *total = cell.load(Ordering::Relaxed);
        }
        counts
    }

    fn alert(&self, metric: Metric) -> AlertRecord {
        let a = &self.alerts[metric as usize];
        let mut record = self.alert_once(a, metric);
        for _ in 0..64 {
            let before = a.seq.load(Ordering::Acquire);
            if before.is_multiple_of(2) {
                record = self.alert_once(a, metric);
                fence(Ordering::Acquire);
                if a.seq.load(Ordering::Relaxed) == before {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        record
    }

    fn alert_once(&self, a: &SharedAlert, metric: Metric) -> AlertRecord {
        let value = f64::from_bits(a.value.load(Ordering::Relaxed));
        AlertRecord {
            metric,
            rule: Rule {
                threshold: f64::from_bits(a.threshold.load(Ordering::Relaxed)),
                window_seconds: a.window_seconds.load(Ordering::Relaxed),
                severity: Severity::from_code(a.severity.load(Ordering::Relaxed))
                    .unwrap_or(Severity::Info),
                enabled: a.enabled.load(Ordering::Relaxed) != 0,
            },
            firing: a.firing.load(Ordering::Relaxed) != 0,
            value: (!value.is_nan()).then_some(value),
            since: a.since.load(Ordering::Relaxed),
            evaluated_at: a.evaluated_at.load(Ordering::Relaxed),
        }
    }

    fn set_alert(&self, record: &AlertRecord) {
        let a = &self.alerts[record.metric as usize];
        a.seq.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::Release);
        a.firing.store(u32::from(record.firing), Ordering::Relaxed);
        a.value.store(
            record.value.unwrap_or(f64::NAN).to_bits(),
            Ordering::Relaxed,
        );
        a.threshold
            .store(record.rule.threshold.to_bits(), Ordering::Relaxed);
        a.window_seconds
            .store(record.rule.window_seconds, Ordering::Relaxed);
        a.severity
            .store(record.rule.severity as u32, Ordering::Relaxed);
        a.enabled
            .store(u32::from(record.rule.enabled), Ordering::Relaxed);
        a.since.store(record.since, Ordering::Relaxed);
        a.evaluated_at.store(record.evaluated_at, Ordering::Relaxed);
        a.seq.fetch_add(1, Ordering::Release);
    }

    /// Records what a revocation check found (an `ok_at` of 0 keeps the
    /// time of the last check that was allowed).
    pub fn set_health(&self, record: KeyHealthRecord) {
        let h = &self.health;
        h.reason.store(record.reason, Ordering::Relaxed);
        h.checked_at.store(record.checked_at, Ordering::Relaxed);
        if record.ok_at != 0 {
            h.ok_at.store(record.ok_at, Ordering::Relaxed);
        }
        h.since.store(record.since, Ordering::Relaxed);
        h.status.store(record.status, Ordering::Release);
    }

    fn health(&self) -> KeyHealthRecord {
        let h = &self.health;
        KeyHealthRecord {
            status: h.status.load(Ordering::Acquire),
            reason: h.reason.load(Ordering::Relaxed),
            checked_at: h.checked_at.load(Ordering::Relaxed),
            ok_at: h.ok_at.load(Ordering::Relaxed),
            since: h.since.load(Ordering::Relaxed),
        }
    }

    /// One data key obtained from the key manager in `micros`.
    pub fn dek_latency(&self, micros: u64) {
        let bucket = crate::histogram::bucket(micros);
        self.dek_latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.dek_latency_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// The slot's tenant label, once the slot is READY (`None` before).
    fn published_tenant(&self) -> Option<&[u8]> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        let len = (self.tenant_len.load(Ordering::Acquire) as usize).min(TENANT_LEN);
        // SAFETY: the label is written only by the party whose swap EMPTY ->
        // CLAIMING succeeded (`MetricTable::slot`), before its Release store of
        // READY, which the Acquire load above has seen; a slot never leaves
        // READY, so the label is never written again and shared reads of it
        // cannot race with a write.
        Some(unsafe { &(&*self.tenant.get())[..len] })
    }

    fn is(&self, database: u32, provider: u32, tenant: &[u8]) -> bool {
        self.published_tenant().is_some_and(|label| {
            self.database.load(Ordering::Relaxed) == database
                && self.provider.load(Ordering::Relaxed) == provider
                && label == tenant
        })
    }
}

/// What `byok.metrics` shows for one (database, provider, tenant).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub counters: [u64; COUNTERS],
    pub kms_latency: [u64; BUCKETS],
    pub dek_latency: [u64; BUCKETS],
    pub kms_latency_sum_us: u64,
    pub dek_latency_sum_us: u64,
    /// The newest revocation check's findings.
    pub health: KeyHealthRecord,
}

impl Totals {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize]
    }
}

/// `N` metric slots.
#[repr(C)]
pub struct MetricTable<const N: usize> {
    /// Unix seconds of the last fine and coarse samples (written by the key broker).
    fine_at: AtomicI64,
    coarse_at: AtomicI64,
    slots: [MetricSlot; N],
}

/// The labels of a slot: (database, provider, tenant).
type Label = (u32, u32, Vec<u8>);

// SAFETY: every field is an atomic except each slot's tenant label (an
// `UnsafeCell`). A label is written by exactly one party, the one whose swap
// EMPTY -> CLAIMING succeeded, and read only once the slot is READY
// (`MetricSlot::published_tenant`), after which it never changes; so threads,
// or processes sharing the table, never write a label another one reads.
unsafe impl<const N: usize> Sync for MetricTable<N> {}

impl<const N: usize> MetricTable<N> {
    /// A zeroed table on the heap (the extension places it in shared memory).
    pub fn new_boxed() -> Box<Self> {
        // SAFETY: every field is an integer atomic, a byte array in an
        // `UnsafeCell`, or an array of those, and all-zero bytes are a valid
        // value of each (the empty table: every slot EMPTY).
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// The slot of (database, provider, tenant), claimed on first use; `None`
    /// when all are taken (those counters are then not kept).
    pub fn slot(&self, database: u32, provider: ProviderKind, tenant: &str) -> Option<&MetricSlot> {
        let provider = provider as u32;
        let tenant = &tenant.as_bytes()[..tenant.len().min(TENANT_LEN)];
        if let Some(slot) = self.slots.iter().find(|m| m.is(database, provider, tenant)) {
            return Some(slot);
        }
        for m in &self.slots {
            if m.state
                .compare_exchange(EMPTY, CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                m.database.store(database, Ordering::Relaxed);
                m.provider.store(provider, Ordering::Relaxed);
                // SAFETY: our swap EMPTY -> CLAIMING succeeded, so no other party
                // writes this label, and none reads it until our Release store of
                // READY below; `tenant.len() <= TENANT_LEN` (cut above).
                unsafe { (&mut *m.tenant.get())[..tenant.len()].copy_from_slice(tenant) };
                m.tenant_len.store(tenant.len() as u32, Ordering::Relaxed);
                m.state.store(READY, Ordering::Release);
                // Two processes may claim a slot for the same labels at once;
                // `totals` adds up slots with equal labels, so that only costs a slot.
                return Some(m);
            }
            if m.is(database, provider, tenant) {
                return Some(m);
            }
        }
        None
    }

    /// The ready slots grouped by label (two processes may have claimed a
    /// slot each for the same label), in label order.
    fn labels(&self) -> BTreeMap<Label, Vec<&MetricSlot>> {
        let mut labels: BTreeMap<Label, Vec<&MetricSlot>> = BTreeMap::new();
        for m in &self.slots {
            let Some(tenant) = m.published_tenant() else {
                continue;
            };
            let label = (
                m.database.load(Ordering::Relaxed),
                m.provider.load(Ordering::Relaxed),
                tenant.to_vec(),
            );
            labels.entry(label).or_default().push(m);
        }
        labels
    }

    /// Every (database, provider, tenant) with its counters, in label order.
    pub fn totals(&self) -> Vec<(u32, ProviderKind, String, Totals)> {
        self.labels()
            .into_iter()
            .filter_map(|((database, provider, tenant), slots)| {
                let mut t = Totals::default();
                for m in slots {
                    for (total, counter) in t.counters.iter_mut().zip(&m.counters) {
                        *total += counter.load(Ordering::Relaxed);
                    }
                    for i in 0..BUCKETS {
                        t.kms_latency[i] += m.kms_latency[i].load(Ordering::Relaxed);
                        t.dek_latency[i] += m.dek_latency[i].load(Ordering::Relaxed);
                    }
                    t.kms_latency_sum_us += m.kms_latency_sum_us.load(Ordering::Relaxed);
                    t.dek_latency_sum_us += m.dek_latency_sum_us.load(Ordering::Relaxed);
                    let health = m.health();
                    if health.checked_at > t.health.checked_at {
                        t.health = health;
                    }
                }
                let (provider, tenant) = decode_label(provider, &tenant)?;
                Some((database, provider, tenant, t))
            })
            .collect()
    }

    /// The key broker's clock tick (call it at least every second): every
    /// [`FINE_STEP_SECONDS`] it samples each slot's counts into its rings and
    /// evaluates every tenant's monitors over their windows, and returns the
    /// monitors whose state changed. Only the key broker calls this.
    pub fn tick(&self, now: i64) -> Vec<AlertChange> {
        // (a clock set back samples at once rather than stalling until it catches up)
        let due = |last: i64, step: i64| now < last || now >= last + step;
        if !due(self.fine_at.load(Ordering::Relaxed), FINE_STEP_SECONDS) {
            return Vec::new();
        }
        self.fine_at.store(now, Ordering::Relaxed);
        let coarse = due(self.coarse_at.load(Ordering::Relaxed), COARSE_STEP_SECONDS);
        if coarse {
            self.coarse_at.store(now, Ordering::Relaxed);
        }
        let mut changes = Vec::new();
        for ((database, provider, tenant), slots) in self.labels() {
            let rules = slots
                .iter()
                .find(|m| m.rules_published.load(Ordering::Acquire) != 0)
                .map_or_else(crate::monitors::default_rules, |m| m.rules());
            // Each window: the counts now minus those sampled a window ago.
            let mut windows = [WindowCounts::default(); MONITORS];
            for m in &slots {
                let live = m.window_counts();
                for (window, rule) in windows.iter_mut().zip(&rules) {
                    let start = now - i64::from(rule.window_seconds);
                    let older = if i64::from(rule.window_seconds)
                        <= FINE_STEP_SECONDS * (FINE_SAMPLES as i64 - 1)
                    {
                        m.fine.at_or_before(start)
                    } else {
                        m.coarse.at_or_before(start)
                    };
                    window.add(&live.since(&older.unwrap_or_default()));
                }
                m.fine.push(now, &live);
                if coarse {
                    m.coarse.push(now, &live);
                }
            }
            // A label's state lives in its first slot (slots never move).
            let primary = slots[0];
            for (metric, (window, rule)) in Metric::ALL.into_iter().zip(windows.iter().zip(&rules))
            {
                let previous = primary.alert(metric);
                // (a disabled monitor shows no value: nothing is judged)
                let value = window.value(metric).filter(|_| rule.enabled);
                let firing = crate::monitors::breaks(metric, rule, value);
                let changed = firing != previous.firing;
                let record = AlertRecord {
                    metric,
                    rule: *rule,
                    firing,
                    value,
                    since: if changed || previous.since == 0 {
                        now
                    } else {
                        previous.since
                    },
                    evaluated_at: now,
                };
                primary.set_alert(&record);
                if changed && let Some((provider, tenant)) = decode_label(provider, &tenant) {
                    changes.push(AlertChange {
                        database,
                        provider,
                        tenant,
                        alert: record,
                    });
                }
            }
        }
        changes
    }

    /// How many slots are in use.
    pub fn used(&self) -> usize {
        self.slots
            .iter()
            .filter(|m| m.state.load(Ordering::Acquire) != EMPTY)
            .count()
    }

    /// Every tenant's monitors as last evaluated, in label order (tenants not
    /// evaluated yet are left out).
    pub fn alerts(&self) -> Vec<(u32, ProviderKind, String, [AlertRecord; MONITORS])> {
        self.labels()
            .into_iter()
            .filter_map(|((database, provider, tenant), slots)| {
                let records = Metric::ALL.map(|metric| slots[0].alert(metric));
                if records[0].evaluated_at == 0 {
                    return None;
                }
                let (provider, tenant) = decode_label(provider, &tenant)?;
                Some((database, provider, tenant, records))
            })
            .collect()
    }
}

/// Longest database name kept (PostgreSQL's NAMEDATALEN - 1).
const DATABASE_NAME_LEN: usize = 63;

/// One database's label for the Prometheus exposition and the share of its
/// encryption budget its busiest data key has used, under a sequence lock
/// that doubles as the writers' lock (odd: being written).
#[repr(C)]
struct DatabaseEntry {
    seq: AtomicU32,
    oid: AtomicU32,
    name_len: AtomicU32,
    /// The share in millionths, plus one (0: not known).
    budget_ppm: AtomicU32,
    name: [AtomicU64; 8],
}

/// `N` databases' names (published by their backends, which know them; the
/// key broker, connected to no database, does not) and budget figures
/// (published by their catalog writers).
#[repr(C)]
pub struct DatabaseTable<const N: usize> {
    entries: [DatabaseEntry; N],
}

impl<const N: usize> DatabaseTable<N> {
    pub fn new_boxed() -> Box<Self> {
        // SAFETY: every field is an integer atomic or an array of them, for
        // which all-zero bytes are valid (every entry unused).
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// Runs `write` on the entry of `oid` (claimed if new) under its lock;
    /// does nothing when the table is full.
    fn update(&self, oid: u32, write: impl FnOnce(&DatabaseEntry)) {
        let entry = self
            .entries
            .iter()
            .find(|e| e.oid.load(Ordering::Acquire) == oid)
            .or_else(|| {
                self.entries.iter().find(|e| {
                    e.oid
                        .compare_exchange(0, oid, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                })
            });
        let Some(entry) = entry.filter(|e| e.oid.load(Ordering::Acquire) == oid) else {
            return;
        };
        loop {
            let seq = entry.seq.load(Ordering::Relaxed);
            if seq.is_multiple_of(2)
                && entry
                    .seq
                    .compare_exchange(seq, seq + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            std::hint::spin_loop();
        }
        fence(Ordering::Release);
        write(entry);
        entry.seq.fetch_add(1, Ordering::Release);
    }

    /// Publishes a database's name (a no-op when it is already the one kept).
    pub fn set_name(&self, oid: u32, name: &str) {
        if oid == 0 || self.name(oid).as_deref() == Some(name) {
            return;
        }
        let mut bytes = [0u8; 64];
        let len = name.len().min(DATABASE_NAME_LEN);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        self.update(oid, |e| {
            for (cell, chunk) in e.name.iter().zip(bytes.chunks(8)) {
                cell.store(
                    u64::from_le_bytes(chunk.try_into().unwrap_or_default()),
                    Ordering::Relaxed,
                );
            }
            e.name_len.store(len as u32, Ordering::Relaxed);
        });
    }

    /// Publishes the share of the encryption budget the database's busiest
    /// active data key has used.
    pub fn set_budget_used(&self, oid: u32, ratio: f64) {
        let ppm = (ratio.clamp(0.0, 4000.0) * 1e6) as u32;
        self.update(oid, |e| {
            e.budget_ppm.store(ppm.saturating_add(1), Ordering::Relaxed)
        });
    }

    fn read<T>(&self, entry: &DatabaseEntry, read: impl Fn(&DatabaseEntry) -> T) -> Option<T> {
        for _ in 0..64 {
            let before = entry.seq.load(Ordering::Acquire);
            if before.is_multiple_of(2) {
                let value = read(entry);
                fence(Ordering::Acquire);
                if entry.seq.load(Ordering::Relaxed) == before {
                    return Some(value);
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    fn name_of(&self, entry: &DatabaseEntry) -> Option<String> {
        self.read(entry, |e| {
            let mut bytes = Vec::with_capacity(64);
            for cell in &e.name {
                bytes.extend_from_slice(&cell.load(Ordering::Relaxed).to_le_bytes());
            }
            bytes.truncate((e.name_len.load(Ordering::Relaxed) as usize).min(DATABASE_NAME_LEN));
            bytes
        })
        .filter(|b| !b.is_empty())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The name published for `oid`.
    pub fn name(&self, oid: u32) -> Option<String> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.oid.load(Ordering::Acquire) == oid)?;
        self.name_of(entry)
    }

    /// Every database's name, by OID.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.entries
            .iter()
            .filter_map(|e| {
                let oid = e.oid.load(Ordering::Acquire);
                (oid != 0)
                    .then(|| self.name_of(e).map(|n| (oid, n)))
                    .flatten()
            })
            .collect()
    }

    /// Every database's budget figure, by OID (where one was published).
    pub fn budgets_used(&self) -> BTreeMap<u32, f64> {
        self.entries
            .iter()
            .filter_map(|e| {
                let oid = e.oid.load(Ordering::Acquire);
                let ppm = self.read(e, |e| e.budget_ppm.load(Ordering::Relaxed))?;
                (oid != 0 && ppm != 0).then(|| (oid, f64::from(ppm - 1) / 1e6))
            })
            .collect()
    }
}

/// A slot's provider number and tenant bytes as a provider and a string.
fn decode_label(provider: u32, tenant: &[u8]) -> Option<(ProviderKind, String)> {
    // `slot` stores only `ProviderKind as u32`, so every label maps back; the
    // `?` only keeps a number that is not a provider (which nothing writes)
    // from being reported as some other provider.
    let provider = *ProviderKind::ALL.get(provider as usize)?;
    // Tenant ids are ASCII (`config::check_tenant_id`), so cutting at
    // TENANT_LEN bytes never splits a character; lossy decoding is only a guard.
    Some((provider, String::from_utf8_lossy(tenant).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_label_and_adds_up_duplicates() {
        let table = MetricTable::<3>::new_boxed();
        let a = table.slot(5, ProviderKind::AwsKms, "acme").unwrap();
        a.add(Counter::KmsCalls, 2);
        a.kms_latency(300);
        assert!(std::ptr::eq(
            a,
            table.slot(5, ProviderKind::AwsKms, "acme").unwrap()
        ));
        table
            .slot(5, ProviderKind::Local, "acme")
            .unwrap()
            .add(Counter::Encrypts, 7);
        table
            .slot(6, ProviderKind::AwsKms, "acme")
            .unwrap()
            .add(Counter::L1Hits, 1);
        assert!(
            table.slot(7, ProviderKind::AwsKms, "full").is_none(),
            "all slots taken"
        );
        let totals = table.totals();
        assert_eq!(totals.len(), 3);
        assert_eq!(totals[0].0, 5);
        let aws = totals
            .iter()
            .find(|r| r.0 == 5 && r.1 == ProviderKind::AwsKms)
            .unwrap();
        assert_eq!(aws.3.get(Counter::KmsCalls), 2);
        assert_eq!(aws.3.kms_latency.iter().sum::<u64>(), 1);
        let local = totals.iter().find(|r| r.1 == ProviderKind::Local).unwrap();
        assert_eq!(
            (local.2.as_str(), local.3.get(Counter::Encrypts)),
            ("acme", 7)
        );
    }

    #[test]
    fn long_tenant_ids_are_cut() {
        let table = MetricTable::<1>::new_boxed();
        let long = "t".repeat(300);
        table
            .slot(1, ProviderKind::Vault, &long)
            .unwrap()
            .add(Counter::Decrypts, 1);
        assert!(table.slot(1, ProviderKind::Vault, &long).is_some());
        assert_eq!(table.totals()[0].2.len(), TENANT_LEN);
    }

    #[test]
    fn monitors_fire_and_resolve_over_their_windows() {
        let table = MetricTable::<2>::new_boxed();
        let slot = table.slot(5, ProviderKind::Vault, "acme").unwrap();
        let mut rules = crate::monitors::default_rules();
        rules[0].window_seconds = 60; // kms_api_success_rate over 1 minute
        slot.set_rules(&rules);
        let mut now = 1_000_000;
        assert!(table.tick(now).is_empty(), "nothing to measure: ok");
        assert!(table.tick(now + 1).is_empty(), "not a sampling tick");
        assert_eq!(table.fine_at.load(Ordering::Relaxed), now);
        assert_eq!(table.alerts()[0].3[0].value, None);
        // 100 calls, all fine.
        slot.add(Counter::KmsCalls, 100);
        now += FINE_STEP_SECONDS;
        assert!(table.tick(now).is_empty());
        assert_eq!(table.alerts()[0].3[0].value, Some(100.0));
        // One failure in 50: 98% < 99.9%.
        slot.add(Counter::KmsCalls, 50);
        slot.add(Counter::KmsFailures, 1);
        now += FINE_STEP_SECONDS;
        let changes = table.tick(now);
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!((change.database, change.tenant.as_str()), (5, "acme"));
        assert_eq!(change.alert.metric, Metric::KmsApiSuccessRate);
        assert!(change.alert.firing);
        assert_eq!(change.alert.since, now);
        let fired_at = now;
        // Still firing while the failure is within the window; no new change.
        for _ in 0..5 {
            slot.add(Counter::KmsCalls, 10);
            now += FINE_STEP_SECONDS;
            assert!(table.tick(now).is_empty());
        }
        let record = table.alerts()[0].3[0];
        assert!(record.firing);
        assert_eq!(record.since, fired_at);
        // Once the window has passed the failure, it resolves, once.
        let mut resolved = Vec::new();
        for _ in 0..3 {
            slot.add(Counter::KmsCalls, 10);
            now += FINE_STEP_SECONDS;
            resolved.extend(table.tick(now));
        }
        assert_eq!(resolved.len(), 1);
        assert!(!resolved[0].alert.firing);
        assert!(resolved[0].alert.value.unwrap() >= 99.9);
        // The decrypt monitor uses the guide's 5 minutes: one failure in 100 fires.
        slot.add(Counter::Decrypts, 100);
        slot.add(Counter::DecryptFailures, 1);
        now += FINE_STEP_SECONDS;
        let changes = table.tick(now);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].alert.metric, Metric::DecryptFailuresRate);
        assert_eq!(changes[0].alert.value, Some(0.01));
        // A disabled monitor never fires.
        rules[3].enabled = false;
        slot.set_rules(&rules);
        now += FINE_STEP_SECONDS;
        let changes = table.tick(now);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].alert.firing);
        assert!(!table.alerts()[0].3[3].rule.enabled);
    }

    #[test]
    fn an_hour_long_window_uses_the_coarse_samples() {
        let table = MetricTable::<1>::new_boxed();
        let slot = table.slot(1, ProviderKind::Local, "t").unwrap();
        let mut now = 50_000;
        // An hour and a half of lookups, 90% hits, sampled every 10 s.
        for _ in 0..540 {
            slot.add(Counter::L1Hits, 9);
            slot.add(Counter::L1Misses, 1);
            table.tick(now);
            now += FINE_STEP_SECONDS;
        }
        let hit_ratio = table.alerts()[0].3[Metric::KeyCacheHitRatio as usize];
        assert!((hit_ratio.value.unwrap() - 0.9).abs() < 1e-9);
        assert!(!hit_ratio.firing);
        // Then a burst of misses the hour-long window dilutes: 0.9 -> ~0.78.
        slot.add(Counter::L1Misses, 50 * 10);
        let changes = table.tick(now);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].alert.metric, Metric::KeyCacheHitRatio);
        let value = changes[0].alert.value.unwrap();
        assert!(value < 0.8 && value > 0.7, "{value}");
    }

    #[test]
    fn database_names_and_budgets() {
        let table = DatabaseTable::<2>::new_boxed();
        table.set_name(5, "app");
        table.set_name(6, &"x".repeat(100));
        table.set_name(7, "full");
        table.set_budget_used(5, 0.5);
        assert_eq!(table.name(5).as_deref(), Some("app"));
        assert_eq!(table.name(6).unwrap().len(), 63);
        assert_eq!(table.name(7), None, "table full");
        table.set_name(5, "app_renamed");
        assert_eq!(
            table.names().get(&5).map(String::as_str),
            Some("app_renamed")
        );
        assert_eq!(table.budgets_used().get(&5), Some(&0.5));
        assert_eq!(table.budgets_used().get(&6), None);
    }

    #[test]
    fn a_new_slot_counts_its_whole_history_in_the_window() {
        let table = MetricTable::<1>::new_boxed();
        let slot = table.slot(1, ProviderKind::Local, "new").unwrap();
        let mut rules = crate::monitors::default_rules();
        rules[3].window_seconds = 30;
        rules[3].threshold = 0.01;
        slot.set_rules(&rules);
        // 100 decryptions before the first sample, then 2 failures: 2 in 100.
        slot.add(Counter::Decrypts, 100);
        let mut now = 7_000;
        table.tick(now);
        slot.add(Counter::DecryptFailures, 2);
        now += FINE_STEP_SECONDS;
        let changes = table.tick(now);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].alert.value, Some(0.02));
    }

    #[test]
    fn a_clock_set_back_does_not_stop_the_sampling() {
        let table = MetricTable::<1>::new_boxed();
        table.slot(1, ProviderKind::Local, "t").unwrap();
        table.tick(10_000);
        table.tick(5_000);
        assert_eq!(table.fine_at.load(Ordering::Relaxed), 5_000);
        assert_eq!(table.alerts()[0].3[0].evaluated_at, 5_000);
    }
}
