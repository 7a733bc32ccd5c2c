use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Map;

use super::*;
use crate::local::LocalProvider;
use crate::provider::WrappedDek;

#[derive(Default)]
struct Counting {
    kms_calls: AtomicUsize,
    hits: AtomicUsize,
    misses: AtomicUsize,
    stale: AtomicUsize,
    checks: AtomicUsize,
    by_backup: AtomicUsize,
    audited: std::sync::Mutex<Vec<(TenantRef, KmsCallAudit)>>,
    settled: std::sync::Mutex<Vec<Settled>>,
}

impl MetricsSink for Counting {
    fn record(&self, _: ProviderKind, _: &TenantRef, event: MetricEvent) {
        let counter = match event {
            MetricEvent::KmsCall { .. } => &self.kms_calls,
            MetricEvent::SharedCacheHit => &self.hits,
            MetricEvent::SharedCacheMiss => &self.misses,
            MetricEvent::ServedStale => &self.stale,
            MetricEvent::KeyCheck => &self.checks,
            MetricEvent::ServedByReplica => return,
            MetricEvent::ServedByBackup => &self.by_backup,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn audit(&self, _: ProviderKind, tenant: &TenantRef, call: KmsCallAudit) {
        self.audited.lock().unwrap().push((tenant.clone(), call));
    }

    fn key_checked(&self, settled: &Settled) {
        self.settled.lock().unwrap().push(settled.clone());
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    key_file: PathBuf,
    service: Arc<KeyService>,
    metrics: Arc<Counting>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    let metrics = Arc::new(Counting::default());
    let service = Arc::new(KeyService::new(
        ServiceSettings {
            local_key_file: key_file.clone(),
            policy: Arc::new(crate::policy::AccessPolicy::permissive_for_tests()),
            max_entries: 100,
            provider_timeout: Duration::from_secs(2),
            refusal_backoff_max: Duration::from_secs(4),
        },
        metrics.clone(),
    ));
    Fixture {
        _dir: dir,
        key_file,
        service,
        metrics,
    }
}

fn tenant(t: &str) -> TenantRef {
    TenantRef {
        database: 1,
        tenant_id: t.into(),
        role: 0,
        role_name: String::new(),
    }
}

fn local() -> ProviderRef {
    ProviderRef {
        provider: byok_core::config::ProviderKind::Local,
        options: Map::new(),
        create_key_store: true,
        backup: false,
    }
}

fn settings(ttl: u32, grace: u32) -> CacheSettings {
    CacheSettings {
        ttl_seconds: ttl,
        max_entries: 10,
        grace_period_seconds: grace,
        revocation_check_seconds: 0,
    }
}

/// A wrapped key made directly with the local provider, and its plaintext.
fn wrapped_key(f: &Fixture, t: &str, dek_id: u64) -> (DataKey, WrappedDek) {
    LocalProvider::new(&f.key_file, true)
        .generate_now("cmk", &KeyContext::new(t, dek_id))
        .unwrap()
}

fn unwrap_request(t: &str, dek_id: u64, wrapped: &WrappedDek, cache: CacheSettings) -> Request {
    Request::Unwrap {
        tenant: tenant(t),
        // Only configuring a tenant may create the key store, never reading a key.
        provider: ProviderRef {
            create_key_store: false,
            backup: false,
            ..local()
        },
        dek_id,
        wrapped: wrapped.clone(),
        cache,
        backup: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_one_key_make_one_provider_call() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 7);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let service = f.service.clone();
            let request = unwrap_request("t", 7, &wrapped, settings(60, 0));
            tokio::spawn(async move { service.handle(request).await })
        })
        .collect();
    for task in tasks {
        let outcome = task.await.unwrap();
        assert_eq!(outcome.response, Response::DataKey { stale: false });
        assert_eq!(outcome.data_key.unwrap(), dek);
    }
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 1);
    // Later requests are shared-cache hits.
    f.service
        .handle(unwrap_request("t", 7, &wrapped, settings(60, 0)))
        .await;
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 1);
    assert!(f.metrics.hits.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn expired_entries_are_fetched_again() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    f.service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 0)))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 0)))
        .await;
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn grace_period_serves_cached_keys_while_the_key_store_is_down_then_fails_closed() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 1);
    let (_, wrapped_no_grace) = wrapped_key(&f, "u", 2);
    f.service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 2)))
        .await;
    f.service
        .handle(unwrap_request("u", 2, &wrapped_no_grace, settings(1, 0)))
        .await;
    std::fs::rename(&f.key_file, f.key_file.with_extension("away")).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let outcome = f
        .service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 2)))
        .await;
    assert_eq!(outcome.response, Response::DataKey { stale: true });
    assert_eq!(outcome.data_key.unwrap(), dek);
    assert_eq!(f.metrics.stale.load(Ordering::SeqCst), 1);
    // Without a grace period the expired key is not served.
    let outcome = f
        .service
        .handle(unwrap_request("u", 2, &wrapped_no_grace, settings(1, 0)))
        .await;
    assert!(
        matches!(outcome.response, Response::Failed { ref error } if error.kind == ErrorKind::Unavailable)
    );
    // Past TTL + grace, the service fails closed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let outcome = f
        .service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 2)))
        .await;
    assert!(
        matches!(outcome.response, Response::Failed { ref error } if error.kind == ErrorKind::Unavailable)
    );
    assert!(outcome.data_key.is_none());
}

#[tokio::test]
async fn a_refusal_is_not_papered_over_by_the_grace_period() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    f.service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 60)))
        .await;
    // Another key store: the key manager now refuses this key.
    std::fs::remove_file(&f.key_file).unwrap();
    LocalProvider::open(&f.key_file, true).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let outcome = f
        .service
        .handle(unwrap_request("t", 1, &wrapped, settings(1, 60)))
        .await;
    assert!(
        matches!(outcome.response, Response::Failed { ref error } if error.kind == ErrorKind::UnwrapFailed)
    );
}

#[tokio::test]
async fn refusals_are_remembered_with_a_growing_backoff_then_asked_again() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 1);
    let original = std::fs::read(&f.key_file).unwrap();
    // The key manager refuses this key (another key store: the wrap does not open).
    std::fs::remove_file(&f.key_file).unwrap();
    LocalProvider::open(&f.key_file, true).unwrap();
    let refused = |outcome: &Outcome| matches!(outcome.response, Response::Failed { ref error } if error.kind == ErrorKind::UnwrapFailed);
    let ask = || {
        f.service
            .handle(unwrap_request("t", 1, &wrapped, settings(60, 0)))
    };
    assert!(refused(&ask().await));
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 1);
    // A hundred retries within the backoff cost the key manager nothing.
    for _ in 0..100 {
        let outcome = ask().await;
        assert!(refused(&outcome));
        let Response::Failed { error } = outcome.response else {
            unreachable!()
        };
        assert!(
            error
                .detail
                .unwrap_or_default()
                .contains("refused by the key manager within the last 1 s")
        );
    }
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 1);
    // After 1 s it asks again, is refused again, and waits 2 s this time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(refused(&ask().await));
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(refused(&ask().await));
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 2);
    // The key comes back: used once the backoff passes, and the refusal is forgotten.
    std::fs::write(&f.key_file, &original).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let outcome = ask().await;
    assert_eq!(outcome.response, Response::DataKey { stale: false });
    assert_eq!(outcome.data_key.unwrap(), dek);
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_flush_forgets_refusals_and_a_corrected_configuration_is_asked_at_once() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    let original = std::fs::read(&f.key_file).unwrap();
    std::fs::remove_file(&f.key_file).unwrap();
    LocalProvider::open(&f.key_file, true).unwrap();
    let ask = || {
        f.service
            .handle(unwrap_request("t", 1, &wrapped, settings(60, 0)))
    };
    assert!(matches!(ask().await.response, Response::Failed { .. }));
    std::fs::write(&f.key_file, &original).unwrap();
    assert!(matches!(ask().await.response, Response::Failed { .. }));
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 1);
    f.service
        .handle(Request::Flush {
            database: 1,
            tenant_id: Some("t".into()),
            dek_id: Some(1),
        })
        .await;
    assert_eq!(ask().await.response, Response::DataKey { stale: false });
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_flush_of_one_data_key_leaves_the_others() {
    let f = fixture();
    let (_, first) = wrapped_key(&f, "t", 1);
    let (_, second) = wrapped_key(&f, "t", 2);
    for (id, w) in [(1, &first), (2, &second)] {
        f.service
            .handle(unwrap_request("t", id, w, settings(60, 0)))
            .await;
    }
    let outcome = f
        .service
        .handle(Request::Flush {
            database: 1,
            tenant_id: None,
            dek_id: Some(1),
        })
        .await;
    assert_eq!(outcome.response, Response::Flushed { entries: 1 });
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), 2);
    f.service
        .handle(unwrap_request("t", 2, &second, settings(60, 0)))
        .await;
    assert_eq!(
        f.metrics.kms_calls.load(Ordering::SeqCst),
        2,
        "key 2 stayed cached"
    );
    f.service
        .handle(unwrap_request("t", 1, &first, settings(60, 0)))
        .await;
    assert_eq!(
        f.metrics.kms_calls.load(Ordering::SeqCst),
        3,
        "key 1 was fetched again"
    );
}

#[tokio::test]
async fn flush_drops_a_tenant_or_a_database() {
    let f = fixture();
    let (_, a) = wrapped_key(&f, "a", 1);
    let (_, b) = wrapped_key(&f, "b", 2);
    f.service
        .handle(unwrap_request("a", 1, &a, settings(60, 0)))
        .await;
    f.service
        .handle(unwrap_request("b", 2, &b, settings(60, 0)))
        .await;
    assert_eq!(f.service.cached_entries(), 2);
    let outcome = f
        .service
        .handle(Request::Flush {
            database: 1,
            tenant_id: Some("a".into()),
            dek_id: None,
        })
        .await;
    assert_eq!(outcome.response, Response::Flushed { entries: 1 });
    let outcome = f
        .service
        .handle(Request::Flush {
            database: 2,
            tenant_id: None,
            dek_id: None,
        })
        .await;
    assert_eq!(outcome.response, Response::Flushed { entries: 0 });
    let outcome = f
        .service
        .handle(Request::Flush {
            database: 1,
            tenant_id: None,
            dek_id: None,
        })
        .await;
    assert_eq!(outcome.response, Response::Flushed { entries: 1 });
    assert_eq!(f.service.cached_entries(), 0);
}

#[tokio::test]
async fn a_key_with_the_same_id_but_another_wrapping_is_not_confused() {
    let f = fixture();
    let (dek1, w1) = wrapped_key(&f, "t", 1);
    let (dek2, w2) = wrapped_key(&f, "t", 1);
    assert_ne!(dek1, dek2);
    let o1 = f
        .service
        .handle(unwrap_request("t", 1, &w1, settings(60, 0)))
        .await;
    let o2 = f
        .service
        .handle(unwrap_request("t", 1, &w2, settings(60, 0)))
        .await;
    assert_eq!(o1.data_key.unwrap(), dek1);
    assert_eq!(o2.data_key.unwrap(), dek2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_key_store_times_out() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    f.service.reconfigure(ServiceSettings {
        local_key_file: f.key_file.clone(),
        policy: Arc::new(crate::policy::AccessPolicy::permissive_for_tests()),
        max_entries: 100,
        provider_timeout: Duration::from_millis(300),
        refusal_backoff_max: Duration::from_secs(4),
    });
    // A FIFO without a writer: opening it blocks, like a key manager that never answers.
    std::fs::remove_file(&f.key_file).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&f.key_file)
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let outcome = f
        .service
        .handle(unwrap_request("t", 1, &wrapped, settings(60, 0)))
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    match outcome.response {
        Response::Failed { error } => {
            assert_eq!(error.kind, ErrorKind::Unavailable);
            assert!(
                error.message.contains("did not answer within 300 ms"),
                "{}",
                error.message
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Release the blocked reader so the test's blocking thread ends.
    let _ = std::fs::OpenOptions::new().write(true).open(&f.key_file);
}

#[tokio::test]
async fn rewrap_moves_a_key_to_another_master_key_without_changing_it() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 4);
    let outcome = f
        .service
        .handle(Request::Rewrap {
            tenant: tenant("t"),
            provider: local(),
            dek_id: 4,
            wrapped: wrapped.clone(),
            new_cmk_id: "cmk-2".into(),
        })
        .await;
    let Response::Generated {
        wrapped: rewrapped, ..
    } = outcome.response
    else {
        panic!("expected a rewrapped key")
    };
    assert!(
        outcome.data_key.is_none(),
        "a rewrap never hands out the plaintext"
    );
    assert_eq!(rewrapped.cmk_id, "cmk-2");
    assert_ne!(rewrapped.blob, wrapped.blob);
    let opened = f
        .service
        .handle(unwrap_request("t", 4, &rewrapped, settings(60, 0)))
        .await;
    assert_eq!(opened.data_key.unwrap(), dek);
    // Still bound to its tenant and id.
    let moved = f
        .service
        .handle(Request::Rewrap {
            tenant: tenant("other"),
            provider: local(),
            dek_id: 4,
            wrapped,
            new_cmk_id: "cmk-2".into(),
        })
        .await;
    assert!(
        matches!(moved.response, Response::Failed { ref error } if error.kind == ErrorKind::UnwrapFailed)
    );
}

#[tokio::test]
async fn validate_and_generate_and_misconfigured_providers() {
    let f = fixture();
    let outcome = f
        .service
        .handle(Request::Validate {
            tenant: tenant("t"),
            provider: local(),
            cmk_id: "cmk".into(),
        })
        .await;
    assert!(
        matches!(outcome.response, Response::KeyInfo { ref info } if info.enabled && info.can_wrap)
    );
    let outcome = f
        .service
        .handle(Request::Generate {
            tenant: tenant("t"),
            provider: local(),
            dek_id: 3,
            cmk_id: "cmk".into(),
            backup: None,
        })
        .await;
    let Response::Generated { wrapped, .. } = outcome.response else {
        panic!("expected a generated key")
    };
    assert!(outcome.data_key.is_none());
    let unwrapped = f
        .service
        .handle(unwrap_request("t", 3, &wrapped, settings(60, 0)))
        .await;
    assert!(unwrapped.data_key.is_some());
    let outcome = f
        .service
        .handle(Request::Validate {
            tenant: tenant("t"),
            provider: ProviderRef {
                provider: byok_core::config::ProviderKind::GcpKms,
                options: Map::new(),
                create_key_store: false,
                backup: false,
            },
            cmk_id: "arn".into(),
        })
        .await;
    // A remote provider's block is checked by the provider before any call.
    assert!(
        matches!(outcome.response, Response::Failed { ref error }
            if error.kind == ErrorKind::Misconfigured && error.message.contains("encryption.gcp_kms: missing field")),
        "{:?}",
        outcome.response
    );
}

#[tokio::test]
async fn every_provider_call_is_audited_once_with_its_key_role_and_error() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 3);
    let mut request = unwrap_request("t", 3, &wrapped, settings(60, 0));
    if let Request::Unwrap { tenant, .. } = &mut request {
        tenant.role = 42;
    }
    f.service.handle(request.clone()).await;
    // A shared-cache hit calls no provider, so it is not a key-manager event.
    f.service.handle(request).await;
    // A wrapped key presented as another key id fails authentication.
    let outcome = f
        .service
        .handle(unwrap_request("t", 4, &wrapped, settings(60, 0)))
        .await;
    assert!(matches!(outcome.response, Response::Failed { .. }));
    let audited = f.audited_calls();
    assert_eq!(audited.len(), 2, "{audited:?}");
    let (tenant, first) = &audited[0];
    assert_eq!((tenant.tenant_id.as_str(), tenant.role), ("t", 42));
    assert_eq!(
        (first.op, first.dek_id, first.ok),
        (KmsOp::Unwrap, Some(3), true)
    );
    assert!(first.error.is_none());
    let (_, second) = &audited[1];
    assert_eq!((second.dek_id, second.ok), (Some(4), false));
    assert!(second.error.as_deref().is_some_and(|e| !e.is_empty()));
    // The local provider has no request ids; AWS's are checked against moto.
    assert!(first.request_id.is_none());
}

impl Fixture {
    fn audited_calls(&self) -> Vec<(TenantRef, KmsCallAudit)> {
        self.metrics.audited.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// Revocation checks (`liveness`).

fn checked(ttl: u32, every: u32) -> CacheSettings {
    CacheSettings {
        revocation_check_seconds: every,
        ..settings(ttl, 0)
    }
}

/// Revokes (or with `false` restores) local master key "cmk".
fn revoke_local(f: &Fixture, revoked: bool) {
    let list = LocalProvider::new(&f.key_file, false).revocation_list();
    if revoked {
        std::fs::write(&list, "# disabled by the customer\ncmk\n").unwrap();
    } else {
        std::fs::remove_file(&list).unwrap();
    }
}

fn failed_with(outcome: &Outcome, kind: ErrorKind) -> bool {
    matches!(outcome.response, Response::Failed { ref error } if error.kind == kind)
}

/// Runs the checks due until `settled` holds, for at most ten seconds: a
/// loaded machine may take well over one check interval, and the bound on
/// how fast a revocation takes effect is measured by the revocation drills.
async fn run_checks_until(f: &Fixture, settled: impl Fn(&Fixture) -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !settled(f) && std::time::Instant::now() < end {
        for check in f.service.due_checks() {
            f.service.check(check).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn last_settled(f: &Fixture) -> Option<Settled> {
    f.metrics.settled.lock().unwrap().last().cloned()
}

/// Runs the checks due until `time` passes.
async fn run_checks_for(f: &Fixture, time: Duration) {
    let end = std::time::Instant::now() + time;
    while std::time::Instant::now() < end {
        for check in f.service.due_checks() {
            f.service.check(check).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_revoked_master_key_is_evicted_and_refused_within_one_interval_then_recovers() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 1);
    let ask = || {
        f.service
            .handle(unwrap_request("t", 1, &wrapped, checked(86_400, 1)))
    };
    assert_eq!(ask().await.data_key.unwrap(), dek);
    assert_eq!(f.service.watched_master_keys(), 1);
    run_checks_until(&f, |f| f.metrics.checks.load(Ordering::SeqCst) >= 1).await;
    assert!(f.metrics.checks.load(Ordering::SeqCst) >= 1);
    assert!(
        f.metrics
            .settled
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.health == KeyHealth::Live && !s.changed)
    );

    // The customer disables the key: within one interval it is refused, the
    // cached key is gone, and the change was reported once.
    revoke_local(&f, true);
    run_checks_until(&f, |f| f.service.cached_entries() == 0).await;
    assert_eq!(f.service.cached_entries(), 0, "evicted despite a 24 h TTL");
    let changes: Vec<Settled> = f
        .metrics
        .settled
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.changed)
        .cloned()
        .collect();
    assert_eq!(changes.len(), 1);
    assert!(
        matches!(changes[0].health, KeyHealth::Revoked(ref e) if e.kind == ErrorKind::KeyDisabled)
    );
    assert_eq!(changes[0].tenants.len(), 1);
    let outcome = ask().await;
    assert!(failed_with(&outcome, ErrorKind::KeyDisabled));
    assert!(outcome.data_key.is_none());

    // Requests meanwhile cost the key manager nothing.
    let calls = f.metrics.kms_calls.load(Ordering::SeqCst);
    for _ in 0..100 {
        assert!(failed_with(&ask().await, ErrorKind::KeyDisabled));
    }
    assert_eq!(f.metrics.kms_calls.load(Ordering::SeqCst), calls);

    // Enabled again: usable within one interval, without anyone's help.
    revoke_local(&f, false);
    run_checks_until(&f, |f| {
        last_settled(f).is_some_and(|s| s.health == KeyHealth::Live)
    })
    .await;
    assert_eq!(ask().await.data_key.unwrap(), dek);
    let last = f.metrics.settled.lock().unwrap().last().cloned().unwrap();
    assert!(last.health == KeyHealth::Live);
    assert!(
        f.metrics
            .settled
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.changed && s.health == KeyHealth::Live)
    );
}

#[tokio::test]
async fn an_outage_is_not_a_revocation() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 1);
    let ask = || {
        f.service
            .handle(unwrap_request("t", 1, &wrapped, checked(86_400, 1)))
    };
    ask().await;
    std::fs::rename(&f.key_file, f.key_file.with_extension("away")).unwrap();
    run_checks_until(&f, |f| {
        last_settled(f).is_some_and(|s| s.health != KeyHealth::Live)
    })
    .await;
    let last = f.metrics.settled.lock().unwrap().last().cloned().unwrap();
    assert!(
        matches!(last.health, KeyHealth::Unreachable(ref e) if e.kind == ErrorKind::Unavailable)
    );
    assert!(last.changed);
    // Still cached, still served.
    assert_eq!(f.service.cached_entries(), 1);
    assert_eq!(ask().await.data_key.unwrap(), dek);
    std::fs::rename(f.key_file.with_extension("away"), &f.key_file).unwrap();
    run_checks_until(&f, |f| {
        last_settled(f).is_some_and(|s| s.health == KeyHealth::Live)
    })
    .await;
    assert_eq!(
        f.metrics.settled.lock().unwrap().last().unwrap().health,
        KeyHealth::Live
    );
}

#[tokio::test]
async fn one_check_per_master_key_per_interval_whatever_the_tenants_and_keys() {
    let f = fixture();
    // Three tenants with two data keys each, all under master key "cmk".
    for (n, t) in ["a", "b", "c"].iter().enumerate() {
        for k in 0..2 {
            let dek_id = (n * 2 + k) as u64;
            let (_, wrapped) = wrapped_key(&f, t, dek_id);
            for _ in 0..5 {
                f.service
                    .handle(unwrap_request(t, dek_id, &wrapped, checked(86_400, 1)))
                    .await;
            }
        }
    }
    assert_eq!(f.service.watched_master_keys(), 1);
    run_checks_for(&f, Duration::from_millis(3050)).await;
    let checks = f.metrics.checks.load(Ordering::SeqCst);
    // At most one check per interval (plus the first, due at once); at least
    // one even on a machine too loaded to keep the schedule.
    assert!((1..=4).contains(&checks), "{checks} checks in 3 s at 1 s");
    // A revocation concerns every tenant using the key.
    revoke_local(&f, true);
    run_checks_until(&f, |f| last_settled(f).is_some_and(|s| s.changed)).await;
    let settled = f.metrics.settled.lock().unwrap().last().cloned().unwrap();
    assert!(settled.changed);
    assert_eq!(
        settled
            .tenants
            .iter()
            .map(|t| t.tenant_id.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(f.service.cached_entries(), 0);
}

#[tokio::test]
async fn checks_are_off_at_zero_and_watches_end_with_the_keys() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    f.service
        .handle(unwrap_request("t", 1, &wrapped, checked(1, 0)))
        .await;
    run_checks_for(&f, Duration::from_millis(1200)).await;
    assert_eq!(f.metrics.checks.load(Ordering::SeqCst), 0);
    // Past TTL (and grace) no cache can hold the key: the watch is forgotten.
    f.service.due_checks();
    assert_eq!(f.service.watched_master_keys(), 0);
}

#[tokio::test]
async fn a_validation_probe_neither_watches_nor_turns_off_the_tenants_checks() {
    let f = fixture();
    let (_, wrapped) = wrapped_key(&f, "t", 1);
    let (_, probe) = wrapped_key(&f, "t", crate::protocol::PROBE_DEK_ID);
    f.service
        .handle(unwrap_request("t", 1, &wrapped, checked(86_400, 1)))
        .await;
    f.service
        .handle(unwrap_request(
            "t",
            crate::protocol::PROBE_DEK_ID,
            &probe,
            checked(1, 0),
        ))
        .await;
    run_checks_until(&f, |f| f.metrics.checks.load(Ordering::SeqCst) >= 1).await;
    assert!(f.metrics.checks.load(Ordering::SeqCst) >= 1);
    assert_eq!(f.service.watched_master_keys(), 1);
}

/// The tenant's backup: another local master key, flagged as the backup.
fn local_backup() -> BackupTarget {
    BackupTarget {
        provider: ProviderRef {
            create_key_store: false,
            backup: true,
            ..local()
        },
        cmk_id: "cmk-escrow".into(),
    }
}

/// A primary key manager that cannot be reached: a Vault nobody listens for.
fn unreachable_primary(f: &Fixture) -> ProviderRef {
    let token = f.key_file.with_file_name("token");
    std::fs::write(&token, "t").unwrap();
    let options = serde_json::json!({
        "address": "http://127.0.0.1:9", "key_name": "cmk",
        "auth": {"method": "token", "token_file": token},
    });
    ProviderRef {
        provider: ProviderKind::Vault,
        options: options.as_object().unwrap().clone(),
        create_key_store: false,
        backup: false,
    }
}

/// A data key generated under "cmk" and "cmk-escrow" at once.
async fn generated_with_backup(f: &Fixture, t: &str, dek_id: u64) -> (WrappedDek, WrappedDek) {
    let outcome = f
        .service
        .handle(Request::Generate {
            tenant: tenant(t),
            provider: local(),
            dek_id,
            cmk_id: "cmk".into(),
            backup: Some(local_backup()),
        })
        .await;
    let Response::Generated {
        wrapped,
        backup: Some(backup),
    } = outcome.response
    else {
        panic!("expected two wraps: {:?}", outcome.response)
    };
    (wrapped, backup)
}

#[tokio::test]
async fn a_key_generated_with_a_backup_has_two_wraps_of_the_same_key() {
    let f = fixture();
    let (primary, backup) = generated_with_backup(&f, "t", 5).await;
    assert_eq!(primary.cmk_id, "cmk");
    assert_eq!(backup.cmk_id, "cmk-escrow");
    let provider = LocalProvider::new(&f.key_file, false);
    let context = KeyContext::new("t", 5);
    assert_eq!(
        provider.unwrap_now(&primary, &context).unwrap(),
        provider.unwrap_now(&backup, &context).unwrap()
    );
    let audited = f.metrics.audited.lock().unwrap();
    let ops: Vec<(KmsOp, bool)> = audited.iter().map(|(_, c)| (c.op, c.backup)).collect();
    assert_eq!(ops, [(KmsOp::Generate, false), (KmsOp::Wrap, true)]);
}

#[tokio::test]
async fn no_key_is_made_without_its_backup_wrap() {
    let f = fixture();
    generated_with_backup(&f, "t", 1).await;
    let list = LocalProvider::new(&f.key_file, false).revocation_list();
    std::fs::write(&list, "cmk-escrow\n").unwrap();
    let outcome = f
        .service
        .handle(Request::Generate {
            tenant: tenant("t"),
            provider: local(),
            dek_id: 2,
            cmk_id: "cmk".into(),
            backup: Some(local_backup()),
        })
        .await;
    assert!(
        failed_with(&outcome, ErrorKind::KeyDisabled),
        "{:?}",
        outcome.response
    );
}

#[tokio::test]
async fn the_backup_unwraps_only_while_the_primary_is_unreachable() {
    let f = fixture();
    let (primary, backup) = generated_with_backup(&f, "t", 6).await;
    let dek = LocalProvider::new(&f.key_file, false)
        .unwrap_now(&primary, &KeyContext::new("t", 6))
        .unwrap();
    let backup_wrap = BackupWrap {
        provider: local_backup().provider,
        wrapped: backup.clone(),
    };
    // The primary cannot be reached: the backup answers, counted and audited.
    let request = Request::Unwrap {
        tenant: tenant("t"),
        provider: unreachable_primary(&f),
        dek_id: 6,
        wrapped: primary.clone(),
        cache: settings(60, 0),
        backup: Some(backup_wrap.clone()),
    };
    let outcome = f.service.handle(request.clone()).await;
    assert_eq!(outcome.data_key.expect("served by the backup"), dek);
    assert_eq!(f.metrics.by_backup.load(Ordering::SeqCst), 1);
    let backup_calls: Vec<KmsCallAudit> = f
        .metrics
        .audited
        .lock()
        .unwrap()
        .iter()
        .map(|(_, c)| c.clone())
        .filter(|c| c.op == KmsOp::Unwrap)
        .collect();
    assert_eq!(
        backup_calls.len(),
        2,
        "the primary's failure, then the backup"
    );
    assert!(!backup_calls[0].ok && !backup_calls[0].backup);
    assert!(backup_calls[1].ok && backup_calls[1].backup);
    // Cached like any other key: the next request costs nothing.
    f.service.handle(request).await.data_key.unwrap();
    assert_eq!(f.metrics.by_backup.load(Ordering::SeqCst), 1);

    // The primary refuses (the customer disabled its key): final, whatever
    // the backup could say.
    revoke_local(&f, true);
    let outcome = f
        .service
        .handle(Request::Unwrap {
            tenant: tenant("t"),
            provider: local(),
            dek_id: 6,
            wrapped: primary.clone(),
            cache: settings(60, 0),
            backup: Some(backup_wrap.clone()),
        })
        .await;
    assert!(failed_with(&outcome, ErrorKind::KeyDisabled));
    assert_eq!(
        f.metrics.by_backup.load(Ordering::SeqCst),
        1,
        "backup not asked"
    );

    // The primary unreachable and the backup refusing (its key disabled): the
    // backup's refusal, not an outage, even with a stale copy at hand.
    let list = LocalProvider::new(&f.key_file, false).revocation_list();
    std::fs::write(&list, "cmk-escrow\n").unwrap();
    let outcome = f
        .service
        .handle(Request::Unwrap {
            tenant: tenant("t"),
            provider: unreachable_primary(&f),
            dek_id: 61,
            wrapped: primary.clone(),
            cache: settings(1, 3600),
            backup: Some(BackupWrap {
                provider: local_backup().provider,
                wrapped: backup.clone(),
            }),
        })
        .await;
    assert!(
        failed_with(&outcome, ErrorKind::KeyDisabled)
            || failed_with(&outcome, ErrorKind::UnwrapFailed),
        "{:?}",
        outcome.response
    );
    std::fs::remove_file(&list).unwrap();

    // Both unreachable: the primary's error, the backup's failure in its detail.
    std::fs::rename(&f.key_file, f.key_file.with_extension("away")).unwrap();
    let outcome = f
        .service
        .handle(Request::Unwrap {
            tenant: tenant("t"),
            provider: unreachable_primary(&f),
            dek_id: 60,
            wrapped: backup.clone(),
            cache: settings(60, 0),
            backup: Some(backup_wrap),
        })
        .await;
    let Response::Failed { error } = outcome.response else {
        panic!("both down")
    };
    assert_eq!(error.kind, ErrorKind::Unavailable);
    assert!(
        error
            .detail
            .unwrap_or_default()
            .contains("the backup key manager (local) failed too"),
    );
}

#[tokio::test]
async fn copy_wrap_adds_a_backup_wrap_to_an_existing_key() {
    let f = fixture();
    let (dek, wrapped) = wrapped_key(&f, "t", 8);
    let outcome = f
        .service
        .handle(Request::CopyWrap {
            tenant: tenant("t"),
            dek_id: 8,
            from: local(),
            wrapped,
            to: local_backup().provider,
            cmk_id: "cmk-escrow".into(),
        })
        .await;
    assert!(outcome.data_key.is_none(), "never hands out the plaintext");
    let Response::Generated { wrapped: copy, .. } = outcome.response else {
        panic!("expected the backup wrap")
    };
    assert_eq!(copy.cmk_id, "cmk-escrow");
    let opened = LocalProvider::new(&f.key_file, false)
        .unwrap_now(&copy, &KeyContext::new("t", 8))
        .unwrap();
    assert_eq!(opened, dek);
}
