//! The audit trail's chain: every row of `byok.audit_log` carries
//! `HMAC-SHA-256(chain key, previous row's hash || the row's canonical text)`.
//!
//! What it proves, and what it does not:
//! - A role that can write `byok.audit_log` without the chain key (no database
//!   role but a superuser can reach the key: it is a file of the server's OS
//!   user, `byok.audit_key_file`) cannot change, insert, remove or reorder a
//!   row without `byok.verify_audit_chain()` finding the break: it cannot
//!   compute the hashes that would hide it. The same holds for a dump edited
//!   before it is restored.
//! - Removing the newest rows leaves a shorter chain that is intact. Anchor the
//!   chain outside the database (`byok.audit_chain_head()`, stored by a cron job
//!   or a SIEM) and verify against the anchor: a missing or changed anchor row
//!   is reported.
//! - A superuser can read the key file (`pg_read_binary_file`) and recompute
//!   everything after a change; only an anchor kept outside the database
//!   catches that. Superusers are trusted by byok_pg's threat model; the chain
//!   makes their changes detectable given an external anchor, not impossible.

use std::cell::RefCell;
use std::path::PathBuf;

use hmac::{KeyInit, Mac};
use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::errors::{ByokError, OrRaise};
use crate::locks::{self, TableLock};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

thread_local! {
    /// The chain key, read once per backend (and again if the setting moves it).
    static KEY: RefCell<Option<(PathBuf, Zeroizing<[u8; 32]>)>> = const { RefCell::new(None) };
}

fn with_key<R>(f: impl FnOnce(&[u8; 32]) -> R) -> Result<R, ByokError> {
    let path = crate::gucs::audit_key_file();
    KEY.with_borrow_mut(|cached| {
        if cached.as_ref().is_none_or(|(p, _)| *p != path) {
            let key = byok_kms::local::keyfile::load_or_create("audit key file", &path, true)
                .map_err(|e| ByokError::Internal(format!("the audit trail's chain key: {e}")))?;
            *cached = Some((path, key));
        }
        Ok(f(&cached.as_ref().expect("just set").1))
    })
}

/// The chain value of a row.
pub fn chain_mac(previous: &[u8], row_text: &[u8]) -> Result<Vec<u8>, ByokError> {
    with_key(|key| {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&(previous.len() as u64).to_be_bytes());
        mac.update(previous);
        mac.update(row_text);
        mac.finalize().into_bytes().to_vec()
    })
}

/// `byok.audit_mac(previous, row_text)`: the chain value of an audit row. Only
/// the extension's own (owner-run) functions may call it.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn audit_mac(previous: &[u8], row_text: &[u8]) -> Vec<u8> {
    chain_mac(previous, row_text).or_raise()
}

/// `byok.lock_audit_chain()`: one writer at a time extends the chain (a
/// transaction lock of its own class: see `locks`).
#[pg_extern(volatile, parallel_unsafe)]
fn lock_audit_chain() {
    locks::lock_for_transaction(TableLock::AuditChain).or_raise();
}
