//! Running code with another role's rights without handing that role's
//! rights to anyone else.
//!
//! Two situations, one guard:
//! - the extension's own catalog work runs as the extension's owner (a
//!   superuser), like a SECURITY DEFINER function: no code an untrusted role
//!   wrote may run there, so the search_path is pinned to
//!   `pg_catalog, pg_temp` (pg_temp last: otherwise it is searched first for
//!   relations, and a temporary view named `pg_roles` would be read with the
//!   owner's rights);
//! - statements against a user table (re-encryption, reference counts) run as
//!   the table's owner inside a security-restricted operation, as VACUUM and
//!   REFRESH MATERIALIZED VIEW do: the owner's triggers, defaults, policies and
//!   index expressions run with the owner's rights and nothing more.
//!
//! The guard restores the previous user id, security context and search_path
//! when dropped, also while an error unwinds.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;

thread_local! {
    /// How many catalog guards (`SwitchedUser::enter_catalog`) are open.
    static CATALOG_GUARDS: Cell<u32> = const { Cell::new(0) };
}

/// Whether the extension's own catalog work is running (as its owner, inside
/// `SwitchedUser::enter_catalog`): statements no session setting restricts.
pub fn in_catalog_work() -> bool {
    CATALOG_GUARDS.get() > 0
}

/// The search_path every piece of code running with elevated rights uses.
pub const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// A changed user id (and security context) with search_path pinned.
pub struct SwitchedUser {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    guc_nest_level: i32,
    catalog: bool,
}

impl SwitchedUser {
    /// Becomes `user`, adding `flags` (`SECURITY_*`) to the security context.
    pub fn enter(user: pg_sys::Oid, flags: u32) -> Self {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        // SAFETY: plain calls into the backend's own state, on its main thread.
        // The GUC nest level is popped in Drop (or by transaction abort, which
        // pops every level above the transaction's).
        let guc_nest_level = unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                PINNED_SEARCH_PATH.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            pg_sys::SetUserIdAndSecContext(user, saved_context | flags as i32);
            level
        };
        SwitchedUser {
            saved_user,
            saved_context,
            guc_nest_level,
            catalog: false,
        }
    }

    /// The extension's catalog work, as its owner. On Citus the key catalog is
    /// a set of reference tables, and a catalog read made while a worker runs
    /// a shard query (a pushed-down `byok.decrypt` whose key is not ready yet)
    /// is a nested distributed execution, which Citus refuses unless allowed.
    /// Allowed here, inside this guard only: the nested statements touch only
    /// reference tables, which have a copy on every node and never move, so
    /// they read this node's copy.
    pub fn enter_catalog(user: pg_sys::Oid, flags: u32) -> Self {
        let mut guard = Self::enter(user, flags);
        guard.catalog = true;
        CATALOG_GUARDS.set(CATALOG_GUARDS.get() + 1);
        const NESTED: &CStr = c"citus.allow_nested_distributed_execution";
        // SAFETY: reads and sets a setting within the nest level `enter`
        // opened (undone when the guard drops); only where Citus defined it,
        // so no placeholder is created without Citus.
        unsafe {
            if !pg_sys::GetConfigOption(NESTED.as_ptr(), true, false).is_null() {
                pg_sys::set_config_option(
                    NESTED.as_ptr(),
                    c"on".as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
        }
        guard
    }

    /// Work on a user table, as its owner, in a security-restricted operation.
    pub fn as_table_owner(owner: pg_sys::Oid) -> Self {
        Self::enter(
            owner,
            pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
        )
    }
}

impl Drop for SwitchedUser {
    fn drop(&mut self) {
        if self.catalog {
            CATALOG_GUARDS.set(CATALOG_GUARDS.get().saturating_sub(1));
        }
        // SAFETY: restores exactly what `enter` saved. During an unwind the
        // error has already been copied and flushed by pgrx's FFI guard, so
        // the backend is in a state where these calls are allowed.
        unsafe {
            // `false`, as VACUUM does: every setting changed inside, even by a
            // plain SET in a table owner's trigger, is undone; none survives
            // into the caller's session (a search_path set there would
            // otherwise run the owner's functions with the caller's rights).
            pg_sys::AtEOXact_GUC(false, self.guc_nest_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

/// The owner of relation `relid`, or `None` if it does not exist.
pub fn relation_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: the syscache lookup copies nothing and the tuple is released
    // before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tuple.is_null() {
            return None;
        }
        let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_class>();
        let owner = (*form).relowner;
        pg_sys::ReleaseSysCache(tuple);
        Some(owner)
    }
}

/// Whether `role` holds CREATEROLE (and is not a superuser, which is trusted anyway).
pub fn can_create_roles(role: pg_sys::Oid) -> bool {
    // SAFETY: as in `relation_owner`; the tuple is released before returning.
    unsafe {
        if pg_sys::superuser_arg(role) {
            return false;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            pg_sys::Datum::from(role),
        );
        if tuple.is_null() {
            return false;
        }
        let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_authid>();
        let createrole = (*form).rolcreaterole;
        pg_sys::ReleaseSysCache(tuple);
        createrole
    }
}
