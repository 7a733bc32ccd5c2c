//! Administrative operations, typed, and the one path every one of them takes.
//!
//! [`AdminOp`] lists every operation once: its SQL name, whether it needs a
//! second administrator's approval where dual control applies, and its
//! arguments. The `#[pg_extern]` functions in `api/` and
//! `byok.approve_operation` both build an `AdminOp` and hand it to [`execute`],
//! which, in order:
//! 1. refuses it if dual control applies and it was not approved (`policy`);
//! 2. switches to the extension's owner with search_path pinned to
//!    `pg_catalog, pg_temp` (catalog work never runs anyone else's code);
//! 3. refuses catalog changes on a standby;
//! 4. runs it (each operation invalidates the key caches it affects and
//!    writes its own success record, in its transaction);
//! 5. if it fails, queues a failure record (its transaction aborts, so it
//!    could not write one itself) and raises the error.
//!
//! A new operation is one variant here and one function in a sibling module.

pub mod compromise;
pub mod dr;
pub mod grants;
pub mod keys;
pub mod policy;
pub mod requests;
pub mod rotation;
pub mod validate;

use pgrx::PgTryBuilder;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use serde::{Deserialize, Serialize};

use crate::catalog;
use crate::errors::ByokError;
use crate::postgres::subxact::Failure;

fn default_grace_period() -> String {
    "24 hours".into()
}

/// Declares [`AdminOp`] and its metadata from one list.
macro_rules! admin_operations {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $name:literal, approval: $approval:literal, request: $request:literal, writes: $writes:literal {
            $( $(#[$fattr:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    )*) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "operation", deny_unknown_fields)]
        pub enum AdminOp {
            $(
                $(#[$doc])*
                #[serde(rename = $name)]
                $variant { $( $(#[$fattr])* $field: $ty ),* },
            )*
        }

        impl AdminOp {
            /// Every operation: (SQL name, needs approval under dual control,
            /// may be asked for with byok.request_operation, argument names).
            pub const ALL: &'static [(&'static str, bool, bool, &'static [&'static str])] = &[
                $( ($name, $approval, $request, &[$(stringify!($field)),*]), )*
            ];

            /// The operation's SQL name (also its audit event).
            pub fn name(&self) -> &'static str {
                match self { $( AdminOp::$variant { .. } => $name, )* }
            }

            /// Whether it needs a second administrator where dual control applies.
            pub fn needs_approval(&self) -> bool {
                match self { $( AdminOp::$variant { .. } => $approval, )* }
            }

            /// Whether it changes the catalog (refused on a standby).
            pub fn writes_catalog(&self) -> bool {
                match self { $( AdminOp::$variant { .. } => $writes, )* }
            }
        }
    };
}

admin_operations! {
    /// Creates or updates a tenant from its byok_config document. Creating a
    /// tenant needs no approval; changing an existing one does where dual
    /// control applies (its endpoints, credentials, rotation and audit
    /// settings are as sensitive as a grant): see [`approval_needed`].
    ConfigureTenant = "configure_tenant", approval: false, request: true, writes: true { config: serde_json::Value }
    /// A new active data key; the previous one becomes decrypt-only.
    RotateDataKey = "rotate_data_key", approval: true, request: true, writes: true {
        tenant_id: String,
        /// Why, when not asked by a person (recorded in the audit trail).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    }
    /// A new active index key (the tenant's first, or a rotation: the previous
    /// one becomes decrypt-only until a re-encryption job rewrites its terms).
    RotateIndexKey = "rotate_index_key", approval: true, request: true, writes: true { tenant_id: String }
    /// All of a master-key rotation at once (the approved form of the procedure).
    RotateMasterKey = "rotate_master_key", approval: true, request: true, writes: true {
        tenant_id: String,
        new_key_id: String,
        #[serde(default = "default_grace_period")]
        grace_period: String,
    }
    /// One batch of `CALL byok.rotate_master_key` (the procedure commits between batches).
    RotateMasterKeyStep = "rotate_master_key_step", approval: true, request: false, writes: true {
        tenant_id: String,
        new_key_id: String,
        grace_period: String,
    }
    /// The end of `CALL byok.rotate_master_key`: checks and records completion.
    FinishMasterKeyRotation = "rotate_master_key_finish", approval: false, request: false, writes: true {
        tenant_id: String,
        new_key_id: String,
    }
    /// The guide's customer notice of a pending rotation: the job launcher
    /// rotates the tenant to `new_key_id` at `rotation_time`, with that grace
    /// period for the previous key.
    ScheduleMasterKeyRotation = "schedule_master_key_rotation", approval: true, request: true, writes: true {
        tenant_id: String,
        new_key_id: String,
        rotation_time: String,
        grace_period_hours: f64,
    }
    /// Withdraws a scheduled rotation that has not started.
    /// (Approved like scheduling: a customer's rotation, perhaps of a
    /// compromised key, is not one administrator's to call off.)
    CancelScheduledRotation = "cancel_scheduled_rotation", approval: true, request: true, writes: true {
        tenant_id: String,
        rotation_id: i64,
    }
    /// Ends the grace period of the master key a rotation replaced: rewraps any
    /// data key still under it, and refuses that key from then on (the job
    /// launcher does it when the grace period ends).
    RetirePreviousMasterKey = "retire_previous_master_key", approval: true, request: true, writes: true {
        tenant_id: String,
    }
    /// decrypt-only <-> retired (retiring makes the key's values unreadable).
    SetDataKeyState = "set_data_key_state", approval: true, request: true, writes: true {
        tenant_id: String,
        dek_id: i64,
        state: String,
    }
    /// Erases a non-active data key.
    DestroyDataKey = "destroy_data_key", approval: true, request: true, writes: true {
        tenant_id: String,
        dek_id: i64,
    }
    /// Crypto-shredding: every data key of the tenant.
    DestroyTenantKeys = "destroy_tenant_keys", approval: true, request: true, writes: true { tenant_id: String }
    /// Lets a role use a tenant's keys.
    GrantTenant = "grant_tenant", approval: true, request: true, writes: true { tenant_id: String, role: String }
    /// Takes a grant back.
    RevokeTenant = "revoke_tenant", approval: false, request: false, writes: true { tenant_id: String, role: String }
    /// Drops cached keys (shared cache now, every backend at commit).
    FlushCache = "flush_cache", approval: false, request: false, writes: false { tenant_id: Option<String> }
    /// The guide's validation checks.
    ValidateTenant = "validate_tenant", approval: false, request: false, writes: false { tenant_id: String }
    /// One batch of `CALL byok.complete_key_wraps`: data keys get the wrap
    /// they lack (backup, or primary for keys made during DR). Adds only what
    /// the tenant's configuration already asks for, so no approval.
    CompleteKeyWrapsStep = "complete_key_wraps_step", approval: false, request: false, writes: true { tenant_id: String }
    /// The end of `CALL byok.complete_key_wraps`: counts and records the result.
    CompleteKeyWraps = "complete_key_wraps", approval: false, request: false, writes: true { tenant_id: String }
    /// The backup master key takes over: new keys and unwraps (DR).
    ActivateDr = "activate_dr", approval: true, request: true, writes: true { tenant_id: String }
    /// Back to the primary master key, which must answer again.
    DeactivateDr = "deactivate_dr", approval: true, request: true, writes: true { tenant_id: String }
    /// Starts the key-compromise response (`CALL byok.respond_to_compromise`):
    /// it ends by destroying the tenant's data keys, so it needs a second
    /// administrator where dual control applies.
    StartCompromiseResponse = "start_compromise_response", approval: true, request: true, writes: true {
        tenant_id: String,
        new_master_key: String,
    }
    /// One step of a started compromise response (only one a second
    /// administrator approved, where dual control applies, can be under way).
    CompromiseResponseStep = "compromise_response_step", approval: false, request: false, writes: true {
        tenant_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<i64>,
    }
}

/// What an operation returns to SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    Text(String),
    Int(i64),
    Bool(bool),
    Checks(Vec<(String, bool, String)>),
}

impl OpResult {
    pub fn text(self) -> String {
        match self {
            OpResult::Text(t) => t,
            OpResult::Int(i) => i.to_string(),
            OpResult::Bool(b) => b.to_string(),
            OpResult::Checks(c) => format!("{} check(s)", c.len()),
        }
    }

    pub fn int(self) -> i64 {
        match self {
            OpResult::Int(i) => i,
            other => unreachable!("operation returned {other:?}, not a number"),
        }
    }

    pub fn bool(self) -> bool {
        match self {
            OpResult::Bool(b) => b,
            other => unreachable!("operation returned {other:?}, not a boolean"),
        }
    }

    pub fn checks(self) -> Vec<(String, bool, String)> {
        match self {
            OpResult::Checks(c) => c,
            other => unreachable!("operation returned {other:?}, not checks"),
        }
    }
}

/// How an operation came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Called directly by the session's role.
    Direct,
    /// Approved by a second administrator (dual control is satisfied).
    Approved,
    /// Run by a background worker on policy set by administrators (scheduled
    /// rotation, the encryption budget).
    Policy,
}

impl AdminOp {
    /// The tenant the operation is about, if it names one.
    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            AdminOp::ConfigureTenant { config } => config.get("tenant_id").and_then(|t| t.as_str()),
            AdminOp::RotateDataKey { tenant_id, .. }
            | AdminOp::RotateIndexKey { tenant_id }
            | AdminOp::RotateMasterKey { tenant_id, .. }
            | AdminOp::RotateMasterKeyStep { tenant_id, .. }
            | AdminOp::FinishMasterKeyRotation { tenant_id, .. }
            | AdminOp::ScheduleMasterKeyRotation { tenant_id, .. }
            | AdminOp::CancelScheduledRotation { tenant_id, .. }
            | AdminOp::RetirePreviousMasterKey { tenant_id }
            | AdminOp::DestroyDataKey { tenant_id, .. }
            | AdminOp::SetDataKeyState { tenant_id, .. }
            | AdminOp::DestroyTenantKeys { tenant_id }
            | AdminOp::GrantTenant { tenant_id, .. }
            | AdminOp::RevokeTenant { tenant_id, .. }
            | AdminOp::ValidateTenant { tenant_id }
            | AdminOp::CompleteKeyWrapsStep { tenant_id }
            | AdminOp::CompleteKeyWraps { tenant_id }
            | AdminOp::ActivateDr { tenant_id }
            | AdminOp::DeactivateDr { tenant_id }
            | AdminOp::StartCompromiseResponse { tenant_id, .. }
            | AdminOp::CompromiseResponseStep { tenant_id, .. } => Some(tenant_id),
            AdminOp::FlushCache { tenant_id } => tenant_id.as_deref(),
        }
    }

    /// The data key the operation is about, if it names one.
    pub fn dek_id(&self) -> Option<i64> {
        match self {
            AdminOp::SetDataKeyState { dek_id, .. } | AdminOp::DestroyDataKey { dek_id, .. } => {
                Some(*dek_id)
            }
            _ => None,
        }
    }

    /// How an approved operation's result reads in `byok.approve_operation`'s answer.
    pub fn describe(&self, result: &OpResult) -> String {
        match (self, result) {
            (AdminOp::RotateDataKey { .. }, OpResult::Int(id)) => {
                format!("new active data key {id}")
            }
            (AdminOp::DestroyDataKey { dek_id, .. }, OpResult::Text(state)) => {
                format!("data key {dek_id} {state}")
            }
            (AdminOp::DestroyTenantKeys { .. }, OpResult::Int(n)) => {
                format!("{n} data key(s) destroyed")
            }
            (AdminOp::GrantTenant { tenant_id, role }, OpResult::Bool(_)) => {
                format!("tenant {tenant_id} granted to {role}")
            }
            (_, other) => other.clone().text(),
        }
    }

    /// The operation a dual-control request asks for to have this one run
    /// (a step of the rotation procedure is approved as the whole rotation).
    pub fn approval_name(&self) -> &'static str {
        match self {
            AdminOp::RotateMasterKeyStep { .. } => "rotate_master_key",
            AdminOp::CompleteKeyWrapsStep { .. } => "complete_key_wraps",
            other => other.name(),
        }
    }

    /// The arguments a dual-control request for this operation carries (all
    /// but the operation's name and tenant), as `byok.request_operation` takes them.
    pub fn request_arguments(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.remove("operation");
            map.remove("tenant_id");
            map.remove("reason");
            if matches!(self, AdminOp::RotateMasterKeyStep { .. }) {
                map.remove("grace_period");
            }
        }
        value
    }
}

/// Runs `op` on the one administrative path (see the module docs).
pub fn execute(op: AdminOp, origin: Origin) -> Result<OpResult, ByokError> {
    // (a step of the rotation procedure is recorded as the rotation)
    let (event, tenant, dek) = (
        op.approval_name(),
        op.tenant_id().map(str::to_string),
        op.dek_id(),
    );
    administer(event, tenant.as_deref(), dek, || run(op, origin))
}

/// Runs `body` (an administrative action) so that its failure, however it
/// happens, leaves a failure record in the audit trail.
pub fn administer<T>(
    event: &'static str,
    tenant: Option<&str>,
    dek: Option<i64>,
    body: impl FnOnce() -> Result<T, ByokError>,
) -> Result<T, ByokError> {
    administer_with(event, tenant, dek, None, body)
}

/// [`administer`], with details for the failure record.
pub fn administer_with<T>(
    event: &'static str,
    tenant: Option<&str>,
    dek: Option<i64>,
    details: Option<serde_json::Value>,
    body: impl FnOnce() -> Result<T, ByokError>,
) -> Result<T, ByokError> {
    let actor = crate::postgres::session::acting_role();
    // A table owner's code (a trigger, a policy) runs inside a
    // security-restricted operation when byok_pg works on its table: it must
    // not administer keys from there, with the rights of whoever started the work.
    // SAFETY: reads the backend's security context.
    let body = move || {
        if unsafe { pg_sys::InSecurityRestrictedOperation() } {
            return Err(ByokError::NotAllowed {
                message: format!("{event} cannot run inside a security-restricted operation"),
                detail: Some(
                    "a table owner's code (a trigger, a policy, an index expression) running while byok_pg works on its table may not administer keys"
                        .into(),
                ),
                hint: None,
            });
        }
        body()
    };
    let tenant = tenant.map(str::to_string);
    let body = std::panic::AssertUnwindSafe(body);
    let outcome = PgTryBuilder::new(move || {
        let body = body; // the whole wrapper, not just its field
        (body.0)()
    })
    .catch_others(|caught| {
        let failure = match &caught {
            CaughtError::PostgresError(r)
            | CaughtError::ErrorReport(r)
            | CaughtError::RustPanic { ereport: r, .. } => Failure::from_caught(r),
        };
        crate::audit::failure(
            event,
            tenant.as_deref(),
            dek,
            &failure.summary(),
            details.clone(),
            actor,
        );
        // Raised afresh: code, message, detail and hint as they were, without
        // the Rust backtrace a rethrow would attach to the detail.
        failure.into_report().report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    })
    .execute();
    if let Err(e) = &outcome {
        crate::audit::failure(
            event,
            tenant.as_deref(),
            dek,
            &e.summary_ref(),
            details.clone(),
            actor,
        );
    }
    outcome
}

/// Whether `op`, called directly, must wait for a second administrator.
fn approval_needed(op: &AdminOp) -> Result<bool, ByokError> {
    if !policy::dual_control_applies() {
        return Ok(false);
    }
    match op {
        AdminOp::ConfigureTenant { config } => {
            catalog::as_extension_owner(|| keys::changes_existing_tenant(config))
        }
        other => Ok(other.needs_approval()),
    }
}

fn run(op: AdminOp, origin: Origin) -> Result<OpResult, ByokError> {
    if origin == Origin::Direct && approval_needed(&op)? {
        return Err(ByokError::DualControlRequired {
            operation: op.approval_name(),
            tenant: op.tenant_id().unwrap_or_default().to_string(),
            args: op.request_arguments().to_string(),
        });
    }
    catalog::as_extension_owner(|| {
        if op.writes_catalog() {
            require_primary(op.name())?;
        }
        match op {
            AdminOp::ConfigureTenant { config } => {
                keys::configure_tenant(&config).map(OpResult::Text)
            }
            AdminOp::RotateDataKey { tenant_id, reason } => {
                keys::rotate_data_key(&tenant_id, reason.as_deref()).map(OpResult::Int)
            }
            AdminOp::RotateIndexKey { tenant_id } => {
                keys::rotate_index_key(&tenant_id).map(OpResult::Int)
            }
            AdminOp::RotateMasterKey {
                tenant_id,
                new_key_id,
                grace_period,
            } => rotation::rotate_master_key(&tenant_id, &new_key_id, &grace_period)
                .map(OpResult::Text),
            AdminOp::RotateMasterKeyStep {
                tenant_id,
                new_key_id,
                grace_period,
            } => rotation::step(&tenant_id, &new_key_id, &grace_period).map(OpResult::Int),
            AdminOp::FinishMasterKeyRotation {
                tenant_id,
                new_key_id,
            } => rotation::finish(&tenant_id, &new_key_id).map(OpResult::Text),
            AdminOp::ScheduleMasterKeyRotation {
                tenant_id,
                new_key_id,
                rotation_time,
                grace_period_hours,
            } => rotation::schedule(
                &tenant_id,
                &new_key_id,
                &rotation_time,
                grace_period_hours,
                origin == Origin::Approved,
            )
            .map(OpResult::Int),
            AdminOp::CancelScheduledRotation {
                tenant_id,
                rotation_id,
            } => rotation::cancel_scheduled(&tenant_id, rotation_id).map(OpResult::Text),
            AdminOp::RetirePreviousMasterKey { tenant_id } => {
                rotation::retire_previous_master_key(&tenant_id).map(OpResult::Text)
            }
            AdminOp::SetDataKeyState { dek_id, state, .. } => {
                keys::set_data_key_state(dek_id, &state).map(OpResult::Text)
            }
            AdminOp::DestroyDataKey { tenant_id, dek_id } => {
                keys::destroy_data_key(&tenant_id, dek_id).map(OpResult::Text)
            }
            AdminOp::DestroyTenantKeys { tenant_id } => {
                keys::destroy_tenant_keys(&tenant_id).map(OpResult::Int)
            }
            AdminOp::GrantTenant { tenant_id, role } => {
                grants::grant(&role, &tenant_id).map(OpResult::Bool)
            }
            AdminOp::RevokeTenant { tenant_id, role } => {
                grants::revoke(&role, &tenant_id).map(OpResult::Bool)
            }
            AdminOp::FlushCache { tenant_id } => {
                keys::flush_cache(tenant_id.as_deref()).map(OpResult::Int)
            }
            AdminOp::ValidateTenant { tenant_id } => {
                validate::validate_tenant(&tenant_id).map(OpResult::Checks)
            }
            AdminOp::CompleteKeyWrapsStep { tenant_id } => {
                dr::complete_key_wraps_step(&tenant_id).map(OpResult::Int)
            }
            AdminOp::CompleteKeyWraps { tenant_id } => {
                dr::complete_key_wraps_finish(&tenant_id).map(OpResult::Text)
            }
            AdminOp::ActivateDr { tenant_id } => dr::activate(&tenant_id).map(OpResult::Text),
            AdminOp::DeactivateDr { tenant_id } => dr::deactivate(&tenant_id).map(OpResult::Text),
            AdminOp::StartCompromiseResponse {
                tenant_id,
                new_master_key,
            } => compromise::start(&tenant_id, &new_master_key).map(OpResult::Int),
            AdminOp::CompromiseResponseStep { tenant_id, job_id } => {
                compromise::step(&tenant_id, job_id).map(OpResult::Text)
            }
        }
    })
}

/// Key administration writes the catalog: refused clearly on a standby, and
/// on a Citus worker (the coordinator writes the reference tables everywhere;
/// a worker's own key id sequence would collide with the coordinator's).
pub fn require_primary(action: &'static str) -> Result<(), ByokError> {
    // SAFETY: reads shared state, no preconditions.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(ByokError::ReadOnlyStandby(action));
    }
    if catalog::cluster_role()? == catalog::ClusterRole::Worker {
        return Err(ByokError::CitusWorkerNode(action));
    }
    Ok(())
}

/// Refuses an operation before it starts (a bad argument), leaving the same
/// failure record as a failure inside it would.
pub fn refuse(event: &'static str, tenant: Option<&str>, dek: Option<i64>, error: ByokError) -> ! {
    match administer(event, tenant, dek, || Err::<(), _>(error)) {
        Err(e) => e.raise(),
        Ok(()) => unreachable!("the refusal is an error"),
    }
}

/// The tenant owning data key `dek_id`, for an operation on it (`event`);
/// an unknown key is refused (and recorded) as that operation's failure.
pub fn tenant_of_data_key(dek_id: i64, event: &'static str) -> String {
    catalog::as_extension_owner(|| catalog::tenant_of_data_key(dek_id))
        .unwrap_or_else(|e| e.raise())
        .unwrap_or_else(|| {
            refuse(
                event,
                None,
                Some(dek_id),
                ByokError::UnknownDataKey(dek_id as u64),
            )
        })
}

/// Raises an operation's failure as an ERROR (the SQL-facing functions' end).
pub fn run_or_raise(op: AdminOp) -> OpResult {
    match execute(op, Origin::Direct) {
        Ok(result) => result,
        Err(e) => e.raise(),
    }
}
