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
use crate::protocol::{CacheSettings, ErrorWire, ProviderRef, Request, Response, TenantRef};
use crate::provider::{CallReport, KeyContext, KeyProvider};

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

/// First wait after a refusal; doubled on each repeat up to `refusal_backoff_max`.
pub const REFUSAL_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Key-manager operations, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsOp {
    Unwrap,
    Generate,
    Rewrap,
    Validate,
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
}

pub trait MetricsSink: Send + Sync {
    fn record(&self, provider: ProviderKind, tenant: &TenantRef, event: MetricEvent);

    /// Called once per key-manager call, after it ends. Runs on a runtime
    /// thread: it may only touch plain memory.
    fn audit(&self, _provider: ProviderKind, _tenant: &TenantRef, _call: KmsCallAudit) {}
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
            } => match self
                .unwrap(&tenant, &provider, dek_id, &wrapped, cache)
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
            } => {
                let tenant_id = tenant.tenant_id.as_str();
                let cmk_id = cmk_id.as_str();
                let result = self
                    .call(
                        &provider,
                        &tenant,
                        KmsOp::Generate,
                        Some(dek_id),
                        |p, report| async move {
                            let context = KeyContext {
                                tenant_id,
                                dek_id,
                                report: &report,
                            };
                            p.generate_data_key(cmk_id, context).await
                        },
                    )
                    .await;
                match result {
                    // The new key's plaintext is not needed by the caller: it is
                    // unwrapped (and cached) on first use like any other.
                    Ok((_dek, wrapped)) => Outcome {
                        response: Response::Generated { wrapped },
                        data_key: None,
                    },
                    Err(e) => Outcome::failed(&e),
                }
            }
            Request::Validate {
                tenant,
                provider,
                cmk_id,
            } => {
                let cmk_id = cmk_id.as_str();
                let result = self
                    .call(
                        &provider,
                        &tenant,
                        KmsOp::Validate,
                        None,
                        |p, _report| async move { p.describe_master_key(cmk_id).await },
                    )
                    .await;
                match result {
                    Ok(info) => Outcome {
                        response: Response::KeyInfo { info },
                        data_key: None,
                    },
                    Err(e) => Outcome::failed(&e),
                }
            }
            Request::Rewrap {
                tenant,
                provider,
                dek_id,
                wrapped,
                new_cmk_id,
            } => {
                let tenant_id = tenant.tenant_id.as_str();
                let (wrapped_ref, new_cmk) = (&wrapped, new_cmk_id.as_str());
                let result = self
                    .call(
                        &provider,
                        &tenant,
                        KmsOp::Rewrap,
                        Some(dek_id),
                        |p, report| async move {
                            let context = KeyContext {
                                tenant_id,
                                dek_id,
                                report: &report,
                            };
                            p.rewrap(wrapped_ref, new_cmk, context).await
                        },
                    )
                    .await;
                match result {
                    Ok(wrapped) => Outcome {
                        response: Response::Generated { wrapped },
                        data_key: None,
                    },
                    Err(e) => Outcome::failed(&e),
                }
            }
            Request::Flush {
                database,
                tenant_id,
                dek_id,
            } => {
                let prefix = tenant_label(database, "");
                let exact = tenant_id.map(|t| tenant_label(database, &t));
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
                Outcome {
                    response: Response::Flushed {
                        entries: entries as u64,
                    },
                    data_key: None,
                }
            }
        }
    }

    async fn unwrap(
        &self,
        tenant: &TenantRef,
        provider: &ProviderRef,
        dek_id: u64,
        wrapped: &crate::provider::WrappedDek,
        settings: CacheSettings,
    ) -> Result<(DataKey, bool), ProviderError> {
        let kind = provider.provider;
        let key = CacheKey {
            database: tenant.database,
            dek_id,
            digest: digest(tenant, wrapped),
        };
        let now = Tick::now();
        let stale = {
            let mut cache = self.cache.lock().expect("cache lock");
            match cache.get(&key, now) {
                Some(entry) if now < entry.fresh_until => {
                    self.metrics
                        .record(kind, tenant, MetricEvent::SharedCacheHit);
                    return Ok((entry.dek.clone(), false));
                }
                Some(entry) => Some(entry.dek.clone()),
                None => None,
            }
        };
        self.metrics
            .record(kind, tenant, MetricEvent::SharedCacheMiss);

        let refusal_key = RefusalKey {
            key: key.clone(),
            options: options_digest(provider),
        };
        if let Some(refused) = self.remembered_refusal(&refusal_key, now) {
            return Err(refused);
        }
        let result = self
            .coalesced(key.clone(), async {
                // Re-check as the leader: a previous leader fills the cache before it
                // leaves the in-flight map, so a request that missed the cache just
                // before that finds the key here instead of calling the provider again.
                let now = Tick::now();
                if let Some(entry) = self.cache.lock().expect("cache lock").get(&key, now)
                    && now < entry.fresh_until
                {
                    return Ok(entry.dek.clone());
                }
                let result = self
                    .call(
                        provider,
                        tenant,
                        KmsOp::Unwrap,
                        Some(dek_id),
                        |p, report| async move {
                            let context = KeyContext {
                                tenant_id: &tenant.tenant_id,
                                dek_id,
                                report: &report,
                            };
                            p.unwrap(wrapped, context).await
                        },
                    )
                    .await;
                if let Ok(dek) = &result {
                    let ttl = Duration::from_secs(settings.ttl_seconds.max(1) as u64);
                    let grace = Duration::from_secs(settings.grace_period_seconds as u64);
                    let fetched = Tick::now();
                    self.cache.lock().expect("cache lock").insert(
                        key.clone(),
                        &tenant_label(tenant.database, &tenant.tenant_id),
                        CachedKey {
                            dek: dek.clone(),
                            fresh_until: fetched + ttl,
                        },
                        // Kept through the grace period, so it can be served if the KMS is down.
                        CacheLimits {
                            ttl: ttl + grace,
                            max_entries: settings.max_entries.max(1) as usize,
                        },
                        fetched,
                    );
                }
                result
            })
            .await;
        self.remember_outcome(refusal_key, tenant, &result);
        match (result, stale) {
            (Ok(dek), _) => Ok((dek, false)),
            (Err(e), Some(dek)) if e.kind.is_availability() => {
                self.metrics.record(kind, tenant, MetricEvent::ServedStale);
                Ok((dek, true))
            }
            (Err(e), _) => Err(e),
        }
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
        result: &Result<DataKey, ProviderError>,
    ) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        match result {
            Ok(_) => {
                refusals.remove(&key);
            }
            Err(e) if is_refusal(e.kind) => {
                let max = self
                    .settings
                    .read()
                    .expect("settings lock")
                    .refusal_backoff_max
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

    /// One provider call, bounded by the timeout and recorded in the metrics.
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
        let kind = provider.provider;
        let instance = self.instance(kind, provider).await?;
        let timeout = self
            .settings
            .read()
            .expect("settings lock")
            .provider_timeout;
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
            },
        );
        if report.replica().is_some() {
            self.metrics
                .record(kind, tenant, MetricEvent::ServedByReplica);
        }
        result
    }

    /// The provider for a tenant's settings. Clients of remote key managers are
    /// built once per distinct configuration and kept: they hold connection pools
    /// and refreshed credentials.
    async fn instance(
        &self,
        kind: ProviderKind,
        provider: &ProviderRef,
    ) -> Result<Arc<dyn KeyProvider>, ProviderError> {
        let settings = self.settings.read().expect("settings lock").clone();
        let timeout = settings.provider_timeout;
        let policy = settings.policy.clone();
        let options = &provider.options;
        match kind {
            ProviderKind::Local => Ok(Arc::new(LocalProvider::new(
                &settings.local_key_file,
                provider.create_key_store,
            ))),
            #[cfg(feature = "aws")]
            ProviderKind::AwsKms => {
                self.cached_client(kind, provider, timeout, async {
                    Ok(Arc::new(
                        crate::aws::AwsKmsProvider::from_options(options, timeout, &policy).await?,
                    ) as Arc<dyn KeyProvider>)
                })
                .await
            }
            #[cfg(feature = "vault")]
            ProviderKind::Vault => {
                self.cached_client(kind, provider, timeout, async {
                    Ok(Arc::new(crate::vault::VaultProvider::from_options(
                        options,
                        timeout,
                        policy.clone(),
                    )?) as Arc<dyn KeyProvider>)
                })
                .await
            }
            #[cfg(feature = "gcp")]
            ProviderKind::GcpKms => {
                self.cached_client(kind, provider, timeout, async {
                    Ok(Arc::new(
                        crate::gcp::GcpKmsProvider::from_options(options, timeout, policy.clone())
                            .await?,
                    ) as Arc<dyn KeyProvider>)
                })
                .await
            }
            #[cfg(feature = "azure")]
            ProviderKind::AzureKv => {
                self.cached_client(kind, provider, timeout, async {
                    Ok(Arc::new(crate::azure::AzureKvProvider::from_options(
                        options,
                        timeout,
                        policy.clone(),
                    )?) as Arc<dyn KeyProvider>)
                })
                .await
            }
            // Reached only in builds without some provider features.
            #[allow(unreachable_patterns)]
            other => Err(ProviderError::new(
                other,
                ErrorKind::NotSupported,
                "not available in this build of byok_pg",
            )
            .with_hint("use provider \"local\", or a build that includes this provider")),
        }
    }

    /// The client for this provider configuration (and timeout), built by `build`
    /// the first time and kept.
    #[allow(dead_code)] // unused in builds without remote providers
    async fn cached_client(
        &self,
        kind: ProviderKind,
        provider: &ProviderRef,
        timeout: Duration,
        build: impl std::future::Future<Output = Result<Arc<dyn KeyProvider>, ProviderError>>,
    ) -> Result<Arc<dyn KeyProvider>, ProviderError> {
        let cache_key = format!(
            "{}/{}/{}",
            kind.name(),
            serde_json::Value::Object(provider.options.clone()),
            timeout.as_millis()
        );
        if let Some(client) = self.clients.lock().expect("clients lock").get(&cache_key) {
            return Ok(client.clone());
        }
        let client = build.await?;
        self.clients
            .lock()
            .expect("clients lock")
            .insert(cache_key, client.clone());
        Ok(client)
    }
}

/// Refusals remembered at most (each a few hundred bytes).
const MAX_REFUSALS: usize = 10_000;

/// A key manager's "no" about a key, as opposed to its being unreachable.
fn is_refusal(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::AccessDenied
            | ErrorKind::KeyDisabled
            | ErrorKind::KeyNotFound
            | ErrorKind::UnwrapFailed
    )
}

/// The per-tenant label of shared-cache entries: database, then tenant.
fn tenant_label(database: u32, tenant_id: &str) -> String {
    format!("{database}/{tenant_id}")
}

fn digest(tenant: &TenantRef, wrapped: &crate::provider::WrappedDek) -> [u8; 32] {
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
