//! Audit records that must outlive their transaction: every key-manager call
//! made by the key broker, and every failure of a key operation (whose own
//! transaction rolls back, taking any row it wrote with it).
//!
//! They go through a queue in shared memory (`broker::shmem::AuditSlot`) and are
//! written into their database's `byok.audit_log` by the *audit writer*, a
//! short-lived background worker the job launcher starts within a second.
//! Administrative successes are written by the operation itself, in its own
//! transaction (`catalog::audit`), so they commit or vanish with it.

use std::cell::{Cell, RefCell};
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::broker::shmem;

/// One queued audit record (JSON in its slot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedRecord {
    pub event: String,
    pub tenant_id: Option<String>,
    pub dek_id: Option<i64>,
    pub ok: bool,
    pub reason: Option<String>,
    pub details: Option<serde_json::Value>,
    /// The role (OID) the action was taken for.
    pub role: u32,
    /// When it happened, in microseconds since the Unix epoch.
    pub at_micros: i64,
}

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Serializes a record to fit its slot (a long reason is cut, then the details
/// dropped). Plain memory only: the broker's runtime threads call this.
pub fn encode(record: &QueuedRecord) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(record).unwrap_or_default();
    if bytes.len() > shmem::AUDIT_RECORD_LEN {
        let mut shorter = record.clone();
        shorter.reason = shorter
            .reason
            .map(|r| r.chars().take(400).collect::<String>() + "...");
        shorter.details = Some(serde_json::json!({"truncated": true}));
        bytes = serde_json::to_vec(&shorter).unwrap_or_default();
    }
    bytes
}

/// Queues a record for `database`; false when the queue was full (counted).
pub fn queue(database: u32, record: &QueuedRecord) -> bool {
    match shmem::shared() {
        Some(shared) => shmem::push_audit(shared, database, &encode(record)),
        None => false,
    }
}

thread_local! {
    /// Administrative operations running in this backend (nesting depth).
    static ACTIVE_OPERATIONS: Cell<u32> = const { Cell::new(0) };
    /// The message of the error being raised, for the failure record.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// An administrative operation in progress: if it ends by raising an error, a
/// failure record with the error's message is queued (its transaction aborts,
/// so it could not write one itself).
pub struct Operation {
    event: &'static str,
    tenant_id: Option<String>,
    dek_id: Option<i64>,
}

impl Operation {
    pub fn begin(event: &'static str, tenant_id: Option<&str>, dek_id: Option<i64>) -> Self {
        ACTIVE_OPERATIONS.set(ACTIVE_OPERATIONS.get() + 1);
        LAST_ERROR.with_borrow_mut(|e| *e = None);
        Operation {
            event,
            tenant_id: tenant_id.map(str::to_string),
            dek_id,
        }
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        ACTIVE_OPERATIONS.set(ACTIVE_OPERATIONS.get().saturating_sub(1));
        if std::thread::panicking() {
            let reason = LAST_ERROR
                .with_borrow_mut(Option::take)
                .unwrap_or_else(|| "the operation raised an error".to_string());
            queue_failure(
                self.event,
                self.tenant_id.clone(),
                self.dek_id,
                reason,
                None,
            );
        }
    }
}

fn queue_failure(
    event: &str,
    tenant_id: Option<String>,
    dek_id: Option<i64>,
    reason: String,
    details: Option<serde_json::Value>,
) {
    queue(
        crate::broker::this_database(),
        &QueuedRecord {
            event: event.to_string(),
            tenant_id,
            dek_id,
            ok: false,
            reason: Some(reason),
            details,
            role: u32::from(crate::catalog::acting_role()),
            at_micros: now_micros(),
        },
    );
}

/// Called as an error is raised. Inside an administrative operation it becomes
/// that operation's failure reason; outside one (encrypt/decrypt), errors that
/// matter to security reviewers are queued as `use_key` failures. At most one
/// per statement: the error ends it.
pub fn note_error(
    summary: &str,
    tenant_id: Option<&str>,
    dek_id: Option<i64>,
    security_relevant: bool,
) {
    if ACTIVE_OPERATIONS.get() > 0 {
        LAST_ERROR.with_borrow_mut(|e| *e = Some(summary.to_string()));
    } else if security_relevant && shmem::shared().is_some() {
        queue_failure(
            "use_key",
            tenant_id.map(str::to_string),
            dek_id,
            summary.to_string(),
            None,
        );
    }
}

/// `byok.audit_failure(event, tenant_id, reason, details)`: queues a failure
/// record that survives the caller's transaction (SQL functions about to raise).
#[pg_extern(volatile, parallel_restricted)]
fn audit_failure(
    event: &str,
    tenant_id: Option<&str>,
    reason: Option<&str>,
    details: Option<pgrx::JsonB>,
) -> bool {
    queue(
        crate::broker::this_database(),
        &QueuedRecord {
            event: event.to_string(),
            tenant_id: tenant_id.map(str::to_string),
            dek_id: None,
            ok: false,
            reason: reason.map(str::to_string),
            details: details.map(|d| d.0),
            role: u32::from(unsafe { pg_sys::GetSessionUserId() }),
            at_micros: now_micros(),
        },
    )
}

/// Writes this database's queued records into `byok.audit_log`, oldest first.
/// Runs in the audit writer's transaction. Returns how many it wrote.
pub fn write_queued(database: u32) -> usize {
    let Some(shared) = shmem::shared() else {
        return 0;
    };
    let records = shmem::take_audit(shared, database);
    let mut written = 0;
    for bytes in records {
        let Ok(record) = serde_json::from_slice::<QueuedRecord>(&bytes) else {
            continue;
        };
        let result = Spi::run_with_args(
            "SELECT byok.audit_event($1, $2, $3, $4, $5, $6, $7, pg_catalog.to_timestamp($8 / 1e6))",
            &[
                DatumWithOid::from(record.event.as_str()),
                DatumWithOid::from(record.tenant_id.as_deref()),
                DatumWithOid::from(record.dek_id),
                DatumWithOid::from(if record.ok { "ok" } else { "failed" }),
                DatumWithOid::from(record.reason.as_deref()),
                DatumWithOid::from(record.details.map(pgrx::JsonB)),
                DatumWithOid::from(pg_sys::Oid::from(record.role)),
                DatumWithOid::from(record.at_micros as f64),
            ],
        );
        if result.is_ok() {
            written += 1;
        }
    }
    written
}
