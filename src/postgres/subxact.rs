//! Running a piece of work in a subtransaction, so that its failure is caught
//! and rolled back without aborting the caller's transaction (what a PL/pgSQL
//! `BEGIN ... EXCEPTION` block does, following PL/Python's pattern).

use std::panic::AssertUnwindSafe;

use pgrx::PgSqlErrorCode;
use pgrx::PgTryBuilder;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport, ErrorReportWithLevel};

use crate::errors::ByokError;

/// A failure caught by [`run`]: one of ours, or one PostgreSQL raised.
#[derive(Debug)]
pub enum Failure {
    Byok(ByokError),
    Postgres {
        code: PgSqlErrorCode,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
}

impl Failure {
    pub fn from_caught(caught: &ErrorReportWithLevel) -> Self {
        Failure::Postgres {
            code: caught.sql_error_code(),
            message: caught.message().to_string(),
            detail: caught.detail().map(str::to_string),
            hint: caught.hint().map(str::to_string),
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Byok(e) => e.clone().into_report().message().to_string(),
            Failure::Postgres { message, .. } => message.clone(),
        }
    }

    /// Message and detail on one line.
    pub fn summary(&self) -> String {
        match self {
            Failure::Byok(e) => e.summary_ref(),
            Failure::Postgres {
                message, detail, ..
            } => match detail {
                Some(d) => format!("{message}: {d}"),
                None => message.clone(),
            },
        }
    }

    /// The SQLSTATE, when PostgreSQL raised it.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Failure::Postgres { code, .. } => Some(sqlstate_text(*code)),
            Failure::Byok(_) => None,
        }
    }

    /// The failure as an error report (to raise it again).
    pub fn into_report(self) -> ErrorReport {
        match self {
            Failure::Byok(e) => e.into_report(),
            Failure::Postgres {
                code,
                message,
                detail,
                hint,
            } => {
                let mut report = ErrorReport::new(code, message, "byok_pg");
                if let Some(d) = detail {
                    report = report.set_detail(d);
                }
                if let Some(h) = hint {
                    report = report.set_hint(h);
                }
                report
            }
        }
    }
}

/// The five characters of a packed SQLSTATE (PostgreSQL's MAKE_SQLSTATE).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let packed = code as i32;
    (0..5)
        .map(|i| char::from((((packed >> (6 * i)) & 0x3F) as u8) + b'0'))
        .collect()
}

/// Runs `f` in a subtransaction: on success the subtransaction is released and
/// its effects kept; on an error (returned by `f`, or raised by PostgreSQL) it
/// is rolled back and the failure returned.
pub fn run<T>(f: impl FnOnce() -> Result<T, ByokError>) -> Result<T, Failure> {
    // SAFETY: the backend's main thread; memory context and resource owner are
    // restored on both paths as PL/Python does.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: as above.
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let restore = move || {
        // SAFETY: puts back what was current before the subtransaction began.
        unsafe {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
        }
    };
    let f = AssertUnwindSafe(f);
    let outcome = PgTryBuilder::new(move || {
        let f = f; // the whole wrapper, not just its field
        (f.0)().map_err(Failure::Byok)
    })
    .catch_others(|caught| match caught {
        CaughtError::PostgresError(report)
        | CaughtError::ErrorReport(report)
        | CaughtError::RustPanic {
            ereport: report, ..
        } => Err(Failure::from_caught(&report)),
    })
    .execute();
    match outcome {
        Ok(value) => {
            // SAFETY: the subtransaction begun above is the current one.
            unsafe { pg_sys::ReleaseCurrentSubTransaction() };
            restore();
            Ok(value)
        }
        Err(failure) => {
            // SAFETY: as above; pgrx has copied and flushed the error state.
            unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
            restore();
            Err(failure)
        }
    }
}
