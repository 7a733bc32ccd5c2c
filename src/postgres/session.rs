//! Facts about the current session that every layer asks for: the database,
//! the roles, and the *acting role* — who an action is recorded for and judged
//! as while the extension runs with its owner's rights.

use std::cell::Cell;

use pgrx::pg_sys;

thread_local! {
    /// The role that called the administrative function now running as the
    /// extension's owner.
    static CALLER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// The extension's owner, once the catalog has been read (it does not
    /// change with catalog invalidations).
    static EXTENSION_OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// The current database's OID.
#[inline]
pub fn database() -> u32 {
    // SAFETY: MyDatabaseId is set at backend start and never changes after.
    u32::from(unsafe { pg_sys::MyDatabaseId })
}

/// The current database's name (its OID if it cannot be read).
pub fn database_name() -> String {
    // SAFETY: get_database_name with our own database id returns a palloc'd C
    // string (or NULL), read inside the transaction that calls us.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            database().to_string()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// The current user (`current_user`).
#[inline]
pub fn current_user() -> pg_sys::Oid {
    super::unguarded::current_user()
}

/// The session's login role (`session_user`: the person, for dual control).
#[inline]
pub fn session_user() -> pg_sys::Oid {
    // SAFETY: reads the backend's session user id.
    unsafe { pg_sys::GetSessionUserId() }
}

/// A role's name for messages (its OID if it no longer exists).
pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr returns NULL or a palloc'd C string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            u32::from(role).to_string()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// The role named exactly `name` (no identifier folding or quoting: role
/// names are compared as stored, as PostgreSQL's `name` arguments are).
pub fn role_oid(name: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: get_role_oid with missing_ok reads the role cache and returns
    // InvalidOid when there is no such role.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The session's login role's name.
pub fn session_role_name() -> String {
    role_name(session_user())
}

/// Remembers the extension's owner (read from the catalog).
pub fn set_extension_owner(owner: pg_sys::Oid) {
    EXTENSION_OWNER.set(owner);
}

/// The role an action is recorded for: the caller of the administrative
/// function now running as the extension's owner, else the current user;
/// inside one of the extension's SECURITY DEFINER functions (an approved
/// dual-control operation, a job step) the session's login role.
pub fn acting_role() -> pg_sys::Oid {
    let caller = match CALLER.get() {
        oid if oid == pg_sys::InvalidOid => current_user(),
        oid => oid,
    };
    if caller == EXTENSION_OWNER.get() {
        session_user()
    } else {
        caller
    }
}

/// Restores the acting role it replaced when dropped (also while an error unwinds).
#[must_use]
pub struct ActingRole(pg_sys::Oid);

impl Drop for ActingRole {
    fn drop(&mut self) {
        CALLER.set(self.0);
    }
}

/// Makes `role` the acting role unless one is set already (an administrative
/// function called from another keeps the outer caller).
pub fn enter_as_caller(role: pg_sys::Oid) -> ActingRole {
    let previous = CALLER.get();
    if previous == pg_sys::InvalidOid {
        CALLER.set(role);
    }
    ActingRole(previous)
}

/// Makes the current user (a table owner whose code may run inside `f`) the
/// acting role for `f`, so anything that code does through the extension is
/// recorded, and judged, as that role's rather than as whoever started the
/// surrounding work.
pub fn acting_as_current_user<R>(f: impl FnOnce() -> R) -> R {
    let _restore = ActingRole(CALLER.get());
    CALLER.set(current_user());
    f()
}
