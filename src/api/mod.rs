//! SQL-facing functions, one file per concern.

pub mod crypt;
pub mod governance;
pub mod jobs;

/// Key administration writes the catalog: refuse it clearly on a standby.
pub fn require_primary(action: &'static str) {
    if unsafe { pgrx::pg_sys::RecoveryInProgress() } {
        crate::errors::ByokError::ReadOnlyStandby(action).raise();
    }
}
pub mod rotation;
pub mod tenants;
