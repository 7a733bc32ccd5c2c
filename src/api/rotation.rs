//! Master-key rotation, as called by `CALL byok.rotate_master_key` (see
//! `admin::rotation`): one step per transaction, then the finish; and the
//! guide's rotation workflow around it: scheduled rotations and the end of a
//! replaced key's grace period.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp};
use crate::errors::ByokError;

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_master_key_step(tenant_id: &str, new_key_id: &str, grace_period: Interval) -> i64 {
    admin::run_or_raise(AdminOp::RotateMasterKeyStep {
        tenant_id: tenant_id.to_string(),
        new_key_id: new_key_id.to_string(),
        grace_period: grace_period.to_string(),
    })
    .int()
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_master_key_finish(tenant_id: &str, new_key_id: &str) -> String {
    admin::run_or_raise(AdminOp::FinishMasterKeyRotation {
        tenant_id: tenant_id.to_string(),
        new_key_id: new_key_id.to_string(),
    })
    .text()
}

/// The guide's notice of a pending customer-initiated rotation, as the customer
/// sends it: `{"tenant_id", "new_key_id", "rotation_time", "grace_period_hours"}`.
/// Returns the scheduled rotation's id (`byok.scheduled_rotations`).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn schedule_master_key_rotation(notice: pgrx::JsonB) -> i64 {
    let op = match scheduled_rotation(&notice.0) {
        Ok(op) => op,
        Err(e) => admin::refuse("schedule_master_key_rotation", None, None, e),
    };
    admin::run_or_raise(op).int()
}

/// The notice's fields, exactly (an unknown or missing field is an error).
fn scheduled_rotation(notice: &serde_json::Value) -> Result<AdminOp, ByokError> {
    const FIELDS: [&str; 4] = [
        "tenant_id",
        "new_key_id",
        "rotation_time",
        "grace_period_hours",
    ];
    let invalid = |message: String| {
        ByokError::InvalidArgument {
        message,
        hint: Some(
            r#"the guide's notice: {"tenant_id": "...", "new_key_id": "...", "rotation_time": "2027-01-15T02:00:00Z", "grace_period_hours": 24}"#
                .into(),
        ),
    }
    };
    let Some(fields) = notice.as_object() else {
        return Err(invalid("the rotation notice must be a JSON object".into()));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(format!(
            "unknown field \"{}\" in the rotation notice",
            unknown.chars().take(64).collect::<String>()
        )));
    }
    let text = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("the rotation notice needs \"{name}\" (a string)")))
    };
    Ok(AdminOp::ScheduleMasterKeyRotation {
        tenant_id: text("tenant_id")?,
        new_key_id: text("new_key_id")?,
        rotation_time: text("rotation_time")?,
        grace_period_hours: fields
            .get("grace_period_hours")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| {
                invalid("the rotation notice needs \"grace_period_hours\" (a number)".into())
            })?,
    })
}

/// Cancels a scheduled rotation that has not started.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn cancel_scheduled_rotation(tenant_id: &str, rotation_id: i64) -> String {
    admin::run_or_raise(AdminOp::CancelScheduledRotation {
        tenant_id: tenant_id.to_string(),
        rotation_id,
    })
    .text()
}

/// Ends the grace period of the master key the tenant's last rotation replaced
/// now, instead of at its end (when the job launcher does it).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn retire_previous_master_key(tenant_id: &str) -> String {
    admin::run_or_raise(AdminOp::RetirePreviousMasterKey {
        tenant_id: tenant_id.to_string(),
    })
    .text()
}
