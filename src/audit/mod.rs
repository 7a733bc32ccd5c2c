//! Audit records that must outlive their transaction: every key-manager call
//! made by the key broker, and every failure of a key operation (whose own
//! transaction rolls back, taking any row it wrote with it).
//!
//! They go through a queue in shared memory (`byok_core::audit_ring`) and are
//! written into their database's `byok.audit_log` by the *catalog writer*, a
//! short-lived background worker the job launcher starts within a second.
//! Administrative successes are written by the operation itself, in its own
//! transaction (`catalog::audit`), so they commit or vanish with it.
//!
//! Repeated failures are coalesced per backend: the first of a kind (event,
//! tenant, data key, reason) is queued at once; the same failure again within
//! [`COALESCE_WINDOW`] is only counted, and one record "repeated N times" follows
//! at the end of the window (at a transaction's end, or when the backend exits).
//! A loop that catches thousands of errors thus leaves two records, not
//! thousands, and cannot push anyone else's records out of the queue.

pub mod chain;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use byok_core::clock::Tick;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::errors::ByokError;
use crate::shmem;

/// How long repeats of one failure are counted before a summary is queued.
pub const COALESCE_WINDOW: Duration = Duration::from_secs(10);
/// Distinct failures a backend coalesces at once (beyond, each is queued).
const COALESCE_KINDS: usize = 256;

/// One queued audit record (JSON in its slot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedRecord {
    pub event: String,
    pub tenant_id: Option<String>,
    pub dek_id: Option<i64>,
    pub ok: bool,
    pub reason: Option<String>,
    pub details: Option<serde_json::Value>,
    /// The role (OID) the action was taken for, and its name when queued.
    pub role: u32,
    #[serde(default)]
    pub role_name: Option<String>,
    /// When it happened, in microseconds since the Unix epoch.
    pub at_micros: i64,
}

/// Microseconds since the Unix epoch (0 for a clock set before 1970, which no
/// audit reader could order anyway).
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Serializes a record to fit its slot (a long reason is cut, then the details
/// dropped). Plain memory only: the broker's runtime threads call this.
pub fn encode(record: &QueuedRecord) -> Vec<u8> {
    // Serializing plain strings and numbers cannot fail; an empty record
    // would be refused by the reader rather than trusted.
    let mut bytes = serde_json::to_vec(record).unwrap_or_default();
    if bytes.len() > byok_core::audit_ring::AUDIT_RECORD_LEN {
        let mut shorter = record.clone();
        shorter.reason = shorter
            .reason
            .map(|r| r.chars().take(400).collect::<String>() + "...");
        shorter.details = Some(serde_json::json!({"truncated": true}));
        bytes = serde_json::to_vec(&shorter).unwrap_or_default();
    }
    bytes
}

/// Queues a record for `database`; false when it was refused (a quota, or the
/// queue full): the loss is counted for that database and reported in its trail.
pub fn queue(database: u32, record: &QueuedRecord) -> bool {
    match shmem::shared() {
        Some(shared) => shared
            .audit
            .push(database, record.role, &encode(record))
            .is_ok(),
        None => false,
    }
}

// ---------------------------------------------------------------------------
// Failures, coalesced per backend.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FailureKind {
    event: String,
    tenant_id: Option<String>,
    dek_id: Option<i64>,
    reason: String,
    role: u32,
}

struct Repeats {
    /// The role's name, resolved when the failure happened (the summary is
    /// queued at a transaction's end or at exit, where the catalog cannot be read).
    role_name: Option<String>,
    first_at: Tick,
    first_micros: i64,
    last_micros: i64,
    count: u64,
}

thread_local! {
    static REPEATS: RefCell<HashMap<FailureKind, Repeats>> = RefCell::new(HashMap::new());
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// Records a failure (queued at once, or counted as a repeat).
pub fn failure(
    event: &str,
    tenant_id: Option<&str>,
    dek_id: Option<i64>,
    reason: &str,
    details: Option<serde_json::Value>,
    role: pg_sys::Oid,
) {
    if shmem::shared().is_none() {
        return;
    }
    register_callbacks();
    let kind = FailureKind {
        event: event.to_string(),
        tenant_id: tenant_id.map(str::to_string),
        dek_id,
        reason: reason.to_string(),
        role: u32::from(role),
    };
    let now = Tick::now();
    let micros = now_micros();
    let role_name = Some(crate::postgres::session::role_name(role));
    let first = REPEATS.with_borrow_mut(|repeats| {
        if let Some(seen) = repeats.get_mut(&kind) {
            if now.duration_since(seen.first_at) < COALESCE_WINDOW {
                seen.count += 1;
                seen.last_micros = micros;
                return false;
            }
            let due = repeats.remove(&kind).expect("present");
            queue_repeats(&kind, &due);
        }
        if repeats.len() < COALESCE_KINDS {
            repeats.insert(
                kind.clone(),
                Repeats {
                    role_name: role_name.clone(),
                    first_at: now,
                    first_micros: micros,
                    last_micros: micros,
                    count: 0,
                },
            );
        }
        true
    });
    if first {
        queue(
            crate::postgres::session::database(),
            &QueuedRecord {
                event: kind.event,
                tenant_id: kind.tenant_id,
                dek_id: kind.dek_id,
                ok: false,
                reason: Some(kind.reason),
                details,
                role_name,
                role: kind.role,
                at_micros: micros,
            },
        );
    }
}

fn queue_repeats(kind: &FailureKind, repeats: &Repeats) {
    if repeats.count == 0 {
        return;
    }
    queue(
        crate::postgres::session::database(),
        &QueuedRecord {
            event: kind.event.clone(),
            tenant_id: kind.tenant_id.clone(),
            dek_id: kind.dek_id,
            ok: false,
            reason: Some(format!(
                "{} (repeated {} more time(s) within {} s)",
                kind.reason,
                repeats.count,
                COALESCE_WINDOW.as_secs()
            )),
            details: Some(serde_json::json!({
                "repeated": repeats.count,
                "first_at_unix_micros": repeats.first_micros,
                "last_at_unix_micros": repeats.last_micros,
            })),
            role_name: repeats.role_name.clone(),
            role: kind.role,
            at_micros: repeats.last_micros,
        },
    );
}

/// Queues the summaries whose window has passed (all of them with `all`).
fn flush_repeats(all: bool) {
    let now = Tick::now();
    REPEATS.with_borrow_mut(|repeats| {
        repeats.retain(|kind, seen| {
            let due = all || now.duration_since(seen.first_at) >= COALESCE_WINDOW;
            if due {
                queue_repeats(kind, seen);
            }
            !due
        });
    });
}

fn register_callbacks() {
    if CALLBACKS.get() {
        return;
    }
    CALLBACKS.set(true);
    // SAFETY: registering callbacks with the backend, once, on its main thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
        pg_sys::before_shmem_exit(Some(at_exit), pg_sys::Datum::from(0));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_ABORT
    ) {
        flush_repeats(false);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn at_exit(_code: i32, _arg: pg_sys::Datum) {
    flush_repeats(true);
}

/// A refused or failed use of a key on the per-row path (decrypt, encrypt):
/// the ones that matter to a security reviewer are recorded as `use_key`
/// failures; malformed input is not.
pub fn key_use_failed(error: &ByokError) {
    let (tenant, dek_id) = match error {
        ByokError::TenantNotGranted { tenant, .. }
        | ByokError::CreateRoleSession { tenant, .. } => (Some(tenant.as_str()), None),
        ByokError::DataKeyNotGranted { tenant, dek_id, .. } => {
            (Some(tenant.as_str()), Some(*dek_id as i64))
        }
        ByokError::TenantMismatchOnEncrypt { requested, .. }
        | ByokError::TenantMismatchOnSearch { requested, .. } => (Some(requested.as_str()), None),
        ByokError::WrongKeyPurpose { key_id, .. } => (None, Some(*key_id as i64)),
        ByokError::TenantMismatchOnDecrypt { .. } | ByokError::BrokerTimeout { .. } => (None, None),
        ByokError::AuthenticationFailed { dek_id, tenant }
        | ByokError::KeyDestroyed { dek_id, tenant }
        | ByokError::KeyRetired { dek_id, tenant } => (tenant.as_deref(), Some(*dek_id as i64)),
        ByokError::IndexKeyDestroyed { key_id, tenant } => {
            (Some(tenant.as_str()), Some(*key_id as i64))
        }
        _ => return,
    };
    failure(
        "use_key",
        tenant,
        dek_id,
        &error.summary_ref(),
        None,
        crate::postgres::session::acting_role(),
    );
}

// ---------------------------------------------------------------------------
// The catalog writer's part.

/// Writes this database's queued records into `byok.audit_log`, oldest first,
/// and a record (with a WARNING and a NOTIFY) for any that were lost. Runs in
/// the writer's transaction. Returns how many it wrote.
pub fn write_queued(database: u32) -> usize {
    let Some(shared) = shmem::shared() else {
        return 0;
    };
    let mut written = 0;
    for bytes in shared.audit.take(database) {
        let Ok(record) = serde_json::from_slice::<QueuedRecord>(&bytes) else {
            continue;
        };
        if write(&record).is_ok() {
            written += 1;
        }
    }
    let lost = shared.audit.take_dropped(database);
    if lost > 0 {
        let record = QueuedRecord {
            event: "audit_records_dropped".into(),
            tenant_id: None,
            dek_id: None,
            ok: false,
            reason: Some(format!(
                "{lost} audit record(s) of this database were refused by the audit queue (a role or database over its share, or the queue full)"
            )),
            details: Some(serde_json::json!({
                "dropped": lost,
                "dropped_since_server_start": shared.audit.dropped_total(),
            })),
            role: pg_sys::BOOTSTRAP_SUPERUSERID,
            role_name: None,
            at_micros: now_micros(),
        };
        if write(&record).is_ok() {
            written += 1;
        }
    }
    written
}

fn write(record: &QueuedRecord) -> Result<(), ByokError> {
    Spi::run_with_args(
        "SELECT byok.audit_event($1, $2, $3, $4, $5, $6, $7, pg_catalog.to_timestamp($8 / 1e6), $9)",
        &[
            DatumWithOid::from(record.event.as_str()),
            DatumWithOid::from(record.tenant_id.as_deref()),
            DatumWithOid::from(record.dek_id),
            DatumWithOid::from(if record.ok { "ok" } else { "failed" }),
            DatumWithOid::from(record.reason.as_deref()),
            DatumWithOid::from(record.details.clone().map(pgrx::JsonB)),
            DatumWithOid::from(pg_sys::Oid::from(record.role)),
            DatumWithOid::from(record.at_micros as f64),
            DatumWithOid::from(record.role_name.as_deref()),
        ],
    )?;
    Ok(())
}
