//! Keeping every backend's ready keys in step with the catalog.
//!
//! A statement trigger on the catalog tables sends a relcache invalidation for
//! the table it fired on. PostgreSQL delivers it to every backend when the
//! transaction commits (and to this one at the next command), where
//! [`relcache_callback`] marks the key ring stale. Changes made by hand with
//! plain SQL are covered too, and an aborted change invalidates nothing.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::ByokError;
use crate::postgres::fmgr::pg_function_info_v1;
use crate::{catalog, keyring};

pub fn register() {
    // SAFETY: registers plain C callbacks with static lifetime; called once per
    // process from _PG_init, before any invalidation can be delivered.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0));
        // Who may use a tenant follows role membership and the superuser flag:
        // a change to either re-checks every ready key's grant.
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(roles_callback),
                pg_sys::Datum::from(0),
            );
        }
    }
}

/// Runs inside invalidation processing: only sets a flag.
#[pg_guard]
unsafe extern "C-unwind" fn roles_callback(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    keyring::invalidate_all();
}

/// Runs inside invalidation processing: it must not error or allocate, so it only sets flags.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = match catalog::known_catalog_ids() {
        // Nothing cached yet that could be stale, unless everything is being reset.
        None => relid == pg_sys::InvalidOid,
        Some(ids) => {
            relid == pg_sys::InvalidOid
                || relid == ids.tenant_config
                || relid == ids.wrapped_data_keys
                || relid == ids.tenant_grants
                || relid == ids.protected_column_registry
        }
    };
    if ours {
        keyring::invalidate_all();
        catalog::forget_catalog_ids();
    }
}

pg_function_info_v1!(byok_invalidate_key_caches);

/// `byok.invalidate_key_caches()`: the statement trigger on the catalog tables.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_invalidate_key_caches(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr passes a valid `fcinfo`; its context is either null or a
    // node whose tag says what it is, and a TriggerData's relation is open for
    // the duration of the trigger call.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            ByokError::NotATrigger("byok.invalidate_key_caches()").raise();
        }
        let trigger = context.cast::<pg_sys::TriggerData>();
        let relid = (*(*trigger).tg_relation).rd_id;
        pg_sys::CacheInvalidateRelcacheByRelid(relid);
        // On Citus the catalog tables are reference tables: a change arrives at
        // each node's shard (byok.wrapped_data_keys_102008), whose OID no cache
        // watches. Also invalidate the table the callback knows.
        let known = catalog::known_catalog_ids().is_some_and(|ids| {
            [
                ids.tenant_config,
                ids.wrapped_data_keys,
                ids.tenant_grants,
                ids.protected_column_registry,
            ]
            .contains(&relid)
        });
        if !known && let Err(e) = catalog::invalidate_everywhere() {
            e.raise();
        }
        keyring::invalidate_all();
        pg_sys::Datum::from(0)
    }
}
