//! Where the built-in `local` key provider keeps its root secret. Every key
//! provider now runs inside the key broker (`broker::worker`); backends never
//! call one directly.

use std::path::PathBuf;

use crate::gucs;

/// File name of the local provider's root secret inside the data directory.
pub const DEFAULT_LOCAL_KEY_FILE: &str = "byok_local_master.key";

/// `byok.local_master_key_file`, or `byok_local_master.key` in the data directory.
pub fn local_key_path() -> PathBuf {
    match gucs::local_master_key_file() {
        Some(path) => PathBuf::from(path),
        None => crate::postgres::data_directory().join(DEFAULT_LOCAL_KEY_FILE),
    }
}
