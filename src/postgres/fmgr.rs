//! Version-1 C functions declared by hand in `sql/`.
//!
//! The per-row functions (type I/O, encrypt, decrypt) are plain fmgr functions
//! rather than `#[pg_extern]`, so they can read their arguments in place and
//! build their result directly in one palloc'd varlena.

/// Emits the `pg_finfo_<name>` record PostgreSQL looks up for a V1 C function.
macro_rules! pg_function_info_v1 {
    ($($name:ident),+ $(,)?) => {
        ::paste::paste! {
            $(
                #[unsafe(no_mangle)]
                #[doc(hidden)]
                pub extern "C" fn [<pg_finfo_ $name>]() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
                    const V1: ::pgrx::pg_sys::Pg_finfo_record = ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
                    &V1
                }
            )+
        }
    };
}
pub(crate) use pg_function_info_v1;

use pgrx::pg_sys;

/// The datum of argument `index`. Callers are STRICT functions, so it is not null.
///
/// # Safety
/// `fcinfo` must be a valid call with at least `index + 1` arguments.
#[inline(always)]
pub unsafe fn arg_datum(fcinfo: pg_sys::FunctionCallInfo, index: usize) -> pg_sys::Datum {
    // SAFETY: the caller guarantees a valid `fcinfo`; `as_slice` is bounded by `nargs`
    // and indexing panics (caught by pg_guard) rather than reading past it.
    unsafe { (*fcinfo).args.as_slice((*fcinfo).nargs as usize)[index].value }
}

/// Number of arguments of this call.
///
/// # Safety
/// `fcinfo` must be valid.
#[inline(always)]
pub unsafe fn nargs(fcinfo: pg_sys::FunctionCallInfo) -> usize {
    // SAFETY: the caller guarantees a valid `fcinfo`.
    unsafe { (*fcinfo).nargs as usize }
}
