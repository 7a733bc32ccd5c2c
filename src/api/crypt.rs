//! `byok.encrypt`, `byok.encrypt_text`, `byok.decrypt`, `byok.decrypt_text`: the
//! per-row path. Arguments are read in place and the result is built in one
//! palloc'd varlena; on a key-cache hit nothing else is allocated.

use byok_core::envelope::{self, Envelope};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{ByokError, OrRaise};
use crate::keyring::{self, Authority, Term, terms};
use crate::postgres::fmgr::{arg_datum, nargs, pg_function_info_v1};
use crate::postgres::varlena::{MAX_VARLENA_PAYLOAD, VarlenaBuf, datum_bytes};

pg_function_info_v1!(
    byok_encrypt,
    byok_decrypt,
    byok_decrypt_text,
    byok_reencrypt,
    byok_value_opens
);

/// Raises a key-use failure, recording it in the audit trail first when it
/// matters to a security reviewer (refusals, authentication failures).
#[cold]
pub(crate) fn key_use_failed(error: ByokError) -> ! {
    crate::audit::key_use_failed(&error);
    error.raise()
}

/// A tenant id argument's bytes as a string (raises for bytes that are not UTF-8).
pub(crate) fn tenant_id(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes)
        .map_err(|_| ByokError::InvalidArgument {
            message: "invalid tenant id: not valid UTF-8".into(),
            hint: None,
        })
        .or_raise()
}

/// The optional `context` argument (SQL default '').
///
/// # Safety
/// `fcinfo` must be a valid STRICT call whose argument `index`, when present,
/// is a varlena.
#[inline(always)]
unsafe fn context_arg<'a>(fcinfo: pg_sys::FunctionCallInfo, index: usize) -> &'a [u8] {
    // SAFETY: the caller's contract; `nargs` bounds the index.
    unsafe {
        if nargs(fcinfo) > index {
            datum_bytes(arg_datum(fcinfo, index))
        } else {
            &[]
        }
    }
}

/// `encrypt(tenant_id text, plaintext bytea|text, context text DEFAULT '')`,
/// and `encrypt(tenant_id, plaintext, context, searchable boolean)`: with
/// `searchable`, the value also carries its blind index term.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypt(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fmgr calls these STRICT functions with a valid `fcinfo` whose declared
    // arguments (see sql/types.sql, sql/search.sql) are non-null varlenas, and a
    // boolean fourth one when there is one.
    let (tenant, plaintext, context, searchable) = unsafe {
        (
            datum_bytes(arg_datum(fcinfo, 0)),
            datum_bytes(arg_datum(fcinfo, 1)),
            context_arg(fcinfo, 2),
            nargs(fcinfo) > 3 && arg_datum(fcinfo, 3).value() != 0,
        )
    };
    let tenant = tenant_id(tenant);
    if searchable {
        return seal_searchable(tenant, plaintext, context);
    }
    let sealed_len = envelope::sealed_len(plaintext.len());
    if sealed_len > MAX_VARLENA_PAYLOAD {
        ByokError::ValueTooLarge(plaintext.len()).raise();
    }
    let mut out = VarlenaBuf::new(sealed_len);
    if let Err(e) = keyring::seal(
        tenant,
        plaintext,
        context,
        None,
        out.as_mut_slice(),
        Authority::Caller,
    ) {
        key_use_failed(e);
    }
    out.into_datum()
}

/// A searchable seal: the term under the tenant's active index key with the
/// column's settings (by context), then the value.
fn seal_searchable(tenant: &str, plaintext: &[u8], context: &[u8]) -> pg_sys::Datum {
    let spec = terms::spec_for(context).or_raise();
    let sealed_len = envelope::searchable_sealed_len(plaintext.len(), spec.term_len);
    if sealed_len > MAX_VARLENA_PAYLOAD {
        ByokError::ValueTooLarge(plaintext.len()).raise();
    }
    let (index_key_id, term) =
        match terms::active_term(tenant, context, plaintext, &spec, Authority::Caller) {
            Ok(found) => found,
            Err(e) => key_use_failed(e),
        };
    let term = Term {
        index_key_id,
        bytes: &term[..spec.term_len],
    };
    let mut out = VarlenaBuf::new(sealed_len);
    if let Err(e) = keyring::seal(
        tenant,
        plaintext,
        context,
        Some(term),
        out.as_mut_slice(),
        Authority::Caller,
    ) {
        key_use_failed(e);
    }
    out.into_datum()
}

/// Opens argument 0 (a `byok.encrypted`) into a new varlena.
///
/// # Safety
/// `fcinfo` must be a valid STRICT call of a function taking
/// `(byok.encrypted, text DEFAULT '')`.
#[inline(always)]
unsafe fn decrypt_into_varlena(fcinfo: pg_sys::FunctionCallInfo) -> VarlenaBuf {
    // SAFETY: the caller's contract (a valid STRICT call whose arguments are varlenas).
    let (sealed, context) = unsafe { (datum_bytes(arg_datum(fcinfo, 0)), context_arg(fcinfo, 1)) };
    let envelope = Envelope::parse(sealed)
        .map_err(ByokError::MalformedValue)
        .or_raise();
    let mut out = VarlenaBuf::new(envelope.plaintext_len());
    if let Err(e) = keyring::open(&envelope, context, out.as_mut_slice(), Authority::Caller) {
        key_use_failed(e);
    }
    out
}

/// `decrypt(value byok.encrypted, context text DEFAULT '') RETURNS bytea`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_decrypt(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fmgr calls these STRICT functions with a valid `fcinfo` whose declared
    // arguments (see sql/types.sql) are non-null varlenas.
    unsafe { decrypt_into_varlena(fcinfo) }.into_datum()
}

/// `decrypt_text(value byok.encrypted, context text DEFAULT '') RETURNS text`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_decrypt_text(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls these STRICT functions with a valid `fcinfo` whose declared
    // arguments (see sql/types.sql) are non-null varlenas.
    let mut out = unsafe { decrypt_into_varlena(fcinfo) };
    let text = out.as_mut_slice();
    // SAFETY: the pointer and length describe `out`'s payload, alive for the call.
    let valid = unsafe { pg_sys::pg_verifymbstr(text.as_ptr().cast(), text.len() as i32, true) };
    if !valid {
        // `out` is wiped and freed as the error unwinds.
        ByokError::NotText.raise();
    }
    out.into_datum()
}

/// `reencrypt(value byok.encrypted, context text DEFAULT '') RETURNS byok.encrypted`:
/// the same plaintext, sealed under its tenant's active data key (and, for a
/// searchable value, its term under the active index key).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_reencrypt(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the caller's contract (a valid STRICT call whose arguments are varlenas).
    let (sealed, context) = unsafe { (datum_bytes(arg_datum(fcinfo, 0)), context_arg(fcinfo, 1)) };
    let envelope = Envelope::parse(sealed)
        .map_err(ByokError::MalformedValue)
        .or_raise();
    // Inside a re-encryption job's statement the job's authority applies (the
    // statement runs as the table's owner); outside one, superusers only.
    let authority = Authority::of_job_step();
    // SAFETY: reads the current user's superuser flag from the role cache.
    if authority == Authority::Caller && !unsafe { pg_sys::superuser() } {
        ByokError::NotAllowed {
            message: "byok.reencrypt runs inside re-encryption jobs (or for a superuser)".into(),
            detail: None,
            hint: Some("start a job: SELECT byok.start_reencrypt(tenant_id)".into()),
        }
        .raise();
    }
    // (built in a vector first: whether it gets a term is known only once the
    // value is open; a job's step, not the per-row path of queries)
    let sealed = match keyring::reseal(&envelope, context, authority) {
        Ok(sealed) => sealed,
        Err(e) => key_use_failed(e),
    };
    if sealed.len() > MAX_VARLENA_PAYLOAD {
        ByokError::ValueTooLarge(envelope.plaintext_len()).raise();
    }
    let mut out = VarlenaBuf::new(sealed.len());
    out.as_mut_slice().copy_from_slice(&sealed);
    out.into_datum()
}

/// `value_opens(value byok.encrypted, context text DEFAULT '') RETURNS boolean`:
/// whether the value opens with the context (a job's verification), without raising.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_value_opens(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the caller's contract (a valid STRICT call whose arguments are varlenas).
    let (sealed, context) = unsafe { (datum_bytes(arg_datum(fcinfo, 0)), context_arg(fcinfo, 1)) };
    let opens = match Envelope::parse(sealed) {
        Ok(envelope) => {
            let mut plaintext = zeroize::Zeroizing::new(vec![0u8; envelope.plaintext_len()]);
            keyring::open(&envelope, context, &mut plaintext, Authority::of_job_step()).is_ok()
        }
        Err(_) => false,
    };
    pg_sys::Datum::from(opens)
}
