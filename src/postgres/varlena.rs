//! Reading varlena arguments in place and building varlena results without a
//! Rust-side copy.

use pgrx::pg_sys;
use pgrx::varlena::{
    set_varsize_4b, varatt_is_1b_e, varatt_is_4b_c, vardata_any, varsize_any_exhdr,
};

/// The bytes of a varlena datum (text, bytea, byok.encrypted), detoasted only when
/// it is compressed or stored out of line. The slice lives as long as the current
/// memory context.
///
/// # Safety
/// `datum` must be a non-null varlena datum.
#[inline(always)]
pub unsafe fn datum_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: the caller guarantees a non-null varlena; a detoasted copy is
    // palloc'd in the current memory context, which outlives the call.
    unsafe {
        let mut varlena = datum.cast_mut_ptr::<pg_sys::varlena>();
        // What PG_DETOAST_DATUM_PACKED does, with its test inline: only compressed or
        // out-of-line values need the call into PostgreSQL, which pgrx guards with a
        // sigsetjmp that would otherwise cost every row.
        if varatt_is_1b_e(varlena) || varatt_is_4b_c(varlena) {
            varlena = pg_sys::pg_detoast_datum_packed(varlena);
        }
        std::slice::from_raw_parts(
            vardata_any(varlena).cast::<u8>(),
            varsize_any_exhdr(varlena),
        )
    }
}

/// A varlena being built in the current memory context. Callers fill
/// `as_mut_slice()` and hand the datum back to PostgreSQL with `into_datum()`.
pub struct VarlenaBuf {
    ptr: *mut pg_sys::varlena,
    len: usize,
}

/// Largest payload a varlena can hold (1 GB less the header).
pub const MAX_VARLENA_PAYLOAD: usize = super::unguarded::MAX_ALLOC_SIZE - pg_sys::VARHDRSZ;

impl VarlenaBuf {
    /// Allocates a varlena with room for `len` bytes of payload. The caller has
    /// checked `len <= MAX_VARLENA_PAYLOAD`.
    pub fn new(len: usize) -> Self {
        debug_assert!(len <= MAX_VARLENA_PAYLOAD);
        let ptr = super::unguarded::alloc(len + pg_sys::VARHDRSZ).cast::<pg_sys::varlena>();
        // SAFETY: `alloc` raises rather than returning null; the header is
        // written before anyone reads the varlena.
        unsafe { set_varsize_4b(ptr, (len + pg_sys::VARHDRSZ) as i32) };
        VarlenaBuf { ptr, len }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds VARHDRSZ + `len` bytes allocated by `new`, owned
        // by `self` until `into_datum` or drop.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.cast::<u8>().add(pg_sys::VARHDRSZ), self.len)
        }
    }

    pub fn into_datum(self) -> pg_sys::Datum {
        let datum = pg_sys::Datum::from(self.ptr);
        std::mem::forget(self);
        datum
    }
}

impl Drop for VarlenaBuf {
    /// Only reached when the result is abandoned (an error while filling it):
    /// wipe it so no partial plaintext lingers in the memory context.
    fn drop(&mut self) {
        // SAFETY: as in `as_mut_slice`; `into_datum` forgets `self`, so a
        // buffer handed to PostgreSQL is never freed here.
        unsafe {
            std::ptr::write_bytes(self.ptr.cast::<u8>().add(pg_sys::VARHDRSZ), 0, self.len);
            pg_sys::pfree(self.ptr.cast());
        }
    }
}
