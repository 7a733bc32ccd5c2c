//! `byok.role_ref`: a role, stored as its OID like `regrole`, whose only
//! external form is the role's name.
//!
//! It has no binary send/receive on purpose. Citus copies a reference table
//! between nodes in binary whenever every column type allows it, and a role's
//! OID differs from node to node: a `regrole` column arrives on a new node as
//! the coordinator's OIDs, naming no role or the wrong one. Without binary I/O,
//! Citus copies `byok.tenant_grants` as text, and each node resolves the names
//! to its own roles (Citus creates every role on every node, by name).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode, function_name};

use crate::postgres::fmgr::{arg_datum, pg_function_info_v1};

pg_function_info_v1!(byok_role_ref_in);

/// `byok.role_ref_in(cstring)`: a role name, resolved like `regrole`'s input,
/// except that a bare number is refused (it would be an OID from elsewhere,
/// such as another node's or a dropped role's, taken for this node's role).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_role_ref_in(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: a STRICT input function: argument 0 is a non-null cstring.
    let input = unsafe { arg_datum(fcinfo, 0) };
    // SAFETY: the datum is a NUL-terminated C string (above).
    let text = unsafe { std::ffi::CStr::from_ptr(input.cast_mut_ptr::<std::ffi::c_char>()) };
    let bytes = text.to_bytes();
    // (regrole's input also takes "-" for no role: refused too)
    if bytes == b"-" || (!bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            format!(
                "invalid input syntax for type byok.role_ref: \"{}\"",
                text.to_string_lossy()
            ),
            function_name!(),
        )
        .set_detail("a role is given by name, never by OID")
        .set_hint("OIDs differ between nodes and outlive dropped roles; name the role")
        .report(PgLogLevel::ERROR);
    }
    // SAFETY: regrolein takes a cstring datum and raises its own errors
    // (an unknown role: 42704); no collation is involved.
    unsafe {
        pg_sys::OidFunctionCall1Coll(
            pg_sys::Oid::from(pg_sys::F_REGROLEIN),
            pg_sys::InvalidOid,
            input,
        )
    }
}
