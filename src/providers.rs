//! The backend's key providers. Only `local` is built in so far; the others are
//! recognised by name and refused clearly until their issue lands.

use std::cell::RefCell;
use std::ffi::CStr;
use std::path::PathBuf;
use std::rc::Rc;

use byok_core::config::ProviderKind;
use byok_kms::KeyProvider;
use byok_kms::local::LocalProvider;
use pgrx::pg_sys;

use crate::errors::ByokError;
use crate::gucs;

/// File name of the local provider's root secret inside the data directory.
pub const DEFAULT_LOCAL_KEY_FILE: &str = "byok_local_master.key";

thread_local! {
    static LOCAL: RefCell<Option<Rc<LocalProvider>>> = const { RefCell::new(None) };
}

/// Where the local provider's root secret lives: `byok.local_master_key_file`,
/// or `byok_local_master.key` in the data directory.
pub fn local_key_path() -> PathBuf {
    match gucs::local_master_key_file() {
        Some(path) => PathBuf::from(path),
        None => {
            // SAFETY: DataDir is set once at startup and never freed.
            let data_dir = unsafe { CStr::from_ptr(pg_sys::DataDir) };
            PathBuf::from(data_dir.to_string_lossy().into_owned()).join(DEFAULT_LOCAL_KEY_FILE)
        }
    }
}

/// The provider for `kind`. `create_local` allows the local provider to create its
/// key file; only configuring a tenant does that, so a lost file is never
/// silently replaced by a new one while data still needs the old.
pub fn provider(kind: ProviderKind, create_local: bool) -> Result<Rc<dyn KeyProvider>, ByokError> {
    match kind {
        ProviderKind::Local => {
            let path = local_key_path();
            let cached = LOCAL.with_borrow(|l| l.as_ref().filter(|p| p.path() == path).cloned());
            if let Some(p) = cached {
                return Ok(p);
            }
            let opened = Rc::new(
                LocalProvider::open(&path, create_local).map_err(byok_kms::ProviderError::from)?,
            );
            LOCAL.with_borrow_mut(|l| *l = Some(opened.clone()));
            Ok(opened)
        }
        other => Err(ByokError::ProviderNotAvailable(other)),
    }
}
