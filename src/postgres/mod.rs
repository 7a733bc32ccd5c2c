//! Glue to PostgreSQL's C interfaces that the rest of the extension uses.

pub mod fmgr;
pub mod security;
pub mod session;
pub mod spi;
pub mod subxact;
pub mod unguarded;
pub mod varlena;

/// The server's data directory.
pub fn data_directory() -> std::path::PathBuf {
    // SAFETY: DataDir is set once at postmaster start-up and never freed.
    let data_dir = unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::DataDir) };
    std::path::PathBuf::from(data_dir.to_string_lossy().into_owned())
}
