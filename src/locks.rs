//! Every advisory lock byok_pg takes, in one place.
//!
//! PostgreSQL's advisory locks share one key space per database, with two
//! 32-bit keys. byok_pg uses the first key as a class that no other lock of the
//! extension shares (each class below is distinct by construction: the enum's
//! discriminants), and the second for the object within the class. An
//! application that also uses two-key advisory locks should avoid first keys
//! from 0x62790000 ("by" followed by the class) to 0x627900ff.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::errors::ByokError;

/// The classes of lock. The discriminant is the low byte of the first key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LockClass {
    /// Extending the audit trail's hash chain (one writer at a time); object 0.
    AuditChain = 1,
    /// A re-encryption job, held by the one worker running it; object = job id.
    ReencryptJob = 2,
}

impl LockClass {
    pub const ALL: [LockClass; 2] = [LockClass::AuditChain, LockClass::ReencryptJob];

    /// The first key of the class's locks.
    pub fn key(self) -> i32 {
        0x6279_0000 | self as i32
    }

    pub fn purpose(self) -> &'static str {
        match self {
            LockClass::AuditChain => "audit trail hash chain (transaction lock)",
            LockClass::ReencryptJob => {
                "re-encryption job, object = job id (session lock of its worker)"
            }
        }
    }
}

/// The second key of a lock on `object` (job ids are bigint: they wrap into
/// the 32-bit key space; two jobs 2^32 apart never run at the same time in
/// practice, and if they did one would wait for the other, nothing worse).
fn object_key(object: i64) -> i32 {
    object as i32
}

/// Takes a transaction-scoped lock, waiting for it.
pub fn lock_for_transaction(class: LockClass, object: i64) -> Result<(), ByokError> {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, $2)",
        &[
            DatumWithOid::from(class.key()),
            DatumWithOid::from(object_key(object)),
        ],
    )?;
    Ok(())
}

/// Tries a session-scoped lock (held until released or the session ends).
pub fn try_lock_for_session(class: LockClass, object: i64) -> Result<bool, ByokError> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_try_advisory_lock($1, $2)",
        &[
            DatumWithOid::from(class.key()),
            DatumWithOid::from(object_key(object)),
        ],
    )?
    .unwrap_or(false))
}

/// `byok.advisory_locks()`: the advisory lock classes byok_pg uses, so an
/// operator can tell its locks apart in `pg_locks` (classid = first key).
#[pg_extern(immutable, parallel_safe)]
fn advisory_locks() -> TableIterator<'static, (name!(classid, i64), name!(purpose, &'static str))> {
    TableIterator::new(
        LockClass::ALL
            .into_iter()
            .map(|class| (i64::from(class.key() as u32), class.purpose())),
    )
}
