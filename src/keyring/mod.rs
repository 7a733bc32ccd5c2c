//! The backend's ready data keys (L1) and the per-row seal/open paths.
//!
//! A hit is a hash lookup, a coarse clock read (`byok_core::clock`) and the
//! AES-GCM work itself: no SPI, no provider call, no allocation. A miss reads the catalog (SPI), asks the
//! tenant's key provider to unwrap the data key, and caches the expanded
//! cipher under the tenant's `cache_config` limits. Any change to the catalog
//! reaches every backend as a relcache invalidation at commit, which drops all
//! ready keys here before the next use.

pub mod citus_tenant;
pub mod counts;
pub mod invalidation;
pub mod terms;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use byok_core::cache::{CacheLimits, CacheStats, KeyCache};
use byok_core::clock::Tick;
use byok_core::config::check_tenant_id;
use byok_core::crypto::{CryptoError, DekCipher, NoncePool};
use byok_core::envelope::Envelope;
use byok_kms::protocol::ProviderRef;

use self::counts::PendingCounts;
use crate::broker;
use crate::catalog::{self, KeyState};
use crate::errors::ByokError;
use crate::gucs;
use crate::postgres::session;
use pgrx::pg_sys;

struct ActiveKey {
    dek_id: u64,
    expires_at: Tick,
}

/// A data key ready for use: its expanded cipher, its not-yet-published
/// counters, and the role last found to be granted its tenant.
struct ReadyKey {
    cipher: DekCipher,
    counts: PendingCounts,
    /// The per-row check is one comparison with the current user id; any other
    /// role (SET ROLE, a SECURITY DEFINER function) is checked once through the
    /// catalog. Grant and role changes drop every ready key, so this never outlives one.
    granted_to: Cell<pg_sys::Oid>,
    /// The tenant's revocation epoch slot, and its value when the key was
    /// asked of the broker: once the slot moves (the broker found a tenant's
    /// master key revoked) the key is dropped before its next use.
    epoch_slot: usize,
    epoch: u64,
}

impl ReadyKey {
    /// Not dropped by a revocation since it was loaded (one atomic load).
    #[inline(always)]
    fn is_current(&self) -> bool {
        crate::shmem::tenant_epoch(self.epoch_slot) == self.epoch
    }
}

/// On whose authority a key is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The current user's: it must be granted the key's tenant.
    Caller,
    /// A re-encryption job's (`byok.reencrypt`, `byok.value_opens` while the
    /// job engine runs a statement as a table's owner): the job's tenant scope
    /// decides, not the owner's grants. Only the engine sets it (see
    /// [`JobScope`]); SQL cannot.
    Job,
}

/// The tenants a running re-encryption job may use keys of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    AllTenants,
    Tenant(Box<str>),
}

static JOB_SCOPE: BackendCell<Option<Scope>> = BackendCell(RefCell::new(None));

/// While alive, `byok.reencrypt` and `byok.value_opens` act with the job's
/// authority for `tenant` (all tenants with `None`).
pub struct JobScope(());

impl JobScope {
    pub fn enter(tenant: Option<&str>) -> JobScope {
        let scope = match tenant {
            Some(t) => Scope::Tenant(t.into()),
            None => Scope::AllTenants,
        };
        JOB_SCOPE.with_borrow_mut(|s| *s = Some(scope));
        JobScope(())
    }
}

impl Drop for JobScope {
    fn drop(&mut self) {
        JOB_SCOPE.with_borrow_mut(|s| *s = None);
    }
}

impl Authority {
    /// `Job` inside a job's statement, else `Caller`.
    pub fn of_job_step() -> Authority {
        if JOB_SCOPE.with_borrow_mut(|s| s.is_some()) {
            Authority::Job
        } else {
            Authority::Caller
        }
    }
}

/// Whether the running job may use `tenant_id`'s keys.
fn job_covers(tenant_id: &str) -> bool {
    JOB_SCOPE.with_borrow_mut(|scope| match scope {
        Some(Scope::AllTenants) => true,
        Some(Scope::Tenant(t)) => &**t == tenant_id,
        None => false,
    })
}

/// Checks `authority` for a tenant (`user` is the current user for `Caller`).
fn authorize_as(authority: Authority, tenant_id: &str, user: pg_sys::Oid) -> Result<(), ByokError> {
    match authority {
        Authority::Caller => authorize(tenant_id, user),
        Authority::Job if job_covers(tenant_id) => Ok(()),
        Authority::Job => Err(ByokError::TenantNotGranted {
            tenant: tenant_id.to_string(),
            role: "re-encryption job".into(),
        }),
    }
}

/// The decrypt path's refusal: names the key, not its tenant.
fn not_granted_for_key(dek_id: u64, e: ByokError) -> ByokError {
    match e {
        ByokError::TenantNotGranted { tenant, role } => ByokError::DataKeyNotGranted {
            dek_id,
            tenant,
            role,
        },
        other => other,
    }
}

/// The role the per-row functions act for (`current_user`).
#[inline(always)]
fn current_user() -> pg_sys::Oid {
    session::current_user()
}

/// Whether `user` may use tenant `tenant_id`'s keys (superusers always may;
/// other roles need `byok.grant_tenant`). Reads the catalog: never on a hit.
fn authorize(tenant_id: &str, user: pg_sys::Oid) -> Result<(), ByokError> {
    // SAFETY: reads the backend's session user and the role cache.
    if unsafe { pg_sys::superuser_arg(user) } {
        return Ok(());
    }
    // A login holding CREATEROLE can make itself a member of any granted role
    // (or SET ROLE to one it joined): it uses only the tenants granted to
    // itself, directly, as itself.
    let session = crate::postgres::session::session_user();
    if crate::postgres::security::can_create_roles(session) {
        return if user == session && catalog::granted_directly(session, tenant_id)? {
            Ok(())
        } else {
            Err(ByokError::CreateRoleSession {
                role: crate::postgres::session::role_name(session),
                tenant: tenant_id.to_string(),
            })
        };
    }
    if catalog::may_use_tenant(user, tenant_id)? {
        Ok(())
    } else {
        Err(ByokError::TenantNotGranted {
            tenant: tenant_id.to_string(),
            role: crate::postgres::session::role_name(user),
        })
    }
}

/// Checks that the current user may use data key `dek_id`'s tenant, and
/// remembers the answer with the ready key.
fn authorize_ready(dek_id: u64, user: pg_sys::Oid) -> Result<(), ByokError> {
    let now = Tick::now();
    let tenant = RING.with_ring(|ring| {
        ring.ciphers
            .get(&dek_id, now)
            .map(|ready| ready.cipher.tenant_id().to_string())
    });
    let Some(tenant) = tenant else {
        return Ok(()); // dropped meanwhile: the miss path checks it
    };
    authorize(&tenant, user).map_err(|e| not_granted_for_key(dek_id, e))?;
    RING.with_ring(|ring| {
        ring.remember_authorized(user, &tenant);
        if let Some(ready) = ring.ciphers.get(&dek_id, now) {
            ready.granted_to.set(user);
        }
    });
    Ok(())
}

struct KeyRing {
    ciphers: KeyCache<ReadyKey>,
    /// tenant id -> its active data key, so encrypt finds its key without SPI.
    active: HashMap<Box<str>, ActiveKey>,
    /// role -> the tenants it was found to be granted. A query that switches
    /// roles row by row (a SECURITY DEFINER function next to a direct call)
    /// re-checks a key against this, not the catalog. Cleared with the keys.
    authorized: HashMap<pg_sys::Oid, HashSet<Box<str>>>,
    /// The shared key epoch the ready keys were loaded under
    /// ([`crate::shmem::Shared::key_epoch`]): when it moves, they all go.
    epoch: u64,
    /// Ready index keys, their tenants' live index keys, and searchable
    /// columns' term settings by context ([`terms`]).
    terms: terms::TermState,
}

/// Whether `user` was already found to be granted `tenant_id` (a field-level
/// function, so it can be called while a ready key of the ring is borrowed).
#[inline]
fn is_authorized(
    authorized: &HashMap<pg_sys::Oid, HashSet<Box<str>>>,
    user: pg_sys::Oid,
    tenant_id: &str,
) -> bool {
    authorized
        .get(&user)
        .is_some_and(|tenants| tenants.contains(tenant_id))
}

impl KeyRing {
    /// Keeps a key just loaded, unless a revocation of its tenant was seen
    /// while it was being loaded (it was then used for this row only).
    fn keep(&mut self, dek_id: u64, ready: ReadyKey, limits: CacheLimits, now: Tick) {
        if ready.is_current() {
            let tenant: Box<str> = ready.cipher.tenant_id().into();
            self.ciphers.insert(dek_id, &tenant, ready, limits, now);
        }
    }

    /// Drops a key its tenant's revocation epoch made stale.
    fn forget(&mut self, dek_id: u64) {
        self.ciphers.remove(&dek_id);
        self.active.retain(|_, active| active.dek_id != dek_id);
    }

    fn remember_authorized(&mut self, user: pg_sys::Oid, tenant_id: &str) {
        self.authorized
            .entry(user)
            .or_default()
            .insert(tenant_id.into());
    }
}

/// The backend's key state. PostgreSQL runs a backend's SQL functions on one
/// thread, so a plain static with interior mutability is enough, and it avoids
/// the thread-local lookup a shared library pays on every access.
struct BackendCell<T>(RefCell<T>);

// SAFETY: only the backend's main thread calls into this module (SQL functions,
// invalidation callbacks); no other thread ever reaches these statics.
unsafe impl<T> Sync for BackendCell<T> {}

impl<T> BackendCell<T> {
    #[inline]
    fn with_borrow_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}

static RING: BackendCell<Option<KeyRing>> = BackendCell(RefCell::new(None));
static NONCES: BackendCell<Option<NoncePool>> = BackendCell(RefCell::new(None));

/// Set by the invalidation callback, which must not touch the ring itself
/// (it can run while the ring is borrowed).
static STALE: AtomicBool = AtomicBool::new(false);

impl BackendCell<Option<KeyRing>> {
    #[inline]
    fn with_ring<R>(&self, f: impl FnOnce(&mut KeyRing) -> R) -> R {
        self.with_borrow_mut(|ring| {
            let ring = ring.get_or_insert_with(|| {
                register_xact_callback();
                KeyRing {
                    ciphers: KeyCache::new(gucs::backend_cache_max_entries()),
                    active: HashMap::new(),
                    authorized: HashMap::new(),
                    epoch: crate::shmem::key_epoch(),
                    terms: terms::TermState::default(),
                }
            });
            ring.sync_invalidations();
            f(ring)
        })
    }
}

/// Marks every ready key stale; they are dropped (and zeroized) before next use.
pub fn invalidate_all() {
    STALE.store(true, Ordering::Relaxed);
}

impl KeyRing {
    /// Drops every ready key after a catalog change (this backend's flag) or
    /// a revocation seen by the key broker (the shared epoch): before the next
    /// row, so a session in the middle of a long statement stops too.
    #[inline]
    fn sync_invalidations(&mut self) {
        let epoch = crate::shmem::key_epoch();
        if STALE.load(Ordering::Relaxed) || epoch != self.epoch {
            STALE.store(false, Ordering::Relaxed);
            self.epoch = epoch;
            self.ciphers.clear();
            self.active.clear();
            self.authorized.clear();
            self.terms.clear();
            self.ciphers.set_capacity(gucs::backend_cache_max_entries());
        }
    }
}

/// Fails if `byok.tenant` restricts this session to another tenant.
#[inline]
fn check_session_tenant_for_decrypt(tenant_id: &str) -> Result<(), ByokError> {
    match gucs::session_tenant() {
        Some(session) if session.to_bytes() != tenant_id.as_bytes() => {
            Err(ByokError::TenantMismatchOnDecrypt {
                session: session.to_string_lossy().into_owned(),
            })
        }
        _ => Ok(()),
    }
}

/// Fails if `byok.tenant` restricts this session to another tenant than the
/// one a term is computed for (a probe, or a searchable seal).
#[inline]
fn check_session_tenant_for_terms(tenant_id: &str) -> Result<(), ByokError> {
    match gucs::session_tenant() {
        Some(session) if session.to_bytes() != tenant_id.as_bytes() => {
            Err(ByokError::TenantMismatchOnSearch {
                requested: tenant_id.to_string(),
                session: session.to_string_lossy().into_owned(),
            })
        }
        _ => Ok(()),
    }
}

#[inline]
fn check_session_tenant_for_encrypt(tenant_id: &str) -> Result<(), ByokError> {
    match gucs::session_tenant() {
        Some(session) if session.to_bytes() != tenant_id.as_bytes() => {
            Err(ByokError::TenantMismatchOnEncrypt {
                requested: tenant_id.to_string(),
                session: session.to_string_lossy().into_owned(),
            })
        }
        _ => Ok(()),
    }
}

/// Seals with a nonce from this process's pool of OS CSPRNG output. The pool is
/// owned by the backend's pid, so a process forked from one that used it
/// (which PostgreSQL does not do, but nothing here relies on that) refills it.
#[inline]
fn seal_with(
    cipher: &DekCipher,
    plaintext: &[u8],
    context: &[u8],
    term: Option<Term<'_>>,
    out: &mut [u8],
) -> Result<(), CryptoError> {
    // SAFETY: MyProcPid is set once at process start and never changes after.
    let owner = unsafe { pgrx::pg_sys::MyProcPid } as u64;
    NONCES.with_borrow_mut(|pool| {
        let pool = pool.get_or_insert_with(NoncePool::default);
        let fill = &mut |nonce: &mut [u8]| pool.fill(owner, nonce);
        let using = gucs::aes_gcm_for(cipher, plaintext.len());
        match term {
            None => cipher.seal_into_using(using, plaintext, context, out, fill),
            Some(term) => cipher.seal_searchable_into_with(
                using,
                plaintext,
                context,
                (term.index_key_id, term.bytes),
                out,
                fill,
            ),
        }
    })
}

/// A blind index term to seal into a value, and the index key it is under.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    pub index_key_id: u64,
    pub bytes: &'a [u8],
}

fn crypto_error(dek_id: u64, tenant: &str, e: CryptoError) -> ByokError {
    match e {
        CryptoError::AuthenticationFailed | CryptoError::WrongKey { .. } => {
            ByokError::AuthenticationFailed {
                dek_id,
                tenant: Some(tenant.to_string()),
            }
        }
        other => ByokError::Internal(other.to_string()),
    }
}

/// Whether data key `dek_id` is one of `tenant_id`'s (from the ring, or the
/// catalog on a miss). Reveals nothing a caller could not learn: `confirm_match`
/// asks it only about a value whose term the caller's tenant's key produced.
pub fn data_key_of_tenant(dek_id: u64, tenant_id: &str) -> Result<bool, ByokError> {
    let cached = RING.with_ring(|ring| {
        ring.ciphers
            .get(&dek_id, Tick::now())
            .map(|ready| ready.cipher.tenant_id() == tenant_id)
    });
    match cached {
        Some(answer) => Ok(answer),
        None => Ok(catalog::load_data_key(dek_id)?
            .is_some_and(|record| record.tenant_id == tenant_id && !record.is_index_key)),
    }
}

/// Opens `envelope` into `out` (exactly `envelope.plaintext_len()` bytes).
pub fn open(
    envelope: &Envelope<'_>,
    context: &[u8],
    out: &mut [u8],
    authority: Authority,
) -> Result<(), ByokError> {
    let dek_id = envelope.dek_id();
    let now = Tick::now();
    let open_with = |ready: &ReadyKey, out: &mut [u8]| -> Result<(), ByokError> {
        check_session_tenant_for_decrypt(ready.cipher.tenant_id())?;
        let result = ready
            .cipher
            .open_into_using(
                gucs::aes_gcm_for(&ready.cipher, envelope.plaintext_len()),
                envelope,
                context,
                out,
            )
            .map_err(|e| crypto_error(dek_id, ready.cipher.tenant_id(), e));
        if result.is_err() {
            ready.counts.decrypt_failed();
        }
        result
    };
    let user = current_user();
    let mut revoked = false;
    let hit = RING.with_ring(|ring| {
        let ready = ring.ciphers.get(&dek_id, now)?;
        if !ready.is_current() {
            revoked = true;
            return None;
        }
        match authority {
            Authority::Caller if ready.granted_to.get() != user => {
                if !is_authorized(&ring.authorized, user, ready.cipher.tenant_id()) {
                    return Some(None);
                }
                ready.granted_to.set(user);
            }
            Authority::Caller => {}
            Authority::Job if !job_covers(ready.cipher.tenant_id()) => return Some(None),
            Authority::Job => {}
        }
        ready.counts.hit(true);
        Some(Some(open_with(ready, &mut *out)))
    });
    match hit {
        Some(Some(result)) => return result,
        Some(None) if authority == Authority::Caller => {
            authorize_ready(dek_id, user)?;
            return open(envelope, context, out, authority);
        }
        Some(None) => {
            // A job outside its scope: refused without naming the key's tenant.
            let tenant = RING
                .with_ring(|ring| {
                    ring.ciphers
                        .get(&dek_id, now)
                        .map(|r| r.cipher.tenant_id().to_string())
                })
                .unwrap_or_default();
            return Err(not_granted_for_key(
                dek_id,
                authorize_as(authority, &tenant, user).unwrap_err(),
            ));
        }
        None => {}
    }
    if revoked {
        RING.with_ring(|ring| ring.forget(dek_id));
    }
    let (ready, limits) = load_cipher(dek_id, user, authority)?;
    ready.counts.miss(true);
    let result = open_with(&ready, out);
    RING.with_ring(|ring| ring.keep(dek_id, ready, limits, now));
    result
}

/// Opens `envelope` and seals its plaintext again under its tenant's active data
/// key, with the same context (a re-encryption job's per-row step); returns
/// the new envelope. It carries a term under the tenant's active index key
/// when the value had one, or when `context` is a searchable column's and the
/// tenant has an index key (a tenant without one keeps unsearchable values).
/// The plaintext lives only in a buffer wiped on drop.
pub fn reseal(
    envelope: &Envelope<'_>,
    context: &[u8],
    authority: Authority,
) -> Result<Vec<u8>, ByokError> {
    use byok_core::envelope::{sealed_len, searchable_sealed_len};
    let mut plaintext = zeroize::Zeroizing::new(vec![0u8; envelope.plaintext_len()]);
    open(envelope, context, &mut plaintext, authority)?;
    let dek_id = envelope.dek_id();
    let tenant = RING
        .with_ring(|ring| {
            ring.ciphers
                .get(&dek_id, Tick::now())
                .map(|ready| ready.cipher.tenant_id().to_string())
        })
        .map(Ok)
        .unwrap_or_else(|| {
            load_cipher(dek_id, current_user(), authority)
                .map(|(ready, _)| ready.cipher.tenant_id().to_string())
        })?;
    let had_term = envelope.term();
    let spec = match (terms::column_spec(context)?, had_term) {
        (Some(spec), _) => Some(spec),
        (None, Some(term)) => {
            Some(byok_core::search::SearchSpec::default().with_term_len(term.len()))
        }
        (None, None) => None,
    };
    let term = match spec {
        None => None,
        Some(spec) => match terms::active_term(&tenant, context, &plaintext, &spec, authority) {
            Ok((index_key_id, term)) => Some((index_key_id, term, spec.term_len)),
            Err(ByokError::NoIndexKey(_)) if had_term.is_none() => None,
            Err(e) => return Err(e),
        },
    };
    let mut out = vec![
        0u8;
        match term {
            Some((_, _, len)) => searchable_sealed_len(plaintext.len(), len),
            None => sealed_len(plaintext.len()),
        }
    ];
    let term = term.as_ref().map(|(index_key_id, bytes, len)| Term {
        index_key_id: *index_key_id,
        bytes: &bytes[..*len],
    });
    seal(&tenant, &plaintext, context, term, &mut out, authority)?;
    Ok(out)
}

/// Seals `plaintext` for `tenant_id` into `out` (exactly `sealed_len(plaintext.len())`
/// bytes, or `searchable_sealed_len` with a `term`).
/// The per-row path: kept in one function so the cache-hit branch (no SPI, no
/// lock, no allocation) can be read, and checked, top to bottom.
pub fn seal(
    tenant_id: &str,
    plaintext: &[u8],
    context: &[u8],
    term: Option<Term<'_>>,
    out: &mut [u8],
    authority: Authority,
) -> Result<(), ByokError> {
    check_session_tenant_for_encrypt(tenant_id)?;
    let now = Tick::now();
    let seal_ready = |ready: &ReadyKey, dek_id: u64, out: &mut [u8]| {
        seal_with(&ready.cipher, plaintext, context, term, out)
            .map_err(|e| crypto_error(dek_id, tenant_id, e))
    };
    let user = current_user();
    let mut revoked = None;
    let hit = RING.with_ring(|ring| {
        let active = ring.active.get(tenant_id).filter(|a| a.expires_at > now)?;
        let dek_id = active.dek_id;
        let ready = ring.ciphers.get(&dek_id, now)?;
        if !ready.is_current() {
            revoked = Some(dek_id);
            return None;
        }
        match authority {
            Authority::Caller if ready.granted_to.get() != user => {
                if !is_authorized(&ring.authorized, user, tenant_id) {
                    return None;
                }
                ready.granted_to.set(user);
            }
            Authority::Caller => {}
            Authority::Job if !job_covers(tenant_id) => return None,
            Authority::Job => {}
        }
        ready.counts.hit(false);
        Some(seal_ready(ready, dek_id, &mut *out))
    });
    if let Some(result) = hit {
        return result;
    }
    if let Some(dek_id) = revoked {
        RING.with_ring(|ring| ring.forget(dek_id));
    }

    // Miss: find the tenant's active key, make sure its cipher is ready, remember both.
    let info = admit_tenant(tenant_id, authority, user)?;
    let dek_id = info
        .active_dek_id
        .ok_or_else(|| ByokError::NoActiveDataKey(tenant_id.to_string()))?;
    let cached = RING.with_ring(|ring| {
        ring.ciphers
            .get(&dek_id, now)
            .filter(|ready| ready.is_current())
            .map(|ready| {
                if authority == Authority::Caller {
                    ready.granted_to.set(user); // authorized above
                }
                ready.counts.hit(false);
                seal_ready(ready, dek_id, &mut *out)
            })
    });
    let result = match cached {
        Some(result) => result,
        None => {
            let (ready, limits) = load_cipher(dek_id, user, authority)?;
            ready.counts.miss(false);
            let result = seal_ready(&ready, dek_id, out);
            RING.with_ring(|ring| ring.keep(dek_id, ready, limits, now));
            result
        }
    };
    RING.with_ring(|ring| {
        ring.active.insert(
            tenant_id.into(),
            ActiveKey {
                dek_id,
                expires_at: now + Duration::from_secs(info.cache.ttl_seconds as u64),
            },
        );
    });
    result
}

/// The start of a miss on a tenant's keys (sealing, or computing terms): the
/// tenant id checked and the caller authorized (remembered for the next rows)
/// before anything about the tenant is looked up, so an unknown tenant and one
/// not granted look the same to a role without the grant; then the tenant's
/// active data key and cache settings.
fn admit_tenant(
    tenant_id: &str,
    authority: Authority,
    user: pg_sys::Oid,
) -> Result<catalog::TenantKeyInfo, ByokError> {
    check_tenant_id(tenant_id).map_err(|problem| ByokError::InvalidArgument {
        message: format!("invalid tenant id: {problem}"),
        hint: None,
    })?;
    authorize_as(authority, tenant_id, user)?;
    if authority == Authority::Caller {
        RING.with_ring(|ring| ring.remember_authorized(user, tenant_id));
    }
    catalog::load_tenant_key_info(tenant_id)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))
}

/// Reads, checks and unwraps data key `dek_id` into a ready cipher for `user`
/// (or a job, per `authority`).
fn load_cipher(
    dek_id: u64,
    user: pg_sys::Oid,
    authority: Authority,
) -> Result<(ReadyKey, CacheLimits), ByokError> {
    let loaded = unwrap_key(dek_id, user, authority, false)?;
    let record = &loaded.record;
    let cipher = DekCipher::new(dek_id, &record.tenant_id, &loaded.key)
        .map_err(|e| ByokError::Internal(e.to_string()))?;
    let limits = CacheLimits {
        ttl: Duration::from_secs(record.cache.ttl_seconds as u64),
        max_entries: record.cache.max_entries as usize,
    };
    let counts = PendingCounts::new(record.provider, &record.tenant_id, dek_id);
    Ok((
        ReadyKey {
            cipher,
            counts,
            // A job's use grants nothing to the role it runs as.
            granted_to: Cell::new(if authority == Authority::Caller {
                user
            } else {
                pg_sys::InvalidOid
            }),
            epoch_slot: loaded.epoch_slot,
            epoch: loaded.epoch,
        },
        limits,
    ))
}

/// A key just unwrapped, with what decides how long it may be kept.
struct UnwrappedKey {
    record: catalog::DataKeyRecord,
    /// Zeroized when dropped; only key schedules (or keyed HMAC states) are kept.
    key: byok_core::crypto::DataKey,
    epoch_slot: usize,
    epoch: u64,
}

/// Reads and checks key `dek_id` (a data key, or with `index` an index key)
/// and has the key broker unwrap it, for `user` (or a job, per `authority`).
fn unwrap_key(
    dek_id: u64,
    user: pg_sys::Oid,
    authority: Authority,
    index: bool,
) -> Result<UnwrappedKey, ByokError> {
    let record = catalog::load_data_key(dek_id)?.ok_or(ByokError::UnknownDataKey(dek_id))?;
    // Refuse before asking the key manager for anything.
    check_session_tenant_for_decrypt(&record.tenant_id)?;
    authorize_as(authority, &record.tenant_id, user).map_err(|e| not_granted_for_key(dek_id, e))?;
    if authority == Authority::Caller {
        RING.with_ring(|ring| ring.remember_authorized(user, &record.tenant_id));
    }
    let tenant = || Some(record.tenant_id.clone());
    // A value naming an index key as its data key (or a probe naming a data
    // key) was not made here: refused before the key manager is asked.
    if record.is_index_key != index {
        return Err(ByokError::WrongKeyPurpose {
            key_id: dek_id,
            expected: if index { "index" } else { "data" },
        });
    }
    match record.state {
        KeyState::Destroyed => {
            return Err(ByokError::KeyDestroyed {
                dek_id,
                tenant: tenant(),
            });
        }
        KeyState::Retired => {
            return Err(ByokError::KeyRetired {
                dek_id,
                tenant: tenant(),
            });
        }
        KeyState::Active | KeyState::DecryptOnly => {}
    }
    if record.master_key_retired {
        return Err(ByokError::MasterKeyRetired {
            dek_id,
            tenant: record.tenant_id.clone(),
            master_key_id: record
                .wrapped
                .as_ref()
                .map(|w| w.cmk_id.clone())
                .unwrap_or_default(),
        });
    }
    // Which key manager opens it: the primary (the backup standing by for
    // an outage), or only the backup while DR is active or until a key made
    // during DR is wrapped by the primary too.
    let primary = ProviderRef {
        provider: record.provider,
        options: record.provider_options.clone(),
        create_key_store: false,
        backup: false,
    };
    let (provider, wrapped, backup) = match (
        record.dr_active,
        record.wrapped.clone(),
        record.backup.clone(),
    ) {
        (true, _, Some(backup)) | (false, None, Some(backup)) => {
            (backup.provider, backup.wrapped, None)
        }
        (_, Some(wrapped), backup) => (primary, wrapped, backup),
        (_, None, None) => {
            return Err(ByokError::KeyDestroyed {
                dek_id,
                tenant: tenant(),
            });
        }
    };
    counts::publish_monitoring(record.provider, &record.tenant_id, &record.monitoring);
    // Read before the broker is asked: a revocation seen while it answers
    // leaves the key unkept (`KeyRing::keep`).
    let epoch_slot = crate::shmem::tenant_epoch_slot(session::database(), &record.tenant_id);
    let epoch = crate::shmem::tenant_epoch(epoch_slot);
    // From the broker's shared cache, or the key manager through the broker.
    // `key` is zeroized when dropped; callers keep only a key schedule or a keyed HMAC state.
    let (key, _stale) = broker::unwrap(
        broker::tenant_ref(&record.tenant_id),
        provider,
        dek_id,
        wrapped,
        record.cache,
        backup,
    )?;
    Ok(UnwrappedKey {
        record,
        key,
        epoch_slot,
        epoch,
    })
}

/// Publishes this backend's pending per-key counters to shared memory.
pub fn flush_metrics() {
    if let Ok(ring) = RING.0.try_borrow()
        && let Some(ring) = ring.as_ref()
    {
        ring.ciphers.values().for_each(|ready| ready.counts.flush());
    }
}

fn register_xact_callback() {
    // SAFETY: registers plain C callbacks with static lifetime, once per
    // backend (the caller checks), from the backend's only thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
        pg_sys::before_shmem_exit(Some(at_exit), pg_sys::Datum::from(0));
    }
}

/// When this backend last published its counters.
static LAST_FLUSH: BackendCell<Option<Tick>> = BackendCell(RefCell::new(None));

/// How often, at most, transaction ends publish the counters. Publishing is a
/// few atomic adds on cache lines every backend of a tenant shares: doing it at
/// every commit of a short write transaction costs more than the seal itself.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Counters reach shared memory at a transaction's end once a second has passed
/// since the last time, every 1024 uses of a key, when a key leaves the cache,
/// when the session reads `byok.metrics`, and when the backend exits.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
    ) {
        let now = Tick::now();
        let due = LAST_FLUSH.with_borrow_mut(|last| match last {
            Some(at) if now.duration_since(*at) < FLUSH_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        });
        if due {
            flush_metrics();
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn at_exit(_code: i32, _arg: pg_sys::Datum) {
    flush_metrics();
}

/// Counters and size of this backend's cache.
pub fn stats() -> (usize, CacheStats) {
    RING.with_ring(|ring| (ring.ciphers.len(), ring.ciphers.stats()))
}
