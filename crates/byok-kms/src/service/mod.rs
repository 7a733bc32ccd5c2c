//! The key broker's service: answers [`Request`]s from a shared data-key cache
//! (L2) or, on a miss, from the tenant's key provider (L3), so the number of
//! key-manager calls follows the number of data keys, not of connections or rows.
//!
//! - Concurrent misses for the same key wait on one provider call (coalescing).
//! - Entries live for the tenant's `ttl_seconds`; while the key manager is
//!   unreachable they are served for `grace_period_seconds` more, then the
//!   service fails closed. Refusals (access denied, disabled key) are never
//!   papered over.
//! - Refusals (access denied, key disabled or missing, a wrapped key that does
//!   not open) are remembered per data key and configuration for a while that
//!   doubles with each repeat, from 1 s up to `refusal_backoff_max`: a misbehaving
//!   application cannot turn into a stream of calls against the customer's key
//!   manager, and a key the customer enables again is used within that bound.
//!   Outages are not remembered (the grace period covers them).
//! - The master key behind every cached key is re-checked with its key manager
//!   every `revocation_check_seconds` ([`liveness`]): a refusal evicts its keys
//!   and refuses them until a check succeeds again; an outage changes nothing.
//! - Plaintext keys are zeroized when evicted, expired or flushed.
//! - Every provider call is bounded by the configured timeout.
//!
//! No PostgreSQL here: the broker process feeds it requests from shared memory.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use byok_core::cache::{CacheLimits, KeyCache};
use byok_core::clock::Tick;
use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::error::{ErrorKind, ProviderError};
use crate::local::LocalProvider;
use crate::policy::AccessPolicy;
use crate::protocol::{
    BackupTarget, BackupWrap, CacheSettings, ErrorWire, ProviderRef, Request, Response, TenantRef,
};
use crate::provider::{CallReport, KeyContext, KeyProvider, MasterKeyInfo, WrappedDek};

pub mod liveness;

use liveness::{Check, MasterKeyId, Watches};
pub use liveness::{KeyHealth, Settled};

/// How often the broker looks for master keys due for their check.
pub const LIVENESS_TICK: Duration = Duration::from_millis(200);

/// Settings from the server configuration (GUCs), reloadable.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub local_key_file: PathBuf,
    /// What tenants' configurations may make the broker read and call.
    pub policy: Arc<AccessPolicy>,
    /// Bound on the whole shared cache.
    pub max_entries: usize,
    /// Bound on each provider call.
    pub provider_timeout: Duration,
    /// Longest time a refusal is remembered before the key manager is asked again.
    pub refusal_backoff_max: Duration,
}

/// The share of the provider timeout each of the primary and the backup key
/// manager gets when an unwrap may fall back to the backup (both fit within
/// the time the backend waits, with some left for the answer to travel).
pub const BACKUP_TIME_SHARE_PERCENT: u32 = 45;

/// First wait after a refusal; doubled on each repeat up to `refusal_backoff_max`.
pub const REFUSAL_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Key-manager operations, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsOp {
    Unwrap,
    Generate,
    Rewrap,
    Validate,
    /// A data key wrapped under another key manager's master key (a backup wrap).
    Wrap,
    /// A revocation check of a master key.
    Check,
}

/// What the service reports about its work; the broker keeps the counters in
/// shared memory for `byok.metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricEvent {
    KmsCall {
        op: KmsOp,
        ok: bool,
        latency: Duration,
    },
    SharedCacheHit,
    SharedCacheMiss,
    ServedStale,
    /// A replica key (another region) answered because the primary failed.
    ServedByReplica,
    /// The backup key manager unwrapped a data key (the primary was
    /// unreachable, or DR is active).
    ServedByBackup,
    /// A revocation check of the master key (counted for the tenant whose
    /// data key it unwrapped; one per master key, however many tenants use it).
    KeyCheck,
}

/// One key-manager call, as the audit trail records it.
#[derive(Debug, Clone, PartialEq)]
pub struct KmsCallAudit {
    pub op: KmsOp,
    pub dek_id: Option<u64>,
    pub ok: bool,
    pub latency: Duration,
    /// The key manager's request id, where it returns one (AWS).
    pub request_id: Option<String>,
    /// The error's message and detail (never key material or credentials).
    pub error: Option<String>,
    pub replica: Option<String>,
    /// Made with the tenant's backup key manager.
    pub backup: bool,
}

pub trait MetricsSink: Send + Sync {
    fn record(&self, provider: ProviderKind, tenant: &TenantRef, event: MetricEvent);

    /// Called once per key-manager call, after it ends. Runs on a runtime
    /// thread: it may only touch plain memory.
    fn audit(&self, _provider: ProviderKind, _tenant: &TenantRef, _call: KmsCallAudit) {}

    /// Called after every revocation check, with what it concluded. When
    /// `settled.health` is `Revoked` and `settled.changed`, the service has
    /// already evicted the keys from its cache: this is where the broker makes
    /// every backend drop its own copies. Runs on a runtime thread.
    fn key_checked(&self, _settled: &Settled) {}
}

/// A sink that drops everything (tests, tools).
pub struct NoMetrics;

impl MetricsSink for NoMetrics {
    fn record(&self, _: ProviderKind, _: &TenantRef, _: MetricEvent) {}
}

/// What identifies a data key across the cluster: its database and id, and a
/// digest of its wrapped form and binding, so a restored or re-created catalog
/// with the same ids never picks up another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    database: u32,
    dek_id: u64,
    digest: [u8; 32],
    /// The master key that wrapped it, under the configuration it was asked with.
    master: MasterKeyId,
}

struct CachedKey {
    dek: DataKey,
    fresh_until: Tick,
}

type Flight = watch::Receiver<Option<Result<DataKey, ProviderError>>>;

/// A refusal remembered for a data key under one provider configuration.
struct Refusal {
    error: ProviderError,
    until: Tick,
    backoff: Duration,
    tenant_label: String,
}

/// What a refusal is remembered by: the key, and the configuration it was
/// refused under (a corrected configuration is tried at once).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    key: CacheKey,
    options: [u8; 32],
}

fn options_digest(provider: &ProviderRef) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(provider.provider.name().as_bytes());
    h.update([0]);
    h.update(serde_json::Value::Object(provider.options.clone()).to_string());
    h.finalize().into()
}

/// The outcome of a request: the answer, and the plaintext key when there is one
/// (it travels apart from the encoded answer).
pub struct Outcome {
    pub response: Response,
    pub data_key: Option<DataKey>,
}

impl Outcome {
    /// An answer without a plaintext key, or the failure.
    fn answer(result: Result<Response, ProviderError>) -> Self {
        match result {
            Ok(response) => Outcome {
                response,
                data_key: None,
            },
            Err(e) => Outcome::failed(&e),
        }
    }

    fn failed(e: &ProviderError) -> Self {
        Outcome {
            response: Response::Failed {
                error: ErrorWire::from(e),
            },
            data_key: None,
        }
    }
}

pub struct KeyService {
    settings: RwLock<ServiceSettings>,
    cache: Mutex<KeyCache<CachedKey, CacheKey, RandomState>>,
    inflight: Mutex<HashMap<CacheKey, Flight>>,
    refusals: Mutex<HashMap<RefusalKey, Refusal>>,
    /// Clients of remote key managers, by provider and configuration.
    clients: Mutex<HashMap<String, Arc<dyn KeyProvider>>>,
    /// The master keys behind cached keys, and what their last check found.
    watches: Mutex<Watches>,
    metrics: Arc<dyn MetricsSink>,
}

impl KeyService {
    pub fn new(settings: ServiceSettings, metrics: Arc<dyn MetricsSink>) -> Self {
        KeyService {
            cache: Mutex::new(KeyCache::new(settings.max_entries)),
            settings: RwLock::new(settings),
            inflight: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            watches: Mutex::new(Watches::default()),
            metrics,
        }
    }

    /// New settings (after a configuration reload).
    pub fn reconfigure(&self, settings: ServiceSettings) {
        self.cache
            .lock()
            .expect("cache lock")
            .set_capacity(settings.max_entries);
        // Clients were built (endpoints checked, credential files read) under
        // the previous policy: a changed policy applies to every tenant at once.
        if self.settings.read().expect("settings lock").policy != settings.policy {
            self.clients.lock().expect("clients lock").clear();
        }
        *self.settings.write().expect("settings lock") = settings;
    }

    pub fn cached_entries(&self) -> usize {
        self.cache.lock().expect("cache lock").len()
    }

    pub async fn handle(&self, request: Request) -> Outcome {
        match request {
            Request::Unwrap {
                tenant,
                provider,
                dek_id,
                wrapped,
                cache,
                backup,
            } => match self
                .unwrap(&tenant, &provider, dek_id, &wrapped, cache, backup.as_ref())
                .await
            {
                Ok((dek, stale)) => Outcome {
                    response: Response::DataKey { stale },
                    data_key: Some(dek),
                },
                Err(e) => Outcome::failed(&e),
            },
            Request::Generate {
                tenant,
                provider,
                dek_id,
                cmk_id,
                backup: None,
            } => Outcome::answer(
                self.wrapped_under(&tenant, &provider, dek_id, &cmk_id, None)
                    .await
                    .map(|wrapped| Response::Generated {
                        wrapped,
                        backup: None,
                    }),
            ),
            Request::Generate {
                tenant,
                provider,
                dek_id,
                cmk_id,
                backup: Some(backup),
            } => Outcome::answer(
                self.generate_with_backup(&tenant, &provider, dek_id, &cmk_id, &backup)
                    .await
                    .map(|(wrapped, backup)| Response::Generated {
                        wrapped,
                        backup: Some(backup),
                    }),
            ),
            Request::CopyWrap {
                tenant,
                dek_id,
                from,
                wrapped,
                to,
                cmk_id,
            } => Outcome::answer(
                self.copy_wrap(&tenant, dek_id, &from, &wrapped, &to, &cmk_id)
                    .await
                    .map(|wrapped| Response::Generated {
                        wrapped,
                        backup: None,
                    }),
            ),
            Request::Validate {
                tenant,
                provider,
                cmk_id,
            } => Outcome::answer(
                self.validate(&tenant, &provider, &cmk_id)
                    .await
                    .map(|info| Response::KeyInfo { info }),
            ),
            Request::Rewrap {
                tenant,
                provider,
                dek_id,
                wrapped,
                new_cmk_id,
            } => Outcome::answer(
                self.wrapped_under(&tenant, &provider, dek_id, &new_cmk_id, Some(&wrapped))
                    .await
                    .map(|wrapped| Response::Generated {
                        wrapped,
                        backup: None,
                    }),
            ),
            Request::Flush {
                database,
                tenant_id,
                dek_id,
            } => Outcome::answer(Ok(Response::Flushed {
                entries: self.flush(database, tenant_id.as_deref(), dek_id) as u64,
            })),
        }
    }

    /// Data key `dek_id` wrapped under `cmk_id`: a new one, or the one `from`
    /// holds (a rotation). A new key's plaintext is not needed by the caller:
    /// it is unwrapped (and cached) on first use like any other.
    async fn wrapped_under(
        &self,
        tenant: &TenantRef,
        provider: &ProviderRef,
        dek_id: u64,
        cmk_id: &str,
        from: Option<&WrappedDek>,
    ) -> Result<WrappedDek, ProviderError> {
        let op = match from {
            Some(_) => KmsOp::Rewrap,
            None => KmsOp::Generate,
        };
        self.call(provider, tenant, op, Some(dek_id), |p, report| async move {
            let context = key_context(tenant, dek_id, &report);
            match from {
                Some(wrapped) => p.rewrap(wrapped, cmk_id, context).await,
                None => Ok(p.generate_data_key(cmk_id, context).await?.1),
            }
        })
        .await
    }

    /// A new data key wrapped under the primary's `cmk_id` and the backup's
    /// key: both or neither (a key without its escrow wrap is not made).
    async fn generate_with_backup(
        &self,
        tenant: &TenantRef,
        provider: &ProviderRef,
        dek_id: u64,
        cmk_id: &str,
        backup: &BackupTarget,
    ) -> Result<(WrappedDek, WrappedDek), ProviderError> {
        let (dek, wrapped) = self
            .call(
                provider,
                tenant,
                KmsOp::Generate,
                Some(dek_id),
                |p, report| async move {
                    p.generate_data_key(cmk_id, key_context(tenant, dek_id, &report))
                        .await
                },
            )
            .await?;
        let backup_wrapped = self
            .wrap_with(tenant, dek_id, &dek, &backup.provider, &backup.cmk_id)
            .await?;
        Ok((wrapped, backup_wrapped))
    }

    /// The key `wrapped` holds, opened by `from` and wrapped by `to` under `cmk_id`.
    async fn copy_wrap(
        &self,
        tenant: &TenantRef,
        dek_id: u64,
        from: &ProviderRef,
        wrapped: &WrappedDek,
        to: &ProviderRef,
        cmk_id: &str,
    ) -> Result<WrappedDek, ProviderError> {
        let dek = self
            .call(
                from,
                tenant,
                KmsOp::Unwrap,
                Some(dek_id),
                |p, report| async move {
                    p.unwrap(wrapped, key_context(tenant, dek_id, &report))
                        .await
                },
            )
            .await?;
        self.wrap_with(tenant, dek_id, &dek, to, cmk_id).await
    }

    /// `dek` wrapped under `cmk_id` of `provider`.
    async fn wrap_with(
        &self,
        tenant: &TenantRef,
        dek_id: u64,
        dek: &DataKey,
        provider: &ProviderRef,
        cmk_id: &str,
    ) -> Result<WrappedDek, ProviderError> {
        self.call(
            provider,
            tenant,
            KmsOp::Wrap,
            Some(dek_id),
            |p, report| async move {
                p.wrap(cmk_id, dek, key_context(tenant, dek_id, &report))
                    .await
            },
        )
        .await
    }

    async fn validate(
        &self,
        tenant: &TenantRef,
        provider: &ProviderRef,
        cmk_id: &str,
    ) -> Result<MasterKeyInfo, ProviderError> {
        self.call(
            provider,
            tenant,
            KmsOp::Validate,
            None,
            |p, _report| async move { p.describe_master_key(cmk_id).await },
        )
        .await
    }

    /// Master keys watched for revocation (behind the cached keys).
    pub fn watched_master_keys(&self) -> usize {
        self.watches.lock().expect("watches lock").len()
    }

    /// Runs the revocation checks until the runtime stops: every
    /// [`LIVENESS_TICK`], each master key due is checked on a task of its own,
    /// so a slow key manager delays no one else's check.
    pub async fn watch_master_keys(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(LIVENESS_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticker.tick().await;
            for check in self.due_checks() {
                let service = self.clone();
                tokio::spawn(async move { service.check(check).await });
            }
        }
    }

    /// The revocation checks due now (each marked running until it settles).
    pub fn due_checks(&self) -> Vec<Check> {
        self.watches.lock().expect("watches lock").due(Tick::now())
    }

    /// One revocation check: the key manager's answer on the master key,
    /// through one of the data keys cached under it. A refusal evicts every
    /// cached key under that master key (and refuses them until a check
    /// succeeds); success after a refusal forgets the refusals remembered for
    /// keys of that configuration. The sink hears the result either way.
    pub async fn check(&self, check: Check) -> Option<Settled> {
        let Check {
            id,
            provider,
            sample,
            ..
        } = check;
        // Should the task end without settling (a provider that panics), the
        // key is checked again at the next tick instead of never.
        struct Unsettled<'a>(&'a Mutex<Watches>, MasterKeyId, bool);
        impl Drop for Unsettled<'_> {
            fn drop(&mut self) {
                if !self.2
                    && let Ok(mut watches) = self.0.lock()
                {
                    watches.abandon(&self.1);
                }
            }
        }
        let mut guard = Unsettled(&self.watches, id, false);
        let sample = &sample;
        let result = self
            .call(
                &provider,
                &sample.tenant,
                KmsOp::Check,
                Some(sample.dek_id),
                |p, report| async move {
                    p.check_master_key(
                        &sample.wrapped,
                        key_context(&sample.tenant, sample.dek_id, &report),
                    )
                    .await
                },
            )
            .await;
        self.metrics
            .record(provider.provider, &sample.tenant, MetricEvent::KeyCheck);
        let health = match result {
            Ok(()) => KeyHealth::Live,
            Err(e) if is_refusal(e.kind) => KeyHealth::Revoked(e),
            // Unreachable, throttled, or not checkable as configured: not the
            // customer's refusal, so nothing is evicted.
            Err(e) => KeyHealth::Unreachable(e),
        };
        guard.2 = true;
        let settled =
            self.watches
                .lock()
                .expect("watches lock")
                .settle(&id, health, Tick::now())?;
        if matches!(settled.health, KeyHealth::Revoked(_)) {
            // At every check, not only the first: nothing under a revoked
            // key stays cached, whatever raced with the previous eviction.
            self.cache
                .lock()
                .expect("cache lock")
                .remove_where(|key, _| key.master == id);
        }
        if settled.changed {
            match &settled.health {
                KeyHealth::Revoked(_) => {}
                KeyHealth::Live => {
                    let options = options_digest(&provider);
                    self.refusals
                        .lock()
                        .expect("refusals lock")
                        .retain(|key, _| key.options != options);
                }
                KeyHealth::Unchecked | KeyHealth::Unreachable(_) => {}
            }
        }
        self.metrics.key_checked(&settled);
        Some(settled)
    }

    /// Drops a database's (or one tenant's, or one data key's) cached keys and
    /// remembered refusals; the number of cached keys dropped.
    fn flush(&self, database: u32, tenant_id: Option<&str>, dek_id: Option<u64>) -> usize {
        let prefix = tenant_label(database, "");
        let exact = tenant_id.map(|t| tenant_label(database, t));
        let doomed = |key: &CacheKey, label: &str| {
            key.database == database
                && dek_id.is_none_or(|id| key.dek_id == id)
                && match &exact {
                    Some(exact) => label == exact,
                    None => label.starts_with(&prefix),
                }
        };
        let entries = self
            .cache
            .lock()
            .expect("cache lock")
            .remove_where(|key, label| doomed(key, label));
        self.refusals
            .lock()
            .expect("refusals lock")
            .retain(|key, refusal| !doomed(&key.key, &refusal.tenant_label));
        entries
    }

    /// A data key from the shared cache, else from the provider (one call for
    /// all concurrent requests, unless the key was refused a moment ago), else,
    /// while the key manager is unreachable, from the backup key manager
    /// (`backup`) or the cache past its TTL. The flag says whether the key was
    /// served from the cache past its TTL (stale).
    async fn unwrap(
        &self,
        tenant: &TenantRef,
        provider: &ProviderRef,
        dek_id: u64,
        wrapped: &WrappedDek,
        settings: CacheSettings,
        backup: Option<&BackupWrap>,
    ) -> Result<(DataKey, bool), ProviderError> {
        let kind = provider.provider;
        let options = options_digest(provider);
        let key = CacheKey {
            database: tenant.database,
            dek_id,
            digest: digest(tenant, wrapped),
            master: liveness::master_key_id(&options, wrapped),
        };
        let now = Tick::now();
        // (A validation probe's key is discarded at once: it watches nothing,
        // and its settings must not stand in for the tenant's.)
        let probe = dek_id == crate::protocol::PROBE_DEK_ID;
        let watch = |watches: &mut Watches| {
            if !probe {
                watches.touch(key.master, provider, tenant, dek_id, wrapped, settings, now)
            }
        };
        // A master key found revoked: refused without asking the key manager
        // until a check finds it usable again (also a key stored in the cache
        // by a call that raced with the check).
        if let Some(refused) = self.revoked(&key.master, |w| watch(w)) {
            self.cache.lock().expect("cache lock").remove(&key);
            return Err(refused);
        }
        let stale = match self.cached(&key, now) {
            Some((dek, true)) => {
                watch(&mut self.watches.lock().expect("watches lock"));
                self.metrics
                    .record(kind, tenant, MetricEvent::SharedCacheHit);
                return Ok((dek, false));
            }
            Some((dek, false)) => Some(dek),
            None => None,
        };
        self.metrics
            .record(kind, tenant, MetricEvent::SharedCacheMiss);
        let refusal_key = RefusalKey {
            key: key.clone(),
            options,
        };
        if let Some(refused) = self.remembered_refusal(&refusal_key, now) {
            return Err(refused);
        }
        let result = self
            .coalesced(
                key.clone(),
                self.fetch(&key, tenant, provider, wrapped, settings, backup),
            )
            .await;
        self.remember_outcome(refusal_key, tenant, settings, &result);
        match (result, stale) {
            (Ok(dek), _) => Ok((dek, false)),
            // (only an outage: a refusal, the primary's or the backup's, is final)
            (Err(e), Some(dek)) if e.kind.is_availability() => {
                self.metrics.record(kind, tenant, MetricEvent::ServedStale);
                Ok((dek, true))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// A cached data key, and whether it is still fresh (within its TTL).
    fn cached(&self, key: &CacheKey, now: Tick) -> Option<(DataKey, bool)> {
        let mut cache = self.cache.lock().expect("cache lock");
        cache
            .get(key, now)
            .map(|entry| (entry.dek.clone(), now < entry.fresh_until))
    }

    /// The leader's work on a cache miss: the provider's unwrap (or, while it
    /// cannot be reached, the backup's), cached.
    ///
    /// The backup is asked only when the primary is *unavailable*. A refusal
    /// (the key disabled, access denied) is the customer's decision about its
    /// own key: answering it from an escrow copy would route around a
    /// revocation, so it is final.
    async fn fetch(
        &self,
        key: &CacheKey,
        tenant: &TenantRef,
        provider: &ProviderRef,
        wrapped: &WrappedDek,
        settings: CacheSettings,
        backup: Option<&BackupWrap>,
    ) -> Result<DataKey, ProviderError> {
        // Re-check as the leader: a previous leader fills the cache before it
        // leaves the in-flight map, so a request that missed the cache just
        // before that finds the key here instead of calling the provider again.
        if let Some((dek, true)) = self.cached(key, Tick::now()) {
            return Ok(dek);
        }
        let dek_id = key.dek_id;
        let share = match backup {
            Some(_) => BACKUP_TIME_SHARE_PERCENT,
            None => 100,
        };
        let dek = self
            .call_within(
                provider,
                tenant,
                KmsOp::Unwrap,
                Some(dek_id),
                share,
                |p, report| async move {
                    p.unwrap(wrapped, key_context(tenant, dek_id, &report))
                        .await
                },
            )
            .await;
        let dek = match (dek, backup) {
            (Err(e), Some(backup)) if e.kind.is_unreachable() => {
                // The primary stays watched too: once it answers again, its
                // refusal ends what the backup opened (the check at the top of
                // `unwrap` refuses before any cached copy is served).
                if dek_id != crate::protocol::PROBE_DEK_ID {
                    self.watches.lock().expect("watches lock").touch(
                        key.master,
                        provider,
                        tenant,
                        dek_id,
                        wrapped,
                        settings,
                        Tick::now(),
                    );
                }
                return self
                    .fetch_from_backup(tenant, dek_id, backup, settings, share, e)
                    .await;
            }
            (dek, _) => dek?,
        };
        // The tenant joins the key's watch, the revocation is checked and the
        // key stored, all under the watches lock: a check finding the key
        // revoked either settles first (and the key is refused here) or counts
        // this tenant among those whose backends must drop it.
        let mut watches = self.watches.lock().expect("watches lock");
        if dek_id != crate::protocol::PROBE_DEK_ID {
            watches.touch(
                key.master,
                provider,
                tenant,
                dek_id,
                wrapped,
                settings,
                Tick::now(),
            );
        }
        if let Some(refused) = watches.revoked(&key.master) {
            return Err(revocation_error(refused));
        }
        self.store(key.clone(), tenant, &dek, settings);
        Ok(dek)
    }

    /// The backup's unwrap of a key the primary could not be reached for
    /// (`unreachable`, its error). Cached and watched under the backup's
    /// master key. A refusal by the backup is final, like the primary's; when
    /// the backup cannot be reached either, the primary's error is returned
    /// with the backup's in its detail.
    async fn fetch_from_backup(
        &self,
        tenant: &TenantRef,
        dek_id: u64,
        backup: &BackupWrap,
        settings: CacheSettings,
        share: u32,
        unreachable: ProviderError,
    ) -> Result<DataKey, ProviderError> {
        // A key the backup opened earlier in the outage is cached (and
        // watched) under the backup's master key: a revocation there evicts it.
        let key = backup_cache_key(tenant, dek_id, backup);
        let probe = dek_id == crate::protocol::PROBE_DEK_ID;
        let touch = |watches: &mut Watches| {
            if !probe {
                watches.touch(
                    key.master,
                    &backup.provider,
                    tenant,
                    dek_id,
                    &backup.wrapped,
                    settings,
                    Tick::now(),
                )
            }
        };
        if let Some(refused) = self.revoked(&key.master, touch) {
            self.cache.lock().expect("cache lock").remove(&key);
            return Err(refused);
        }
        if let Some((dek, true)) = self.cached(&key, Tick::now()) {
            touch(&mut self.watches.lock().expect("watches lock"));
            return Ok(dek);
        }
        let from_backup = self
            .call_within(
                &backup.provider,
                tenant,
                KmsOp::Unwrap,
                Some(dek_id),
                share,
                |p, report| async move {
                    p.unwrap(&backup.wrapped, key_context(tenant, dek_id, &report))
                        .await
                },
            )
            .await;
        let dek = match from_backup {
            Ok(dek) => dek,
            Err(refusal) if is_refusal(refusal.kind) => return Err(refusal),
            Err(backup_error) => {
                let mut e = unreachable;
                let note = format!(
                    "the backup key manager ({}) failed too: {}",
                    backup.provider.provider.name(),
                    backup_error.message
                );
                e.detail = Some(match e.detail.take() {
                    Some(detail) => format!("{detail}; {note}"),
                    None => note,
                });
                return Err(e);
            }
        };
        let mut watches = self.watches.lock().expect("watches lock");
        touch(&mut watches);
        if let Some(refused) = watches.revoked(&key.master) {
            return Err(revocation_error(refused));
        }
        self.store(key.clone(), tenant, &dek, settings);
        Ok(dek)
    }

    /// The refusal recorded for a revoked master key (after `touch`ing its
    /// watch, so that it lives while keys under it are asked for).
    fn revoked(
        &self,
        master: &MasterKeyId,
        touch: impl FnOnce(&mut Watches),
    ) -> Option<ProviderError> {
        let mut watches = self.watches.lock().expect("watches lock");
        let error = revocation_error(watches.revoked(master)?);
        touch(&mut watches);
        Some(error)
    }

    /// Caches a data key for its tenant's TTL, and keeps it through the grace
    /// period so it can be served while the key manager is down.
    fn store(&self, key: CacheKey, tenant: &TenantRef, dek: &DataKey, settings: CacheSettings) {
        let ttl = Duration::from_secs(settings.ttl_seconds.max(1) as u64);
        let grace = Duration::from_secs(settings.grace_period_seconds as u64);
        let fetched = Tick::now();
        self.cache.lock().expect("cache lock").insert(
            key,
            &tenant_label(tenant.database, &tenant.tenant_id),
            CachedKey {
                dek: dek.clone(),
                fresh_until: fetched + ttl,
            },
            CacheLimits {
                ttl: ttl + grace,
                max_entries: settings.max_entries.max(1) as usize,
            },
            fetched,
        );
    }

    /// A refusal of this key still within its backoff, if any.
    fn remembered_refusal(&self, key: &RefusalKey, now: Tick) -> Option<ProviderError> {
        let refusals = self.refusals.lock().expect("refusals lock");
        let refusal = refusals.get(key)?;
        (now < refusal.until).then(|| {
            let mut error = refusal.error.clone();
            let note = format!(
                "refused by the key manager within the last {} s; asked again after that",
                refusal.backoff.as_secs()
            );
            error.detail = Some(match error.detail.take() {
                Some(detail) => format!("{detail} ({note})"),
                None => note,
            });
            error
        })
    }

    /// Remembers a refusal (doubling its backoff) or forgets one after a success.
    fn remember_outcome(
        &self,
        key: RefusalKey,
        tenant: &TenantRef,
        settings: CacheSettings,
        result: &Result<DataKey, ProviderError>,
    ) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        match result {
            Ok(_) => {
                refusals.remove(&key);
            }
            Err(e) if is_refusal(e.kind) => {
                // Up to the tenant's revocation interval: a key enabled again
                // is used within the bound stated for revocation.
                let max = match settings.revocation_check_seconds {
                    0 => {
                        self.settings
                            .read()
                            .expect("settings lock")
                            .refusal_backoff_max
                    }
                    seconds => Duration::from_secs(seconds as u64),
                }
                .max(REFUSAL_BACKOFF_MIN);
                let backoff = match refusals.get(&key) {
                    Some(previous) => (previous.backoff * 2).min(max),
                    None => REFUSAL_BACKOFF_MIN,
                };
                // Bounded: a flood of distinct bad keys cannot grow it without end.
                if refusals.len() >= MAX_REFUSALS {
                    let now = Tick::now();
                    refusals.retain(|_, r| now < r.until);
                    if refusals.len() >= MAX_REFUSALS {
                        return;
                    }
                }
                refusals.insert(
                    key,
                    Refusal {
                        error: e.clone(),
                        until: Tick::now() + backoff,
                        backoff,
                        tenant_label: tenant_label(tenant.database, &tenant.tenant_id),
                    },
                );
            }
            Err(_) => {}
        }
    }

    /// Runs `call` once for all concurrent requests of the same key.
    async fn coalesced(
        &self,
        key: CacheKey,
        call: impl std::future::Future<Output = Result<DataKey, ProviderError>>,
    ) -> Result<DataKey, ProviderError> {
        let (leader, mut flight) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(&key) {
                Some(flight) => (None, flight.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx.clone());
                    (Some(tx), rx)
                }
            }
        };
        if let Some(tx) = leader {
            let result = call.await;
            self.inflight.lock().expect("inflight lock").remove(&key);
            tx.send_replace(Some(result.clone()));
            return result;
        }
        loop {
            if let Some(result) = flight.borrow().clone() {
                return result;
            }
            if flight.changed().await.is_err() {
                return Err(ProviderError::new(
                    ProviderKind::Local,
                    ErrorKind::Unavailable,
                    "the key manager call this request waited on was abandoned",
                ));
            }
        }
    }

    /// One provider call, bounded by the timeout, recorded in the metrics and
    /// the audit trail (revocation checks are audited only when the key's
    /// health changes: see [`KeyService::check`]).
    async fn call<T, F>(
        &self,
        provider: &ProviderRef,
        tenant: &TenantRef,
        op: KmsOp,
        dek_id: Option<u64>,
        f: impl FnOnce(Arc<dyn KeyProvider>, Arc<CallReport>) -> F,
    ) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        self.call_within(provider, tenant, op, dek_id, 100, f).await
    }

    /// [`call`](Self::call), bounded by `percent` of the provider timeout: an
    /// unwrap with a backup to fall back on gives each key manager a share of
    /// the time the backend waits (`byok.kms_timeout_ms`), so a primary that
    /// hangs still leaves the backup time to answer.
    async fn call_within<T, F>(
        &self,
        provider: &ProviderRef,
        tenant: &TenantRef,
        op: KmsOp,
        dek_id: Option<u64>,
        percent: u32,
        f: impl FnOnce(Arc<dyn KeyProvider>, Arc<CallReport>) -> F,
    ) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let kind = provider.provider;
        let instance = self.instance(kind, provider).await?;
        let timeout = self
            .settings
            .read()
            .expect("settings lock")
            .provider_timeout
            * percent
            / 100;
        let started = Instant::now();
        let report = Arc::new(CallReport::default());
        let result = match tokio::time::timeout(timeout, f(instance, report.clone())).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(
                kind,
                ErrorKind::Unavailable,
                format!(
                    "the key manager did not answer within {} ms",
                    timeout.as_millis()
                ),
            )
            .with_hint("check the key manager's reachability, or raise byok.kms_timeout_ms")),
        };
        let latency = started.elapsed();
        self.metrics.record(
            kind,
            tenant,
            MetricEvent::KmsCall {
                op,
                ok: result.is_ok(),
                latency,
            },
        );
        if op != KmsOp::Check {
            self.metrics.audit(
                kind,
                tenant,
                KmsCallAudit {
                    op,
                    dek_id,
                    ok: result.is_ok(),
                    latency,
                    request_id: report.request_id(),
                    error: result.as_ref().err().map(|e| match &e.detail {
                        Some(detail) => format!("{}: {detail}", e.message),
                        None => e.message.clone(),
                    }),
                    replica: report.replica(),
                    backup: provider.backup,
                },
            );
        }
        if report.replica().is_some() {
            self.metrics
                .record(kind, tenant, MetricEvent::ServedByReplica);
        }
        if provider.backup && op == KmsOp::Unwrap && result.is_ok() {
            self.metrics
                .record(kind, tenant, MetricEvent::ServedByBackup);
        }
        result
    }

    /// The provider for a tenant's settings.
    async fn instance(
        &self,
        kind: ProviderKind,
        provider: &ProviderRef,
    ) -> Result<Arc<dyn KeyProvider>, ProviderError> {
        let settings = self.settings.read().expect("settings lock").clone();
        match kind {
            ProviderKind::Local => Ok(Arc::new(LocalProvider::new(
                &settings.local_key_file,
                provider.create_key_store,
            ))),
            _ => self.remote_client(kind, provider, &settings).await,
        }
    }

    /// The client of a remote key manager for this configuration (and
    /// timeout). Clients are built once per distinct configuration and kept:
    /// they hold connection pools and refreshed credentials.
    async fn remote_client(
        &self,
        kind: ProviderKind,
        provider: &ProviderRef,
        settings: &ServiceSettings,
    ) -> Result<Arc<dyn KeyProvider>, ProviderError> {
        let timeout = settings.provider_timeout;
        let cache_key = format!(
            "{}/{}/{}",
            kind.name(),
            serde_json::Value::Object(provider.options.clone()),
            timeout.as_millis()
        );
        if let Some(client) = self.clients.lock().expect("clients lock").get(&cache_key) {
            return Ok(client.clone());
        }
        let client = connect(kind, &provider.options, timeout, &settings.policy).await?;
        self.clients
            .lock()
            .expect("clients lock")
            .insert(cache_key, client.clone());
        Ok(client)
    }
}

/// A new client of a remote key manager (it checks the configuration against
/// the policy, reads credential files and builds its HTTP client).
async fn connect(
    kind: ProviderKind,
    options: &serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
    policy: &Arc<AccessPolicy>,
) -> Result<Arc<dyn KeyProvider>, ProviderError> {
    let _ = (options, timeout, policy); // unused in builds without remote providers
    match kind {
        #[cfg(feature = "aws")]
        ProviderKind::AwsKms => Ok(Arc::new(
            crate::aws::AwsKmsProvider::from_options(options, timeout, policy).await?,
        )),
        #[cfg(feature = "vault")]
        ProviderKind::Vault => Ok(Arc::new(crate::vault::VaultProvider::from_options(
            options,
            timeout,
            policy.clone(),
        )?)),
        #[cfg(feature = "gcp")]
        ProviderKind::GcpKms => Ok(Arc::new(
            crate::gcp::GcpKmsProvider::from_options(options, timeout, policy.clone()).await?,
        )),
        #[cfg(feature = "azure")]
        ProviderKind::AzureKv => Ok(Arc::new(crate::azure::AzureKvProvider::from_options(
            options,
            timeout,
            policy.clone(),
        )?)),
        // Reached only in builds without some provider features (`local` never
        // comes here).
        other => Err(ProviderError::new(
            other,
            ErrorKind::NotSupported,
            "not available in this build of byok_pg",
        )
        .with_hint("use provider \"local\", or a build that includes this provider")),
    }
}

/// A revocation check's refusal, as the requests it refuses report it.
fn revocation_error(refusal: &ProviderError) -> ProviderError {
    let mut error = refusal.clone();
    let note = "the key manager refused this master key at its last revocation check; \
                it is asked again at the next one";
    error.detail = Some(match error.detail.take() {
        Some(detail) => format!("{detail} ({note})"),
        None => note.to_string(),
    });
    error
}

/// Refusals remembered at most (each a few hundred bytes).
const MAX_REFUSALS: usize = 10_000;

/// A key manager's "no" about a key ([`ErrorKind::is_refusal`]).
fn is_refusal(kind: ErrorKind) -> bool {
    kind.is_refusal()
}

/// What a wrapped data key is bound to, for one call whose facts go to `report`.
fn key_context<'a>(tenant: &'a TenantRef, dek_id: u64, report: &'a CallReport) -> KeyContext<'a> {
    KeyContext {
        tenant_id: &tenant.tenant_id,
        dek_id,
        report,
    }
}

/// The per-tenant label of shared-cache entries: database, then tenant.
fn tenant_label(database: u32, tenant_id: &str) -> String {
    format!("{database}/{tenant_id}")
}

/// Where a key the backup opened is cached: under the backup's wrap and
/// master key.
fn backup_cache_key(tenant: &TenantRef, dek_id: u64, backup: &BackupWrap) -> CacheKey {
    CacheKey {
        database: tenant.database,
        dek_id,
        digest: digest(tenant, &backup.wrapped),
        master: liveness::master_key_id(&options_digest(&backup.provider), &backup.wrapped),
    }
}

fn digest(tenant: &TenantRef, wrapped: &WrappedDek) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        tenant.tenant_id.as_bytes(),
        wrapped.cmk_id.as_bytes(),
        wrapped.cmk_version.as_bytes(),
        &wrapped.blob,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests;
