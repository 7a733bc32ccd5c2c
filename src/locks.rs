//! Every lock byok_pg takes beyond row locks, in one place.
//!
//! None is an advisory lock: advisory lock keys are open to every role
//! (`pg_advisory_lock` is executable by PUBLIC), so any session could take
//! byok_pg's keys first and stall administration or a job. The audit chain is
//! serialized with a table lock that only its owner may take; a job is kept to
//! one worker by a claim in its row (`jobs::engine::claim_for_worker`).

use pgrx::prelude::*;

use crate::errors::ByokError;

/// The locks, each with the statement that takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLock {
    /// Extending the audit trail's hash chain: one writer at a time. SHARE ROW
    /// EXCLUSIVE conflicts with itself and with writers, not with readers
    /// (ACCESS SHARE), and needs more than the SELECT privilege others have.
    AuditChain,
    /// Checking a context against the protected-column registry and then
    /// registering or making a column searchable (`jobs::check_context`): one
    /// at a time, so two sessions cannot both find a context free. SHARE
    /// UPDATE EXCLUSIVE conflicts with itself, not with the row changes the
    /// registry's event trigger makes on every DDL command: holding it never
    /// stalls anyone's DDL.
    ColumnRegistry,
}

impl TableLock {
    fn statement(self) -> &'static str {
        match self {
            TableLock::AuditChain => "LOCK TABLE byok.audit_log IN SHARE ROW EXCLUSIVE MODE",
            TableLock::ColumnRegistry => {
                "LOCK TABLE byok.protected_column_registry IN SHARE UPDATE EXCLUSIVE MODE"
            }
        }
    }
}

/// Takes `lock` until the end of the transaction, waiting for it.
pub fn lock_for_transaction(lock: TableLock) -> Result<(), ByokError> {
    Spi::run(lock.statement())?;
    Ok(())
}
