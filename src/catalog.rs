//! Reading and writing the key catalog (`sql/catalog.sql`) through SPI. Only
//! cache misses and administrative functions come here, never a cache hit.
//!
//! Lookups made on behalf of encrypt/decrypt run with the extension owner's
//! rights (like a SECURITY DEFINER function), so applications need no grant on
//! the catalog tables. Every operator is schema-qualified, so the caller's
//! search_path cannot substitute its own.

use std::cell::Cell;

use byok_core::config::ProviderKind;
use byok_kms::WrappedDek;
use byok_kms::protocol::ProviderRef;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::ByokError;
use crate::postgres::session;
use crate::postgres::spi::Required;

/// The OIDs the key caches care about, looked up once per backend.
#[derive(Debug, Clone, Copy)]
pub struct CatalogIds {
    pub owner: pg_sys::Oid,
    pub tenant_config: pg_sys::Oid,
    pub wrapped_data_keys: pg_sys::Oid,
    pub tenant_grants: pg_sys::Oid,
    /// (searchable columns' term settings are cached with the keys)
    pub protected_column_registry: pg_sys::Oid,
}

thread_local! {
    static CATALOG_IDS: Cell<Option<CatalogIds>> = const { Cell::new(None) };
}

/// Forgets the cached OIDs (the extension may have been dropped and re-created).
pub fn forget_catalog_ids() {
    CATALOG_IDS.with(|c| c.set(None));
}

pub fn known_catalog_ids() -> Option<CatalogIds> {
    CATALOG_IDS.with(|c| c.get())
}

fn catalog_ids() -> Result<CatalogIds, ByokError> {
    if let Some(ids) = known_catalog_ids() {
        return Ok(ids);
    }
    let ids = Spi::connect(|client| -> Result<Option<CatalogIds>, ByokError> {
        let table = client.select(
            "SELECT e.extowner, c.oid, k.oid, g.oid,
                    pg_catalog.to_regclass('byok.protected_column_registry')::pg_catalog.oid
               FROM pg_catalog.pg_extension e,
                    pg_catalog.pg_class c, pg_catalog.pg_class k, pg_catalog.pg_class g
              WHERE e.extname OPERATOR(pg_catalog.=) 'byok_pg'
                AND c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('byok.tenant_config')
                AND k.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('byok.wrapped_data_keys')
                AND g.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('byok.tenant_grants')",
            Some(1),
            &[],
        )?;
        if table.is_empty() {
            return Ok(None);
        }
        let row = table.first();
        Ok(Some(CatalogIds {
            owner: row.get(1)?.unwrap_or(pg_sys::InvalidOid),
            tenant_config: row.get(2)?.unwrap_or(pg_sys::InvalidOid),
            wrapped_data_keys: row.get(3)?.unwrap_or(pg_sys::InvalidOid),
            tenant_grants: row.get(4)?.unwrap_or(pg_sys::InvalidOid),
            protected_column_registry: row.get(5)?.unwrap_or(pg_sys::InvalidOid),
        }))
    })?;
    let ids = ids.ok_or_else(|| {
        ByokError::Catalog("the byok_pg extension is not installed in this database".into())
    })?;
    CATALOG_IDS.with(|c| c.set(Some(ids)));
    session::set_extension_owner(ids.owner);
    Ok(ids)
}

/// Makes every backend of this database drop its ready keys when the current
/// transaction commits (PostgreSQL's relcache invalidation, as the catalog
/// trigger does).
pub fn invalidate_everywhere() -> Result<(), ByokError> {
    let ids = catalog_ids()?;
    // SAFETY: queues an invalidation for a relation OID read from the catalog
    // in this transaction; PostgreSQL ignores OIDs it does not know.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(ids.wrapped_data_keys) };
    Ok(())
}

/// Switches the current user id to the extension's owner (adding `flags` to the
/// security context) with search_path pinned to `pg_catalog, pg_temp`; the
/// returned guard restores the caller's id, context and search_path when
/// dropped, also while an error unwinds.
fn switch_to_owner(owner: pg_sys::Oid, flags: u32) -> crate::postgres::security::SwitchedUser {
    crate::postgres::security::SwitchedUser::enter_catalog(owner, flags)
}

/// Runs `f` with the extension owner's user id (and restores the caller's
/// afterwards, also when `f` raises an error).
fn as_catalog_owner<R>(f: impl FnOnce() -> Result<R, ByokError>) -> Result<R, ByokError> {
    let ids = catalog_ids()?;
    let _restore = switch_to_owner(
        ids.owner,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
    );
    f()
}

/// Runs administrative work with the extension owner's user id. Who may call it
/// is decided by EXECUTE privileges (`byok_admin`); the catalog tables stay
/// closed to the caller otherwise. The caller's id comes back afterwards, also
/// when `f` raises an error; `session_user` (what the audit trail records) is
/// never changed.
pub fn as_extension_owner<R>(f: impl FnOnce() -> Result<R, ByokError>) -> Result<R, ByokError> {
    let ids = catalog_ids()?;
    let _caller = session::enter_as_caller(session::current_user());
    let _owner = switch_to_owner(ids.owner, pg_sys::SECURITY_LOCAL_USERID_CHANGE);
    f()
}

/// A tenant as the catalog holds it: its key manager and master key, its
/// backup key (`encryption.backup`) and whether DR is active.
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub provider: ProviderRef,
    pub master_key_id: String,
    pub backup: Option<BackupKeyRecord>,
    pub dr_active: bool,
}

/// A tenant's backup master key and the key manager holding it.
#[derive(Debug, Clone)]
pub struct BackupKeyRecord {
    pub provider: ProviderRef,
    pub master_key_id: String,
}

impl TenantRecord {
    /// Where new data keys are made: the backup while DR is active, else the
    /// primary (with the backup as the second wrap).
    pub fn generating_key(&self) -> (&ProviderRef, &str) {
        match (&self.backup, self.dr_active) {
            (Some(backup), true) => (&backup.provider, &backup.master_key_id),
            _ => (&self.provider, &self.master_key_id),
        }
    }
}

/// A backup key manager's reference, flagged as the backup.
pub fn backup_provider_ref(
    kind: ProviderKind,
    options: serde_json::Map<String, serde_json::Value>,
) -> ProviderRef {
    ProviderRef {
        provider: kind,
        options,
        create_key_store: false,
        backup: true,
    }
}

/// Columns new in 0.2.0 are read through `to_jsonb(row)`: between installing
/// the library and `ALTER EXTENSION byok_pg UPDATE` they are missing, and a
/// missing key reads as NULL instead of failing every decryption.
fn json_object(value: Option<serde_json::Value>) -> serde_json::Map<String, serde_json::Value> {
    match value {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// The tenant `tenant_id` (locked for update with `lock`), or `None`. Call as
/// the extension's owner.
pub fn load_tenant(tenant_id: &str, lock: bool) -> Result<Option<TenantRecord>, ByokError> {
    Spi::connect_mut(|client| load_tenant_with(client, tenant_id, lock))
}

/// [`load_tenant`] with an open SPI client.
pub fn load_tenant_with(
    client: &mut pgrx::spi::SpiClient<'_>,
    tenant_id: &str,
    lock: bool,
) -> Result<Option<TenantRecord>, ByokError> {
    let sql = if lock {
        "SELECT provider, master_key_id, provider_options,
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_provider',
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_master_key_id',
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->) 'backup_provider_options',
                (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'dr_active')::pg_catalog.bool
           FROM byok.tenant_config t
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 FOR UPDATE"
    } else {
        "SELECT provider, master_key_id, provider_options,
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_provider',
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_master_key_id',
                pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->) 'backup_provider_options',
                (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'dr_active')::pg_catalog.bool
           FROM byok.tenant_config t
          WHERE tenant_id OPERATOR(pg_catalog.=) $1"
    };
    let rows = client.update(sql, Some(1), &[DatumWithOid::from(tenant_id)])?;
    if rows.is_empty() {
        return Ok(None);
    }
    let row = rows.first();
    let name: String = row
        .get(1)?
        .ok_or_else(|| ByokError::Catalog(format!("tenant \"{tenant_id}\" has no provider")))?;
    let master_key_id: String = row
        .get(2)?
        .ok_or_else(|| ByokError::Catalog(format!("tenant \"{tenant_id}\" has no master key")))?;
    let options = json_object(row.get::<pgrx::JsonB>(3)?.map(|j| j.0));
    let backup = match (row.get::<String>(4)?, row.get::<String>(5)?) {
        (Some(kind), Some(master_key_id)) => Some(BackupKeyRecord {
            provider: backup_provider_ref(
                provider_of(&kind)?,
                json_object(row.get::<pgrx::JsonB>(6)?.map(|j| j.0)),
            ),
            master_key_id,
        }),
        _ => None,
    };
    Ok(Some(TenantRecord {
        provider: ProviderRef {
            provider: provider_of(&name)?,
            options,
            create_key_store: false,
            backup: false,
        },
        master_key_id,
        backup,
        dr_active: row.get::<bool>(7)?.unwrap_or(false),
    }))
}

/// The tenant owning data key `dek_id`, if the key exists. Call as the owner.
pub fn tenant_of_data_key(dek_id: i64) -> Result<Option<String>, ByokError> {
    read_one(
        "SELECT tenant_id FROM byok.wrapped_data_keys WHERE dek_id OPERATOR(pg_catalog.=) $1",
        &[DatumWithOid::from(dek_id)],
    )
}

/// Where this node stands in a Citus cluster, as far as the key catalog goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterRole {
    /// No Citus, or a key catalog that is still this node's own.
    Standalone,
    /// The Citus coordinator, whose key catalog is a set of reference tables.
    Coordinator,
    /// A Citus worker: it reads the catalog the coordinator writes.
    Worker,
}

/// How Citus distributes a table (`pg_dist_partition.partmethod`: `h`ash,
/// `r`ange, `a`ppend, `n`one for a reference table), or `None` for a table
/// Citus does not know (or no Citus). Two catalog reads: not for a per-row path.
pub fn citus_partition_method(relid: pg_sys::Oid) -> Result<Option<String>, ByokError> {
    // (Citus's catalogs exist only where Citus is installed: asked by name first)
    let citus = read_one::<bool>(
        "SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL",
        &[],
    )?
    .unwrap_or(false);
    if !citus {
        return Ok(None);
    }
    read_one::<String>(
        "SELECT partmethod::pg_catalog.text FROM pg_catalog.pg_dist_partition
          WHERE logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid",
        &[DatumWithOid::from(relid)],
    )
}

/// This node's [`ClusterRole`]. Administrative paths only (two catalog reads).
pub fn cluster_role() -> Result<ClusterRole, ByokError> {
    // (Citus's catalogs exist only where Citus is installed: asked by name first)
    let citus = read_one::<bool>(
        "SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL
            AND pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL",
        &[],
    )?
    .unwrap_or(false);
    if !citus {
        return Ok(ClusterRole::Standalone);
    }
    let group = read_one::<i32>(
        "SELECT l.groupid FROM pg_catalog.pg_dist_local_group l
          WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                         WHERE p.logicalrelid OPERATOR(pg_catalog.=)
                               pg_catalog.to_regclass('byok.wrapped_data_keys'))",
        &[],
    )?;
    Ok(match group {
        None => ClusterRole::Standalone,
        Some(0) => ClusterRole::Coordinator,
        Some(_) => ClusterRole::Worker,
    })
}

/// On a Citus coordinator: runs `format(template, argument)` on every worker
/// (Citus's `run_command_on_workers`, each node in its own transaction) and
/// returns the sum of the bigint each returns; a node's failure is an error
/// naming it.
pub fn on_every_worker(template: &str, argument: Option<&str>) -> Result<i64, ByokError> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT coalesce(sum(r.result::pg_catalog.int8) FILTER (WHERE r.success), 0)::pg_catalog.int8,
                    pg_catalog.string_agg(r.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) r.nodeport
                                          OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) r.result, '; ')
                        FILTER (WHERE NOT r.success)
               FROM pg_catalog.run_command_on_workers(pg_catalog.format($1, $2)) r",
            None,
            &[DatumWithOid::from(template), DatumWithOid::from(argument)],
        )?;
        let row = rows.first();
        let total = row.get::<i64>(1)?.unwrap_or(0);
        match row.get::<String>(2)? {
            None => Ok(total),
            Some(failures) => Err(ByokError::WrongState {
                message: format!("not every Citus worker answered: {failures}"),
                detail: None,
                hint: Some("run it again once every worker answers".into()),
            }),
        }
    })
}

/// The first column of the first row of a read-only query (None: no row or
/// NULL). Read-only for SPI, so it works on a standby (pgrx's `Spi::get_one*`
/// would assign a transaction id, which a standby refuses).
pub fn read_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> Result<Option<T>, ByokError> {
    Spi::connect(|client| {
        let rows = client.select(sql, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows.first().get::<T>(1)?)
    })
}

/// What dual control needs to know about a role taking part in it.
#[derive(Debug, Clone)]
pub struct Participant {
    pub oid: pg_sys::Oid,
    pub name: String,
    pub is_admin: bool,
    pub can_create_roles: bool,
}

/// The dual-control facts about `role_name`.
pub fn participant(role_name: &str) -> Result<Participant, ByokError> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT r.rolcreaterole, pg_catalog.pg_has_role(r.oid, 'byok_admin', 'USAGE'), r.oid
               FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[DatumWithOid::from(role_name)],
        )?;
        if rows.is_empty() {
            return Err(ByokError::UnknownRole(role_name.to_string()));
        }
        let row = rows.first();
        Ok(Participant {
            oid: row
                .get::<pg_sys::Oid>(3)?
                .ok_or_else(|| ByokError::UnknownRole(role_name.to_string()))?,
            name: role_name.to_string(),
            can_create_roles: row.get::<bool>(1)?.unwrap_or(true),
            is_admin: row.get::<bool>(2)?.unwrap_or(false),
        })
    })
}

/// How `approver`'s and `requester`'s administrator rights came to be, as far
/// as dual control cares. A party's *provenance* is every non-superuser role
/// that granted a membership on its path to byok_admin, and, transitively, the
/// provenance of those grantors (a grantor needed byok_admin's ADMIN OPTION, or
/// CREATEROLE, to grant it). Returns whether either party's rights came from the
/// other (directly or through a role the other belongs to), and a role holding
/// CREATEROLE in both provenances (one person who could have minted both
/// logins), if any.
pub fn membership_conflicts(
    approver: pg_sys::Oid,
    requester: pg_sys::Oid,
) -> Result<(bool, Option<String>), ByokError> {
    Spi::connect(|client| {
        let rows = client.select(
            "WITH RECURSIVE
             parties(who, r, other) AS (
                 VALUES ('approver', $1::pg_catalog.oid, $2::pg_catalog.oid),
                        ('requester', $2::pg_catalog.oid, $1::pg_catalog.oid)),
             provenance(who, grantor) AS (
                 SELECT p.who, m.grantor
                   FROM parties p
                   JOIN pg_catalog.pg_auth_members m
                     ON pg_catalog.pg_has_role(p.r, m.member, 'MEMBER')
                    AND pg_catalog.pg_has_role(m.roleid, 'byok_admin', 'MEMBER')
                 UNION
                 SELECT v.who, m.grantor
                   FROM provenance v
                   JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) v.grantor AND NOT g.rolsuper
                   JOIN pg_catalog.pg_auth_members m
                     ON pg_catalog.pg_has_role(v.grantor, m.member, 'MEMBER')
                    AND pg_catalog.pg_has_role(m.roleid, 'byok_admin', 'MEMBER')),
             named AS (
                 SELECT v.who, g.oid, g.rolname, g.rolcreaterole
                   FROM provenance v JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) v.grantor
                  WHERE NOT g.rolsuper)
             SELECT EXISTS (SELECT 1 FROM named n JOIN parties p ON p.who OPERATOR(pg_catalog.=) n.who
                             WHERE pg_catalog.pg_has_role(p.other, n.oid, 'MEMBER')),
                    (SELECT a.rolname::pg_catalog.text FROM named a JOIN named b ON b.oid OPERATOR(pg_catalog.=) a.oid
                      WHERE a.who OPERATOR(pg_catalog.=) 'approver' AND b.who OPERATOR(pg_catalog.=) 'requester'
                        AND a.rolcreaterole
                      LIMIT 1)",
            Some(1),
            &[DatumWithOid::from(approver), DatumWithOid::from(requester)],
        )?;
        let row = rows.first();
        Ok((row.get::<bool>(1)?.unwrap_or(true), row.get::<String>(2)?))
    })
}

/// A data key as the catalog holds it, with what is needed to unwrap and cache it.
#[derive(Debug, Clone)]
pub struct DataKeyRecord {
    pub tenant_id: String,
    /// The tenant's monitoring rules (`monitoring_rules`, or the guide's).
    pub monitoring: byok_core::monitors::Rules,
    pub state: KeyState,
    pub provider: ProviderKind,
    pub wrapped: Option<WrappedDek>,
    /// The tenant's provider block (the broker needs it to reach the key manager).
    pub provider_options: serde_json::Map<String, serde_json::Value>,
    pub cache: byok_kms::protocol::CacheSettings,
    /// The master key that wrapped it was retired (`byok.retired_master_keys`).
    pub master_key_retired: bool,
    /// The same key wrapped by the tenant's backup master key, when the
    /// tenant's backup is still the key manager that made it.
    pub backup: Option<byok_kms::protocol::BackupWrap>,
    /// DR is active for the tenant: only the backup is asked.
    pub dr_active: bool,
    /// An index key (blind index terms), not a data key.
    pub is_index_key: bool,
}

/// A tenant's cache settings, the server's defaults filling what it leaves out.
pub fn cache_settings(
    ttl: Option<i32>,
    max_entries: Option<i32>,
    grace: Option<i32>,
    revocation_check: Option<i32>,
) -> byok_kms::protocol::CacheSettings {
    byok_kms::protocol::CacheSettings {
        ttl_seconds: ttl
            .map_or_else(crate::gucs::cache_ttl_seconds, |t| t.max(0) as u32)
            .max(1),
        max_entries: max_entries
            .map_or_else(crate::gucs::cache_max_entries, |m| m.max(0) as u32)
            .max(1),
        grace_period_seconds: grace.unwrap_or(0).max(0) as u32,
        revocation_check_seconds: revocation_check
            .map_or_else(crate::gucs::revocation_check_seconds, |s| s.max(0) as u32),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    DecryptOnly,
    Retired,
    Destroyed,
}

impl KeyState {
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            KeyState::Active,
            KeyState::DecryptOnly,
            KeyState::Retired,
            KeyState::Destroyed,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

fn provider_of(name: &str) -> Result<ProviderKind, ByokError> {
    ProviderKind::from_name(name)
        .ok_or_else(|| ByokError::Catalog(format!("unknown provider \"{name}\" in the catalog")))
}

fn state_of(name: &str) -> Result<KeyState, ByokError> {
    KeyState::from_name(name)
        .ok_or_else(|| ByokError::Catalog(format!("unknown key state \"{name}\" in the catalog")))
}

/// The data key `dek_id`, or `None` if the catalog has no such key.
pub fn load_data_key(dek_id: u64) -> Result<Option<DataKeyRecord>, ByokError> {
    as_catalog_owner(|| {
        Spi::connect(|client| {
            let args = [DatumWithOid::from(dek_id as i64)];
            let table = client.select(
                "SELECT k.tenant_id, k.state, k.provider, k.wrapped_dek, k.cmk_id, k.cmk_version,
                        t.cache_ttl_seconds, t.cache_max_entries, t.cache_grace_period_seconds,
                        t.provider_options, (t.config OPERATOR(pg_catalog.#>>) '{encryption,cache_config,revocation_check_seconds}')::pg_catalog.int4,
                        t.config OPERATOR(pg_catalog.#>) '{encryption,monitoring_rules}',
                        (pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'backup_wrapped_dek')::pg_catalog.bytea,
                        pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'backup_cmk_id',
                        pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'backup_cmk_version',
                        pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->) 'backup_provider_options',
                        -- the tenant's backup, if it is the key manager that wrapped this key
                        CASE WHEN (pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'backup_provider')
                                  OPERATOR(pg_catalog.=) (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_provider')
                             THEN pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'backup_provider' END,
                        (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'dr_active')::pg_catalog.bool,
                        (pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.->>) 'purpose') IS NOT DISTINCT FROM 'index'
                   FROM byok.wrapped_data_keys k
                   JOIN byok.tenant_config t ON t.tenant_id OPERATOR(pg_catalog.=) k.tenant_id
                  WHERE k.dek_id OPERATOR(pg_catalog.=) $1",
                Some(1),
                &args,
            )?;
            if table.is_empty() {
                return Ok(None);
            }
            let row = table.first();
            let wrapped = row
                .get::<Vec<u8>>(4)?
                .map(|blob| -> Result<WrappedDek, ByokError> {
                    Ok(WrappedDek {
                        blob,
                        cmk_id: row.required::<String>(5)?,
                        cmk_version: row.required::<String>(6)?,
                    })
                });
            let mut record = DataKeyRecord {
                tenant_id: row.required::<String>(1)?,
                state: state_of(&row.required::<String>(2)?)?,
                provider: provider_of(&row.required::<String>(3)?)?,
                wrapped: wrapped.transpose()?,
                cache: cache_settings(
                    row.get::<i32>(7)?,
                    row.get::<i32>(8)?,
                    row.get::<i32>(9)?,
                    row.get::<i32>(11)?,
                ),
                master_key_retired: false,
                backup: match (row.get::<Vec<u8>>(13)?, row.get::<String>(17)?) {
                    (Some(blob), Some(kind)) => Some(byok_kms::protocol::BackupWrap {
                        provider: backup_provider_ref(
                            provider_of(&kind)?,
                            json_object(row.get::<pgrx::JsonB>(16)?.map(|j| j.0)),
                        ),
                        wrapped: WrappedDek {
                            blob,
                            cmk_id: row.required::<String>(14)?,
                            cmk_version: row.required::<String>(15)?,
                        },
                    }),
                    _ => None,
                },
                dr_active: row.get::<bool>(18)?.unwrap_or(false),
                is_index_key: row.get::<bool>(19)?.unwrap_or(false),
                monitoring: monitoring_rules(row.get::<pgrx::JsonB>(12)?.map(|j| j.0)),
                provider_options: match row.get::<pgrx::JsonB>(10)?.map(|j| j.0) {
                    Some(serde_json::Value::Object(map)) => map,
                    _ => serde_json::Map::new(),
                },
            };
            // (after the row is read: another query replaces SPI's result)
            record.master_key_retired = master_key_retired(client, dek_id)?;
            Ok(Some(record))
        })
    })
}

/// A tenant's `monitoring_rules` (checked when the tenant was configured; a
/// document that no longer parses, edited by hand, falls back to the guide's).
fn monitoring_rules(section: Option<serde_json::Value>) -> byok_core::monitors::Rules {
    section
        .as_ref()
        .and_then(serde_json::Value::as_object)
        .and_then(|obj| byok_core::monitors::parse_rules("monitoring_rules", obj).ok())
        .unwrap_or_else(byok_core::monitors::default_rules)
}

/// Whether the master key that wrapped data key `dek_id` was retired. (The
/// table is new in 0.2.0: between installing the library and `ALTER EXTENSION
/// byok_pg UPDATE` it is missing, and nothing is retired yet.)
fn master_key_retired(client: &pgrx::spi::SpiClient<'_>, dek_id: u64) -> Result<bool, ByokError> {
    let present = client
        .select(
            "SELECT pg_catalog.to_regclass('byok.retired_master_keys') IS NOT NULL",
            Some(1),
            &[],
        )?
        .first()
        .get::<bool>(1)?
        .unwrap_or(false);
    if !present {
        return Ok(false);
    }
    Ok(client
        .select(
            "SELECT EXISTS (SELECT 1 FROM byok.wrapped_data_keys k
                              JOIN byok.retired_master_keys r
                                ON r.tenant_id OPERATOR(pg_catalog.=) k.tenant_id
                               AND r.master_key_id OPERATOR(pg_catalog.=) k.cmk_id
                             WHERE k.dek_id OPERATOR(pg_catalog.=) $1)",
            Some(1),
            &[DatumWithOid::from(dek_id as i64)],
        )?
        .first()
        .get::<bool>(1)?
        .unwrap_or(false))
}

/// The condition (on `byok.wrapped_data_keys k`) that leaves index keys out.
/// Between installing this library and `ALTER EXTENSION byok_pg UPDATE` the
/// 0.1.0 catalog has no `purpose` column (and no index keys). (A plain column
/// test: on Citus a statement on a reference table may not pass its rows to a
/// function that is not immutable, as `to_jsonb(k)` would.)
pub fn data_keys_only() -> Result<&'static str, ByokError> {
    let ids = catalog_ids()?;
    // SAFETY: a syscache lookup by relation OID and a NUL-terminated name.
    let purpose = unsafe { pg_sys::get_attnum(ids.wrapped_data_keys, c"purpose".as_ptr()) };
    Ok(if purpose > 0 {
        "k.purpose OPERATOR(pg_catalog.=) 'data'"
    } else {
        "true"
    })
}

/// A tenant's index keys: the active one first, then any decrypt-only one a
/// rotation left (probes use them all), and the newest destroyed one.
#[derive(Debug, Clone, Default)]
pub struct IndexKeys {
    pub live: Vec<u64>,
    pub destroyed: Option<u64>,
}

pub fn index_keys(tenant_id: &str) -> Result<IndexKeys, ByokError> {
    as_catalog_owner(|| {
        let rows = read_one::<pgrx::JsonB>(
            "SELECT pg_catalog.jsonb_build_object(
                        'live', coalesce(pg_catalog.jsonb_agg(dek_id ORDER BY state OPERATOR(pg_catalog.<>) 'active', dek_id DESC)
                                         FILTER (WHERE state OPERATOR(pg_catalog.=) ANY ('{active,decrypt-only}')), '[]'),
                        'destroyed', pg_catalog.max(dek_id) FILTER (WHERE state OPERATOR(pg_catalog.=) 'destroyed'))
               FROM byok.wrapped_data_keys
              WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND purpose OPERATOR(pg_catalog.=) 'index'",
            &[DatumWithOid::from(tenant_id)],
        )?
        .map(|j| j.0)
        .unwrap_or_default();
        Ok(IndexKeys {
            live: rows["live"]
                .as_array()
                .map(|ids| ids.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default(),
            destroyed: rows["destroyed"].as_u64(),
        })
    })
}

/// The term settings of the searchable column sealed with `context`
/// (`byok.make_searchable`): its term length and normalization.
pub fn search_spec(context: &[u8]) -> Result<Option<(usize, String)>, ByokError> {
    // (a context that is not UTF-8 cannot be registered: it has no settings)
    let Ok(context) = std::str::from_utf8(context) else {
        return Ok(None);
    };
    as_catalog_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT r.search_term_length::pg_catalog.int4, r.search_normalization,
                        r.relid::pg_catalog.oid, r.relid::pg_catalog.text
                   FROM byok.protected_column_registry r
                  WHERE r.context OPERATOR(pg_catalog.=) $1 AND r.search_term_length IS NOT NULL
                    -- (a row whose table is gone, before the event trigger removes it)
                    AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                 WHERE c.oid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid)
                  LIMIT 2",
                Some(2),
                &[DatumWithOid::from(context)],
            )?;
            if rows.is_empty() {
                return Ok(None);
            }
            // (make_searchable and protect_column keep a searchable context to
            // one column; two mean the registry was edited by hand)
            if rows.len() > 1 {
                return Err(ByokError::Catalog(format!(
                    "two searchable columns are registered with context \"{}\"",
                    context.chars().take(64).collect::<String>()
                )));
            }
            let row = rows.first();
            let (term_len, normalization) = (
                row.required::<i32>(1)?.max(0) as usize,
                row.required::<String>(2)?,
            );
            // (a table distributed after make_searchable: its workers would
            // compute terms with the defaults)
            if !byok_core::search::is_default_spec(term_len, &normalization)
                && citus_partition_method(row.required::<pg_sys::Oid>(3)?)?.is_some()
            {
                return Err(ByokError::CitusSearchSettings(row.required::<String>(4)?));
            }
            Ok(Some((term_len, normalization)))
        })
    })
}

/// What encrypt needs to know about a tenant.
#[derive(Debug, Clone)]
pub struct TenantKeyInfo {
    pub active_dek_id: Option<u64>,
    pub cache: byok_kms::protocol::CacheSettings,
}

/// The tenant's active data key id, or `None` if the tenant does not exist.
pub fn load_tenant_key_info(tenant_id: &str) -> Result<Option<TenantKeyInfo>, ByokError> {
    as_catalog_owner(|| {
        let data_keys_only = data_keys_only()?;
        Spi::connect(|client| {
            let args = [DatumWithOid::from(tenant_id)];
            let table = client.select(
                &format!("SELECT k.dek_id, t.cache_ttl_seconds, t.cache_max_entries, t.cache_grace_period_seconds,
                        (t.config OPERATOR(pg_catalog.#>>) '{{encryption,cache_config,revocation_check_seconds}}')::pg_catalog.int4
                   FROM byok.tenant_config t
                   LEFT JOIN byok.wrapped_data_keys k
                          ON k.tenant_id OPERATOR(pg_catalog.=) t.tenant_id
                         AND k.state OPERATOR(pg_catalog.=) 'active'
                         AND {data_keys_only}
                  WHERE t.tenant_id OPERATOR(pg_catalog.=) $1"),
                Some(1),
                &args,
            )?;
            if table.is_empty() {
                return Ok(None);
            }
            let row = table.first();
            Ok(Some(TenantKeyInfo {
                active_dek_id: row.get::<i64>(1)?.map(|id| id as u64),
                cache: cache_settings(
                    row.get::<i32>(2)?,
                    row.get::<i32>(3)?,
                    row.get::<i32>(4)?,
                    row.get::<i32>(5)?,
                ),
            }))
        })
    })
}

/// Appends an event to the audit trail (`byok.audit_event`, which also alerts on
/// failures per the tenant's `audit` settings). Administration only: never on
/// the per-row path.
pub fn audit(
    event: &str,
    tenant_id: Option<&str>,
    dek_id: Option<i64>,
    ok: bool,
    reason: Option<&str>,
    details: Option<serde_json::Value>,
) -> Result<(), ByokError> {
    let caller = session::acting_role();
    Spi::run_with_args(
        "SELECT byok.audit_event($1, $2, $3, $4, $5, $6, $7)",
        &[
            DatumWithOid::from(event),
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(dek_id),
            DatumWithOid::from(if ok { "ok" } else { "failed" }),
            DatumWithOid::from(reason),
            DatumWithOid::from(details.map(pgrx::JsonB)),
            DatumWithOid::from(caller),
        ],
    )?;
    Ok(())
}

/// Whether `user` is granted tenant `tenant_id` (directly or through a role it
/// belongs to); `byok.may_use_tenant` in the catalog.
pub fn may_use_tenant(user: pg_sys::Oid, tenant_id: &str) -> Result<bool, ByokError> {
    as_catalog_owner(|| {
        Ok(read_one::<bool>(
            "SELECT byok.may_use_tenant($1, $2)",
            &[DatumWithOid::from(user), DatumWithOid::from(tenant_id)],
        )?
        .unwrap_or(false))
    })
}

/// Whether the current user may see tenant `tenant_id` in the catalog views:
/// superusers and byok_admin members see every tenant, other roles the ones
/// they are granted.
pub fn current_user_sees_tenant(tenant_id: &str) -> Result<bool, ByokError> {
    // SAFETY: plain lookups of the backend's own state and the role cache.
    let (user, admin) = unsafe {
        (
            pg_sys::GetUserId(),
            pg_sys::get_role_oid(c"byok_admin".as_ptr(), true),
        )
    };
    // SAFETY: as above.
    if unsafe { pg_sys::superuser_arg(user) }
        || (admin != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(user, admin) })
    {
        return Ok(true);
    }
    may_use_tenant(user, tenant_id)
}

/// Whether `role` itself (not through a membership) is granted `tenant_id`.
pub fn granted_directly(role: pg_sys::Oid, tenant_id: &str) -> Result<bool, ByokError> {
    as_catalog_owner(|| {
        Ok(read_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM byok.tenant_grants
                             WHERE grantee::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                               AND tenant_id OPERATOR(pg_catalog.=) $2)",
            &[DatumWithOid::from(role), DatumWithOid::from(tenant_id)],
        )?
        .unwrap_or(false))
    })
}
