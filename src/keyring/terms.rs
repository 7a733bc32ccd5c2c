//! Blind index terms on the backend: the tenant's index keys, ready, and the
//! term settings of searchable columns, kept beside the data keys and dropped
//! with them (a catalog change, a revocation). A term under a ready key costs
//! the HMAC of the value only: no SPI, no lock, no allocation.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use byok_core::clock::Tick;
use byok_core::envelope::MAX_TERM_LEN;
use byok_core::search::{IndexKey, Normalization, SearchSpec};
use pgrx::pg_sys;

use super::{
    Authority, RING, admit_tenant, check_session_tenant_for_terms, current_user, is_authorized,
    job_covers, unwrap_key,
};
use crate::catalog;
use crate::errors::ByokError;

/// Searchable columns' settings kept at most, and the longest context kept:
/// contexts are few and short (a column's name); a caller making up a new,
/// long context per call must not grow a backend without bound (at most
/// 1024 x 256 bytes here; a longer context is looked up every time).
const MAX_SPECS: usize = 1024;
const MAX_CACHED_CONTEXT: usize = 256;

/// An index key ready for use.
struct ReadyIndexKey {
    key: IndexKey,
    expires_at: Tick,
    /// The tenant's revocation epoch when it was loaded (see `ReadyKey`).
    epoch_slot: usize,
    epoch: u64,
}

impl ReadyIndexKey {
    #[inline(always)]
    fn is_usable(&self, now: Tick) -> bool {
        self.expires_at > now && crate::shmem::tenant_epoch(self.epoch_slot) == self.epoch
    }
}

/// A tenant's live index keys (active first), as last read from the catalog.
struct TenantIndexKeys {
    live: Vec<u64>,
    expires_at: Tick,
    /// The role last found to be granted the tenant (see `ReadyKey::granted_to`).
    granted_to: Cell<pg_sys::Oid>,
}

/// Maps read on the per-row path: foldhash, several times cheaper than
/// SipHash on short keys. Its weaker resistance to chosen collisions matters
/// little here: the maps are one backend's, keyed by what that session uses.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub(super) struct TermState {
    keys: FastMap<u64, ReadyIndexKey>,
    tenants: FastMap<Box<str>, TenantIndexKeys>,
    specs: FastMap<Box<[u8]>, Option<SearchSpec>>,
}

impl TermState {
    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.tenants.clear();
        self.specs.clear();
    }

    /// Keeps a key just loaded. Keys expired or dropped by a revocation go
    /// first (wiped as they drop), and the ready index keys stay within
    /// `byok.backend_cache_max_entries`, like the data keys.
    fn keep(&mut self, id: u64, ready: ReadyIndexKey, now: Tick) {
        self.keys.retain(|_, key| key.is_usable(now));
        self.tenants.retain(|_, entry| entry.expires_at > now);
        if self.keys.len() >= crate::gucs::backend_cache_max_entries().max(1) {
            self.keys.clear();
        }
        self.keys.insert(id, ready);
    }
}

/// A term computed on the stack: `len` bytes of `bytes` are the term.
pub type TermBuf = [u8; MAX_TERM_LEN];

/// The term settings of the searchable column sealed with `context`
/// (`byok.make_searchable`), or `None` when no searchable column uses it.
pub fn column_spec(context: &[u8]) -> Result<Option<SearchSpec>, ByokError> {
    if let Some(spec) = RING.with_ring(|ring| ring.terms.specs.get(context).copied()) {
        return Ok(spec);
    }
    let spec = match catalog::search_spec(context)? {
        None => None,
        Some((term_len, normalization)) => Some(SearchSpec {
            term_len: term_len.clamp(byok_core::search::MIN_TERM_LEN, MAX_TERM_LEN),
            normalization: Normalization::parse(&normalization).map_err(|problem| {
                ByokError::Catalog(format!("a searchable column's normalization: {problem}"))
            })?,
        }),
    };
    if context.len() <= MAX_CACHED_CONTEXT {
        RING.with_ring(|ring| {
            if ring.terms.specs.len() >= MAX_SPECS {
                ring.terms.specs.clear();
            }
            ring.terms.specs.insert(context.into(), spec);
        });
    }
    Ok(spec)
}

/// The settings a searchable value sealed with `context` gets: its column's,
/// or the defaults (8-byte terms, exact values).
pub fn spec_for(context: &[u8]) -> Result<SearchSpec, ByokError> {
    Ok(column_spec(context)?.unwrap_or_default())
}

/// The term of `plaintext` under `tenant`'s active index key: its id and the
/// term (the first `spec.term_len` bytes). The per-row path of a searchable seal.
pub fn active_term(
    tenant: &str,
    context: &[u8],
    plaintext: &[u8],
    spec: &SearchSpec,
    authority: Authority,
) -> Result<(u64, TermBuf), ByokError> {
    let mut found = None;
    with_terms(
        tenant,
        context,
        plaintext,
        spec,
        false,
        authority,
        &mut |id, term| {
            let mut buf = [0u8; MAX_TERM_LEN];
            buf[..term.len()].copy_from_slice(term);
            found = Some((id, buf));
        },
    )?;
    found.ok_or_else(|| ByokError::NoIndexKey(tenant.to_string()))
}

/// Calls `each` with the term of `plaintext` (normalized per `spec`) under
/// `tenant`'s active index key, and with `all` under every live one (the
/// previous key's too while a rotation's job rewrites terms), active first.
pub fn with_terms(
    tenant: &str,
    context: &[u8],
    plaintext: &[u8],
    spec: &SearchSpec,
    all: bool,
    authority: Authority,
    each: &mut dyn FnMut(u64, &[u8]),
) -> Result<(), ByokError> {
    check_session_tenant_for_terms(tenant)?;
    let normalized =
        spec.normalization
            .apply_bytes(plaintext)
            .map_err(|e| ByokError::InvalidArgument {
                message: e.to_string(),
                hint: Some("searchable text columns need a UTF-8 database".into()),
            })?;
    let normalized = normalized.as_bytes();
    let len = spec.term_len;
    let mut buf = [0u8; MAX_TERM_LEN];
    let now = Tick::now();
    let user = current_user();
    // Hit: the tenant's keys known, granted, ready. One lookup per key: the
    // per-row seal asks for the active key only.
    let hit = RING.with_ring(|ring| {
        let entry = ring
            .terms
            .tenants
            .get(tenant)
            .filter(|e| e.expires_at > now)?;
        let allowed = match authority {
            Authority::Caller if entry.granted_to.get() == user => true,
            Authority::Caller => is_authorized(&ring.authorized, user, tenant),
            Authority::Job => job_covers(tenant),
        };
        let wanted = if all { entry.live.len() } else { 1 };
        let ids = entry
            .live
            .get(..wanted)
            .filter(|ids| allowed && !ids.is_empty())?;
        let mut ready = Vec::new();
        let keys = &ring.terms.keys;
        let first = keys.get(&ids[0]).filter(|r| r.is_usable(now))?;
        if ids.len() > 1 {
            // (probes, once per query: the previous keys too)
            for id in &ids[1..] {
                ready.push((*id, keys.get(id).filter(|r| r.is_usable(now))?));
            }
        }
        if authority == Authority::Caller {
            entry.granted_to.set(user);
        }
        for (id, key) in std::iter::once((ids[0], first)).chain(ready) {
            key.key
                .term_into(tenant, context, normalized, &mut buf[..len]);
            each(id, &buf[..len]);
        }
        Some(())
    });
    if hit.is_some() {
        return Ok(());
    }

    // Miss: check the tenant and the caller, read its index keys, load them.
    let info = admit_tenant(tenant, authority, user)?;
    let keys = catalog::index_keys(tenant)?;
    if keys.live.is_empty() {
        return Err(match keys.destroyed {
            Some(key_id) => ByokError::IndexKeyDestroyed {
                key_id,
                tenant: tenant.to_string(),
            },
            None => ByokError::NoIndexKey(tenant.to_string()),
        });
    }
    let ttl = Duration::from_secs(info.cache.ttl_seconds as u64);
    let wanted = if all { keys.live.len() } else { 1 };
    for &id in &keys.live[..wanted] {
        let computed = RING.with_ring(|ring| {
            let ready = ring.terms.keys.get(&id).filter(|r| r.is_usable(now))?;
            ready
                .key
                .term_into(tenant, context, normalized, &mut buf[..len]);
            Some(())
        });
        if computed.is_none() {
            let loaded = unwrap_key(id, user, authority, true)?;
            let ready = ReadyIndexKey {
                key: IndexKey::from_bytes(loaded.key.expose()),
                expires_at: now + ttl,
                epoch_slot: loaded.epoch_slot,
                epoch: loaded.epoch,
            };
            ready
                .key
                .term_into(tenant, context, normalized, &mut buf[..len]);
            // Kept unless a revocation was seen while it was loaded.
            if ready.is_usable(now) {
                RING.with_ring(|ring| ring.terms.keep(id, ready, now));
            }
        }
        each(id, &buf[..len]);
    }
    RING.with_ring(|ring| {
        ring.terms.tenants.insert(
            tenant.into(),
            TenantIndexKeys {
                live: keys.live,
                expires_at: now + ttl,
                granted_to: Cell::new(if authority == Authority::Caller {
                    user
                } else {
                    pg_sys::InvalidOid
                }),
            },
        )
    });
    Ok(())
}
