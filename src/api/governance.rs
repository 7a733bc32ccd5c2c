//! Governance: validation (`byok.validate_tenant`), crypto-shredding
//! (`byok.destroy_tenant_keys`), per-tenant grants, key segregation and dual
//! control (`byok.request_operation` / `approve_operation` / `cancel_operation`).

use pgrx::JsonB;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp};
use crate::errors::ByokError;

/// The guide's `validate_byok.py` as SQL: provider reachable, master key present,
/// enabled and usable for wrapping, a data key generated and round-tripped, and
/// the latencies. Never raises for a failed check; records the result in the audit trail.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn validate_tenant(
    tenant_id: &str,
) -> TableIterator<
    'static,
    (
        name!(check_name, String),
        name!(ok, bool),
        name!(detail, String),
    ),
> {
    TableIterator::new(
        admin::run_or_raise(AdminOp::ValidateTenant {
            tenant_id: tenant_id.to_string(),
        })
        .checks(),
    )
}

/// Crypto-shredding: `confirm` repeats the tenant id. Irreversible.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn destroy_tenant_keys(tenant_id: &str, confirm: &str) -> i64 {
    if confirm != tenant_id {
        admin::refuse(
            "destroy_tenant_keys",
            Some(tenant_id),
            None,
            ByokError::InvalidArgument {
                message: "destroy_tenant_keys: confirm must repeat the tenant id".into(),
                hint: Some("SELECT byok.destroy_tenant_keys('TENANT', 'TENANT')".into()),
            },
        );
    }
    admin::run_or_raise(AdminOp::DestroyTenantKeys {
        tenant_id: tenant_id.to_string(),
    })
    .int()
}

/// The segregation policy in force (`byok.environment`, the guide's matrix).
#[pg_extern(stable, parallel_safe)]
fn segregation_policy() -> TableIterator<
    'static,
    (
        name!(environment, String),
        name!(key_prefix, String),
        name!(approval_required, bool),
    ),
> {
    let policy = crate::gucs::segregation_policy();
    TableIterator::once((
        policy.environment.name().to_string(),
        policy.key_prefix,
        policy.approval_required,
    ))
}

/// Lets `role_name` (and the roles that belong to it) encrypt for and decrypt
/// tenant `tenant_id`'s values, and see the tenant in the catalog views.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn grant_tenant(role_name: &str, tenant_id: &str) -> bool {
    admin::run_or_raise(AdminOp::GrantTenant {
        tenant_id: tenant_id.to_string(),
        role: role_name.to_string(),
    })
    .bool()
}

/// Takes a tenant grant back; every backend re-checks at the transaction's commit.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_tenant(role_name: &str, tenant_id: &str) -> bool {
    admin::run_or_raise(AdminOp::RevokeTenant {
        tenant_id: tenant_id.to_string(),
        role: role_name.to_string(),
    })
    .bool()
}

/// Dual control: asks for an operation that needs a second administrator.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn request_operation(
    op: Option<&str>,
    tenant_id: Option<&str>,
    args: default!(Option<JsonB>, "'{}'"),
) -> i64 {
    let (Some(op), Some(tenant_id), Some(args)) = (op, tenant_id, args) else {
        ByokError::InvalidArgument {
            message: "request_operation: op and tenant_id are required, args must be a JSON object"
                .into(),
            hint: None,
        }
        .raise();
    };
    admin::requests::request(op, tenant_id, &args.0).unwrap_or_else(|e| e.raise())
}

/// Dual control: another byok_admin approves and runs the request; returns its result.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn approve_operation(id: i64) -> String {
    admin::requests::approve(id).unwrap_or_else(|e| e.raise())
}

/// Dual control: withdraws a pending request.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn cancel_operation(id: i64) -> String {
    admin::requests::cancel(id).unwrap_or_else(|e| e.raise())
}

/// `byok.tenant_visible(tenant_id)`: whether the current user may see the
/// tenant in the catalog views (administrators see all, other roles the
/// tenants they are granted). Answers for the current user only: it reveals
/// nothing about other roles' grants.
#[pg_extern(stable, parallel_safe, strict)]
fn tenant_visible(tenant_id: &str) -> bool {
    crate::catalog::current_user_sees_tenant(tenant_id).unwrap_or_else(|e| e.raise())
}
