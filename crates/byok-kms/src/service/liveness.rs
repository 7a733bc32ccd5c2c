//! Liveness of master keys: the key broker's revocation check.
//!
//! A cached data key stays usable for its tenant's TTL (24 hours by default)
//! in the shared cache and in every backend. So that a customer who disables
//! its master key, or withdraws our permission, is obeyed within seconds and
//! not at the next expiry, the broker asks the key manager, every
//! `revocation_check_seconds`, whether each master key protecting a cached data
//! key may still be used ([`crate::KeyProvider::check_master_key`]).
//!
//! - One check per master key per interval, whatever the number of tenants,
//!   data keys and sessions behind it: keys are *watched* per master key (the
//!   provider, its configuration, the key id and version: a key manager may
//!   disable one version and not another), not per data key.
//! - Checks are spread over the interval: a master key's first check comes at a
//!   point of the interval taken from its id, then every interval after it.
//! - A watch lives as long as any cache could hold a key it protects (the last
//!   use plus TTL and grace period), then is forgotten.
//! - What a check finds is the key's [`KeyHealth`]: a refusal makes it
//!   `Revoked` (the service then evicts and refuses every key under it without
//!   asking the key manager, until a check succeeds again); an outage makes it
//!   `Unreachable`, which changes nothing else (the grace-period rules apply).
//!
//! Plain data structures; the service (`super`) runs the checks.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use byok_core::clock::Tick;
use sha2::{Digest, Sha256};

use crate::error::ProviderError;
use crate::protocol::{CacheSettings, ProviderRef, TenantRef};
use crate::provider::WrappedDek;

/// A master key as the broker checks it: the provider, its configuration, the
/// key id and its version (a digest of the four).
pub type MasterKeyId = [u8; 32];

pub fn master_key_id(options_digest: &[u8; 32], wrapped: &WrappedDek) -> MasterKeyId {
    let mut h = Sha256::new();
    h.update(options_digest);
    for part in [&wrapped.cmk_id, &wrapped.cmk_version] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// How often a key found revoked (or unreachable) is checked again when no
/// tenant asks for checks any more: a key the customer enables again must not
/// stay refused for good.
pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(30);

/// What the last check of a master key found.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyHealth {
    /// Not checked yet since it was first used.
    Unchecked,
    /// The key manager let us use the key.
    Live,
    /// The key manager refused: disabled, scheduled for deletion, destroyed,
    /// permission removed, wrong key. Every key under it is refused.
    Revoked(ProviderError),
    /// The key manager did not answer (or throttled us): nothing is evicted.
    Unreachable(ProviderError),
}

impl KeyHealth {
    pub fn name(&self) -> &'static str {
        match self {
            KeyHealth::Unchecked => "unchecked",
            KeyHealth::Live => "ok",
            KeyHealth::Revoked(_) => "revoked",
            KeyHealth::Unreachable(_) => "unreachable",
        }
    }

    pub fn error(&self) -> Option<&ProviderError> {
        match self {
            KeyHealth::Revoked(e) | KeyHealth::Unreachable(e) => Some(e),
            KeyHealth::Unchecked | KeyHealth::Live => None,
        }
    }

    fn same_state(&self, other: &KeyHealth) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// The data key a check unwraps (any one cached under the master key).
#[derive(Debug, Clone)]
pub struct Sample {
    pub tenant: TenantRef,
    pub dek_id: u64,
    pub wrapped: WrappedDek,
}

struct Watch {
    provider: ProviderRef,
    cmk_id: String,
    sample: Sample,
    /// Who uses the key, by (database, tenant): whom a change of its health
    /// concerns, and the interval each asked for in its latest request.
    tenants: BTreeMap<(u32, String), (TenantRef, Option<Duration>)>,
    /// The shortest interval the tenants ask for (`None`: never checked).
    interval: Option<Duration>,
    keep_until: Tick,
    next_check: Tick,
    checking: bool,
    health: KeyHealth,
    /// When the health last changed (wall clock, for the record).
    since: SystemTime,
}

/// A check to make.
#[derive(Debug, Clone)]
pub struct Check {
    pub id: MasterKeyId,
    pub provider: ProviderRef,
    pub cmk_id: String,
    pub sample: Sample,
}

/// What a check concluded, for whoever records it.
#[derive(Debug, Clone)]
pub struct Settled {
    pub provider: ProviderRef,
    pub cmk_id: String,
    pub tenants: Vec<TenantRef>,
    pub health: KeyHealth,
    /// The health is not what the previous check found (an event to record).
    pub changed: bool,
    pub previous: KeyHealth,
    /// Since when the key has had this health.
    pub since: SystemTime,
}

/// Every watched master key.
#[derive(Default)]
pub struct Watches {
    map: HashMap<MasterKeyId, Watch>,
}

/// Where in its interval a master key's checks fall: a fraction taken from
/// its id, so checks of many keys spread evenly and a key keeps its place.
fn phase(id: &MasterKeyId, interval: Duration) -> Duration {
    let fraction = u16::from_be_bytes([id[0], id[1]]) as f64 / 65_536.0;
    interval.mul_f64(fraction)
}

impl Watches {
    /// A data key under master key `id` was cached or served from the cache:
    /// watch the master key as long as any cache may hold that data key.
    #[allow(clippy::too_many_arguments)]
    pub fn touch(
        &mut self,
        id: MasterKeyId,
        provider: &ProviderRef,
        tenant: &TenantRef,
        dek_id: u64,
        wrapped: &WrappedDek,
        settings: CacheSettings,
        now: Tick,
    ) {
        let keep_until = now
            + Duration::from_secs(
                settings.ttl_seconds.max(1) as u64 + settings.grace_period_seconds as u64,
            );
        let asked = (settings.revocation_check_seconds > 0)
            .then(|| Duration::from_secs(settings.revocation_check_seconds as u64));
        let sample = Sample {
            tenant: tenant.clone(),
            dek_id,
            wrapped: wrapped.clone(),
        };
        let watch = self.map.entry(id).or_insert_with(|| Watch {
            provider: provider.clone(),
            cmk_id: wrapped.cmk_id.clone(),
            sample: sample.clone(),
            tenants: BTreeMap::new(),
            interval: None,
            keep_until,
            next_check: now,
            checking: false,
            health: KeyHealth::Unchecked,
            since: SystemTime::now(),
        });
        watch.sample = sample;
        watch.keep_until = watch.keep_until.max(keep_until);
        watch.tenants.insert(
            (tenant.database, tenant.tenant_id.clone()),
            (tenant.clone(), asked),
        );
        // A tenant's latest settings count: one that turned its checks off
        // (or lengthened them) stops asking for the shorter interval.
        let interval = watch.tenants.values().filter_map(|(_, asked)| *asked).min();
        if interval != watch.interval {
            // First interval (or a shorter one): the next check falls at the
            // key's place in it, counted from now.
            if let Some(interval) = interval {
                let next = now + phase(&id, interval);
                if watch.interval.is_none() || next < watch.next_check {
                    watch.next_check = next;
                }
            }
            watch.interval = interval;
        }
    }

    /// The refusal recorded for master key `id`, if the last check was refused.
    pub fn revoked(&self, id: &MasterKeyId) -> Option<&ProviderError> {
        match &self.map.get(id)?.health {
            KeyHealth::Revoked(e) => Some(e),
            _ => None,
        }
    }

    /// The checks due at `now` (each marked as running until settled); watches
    /// no cache can need any more are forgotten.
    pub fn due(&mut self, now: Tick) -> Vec<Check> {
        // (A revoked key's watch is kept alive by the requests it refuses,
        // which touch it too.)
        self.map.retain(|_, w| w.checking || now < w.keep_until);
        let mut due = Vec::new();
        for (id, w) in self.map.iter_mut() {
            let needs_checks = w.interval.is_some()
                || matches!(w.health, KeyHealth::Revoked(_) | KeyHealth::Unreachable(_));
            if w.checking || !needs_checks || now < w.next_check {
                continue;
            }
            w.checking = true;
            due.push(Check {
                id: *id,
                provider: w.provider.clone(),
                cmk_id: w.cmk_id.clone(),
                sample: w.sample.clone(),
            });
        }
        due
    }

    /// Records a check's result; the next check comes one interval later. A
    /// key refused before stays refused when the key manager cannot be reached:
    /// only an answer that allows it ends a revocation.
    pub fn settle(&mut self, id: &MasterKeyId, health: KeyHealth, now: Tick) -> Option<Settled> {
        let w = self.map.get_mut(id)?;
        let health = match (&w.health, health) {
            (KeyHealth::Revoked(refusal), KeyHealth::Unreachable(_)) => {
                KeyHealth::Revoked(refusal.clone())
            }
            (_, health) => health,
        };
        w.checking = false;
        w.next_check = now + w.interval.unwrap_or(FALLBACK_INTERVAL);
        // Unchecked -> Live is the normal start, not news.
        let first_success =
            matches!(w.health, KeyHealth::Unchecked) && matches!(health, KeyHealth::Live);
        let changed = !w.health.same_state(&health) && !first_success;
        if !w.health.same_state(&health) {
            w.since = SystemTime::now();
        }
        let previous = std::mem::replace(&mut w.health, health.clone());
        Some(Settled {
            provider: w.provider.clone(),
            cmk_id: w.cmk_id.clone(),
            tenants: w.tenants.values().map(|(t, _)| t.clone()).collect(),
            health,
            changed,
            previous,
            since: w.since,
        })
    }

    /// A check that ended without settling (its task failed): the key is
    /// checked again at the next tick instead of never.
    pub fn abandon(&mut self, id: &MasterKeyId) {
        if let Some(w) = self.map.get_mut(id) {
            w.checking = false;
        }
    }

    /// Watched master keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use byok_core::config::ProviderKind;

    fn wrapped(version: &str) -> WrappedDek {
        WrappedDek {
            blob: vec![1, 2, 3],
            cmk_id: "cmk".into(),
            cmk_version: version.into(),
        }
    }

    fn provider() -> ProviderRef {
        ProviderRef {
            provider: ProviderKind::Local,
            options: serde_json::Map::new(),
            create_key_store: false,
            backup: false,
        }
    }

    fn tenant() -> TenantRef {
        TenantRef {
            database: 1,
            tenant_id: "t".into(),
            role: 0,
            role_name: String::new(),
        }
    }

    fn settings(every: u32) -> CacheSettings {
        CacheSettings {
            ttl_seconds: 86_400,
            max_entries: 10,
            grace_period_seconds: 0,
            revocation_check_seconds: every,
        }
    }

    /// A use of data key 1 (wrapped under version v1) by tenant "t".
    fn touch(watches: &mut Watches, id: MasterKeyId, settings: CacheSettings, now: Tick) {
        watches.touch(id, &provider(), &tenant(), 1, &wrapped("v1"), settings, now);
    }

    fn refused() -> KeyHealth {
        KeyHealth::Revoked(ProviderError::new(
            ProviderKind::Local,
            ErrorKind::KeyDisabled,
            "disabled",
        ))
    }

    #[test]
    fn each_version_of_a_master_key_is_watched_on_its_own() {
        let options = [7u8; 32];
        assert_ne!(
            master_key_id(&options, &wrapped("v1")),
            master_key_id(&options, &wrapped("v2"))
        );
        assert_eq!(
            master_key_id(&options, &wrapped("v1")),
            master_key_id(&options, &wrapped("v1"))
        );
    }

    #[test]
    fn a_revoked_key_is_still_checked_when_its_tenants_turn_checks_off() {
        let mut watches = Watches::default();
        let id = master_key_id(&[0; 32], &wrapped("v1"));
        let now = Tick::now();
        touch(&mut watches, id, settings(1), now);
        let due = watches.due(now + Duration::from_secs(1));
        assert_eq!(due.len(), 1);
        let settled = watches
            .settle(&id, refused(), now + Duration::from_secs(1))
            .unwrap();
        assert!(settled.changed);
        // The tenant turns its checks off: the refusal must not last for ever.
        touch(&mut watches, id, settings(0), now);
        let at = now + Duration::from_secs(2);
        assert_eq!(watches.due(at).len(), 1, "the check already planned");
        watches.settle(&id, refused(), at).unwrap();
        assert!(watches.due(at + Duration::from_secs(5)).is_empty());
        assert_eq!(
            watches.due(at + FALLBACK_INTERVAL).len(),
            1,
            "then the fallback interval"
        );
    }

    #[test]
    fn an_outage_does_not_end_a_revocation() {
        let mut watches = Watches::default();
        let id = master_key_id(&[0; 32], &wrapped("v1"));
        let now = Tick::now();
        touch(&mut watches, id, settings(1), now);
        watches.settle(&id, refused(), now).unwrap();
        let outage = KeyHealth::Unreachable(ProviderError::new(
            ProviderKind::Local,
            ErrorKind::Unavailable,
            "no answer",
        ));
        let settled = watches.settle(&id, outage, now).unwrap();
        assert!(matches!(settled.health, KeyHealth::Revoked(_)) && !settled.changed);
        assert!(watches.revoked(&id).is_some());
    }

    #[test]
    fn a_check_that_never_settles_is_made_again() {
        let mut watches = Watches::default();
        let id = master_key_id(&[0; 32], &wrapped("v1"));
        let now = Tick::now();
        touch(&mut watches, id, settings(1), now);
        let later = now + Duration::from_secs(2);
        assert_eq!(watches.due(later).len(), 1);
        assert!(watches.due(later).is_empty(), "running: not due twice");
        watches.abandon(&id);
        assert_eq!(watches.due(later).len(), 1);
    }
}
