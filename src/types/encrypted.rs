//! Input/output of `byok.encrypted`: text is `byok:` plus base64 of the envelope
//! (what COPY and pg_dump carry); binary send/recv carry the envelope bytes.
//! Both inputs check the envelope's structure, so a stored value is always
//! well-formed; only authentication can still fail, and that needs the key.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use byok_core::envelope::{self, Envelope, TEXT_PREFIX};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{ByokError, OrRaise};
use crate::postgres::fmgr::{arg_datum, pg_function_info_v1};
use crate::postgres::varlena::{VarlenaBuf, datum_bytes};

pg_function_info_v1!(
    byok_encrypted_in,
    byok_encrypted_out,
    byok_encrypted_recv,
    byok_encrypted_send,
    byok_encrypted_from_bytea,
    byok_value_data_key_id
);

fn copy_to_varlena(bytes: &[u8]) -> pg_sys::Datum {
    let mut out = VarlenaBuf::new(bytes.len());
    out.as_mut_slice().copy_from_slice(bytes);
    out.into_datum()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypted_in(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls the STRICT type I/O functions with a valid `fcinfo`;
    // byok_encrypted_in's argument is a NUL-terminated C string.
    let text = unsafe {
        std::ffi::CStr::from_ptr(arg_datum(fcinfo, 0).cast_mut_ptr::<std::ffi::c_char>())
    };
    let text = std::str::from_utf8(text.to_bytes()).unwrap_or("");
    let bytes = envelope::decode_text(text.trim())
        .map_err(ByokError::MalformedText)
        .or_raise();
    copy_to_varlena(&bytes)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypted_out(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls the STRICT type I/O functions with a valid `fcinfo`;
    // the argument is a byok.encrypted varlena.
    let bytes = unsafe { datum_bytes(arg_datum(fcinfo, 0)) };
    // Encode straight into the palloc'd C string.
    let len = envelope::text_len(bytes.len());
    // SAFETY: palloc raises rather than returning null, and the slice covers
    // exactly the `len + 1` bytes allocated.
    unsafe {
        let out = pg_sys::palloc(len + 1).cast::<u8>();
        let buf = std::slice::from_raw_parts_mut(out, len + 1);
        buf[..TEXT_PREFIX.len()].copy_from_slice(TEXT_PREFIX.as_bytes());
        let written = BASE64
            .encode_slice(bytes, &mut buf[TEXT_PREFIX.len()..len])
            .expect("text_len sizes the buffer exactly");
        buf[TEXT_PREFIX.len() + written] = 0;
        pg_sys::Datum::from(out)
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypted_recv(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls the STRICT type I/O functions with a valid `fcinfo`;
    // receive functions get a StringInfo whose `data[cursor..len]` is unread.
    unsafe {
        let buf = arg_datum(fcinfo, 0).cast_mut_ptr::<pg_sys::StringInfoData>();
        let remaining = ((*buf).len - (*buf).cursor) as usize;
        let bytes = std::slice::from_raw_parts(
            (*buf).data.add((*buf).cursor as usize).cast::<u8>(),
            remaining,
        );
        Envelope::parse(bytes)
            .map_err(ByokError::MalformedBinary)
            .or_raise();
        let datum = copy_to_varlena(bytes);
        (*buf).cursor = (*buf).len;
        datum
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypted_send(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls the STRICT type I/O functions with a valid `fcinfo`;
    // the argument is a byok.encrypted varlena.
    copy_to_varlena(unsafe { datum_bytes(arg_datum(fcinfo, 0)) })
}

/// The cast `bytea AS byok.encrypted`: the bytes are the binary format (the
/// envelope), checked like the type's inputs.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_encrypted_from_bytea(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls this STRICT cast function with a valid `fcinfo`
    // whose argument is a bytea varlena.
    let bytes = unsafe { datum_bytes(arg_datum(fcinfo, 0)) };
    Envelope::parse(bytes)
        .map_err(ByokError::MalformedBytes)
        .or_raise();
    copy_to_varlena(bytes)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_value_data_key_id(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fmgr calls the STRICT type I/O functions with a valid `fcinfo`;
    // the argument is a byok.encrypted varlena.
    let bytes = unsafe { datum_bytes(arg_datum(fcinfo, 0)) };
    let envelope = Envelope::parse(bytes)
        .map_err(ByokError::MalformedValue)
        .or_raise();
    pg_sys::Datum::from(envelope.dek_id() as i64)
}
