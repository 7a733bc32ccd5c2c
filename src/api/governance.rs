//! Governance: the guide's validation script as SQL (`byok.validate_tenant`) and
//! crypto-shredding (`byok.destroy_tenant_keys`). Both leave an audit record.

use std::time::Instant;

use byok_core::config::ProviderKind;
use byok_core::crypto::DekCipher;
use byok_core::envelope::{self, Envelope};
use byok_kms::protocol::ProviderRef;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::broker;
use crate::catalog;
use crate::errors::{ByokError, OrRaise};
use crate::keyring;

/// The data-key id validation probes use: the largest a bigint holds, which the
/// key id sequence never reaches; the binding (tenant, id) keeps the probe apart.
const PROBE_DEK_ID: u64 = i64::MAX as u64;

type Checks = Vec<(String, bool, String)>;

fn tenant_provider(
    tenant_id: &str,
) -> Result<Option<(ProviderKind, ProviderRef, String)>, ByokError> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT provider, master_key_id, provider_options FROM byok.tenant_config WHERE tenant_id = $1",
            Some(1),
            &[DatumWithOid::from(tenant_id)],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        let name: String = row.get(1)?.unwrap_or_default();
        let master_key_id: String = row.get(2)?.unwrap_or_default();
        let options = match row.get::<pgrx::JsonB>(3)?.map(|j| j.0) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let kind = ProviderKind::from_name(&name)
            .ok_or_else(|| ByokError::Catalog(format!("unknown provider \"{name}\"")))?;
        Ok(Some((
            kind,
            ProviderRef {
                provider: name,
                options,
                create_key_store: false,
            },
            master_key_id,
        )))
    })
}

fn run_checks(tenant_id: &str) -> Checks {
    let mut checks: Checks = Vec::new();
    let mut add =
        |name: &str, ok: bool, detail: String| checks.push((name.to_string(), ok, detail));
    let (kind, provider, master_key_id) = match tenant_provider(tenant_id) {
        Ok(Some(found)) => found,
        Ok(None) => {
            add(
                "tenant configured",
                false,
                format!("tenant \"{tenant_id}\" does not exist"),
            );
            return checks;
        }
        Err(e) => {
            add("tenant configured", false, e.summary());
            return checks;
        }
    };
    add(
        "tenant configured",
        true,
        format!("provider {}, master key {master_key_id}", kind.name()),
    );
    let tenant = broker::tenant_ref(tenant_id);
    let started = Instant::now();
    let info = match broker::validate(tenant.clone(), provider.clone(), &master_key_id) {
        Ok(info) => info,
        Err(e) => {
            add("provider reachable", false, e.summary());
            return checks;
        }
    };
    add(
        "provider reachable",
        true,
        format!(
            "answered in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
    );
    add("master key exists", true, info.description.clone());
    add(
        "master key enabled",
        info.enabled,
        format!("version {}", info.version),
    );
    add(
        "key usage allows wrap and unwrap",
        info.can_wrap,
        if info.can_wrap {
            "yes".into()
        } else {
            info.description.clone()
        },
    );
    // A probe data key: generated, wrapped, unwrapped, and used once.
    let started = Instant::now();
    let wrapped = match broker::generate(
        tenant.clone(),
        provider.clone(),
        PROBE_DEK_ID,
        &master_key_id,
    ) {
        Ok(wrapped) => wrapped,
        Err(e) => {
            add("data key generates", false, e.summary());
            return checks;
        }
    };
    let generate_ms = started.elapsed().as_secs_f64() * 1e3;
    add("data key generates", true, format!("{generate_ms:.1} ms"));
    let started = Instant::now();
    let cache = catalog::cache_settings(Some(1), Some(1), Some(0));
    let dek = match broker::unwrap(tenant, provider, PROBE_DEK_ID, wrapped, cache) {
        Ok((dek, _)) => dek,
        Err(e) => {
            add("data key round-trips", false, e.summary());
            return checks;
        }
    };
    let unwrap_ms = started.elapsed().as_secs_f64() * 1e3;
    let probe = b"byok_pg validate_tenant probe";
    let round_trip = DekCipher::new(PROBE_DEK_ID, tenant_id, &dek).and_then(|cipher| {
        let mut sealed = vec![0u8; envelope::sealed_len(probe.len())];
        cipher.seal_into(probe, b"validate", &mut sealed)?;
        let parsed = Envelope::parse(&sealed)
            .map_err(|_| byok_core::crypto::CryptoError::AuthenticationFailed)?;
        let mut opened = vec![0u8; probe.len()];
        cipher.open_into(&parsed, b"validate", &mut opened)?;
        Ok(opened == probe)
    });
    let (round_trips, outcome) = match round_trip {
        Ok(true) => (true, "a value sealed under it opens".to_string()),
        Ok(false) => (
            false,
            "a value sealed under it opened to something else".to_string(),
        ),
        Err(e) => (false, format!("sealing or opening with it failed: {e}")),
    };
    add(
        "data key round-trips",
        round_trips,
        format!("unwrapped in {unwrap_ms:.1} ms; {outcome}"),
    );
    let budget_ms = crate::gucs::KMS_TIMEOUT_MS.get() as f64;
    add(
        "latency within byok.kms_timeout_ms",
        generate_ms.max(unwrap_ms) < budget_ms,
        format!("generate {generate_ms:.1} ms, unwrap {unwrap_ms:.1} ms, budget {budget_ms:.0} ms"),
    );
    checks
}

/// The guide's `validate_byok.py` as SQL: provider reachable, master key present,
/// enabled and usable for wrapping, a data key generated and round-tripped, and
/// the latencies. Never raises for a failed check; records the result in the audit trail.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
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
    TableIterator::new(crate::catalog::as_extension_owner(|| {
        validate_tenant_as_owner(tenant_id)
    }))
}

fn validate_tenant_as_owner(tenant_id: &str) -> Checks {
    let checks = run_checks(tenant_id);
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, _)| name.as_str())
        .collect();
    let known = checks.first().is_some_and(|(_, ok, _)| *ok);
    catalog::audit(
        "validate_tenant",
        known.then_some(tenant_id),
        None,
        failed.is_empty(),
        (!failed.is_empty())
            .then(|| format!("failed checks: {}", failed.join(", ")))
            .as_deref(),
        None,
    )
    .or_raise();
    checks
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn destroy_tenant_keys(tenant_id: &str, confirm: &str) -> i64 {
    let _audit = crate::audit::Operation::begin("destroy_tenant_keys", Some(tenant_id), None);
    require_dual_control("destroy_tenant_keys", tenant_id, "{}");
    crate::catalog::as_extension_owner(|| destroy_tenant_keys_as_owner(tenant_id, confirm))
}

/// Crypto-shredding (key compromise, tenant off-boarding): every data key of the
/// tenant is erased (its wrapped form deleted), every cache flushed. Afterwards
/// each of the tenant's values fails with "data key destroyed"; other tenants are
/// untouched. `confirm` must repeat the tenant id. Irreversible.
pub(crate) fn destroy_tenant_keys_as_owner(tenant_id: &str, confirm: &str) -> i64 {
    super::require_primary("destroy a tenant's keys");
    if confirm != tenant_id {
        ByokError::InvalidArgument {
            message: "destroy_tenant_keys: confirm must repeat the tenant id".into(),
            hint: Some("SELECT byok.destroy_tenant_keys('TENANT', 'TENANT')".into()),
        }
        .raise();
    }
    let destroyed = Spi::connect_mut(|client| -> Result<i64, ByokError> {
        let exists = client.update(
            "SELECT 1 FROM byok.tenant_config WHERE tenant_id = $1 FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(tenant_id)],
        )?;
        if exists.is_empty() {
            return Err(ByokError::UnknownTenant(tenant_id.to_string()));
        }
        let rows = client.update(
            "UPDATE byok.wrapped_data_keys
                SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = now()
              WHERE tenant_id = $1 AND state <> 'destroyed'",
            None,
            &[DatumWithOid::from(tenant_id)],
        )?;
        Ok(rows.len() as i64)
    })
    .or_raise();
    // The broker's copies go now; every backend's at commit (relcache invalidation).
    broker::flush(Some(tenant_id.to_string())).or_raise();
    catalog::invalidate_everywhere().or_raise();
    keyring::invalidate_all();
    catalog::audit(
        "destroy_tenant_keys",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({"data_keys_destroyed": destroyed})),
    )
    .or_raise();
    destroyed
}

// ---------------------------------------------------------------------------
// Key segregation and dual control.

thread_local! {
    /// Set while `byok.approve_operation` runs an approved request: the one way
    /// past dual control. Only Rust code sets it, so SQL cannot forge it.
    static APPROVED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether destructive operations called now need a dual-control approval.
pub fn dual_control_applies() -> bool {
    // Background workers act on policy configured by administrators (scheduled
    // rotation from key_rotation), not on a person's request.
    let background =
        unsafe { pgrx::pg_sys::MyBackendType } == pgrx::pg_sys::BackendType::B_BG_WORKER;
    crate::gucs::segregation_policy().approval_required && !APPROVED.get() && !background
}

/// Raises 42501 when `operation` needs a second administrator's approval.
pub fn require_dual_control(operation: &'static str, tenant_id: &str, args: &str) {
    if dual_control_applies() {
        ByokError::DualControlRequired {
            operation,
            tenant: tenant_id.to_string(),
            args: args.to_string(),
        }
        .raise();
    }
}

/// A master key's name as segregation sees it: the last `/`-separated segment of
/// its id (an AWS alias or ARN, a GCP resource name, a Vault or Azure key name).
fn key_name(master_key_id: &str) -> &str {
    master_key_id.rsplit('/').next().unwrap_or(master_key_id)
}

/// Refuses a master key that does not carry the environment's key prefix.
pub fn check_key_prefix(master_key_id: &str) -> Result<(), ByokError> {
    let policy = crate::gucs::segregation_policy();
    if policy.key_prefix.is_empty() || key_name(master_key_id).starts_with(&policy.key_prefix) {
        return Ok(());
    }
    Err(ByokError::SegregationViolation {
        master_key_id: master_key_id.to_string(),
        key_prefix: policy.key_prefix,
        environment: policy.environment.name(),
    })
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

/// Runs an approved dual-control request; called only by `byok.approve_operation`
/// (which checks the request, its expiry and the two administrators).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn execute_approved_operation(operation: &str, tenant_id: &str, args: pgrx::JsonB) -> String {
    let event = match operation {
        "rotate_data_key" => "rotate_data_key",
        "rotate_master_key" => "rotate_master_key",
        "destroy_data_key" => "destroy_data_key",
        "destroy_tenant_keys" => "destroy_tenant_keys",
        "grant_tenant" => "grant_tenant",
        _ => "approve_operation",
    };
    let _audit = crate::audit::Operation::begin(event, Some(tenant_id), None);
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            APPROVED.set(false);
        }
    }
    APPROVED.set(true);
    let _reset = Reset;
    let arg = |name: &str| args.0.get(name).cloned().unwrap_or(serde_json::Value::Null);
    let text_arg = |name: &str| match arg(name) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    catalog::as_extension_owner(|| match operation {
        "rotate_data_key" => format!(
            "new active data key {}",
            super::tenants::rotate_data_key_as_owner(tenant_id)
        ),
        "rotate_master_key" => {
            let grace = match text_arg("grace_period") {
                g if g.is_empty() => "24 hours".to_string(),
                g => g,
            };
            let grace = Spi::get_one_with_args::<Interval>(
                "SELECT $1::interval",
                &[DatumWithOid::from(grace.as_str())],
            )
            .or_raise()
            .unwrap_or_else(|| {
                ByokError::InvalidArgument {
                    message: "grace_period must be an interval".into(),
                    hint: None,
                }
                .raise()
            });
            let new_key_id = text_arg("new_key_id");
            let mut rewrapped = 0;
            loop {
                let n =
                    super::rotation::rotate_master_key_step_as_owner(tenant_id, &new_key_id, grace);
                rewrapped += n;
                if n == 0 {
                    break;
                }
            }
            catalog::audit(
                "rotate_master_key",
                Some(tenant_id),
                None,
                true,
                None,
                Some(serde_json::json!({"new_key_id": new_key_id, "rewrapped": rewrapped})),
            )
            .or_raise();
            format!("{rewrapped} data key(s) rewrapped under master key {new_key_id}")
        }
        "destroy_data_key" => {
            let dek_id: i64 = text_arg("dek_id").parse().unwrap_or_else(|_| {
                ByokError::InvalidArgument {
                    message: "dek_id must be a data key id".into(),
                    hint: None,
                }
                .raise()
            });
            // The request named the tenant: the key must still be one of its.
            let owner = Spi::get_one_with_args::<String>(
                "SELECT tenant_id FROM byok.wrapped_data_keys WHERE dek_id = $1",
                &[DatumWithOid::from(dek_id)],
            )
            .or_raise();
            if owner.as_deref() != Some(tenant_id) {
                ByokError::UnknownDataKey(dek_id as u64).raise();
            }
            format!(
                "data key {dek_id} {}",
                super::tenants::destroy_data_key_as_owner(dek_id, dek_id)
            )
        }
        "destroy_tenant_keys" => format!(
            "{} data key(s) destroyed",
            destroy_tenant_keys_as_owner(tenant_id, tenant_id)
        ),
        "grant_tenant" => {
            let role = text_arg("role");
            grant_tenant_as_owner(&role, tenant_id);
            format!("tenant {tenant_id} granted to {role}")
        }
        other => ByokError::InvalidArgument {
            message: format!("unknown operation \"{other}\""),
            hint: None,
        }
        .raise(),
    })
}

// ---------------------------------------------------------------------------
// Per-tenant grants.

/// Lets `role_name` (and the roles that belong to it) encrypt for and decrypt
/// tenant `tenant_id`'s values, and see the tenant in the catalog views.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn grant_tenant(role_name: &str, tenant_id: &str) -> bool {
    let _audit = crate::audit::Operation::begin("grant_tenant", Some(tenant_id), None);
    require_dual_control(
        "grant_tenant",
        tenant_id,
        &serde_json::json!({"role": role_name}).to_string(),
    );
    catalog::as_extension_owner(|| grant_tenant_as_owner(role_name, tenant_id))
}

fn resolve_role(role_name: &str) -> pgrx::pg_sys::Oid {
    Spi::get_one_with_args::<pgrx::pg_sys::Oid>(
        "SELECT pg_catalog.to_regrole($1)::pg_catalog.oid",
        &[DatumWithOid::from(role_name)],
    )
    .or_raise()
    .unwrap_or_else(|| ByokError::UnknownRole(role_name.to_string()).raise())
}

/// Returns false when the grant already existed.
fn grant_tenant_as_owner(role_name: &str, tenant_id: &str) -> bool {
    super::require_primary("grant a tenant");
    let role = resolve_role(role_name);
    let exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM byok.tenant_config WHERE tenant_id = $1)",
        &[DatumWithOid::from(tenant_id)],
    )
    .or_raise()
    .unwrap_or(false);
    if !exists {
        ByokError::UnknownTenant(tenant_id.to_string()).raise();
    }
    change_grant(
        "grant_tenant",
        "WITH changed AS (INSERT INTO byok.tenant_grants (grantee, tenant_id, granted_by)
                          VALUES ($1::pg_catalog.oid::pg_catalog.regrole, $2, session_user)
                          ON CONFLICT DO NOTHING RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM changed)",
        role,
        tenant_id,
    )
}

/// Runs a statement adding or removing one grant (`$1` role, `$2` tenant; true if
/// it changed anything) and records it in the audit trail.
fn change_grant(event: &str, sql: &str, role: pgrx::pg_sys::Oid, tenant_id: &str) -> bool {
    let changed = Spi::get_one_with_args::<bool>(
        sql,
        &[DatumWithOid::from(role), DatumWithOid::from(tenant_id)],
    )
    .or_raise()
    .unwrap_or(false);
    catalog::audit(
        event,
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({"role": catalog::role_name(role), "changed": changed})),
    )
    .or_raise();
    changed
}

/// Takes a tenant grant back; every backend re-checks at the transaction's commit.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn revoke_tenant(role_name: &str, tenant_id: &str) -> bool {
    let _audit = crate::audit::Operation::begin("revoke_tenant", Some(tenant_id), None);
    catalog::as_extension_owner(|| {
        super::require_primary("revoke a tenant");
        let role = resolve_role(role_name);
        change_grant(
            "revoke_tenant",
            "WITH changed AS (DELETE FROM byok.tenant_grants
                               WHERE grantee = $1::pg_catalog.oid::pg_catalog.regrole AND tenant_id = $2
                               RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM changed)",
            role,
            tenant_id,
        )
    })
}
