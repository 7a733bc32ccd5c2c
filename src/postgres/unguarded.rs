//! The PostgreSQL calls on the per-row path, made without pgrx's FFI guard.
//!
//! pgrx wraps every `pg_sys` function in a `sigsetjmp` so that an ERROR raised
//! inside it unwinds Rust frames properly instead of being `longjmp`ed over
//! them. That guard costs a few nanoseconds a call, paid twice per row by
//! `byok.encrypt`/`byok.decrypt` (the result's allocation, the current user).
//! The calls here are the ones that cannot raise, so they need no guard:
//! `GetUserId` only returns a static, and `MemoryContextAllocExtended` with
//! `MCXT_ALLOC_NO_OOM` on an AllocSet returns NULL instead of raising, its
//! only other ERROR being a size over 1 GB, which [`alloc`] refuses first
//! (checked against PostgreSQL 15's mcxt.c and aset.c; a Slab context can
//! raise, hence the AllocSet test). Without the guard there is also no pgrx
//! thread check: like every PostgreSQL call, these run on the backend's main
//! thread only, never from the broker's tokio threads.

use std::ffi::{c_int, c_void};

use pgrx::pg_sys;

use crate::errors::ByokError;

/// `MaxAllocSize` (utils/memutils.h: a macro, so not among pgrx's bindings).
pub const MAX_ALLOC_SIZE: usize = 0x3FFF_FFFF;

mod ffi {
    use super::*;

    // The same declarations as pgrx's, minus the guard (see the module comment).
    // Any other declaration of these symbols in this crate must match these
    // exactly (`extern "C"`), or rustc reports clashing declarations.
    unsafe extern "C" {
        pub(super) fn GetUserId() -> pg_sys::Oid;
        pub(super) fn MemoryContextAllocExtended(
            context: pg_sys::MemoryContext,
            size: pg_sys::Size,
            flags: c_int,
        ) -> *mut c_void;
    }
}

/// The current user (`current_user`).
#[inline]
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: GetUserId reads a backend static and raises nothing.
    unsafe { ffi::GetUserId() }
}

/// `palloc(size)` in the current memory context. Raises out of memory (53200,
/// without the memory-context statistics PostgreSQL's own report logs) or,
/// through palloc, a size over [`MAX_ALLOC_SIZE`].
#[inline]
pub fn alloc(size: usize) -> *mut c_void {
    // SAFETY: CurrentMemoryContext is always a valid context while a
    // function runs; its node tag says which allocator it is.
    let context = unsafe { pg_sys::CurrentMemoryContext };
    // SAFETY: as above.
    let is_alloc_set = unsafe { (*context).type_ } == pg_sys::NodeTag::T_AllocSetContext;
    if size > MAX_ALLOC_SIZE || !is_alloc_set {
        // (Not on the per-row path: the guarded call raises what PostgreSQL raises.)
        // SAFETY: palloc raises rather than returning NULL.
        return unsafe { pg_sys::palloc(size) };
    }
    // SAFETY: a valid AllocSet and a size under MaxAllocSize: with NO_OOM the
    // allocator returns NULL rather than raising, so no longjmp crosses Rust frames.
    let chunk = unsafe {
        ffi::MemoryContextAllocExtended(context, size, pg_sys::MCXT_ALLOC_NO_OOM as c_int)
    };
    if chunk.is_null() {
        ByokError::OutOfMemory(size).raise();
    }
    chunk
}
