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
    let tenant = byok_kms::protocol::TenantRef {
        database: broker::this_database(),
        tenant_id: tenant_id.to_string(),
    };
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
fn destroy_tenant_keys(tenant_id: &str, confirm: &str) -> i64 {
    crate::catalog::as_extension_owner(|| destroy_tenant_keys_as_owner(tenant_id, confirm))
}

/// Crypto-shredding (key compromise, tenant off-boarding): every data key of the
/// tenant is erased (its wrapped form deleted), every cache flushed. Afterwards
/// each of the tenant's values fails with "data key destroyed"; other tenants are
/// untouched. `confirm` must repeat the tenant id. Irreversible.
fn destroy_tenant_keys_as_owner(tenant_id: &str, confirm: &str) -> i64 {
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
