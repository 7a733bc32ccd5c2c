//! The guide's validation script (`validate_byok.py`) as SQL: provider
//! reachable, master key present, enabled and usable for wrapping, a probe data
//! key generated and round-tripped, and the latencies. Never raises for a failed
//! check; records the result in the audit trail.

use std::time::Instant;

use byok_core::crypto::DekCipher;
use byok_core::envelope::{self, Envelope};

use crate::broker;
use crate::catalog;
use crate::errors::ByokError;

use byok_kms::protocol::PROBE_DEK_ID;

pub type Checks = Vec<(String, bool, String)>;

fn run_checks(tenant_id: &str) -> Checks {
    let mut checks: Checks = Vec::new();
    let mut add =
        |name: &str, ok: bool, detail: String| checks.push((name.to_string(), ok, detail));
    let (kind, provider, master_key_id) = match catalog::load_tenant(tenant_id, false) {
        Ok(Some(t)) => (t.provider.provider, t.provider, t.master_key_id),
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
    let budget_ms = crate::gucs::kms_timeout_ms() as f64;
    add(
        "latency within byok.kms_timeout_ms",
        generate_ms.max(unwrap_ms) < budget_ms,
        format!("generate {generate_ms:.1} ms, unwrap {unwrap_ms:.1} ms, budget {budget_ms:.0} ms"),
    );
    checks
}

/// Runs the checks and records the outcome.
pub fn validate_tenant(tenant_id: &str) -> Result<Checks, ByokError> {
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
        // The probe key never reaches the catalog: no data key id, say so instead.
        Some(serde_json::json!({"probe_data_key": "generated, unwrapped and discarded"})),
    )?;
    Ok(checks)
}
