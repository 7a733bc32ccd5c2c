//! Per-tenant grants: which roles (and their members) may encrypt for and
//! decrypt a tenant's values. Effective in every session at commit (the
//! catalog trigger invalidates every backend's ready keys).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::errors::ByokError;
use crate::postgres::session;

fn resolve_role(role_name: &str) -> Result<pg_sys::Oid, ByokError> {
    session::role_oid(role_name).ok_or_else(|| ByokError::UnknownRole(role_name.to_string()))
}

/// Lets `role_name` use tenant `tenant_id`'s keys; false when it already could.
pub fn grant(role_name: &str, tenant_id: &str) -> Result<bool, ByokError> {
    let role = resolve_role(role_name)?;
    if catalog::load_tenant(tenant_id, false)?.is_none() {
        return Err(ByokError::UnknownTenant(tenant_id.to_string()));
    }
    change(
        "grant_tenant",
        "WITH changed AS (INSERT INTO byok.tenant_grants (grantee, tenant_id, granted_by)
                          VALUES ($1::pg_catalog.oid::pg_catalog.regrole::pg_catalog.text::byok.role_ref, $2, session_user)
                          ON CONFLICT DO NOTHING RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM changed)",
        role,
        tenant_id,
    )
}

/// Takes a grant back; false when there was none.
pub fn revoke(role_name: &str, tenant_id: &str) -> Result<bool, ByokError> {
    let role = resolve_role(role_name)?;
    change(
        "revoke_tenant",
        "WITH changed AS (DELETE FROM byok.tenant_grants
                           WHERE grantee OPERATOR(byok.=) $1::pg_catalog.oid::pg_catalog.regrole::pg_catalog.text::byok.role_ref
                             AND tenant_id OPERATOR(pg_catalog.=) $2
                           RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM changed)",
        role,
        tenant_id,
    )
}

/// Runs a statement adding or removing one grant (`$1` role, `$2` tenant; true if
/// it changed anything) and records it in the audit trail. The role reaches
/// the statement as its name (`::text::byok.role_ref`): on Citus the statement
/// runs on every node, where the same role has another OID.
fn change(event: &str, sql: &str, role: pg_sys::Oid, tenant_id: &str) -> Result<bool, ByokError> {
    let changed = Spi::get_one_with_args::<bool>(
        sql,
        &[DatumWithOid::from(role), DatumWithOid::from(tenant_id)],
    )?
    .unwrap_or(false);
    catalog::audit(
        event,
        Some(tenant_id),
        None,
        true,
        None,
        Some(
            serde_json::json!({"role": crate::postgres::session::role_name(role), "changed": changed}),
        ),
    )?;
    Ok(changed)
}
