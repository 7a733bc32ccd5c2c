//! Dual control: `byok.request_operation`, `byok.approve_operation`,
//! `byok.cancel_operation`. A request names an [`AdminOp`] that needs approval;
//! another administrator's approval runs it through the same executor as a
//! direct call, in the approver's transaction. Who may take part is decided by
//! `policy` (different people, no self-minted approvers).

use pgrx::JsonB;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use super::{AdminOp, Origin, policy};
use crate::catalog;
use crate::errors::ByokError;
use crate::postgres::spi::Required;

fn invalid(message: String, hint: Option<String>) -> ByokError {
    ByokError::InvalidArgument { message, hint }
}

fn requestable()
-> impl Iterator<Item = &'static (&'static str, bool, bool, &'static [&'static str])> {
    AdminOp::ALL.iter().filter(|(_, _, request, _)| *request)
}

/// The operation a request describes, checked as `byok.request_operation`
/// documents: a known requestable operation, its arguments exactly.
pub fn parse_request(
    op: &str,
    tenant_id: &str,
    args: &serde_json::Value,
) -> Result<AdminOp, ByokError> {
    let Some((_, _, _, fields)) = requestable().find(|(name, ..)| *name == op) else {
        return Err(invalid(
            format!(
                "unknown operation \"{}\"",
                op.chars().take(64).collect::<String>()
            ),
            Some(format!(
                "one of {}",
                requestable()
                    .map(|(n, ..)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ));
    };
    let arguments: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|f| !matches!(*f, "tenant_id" | "reason"))
        .collect();
    let Some(given) = args.as_object() else {
        return Err(invalid(
            "request_operation: args must be a JSON object".into(),
            None,
        ));
    };
    let extra: Vec<&str> = given
        .keys()
        .map(String::as_str)
        .filter(|k| !arguments.contains(k))
        .collect();
    if !extra.is_empty() {
        return Err(invalid(
            format!("operation {op} takes no argument {}", extra.join(", ")),
            Some(format!(
                "its arguments: {}",
                if arguments.is_empty() {
                    "none".to_string()
                } else {
                    arguments.join(", ")
                }
            )),
        ));
    }
    let mut document = given.clone();
    document.insert("operation".into(), op.into());
    if fields.contains(&"tenant_id") {
        document.insert("tenant_id".into(), tenant_id.into());
    }
    // Numbers and strings alike: a dek_id may come as 17 or "17".
    if let Some(serde_json::Value::String(id)) = document.get("dek_id").cloned()
        && let Ok(id) = id.parse::<i64>()
    {
        document.insert("dek_id".into(), id.into());
    }
    serde_json::from_value::<AdminOp>(serde_json::Value::Object(document)).map_err(|e| {
        let text = e.to_string();
        match text
            .split('`')
            .nth(1)
            .filter(|_| text.starts_with("missing field"))
        {
            Some(field) => invalid(format!("operation {op} needs argument {field}"), None),
            None => invalid(format!("operation {op}: {text}"), None),
        }
    })
}

/// Checks what a request names: the tenant, the data key, the role, the interval.
fn check_request(op: &AdminOp, requested_tenant: &str) -> Result<(), ByokError> {
    // Operations without a tenant are requested under '' (the column is NOT NULL).
    let tenant_id = op.tenant_id().unwrap_or_default();
    if tenant_id != requested_tenant {
        return Err(invalid(
            format!(
                "the configuration is for tenant \"{tenant_id}\", the request for \"{requested_tenant}\""
            ),
            None,
        ));
    }
    if catalog::load_tenant(tenant_id, false)?.is_none() {
        return Err(ByokError::UnknownTenant(tenant_id.to_string()));
    }
    match op {
        AdminOp::DestroyDataKey { dek_id, .. } | AdminOp::SetDataKeyState { dek_id, .. }
            if catalog::tenant_of_data_key(*dek_id)?.as_deref() != Some(tenant_id) =>
        {
            return Err(ByokError::NotFound {
                message: format!("tenant \"{tenant_id}\" has no data key {dek_id}"),
                hint: None,
            });
        }
        AdminOp::GrantTenant { role, .. } if crate::postgres::session::role_oid(role).is_none() => {
            return Err(ByokError::UnknownRole(role.clone()));
        }
        AdminOp::RotateMasterKey { grace_period, .. } => {
            Spi::get_one_with_args::<pgrx::datum::Interval>(
                "SELECT $1::pg_catalog.interval",
                &[DatumWithOid::from(grace_period.as_str())],
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// `byok.request_operation`: records a request; returns its id.
pub fn request(op_name: &str, tenant_id: &str, args: &serde_json::Value) -> Result<i64, ByokError> {
    let details = serde_json::json!({"operation": op_name, "args": args});
    super::administer_with(
        "request_operation",
        Some(tenant_id),
        None,
        Some(details),
        || {
            let op = parse_request(op_name, tenant_id, args)?;
            catalog::as_extension_owner(|| {
                super::require_primary("request_operation")?;
                check_request(&op, tenant_id)?;
                let requester =
                    catalog::participant(&crate::postgres::session::session_role_name())?;
                policy::check_requester(&requester)?;
                let id = Spi::get_one_with_args::<i64>(
                "INSERT INTO byok.operation_requests (operation, tenant_id, args, requested_by, expires_at)
                 VALUES ($1, $2, $3, session_user,
                         now() + pg_catalog.make_interval(mins => $4))
                 RETURNING request_id",
                &[
                    DatumWithOid::from(op.name()),
                    DatumWithOid::from(tenant_id),
                    DatumWithOid::from(JsonB(op.request_arguments())),
                    DatumWithOid::from(crate::gucs::approval_expiry_minutes()),
                ],
            )?
            .ok_or_else(|| ByokError::Internal("the request was not recorded".into()))?;
                catalog::audit(
                    "request_operation",
                    Some(tenant_id),
                    None,
                    true,
                    None,
                    Some(
                        serde_json::json!({"request_id": id, "operation": op.name(), "args": op.request_arguments()}),
                    ),
                )?;
                Ok(id)
            })
        },
    )
}

struct Request {
    operation: String,
    tenant_id: String,
    args: serde_json::Value,
    requested_by: String,
    state: String,
    expired: bool,
}

fn load_request(id: i64) -> Result<Request, ByokError> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT operation, tenant_id, args, requested_by::text, state, expires_at <= now()
               FROM byok.operation_requests WHERE request_id = $1 FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(id)],
        )?;
        if rows.is_empty() {
            return Err(ByokError::NotFound {
                message: format!("no operation request {id}"),
                hint: None,
            });
        }
        let row = rows.first();
        Ok(Request {
            operation: row.required::<String>(1)?,
            tenant_id: row.required::<String>(2)?,
            args: row.required::<JsonB>(3)?.0,
            requested_by: row.required::<String>(4)?,
            state: row.required::<String>(5)?,
            expired: row.required::<bool>(6)?,
        })
    })
}

fn not_in_state(message: String, detail: Option<&str>, hint: Option<&str>) -> ByokError {
    ByokError::WrongState {
        message,
        detail: detail.map(str::to_string),
        hint: hint.map(str::to_string),
    }
}

/// Request `id`, or `None` when there is none (what the audit record of a
/// refused call can name; the operation itself reports the missing request).
fn find_request(id: i64) -> Result<Option<Request>, ByokError> {
    match load_request(id) {
        Ok(request) => Ok(Some(request)),
        Err(ByokError::NotFound { .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

/// `byok.approve_operation`: a second administrator approves and runs a request.
pub fn approve(id: i64) -> Result<String, ByokError> {
    let known = catalog::as_extension_owner(|| find_request(id))?;
    let tenant = known.as_ref().map(|r| r.tenant_id.clone());
    let details = serde_json::json!({
        "request_id": id,
        "operation": known.as_ref().map(|r| r.operation.clone()),
    });
    super::administer_with(
        "approve_operation",
        tenant.as_deref(),
        None,
        Some(details),
        || {
            let request = catalog::as_extension_owner(|| load_request(id))?;
            if request.state != "pending" {
                return Err(not_in_state(
                    format!("operation request {id} is already {}", request.state),
                    None,
                    None,
                ));
            }
            if request.expired {
                return Err(not_in_state(
                    format!("operation request {id} has expired"),
                    Some("requests wait byok.approval_expiry_minutes for their approval"),
                    Some("ask again with byok.request_operation()"),
                ));
            }
            let (requester, approver, (granted, minted_by)) = catalog::as_extension_owner(|| {
                let requester = catalog::participant(&request.requested_by)?;
                let approver =
                    catalog::participant(&crate::postgres::session::session_role_name())?;
                let conflicts = catalog::membership_conflicts(approver.oid, requester.oid)?;
                Ok((requester, approver, conflicts))
            })?;
            policy::check_approver(id, &requester, &approver, granted, minted_by.as_deref())?;
            let op = parse_request(&request.operation, &request.tenant_id, &request.args)?;
            let result = super::execute(op.clone(), Origin::Approved)?;
            let outcome = op.describe(&result);
            catalog::as_extension_owner(|| {
                Spi::run_with_args(
                    "UPDATE byok.operation_requests SET state = 'done', approved_by = session_user,
                        approved_at = now(), result = $2
                  WHERE request_id = $1",
                    &[DatumWithOid::from(id), DatumWithOid::from(outcome.as_str())],
                )?;
                catalog::audit(
                    "approve_operation",
                    Some(&request.tenant_id),
                    None,
                    true,
                    None,
                    Some(serde_json::json!({
                        "request_id": id, "operation": request.operation, "args": request.args,
                        "requested_by": request.requested_by, "result": outcome,
                    })),
                )
            })?;
            Ok(outcome)
        },
    )
}

/// `byok.cancel_operation`: withdraws a pending request.
pub fn cancel(id: i64) -> Result<String, ByokError> {
    let tenant = catalog::as_extension_owner(|| find_request(id))?.map(|r| r.tenant_id);
    super::administer("cancel_operation", tenant.as_deref(), None, || {
        catalog::as_extension_owner(|| {
            let request = load_request(id)?;
            if request.state != "pending" {
                return Err(ByokError::NotFound {
                    message: format!("no pending operation request {id}"),
                    hint: None,
                });
            }
            Spi::run_with_args(
                "UPDATE byok.operation_requests SET state = 'cancelled' WHERE request_id = $1",
                &[DatumWithOid::from(id)],
            )?;
            catalog::audit(
                "cancel_operation",
                Some(&request.tenant_id),
                None,
                true,
                None,
                Some(serde_json::json!({"request_id": id})),
            )?;
            Ok("cancelled".to_string())
        })
    })
}
