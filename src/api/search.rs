//! Searchable encryption: `byok.term` and `byok.index_key_id` (read a value's
//! header, no key), `byok.search_term`/`byok.search_terms` (the probes),
//! `byok.confirm_match` (the decrypting check `byok.matches` ends with),
//! `byok.make_searchable` and `byok.rotate_index_key`.

use byok_core::envelope::Envelope;
use pgrx::PgRelation;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp};
use crate::api::crypt::{key_use_failed, tenant_id};
use crate::errors::{ByokError, OrRaise};
use crate::keyring::{self, Authority, terms};
use crate::postgres::fmgr::{arg_datum, nargs, pg_function_info_v1};
use crate::postgres::varlena::{VarlenaBuf, datum_bytes};

pg_function_info_v1!(
    byok_value_term,
    byok_value_index_key_id,
    byok_search_term,
    byok_search_terms,
    byok_confirm_match
);

/// Argument 0 parsed as a sealed value.
///
/// # Safety
/// `fcinfo` must be a valid STRICT call whose argument 0 is a `byok.encrypted`.
unsafe fn value_arg<'a>(fcinfo: pg_sys::FunctionCallInfo) -> Envelope<'a> {
    // SAFETY: the caller's contract.
    let bytes = unsafe { datum_bytes(arg_datum(fcinfo, 0)) };
    Envelope::parse(bytes)
        .map_err(ByokError::MalformedValue)
        .or_raise()
}

/// Returns SQL NULL from a C function.
///
/// # Safety
/// `fcinfo` must be the valid call being answered.
unsafe fn null(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the caller's contract.
    unsafe { (*fcinfo).isnull = true };
    pg_sys::Datum::from(0)
}

fn bytea(bytes: &[u8]) -> pg_sys::Datum {
    let mut out = VarlenaBuf::new(bytes.len());
    out.as_mut_slice().copy_from_slice(bytes);
    out.into_datum()
}

/// `term(value byok.encrypted) RETURNS bytea`: the index key id, term length
/// and term of a searchable value; NULL for a value sealed without a term.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_value_term(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fmgr calls this STRICT function with a valid `fcinfo` whose
    // argument is a byok.encrypted varlena.
    let envelope = unsafe { value_arg(fcinfo) };
    match envelope.keyed_term() {
        Some(term) => bytea(term),
        // SAFETY: answering this call.
        None => unsafe { null(fcinfo) },
    }
}

/// `index_key_id(value byok.encrypted) RETURNS bigint`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_value_index_key_id(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: as byok_value_term.
    let envelope = unsafe { value_arg(fcinfo) };
    match envelope.index_key_id() {
        Some(id) => pg_sys::Datum::from(id as i64),
        // SAFETY: answering this call.
        None => unsafe { null(fcinfo) },
    }
}

/// The tenant, plaintext and context arguments starting at `first`.
///
/// # Safety
/// `fcinfo` must be a valid STRICT call with text arguments `first`,
/// `first + 1` and (when present) `first + 2`.
unsafe fn probe_args<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    first: usize,
) -> (&'a str, &'a [u8], &'a [u8]) {
    // SAFETY: the caller's contract; `nargs` bounds the optional context.
    let (tenant, plaintext, context) = unsafe {
        (
            datum_bytes(arg_datum(fcinfo, first)),
            datum_bytes(arg_datum(fcinfo, first + 1)),
            if nargs(fcinfo) > first + 2 {
                datum_bytes(arg_datum(fcinfo, first + 2))
            } else {
                &[]
            },
        )
    };
    (tenant_id(tenant), plaintext, context)
}

/// Every probe for a value: under the active index key, and with `all` the
/// previous one's too, as `byok.term` would hold them.
fn probes(tenant: &str, plaintext: &[u8], context: &[u8], all: bool) -> Vec<Vec<u8>> {
    let spec = terms::spec_for(context).or_raise();
    let mut out = Vec::with_capacity(2);
    if let Err(e) = terms::with_terms(
        tenant,
        context,
        plaintext,
        &spec,
        all,
        Authority::Caller,
        &mut |id, term| out.push(byok_core::search::keyed_term(id, term)),
    ) {
        key_use_failed(e);
    }
    out
}

/// `search_term(tenant_id text, plaintext text, context text DEFAULT '') RETURNS bytea`:
/// what `byok.term` holds for a value equal to `plaintext` sealed now.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_search_term(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls this STRICT function with a valid `fcinfo` whose
    // arguments are text varlenas.
    let (tenant, plaintext, context) = unsafe { probe_args(fcinfo, 0) };
    let probes = probes(tenant, plaintext, context, false);
    bytea(&probes[0])
}

/// `search_terms(tenant_id text, plaintext text, context text DEFAULT '') RETURNS bytea[]`:
/// the probe under every live index key (two while a rotation's job runs).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_search_terms(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: as byok_search_term.
    let (tenant, plaintext, context) = unsafe { probe_args(fcinfo, 0) };
    let probes = probes(tenant, plaintext, context, true);
    match probes.into_datum() {
        Some(datum) => datum,
        // SAFETY: answering this call (never reached: a Vec always converts).
        None => unsafe { null(fcinfo) },
    }
}

/// `confirm_match(value byok.encrypted, tenant_id text, plaintext text,
/// context text DEFAULT '') RETURNS boolean`: whether `value` is the tenant's
/// and, decrypted and normalized, equals `plaintext` normalized. A value of
/// another tenant, or without a term, is not a match (not an error: a
/// truncated term's false candidates from anywhere in the column reach it),
/// nor is a value of the tenant's that fails authentication (recorded in the
/// audit trail: a value carrying a copied term).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_confirm_match(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls this STRICT function with a valid `fcinfo`: a
    // byok.encrypted, then text varlenas.
    let (envelope, (tenant, plaintext, context)) =
        unsafe { (value_arg(fcinfo), probe_args(fcinfo, 1)) };
    let (Some(value_key), Some(value_term)) = (envelope.index_key_id(), envelope.term()) else {
        return pg_sys::Datum::from(false);
    };
    let spec = terms::spec_for(context).or_raise();
    // The value's term must be the tenant's term of `plaintext` (under one of
    // its live index keys): a term is bound to its tenant's key, and the
    // value's header (term included) to its data key, so a value passing this
    // is the tenant's, and opening it below uses the tenant's grant only.
    let mut candidate = false;
    if let Err(e) = terms::with_terms(
        tenant,
        context,
        plaintext,
        &spec.with_term_len(value_term.len()),
        true,
        Authority::Caller,
        &mut |id, term| candidate |= id == value_key && term == value_term,
    ) {
        key_use_failed(e);
    }
    // A value whose data key is another tenant's carries a term copied from
    // one of ours (terms are public): not a match, and not ours to open.
    if !candidate || !keyring::data_key_of_tenant(envelope.dek_id(), tenant).or_raise() {
        return pg_sys::Datum::from(false);
    }
    let mut opened = zeroize::Zeroizing::new(vec![0u8; envelope.plaintext_len()]);
    match keyring::open(&envelope, context, &mut opened, Authority::Caller) {
        Ok(()) => {}
        // A value carrying a copy of a term (terms are public) fails here:
        // recorded, and not a match, so a forged row cannot break lookups.
        Err(e @ ByokError::AuthenticationFailed { .. }) => {
            crate::audit::key_use_failed(&e);
            return pg_sys::Datum::from(false);
        }
        Err(e) => key_use_failed(e),
    }
    let equal = match (
        spec.normalization.apply_bytes(&opened),
        spec.normalization.apply_bytes(plaintext),
    ) {
        (Ok(a), Ok(b)) => a.as_bytes() == b.as_bytes(),
        _ => false,
    };
    pg_sys::Datum::from(equal)
}

/// `byok.make_searchable(tbl, col, term_length, normalization)`: declares a
/// registered column's term settings. Returns the normalization as stored.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn make_searchable(
    tbl: PgRelation,
    col: &str,
    term_length: default!(i32, 8),
    normalization: default!(&str, "'exact'"),
) -> String {
    admin::administer("make_searchable", None, None, || {
        crate::jobs::make_searchable(tbl.oid(), col, term_length, normalization)
    })
    .unwrap_or_else(|e| e.raise())
}

/// `byok.rotate_index_key(tenant_id)`: the tenant's first index key, or a new
/// one; returns its id. After a rotation, `byok.start_reencrypt(tenant_id)`
/// rewrites the terms; probes find rows under either key meanwhile.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_index_key(tenant_id: &str) -> i64 {
    admin::run_or_raise(AdminOp::RotateIndexKey {
        tenant_id: tenant_id.to_string(),
    })
    .int()
}
