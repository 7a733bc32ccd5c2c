//! The guide's validation script (`validate_byok.py`) as SQL: provider
//! reachable, master key present, enabled and usable for wrapping, a probe data
//! key generated and round-tripped, and the latencies. Never raises for a failed
//! check; records the result in the audit trail.

use std::time::Instant;

use byok_core::crypto::{DataKey, DekCipher};
use byok_core::envelope::{self, Envelope};

use crate::broker;
use crate::catalog;
use crate::errors::ByokError;

use byok_kms::protocol::{PROBE_DEK_ID, ProviderRef, TenantRef};

pub type Checks = Vec<(String, bool, String)>;

/// The checks so far. A stage that cannot go on records its failure and
/// returns `None`, which ends the run (later checks depend on it).
#[derive(Default)]
struct Report {
    checks: Checks,
}

impl Report {
    fn add(&mut self, name: &str, ok: bool, detail: String) {
        self.checks.push((name.to_string(), ok, detail));
    }

    fn passed<T>(&mut self, name: &str, result: Result<T, ByokError>) -> Option<T> {
        result
            .inspect_err(|e| self.add(name, false, e.summary_ref()))
            .ok()
    }
}

/// What the checks of one tenant talk to.
struct Target {
    tenant: TenantRef,
    provider: ProviderRef,
    master_key_id: String,
}

fn run_checks(tenant_id: &str) -> Checks {
    let mut report = Report::default();
    if let Some(target) = check_tenant(&mut report, tenant_id)
        && check_master_key(&mut report, &target).is_some()
    {
        check_probe_key(&mut report, tenant_id, target);
    }
    report.checks
}

fn check_tenant(report: &mut Report, tenant_id: &str) -> Option<Target> {
    let found = report.passed("tenant configured", catalog::load_tenant(tenant_id, false))?;
    let Some(config) = found else {
        let missing = format!("tenant \"{tenant_id}\" does not exist");
        report.add("tenant configured", false, missing);
        return None;
    };
    report.add(
        "tenant configured",
        true,
        format!(
            "provider {}, master key {}",
            config.provider.provider.name(),
            config.master_key_id
        ),
    );
    Some(Target {
        tenant: broker::tenant_ref(tenant_id),
        provider: config.provider,
        master_key_id: config.master_key_id,
    })
}

fn check_master_key(report: &mut Report, target: &Target) -> Option<()> {
    let started = Instant::now();
    let validated = broker::validate(
        target.tenant.clone(),
        target.provider.clone(),
        &target.master_key_id,
    );
    let info = report.passed("provider reachable", validated)?;
    report.add(
        "provider reachable",
        true,
        format!(
            "answered in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
    );
    report.add("master key exists", true, info.description.clone());
    report.add(
        "master key enabled",
        info.enabled,
        format!("version {}", info.version),
    );
    let usage = if info.can_wrap {
        "yes".into()
    } else {
        info.description.clone()
    };
    report.add("key usage allows wrap and unwrap", info.can_wrap, usage);
    Some(())
}

/// A probe data key: generated, wrapped, unwrapped, and used once.
fn check_probe_key(report: &mut Report, tenant_id: &str, target: Target) -> Option<()> {
    let started = Instant::now();
    let generated = broker::generate(
        target.tenant.clone(),
        target.provider.clone(),
        PROBE_DEK_ID,
        &target.master_key_id,
    );
    let wrapped = report.passed("data key generates", generated)?;
    let generate_ms = started.elapsed().as_secs_f64() * 1e3;
    report.add("data key generates", true, format!("{generate_ms:.1} ms"));
    let started = Instant::now();
    let cache = catalog::cache_settings(Some(1), Some(1), Some(0), Some(0));
    let unwrapped = broker::unwrap(target.tenant, target.provider, PROBE_DEK_ID, wrapped, cache);
    let (dek, _) = report.passed("data key round-trips", unwrapped)?;
    let unwrap_ms = started.elapsed().as_secs_f64() * 1e3;
    let (round_trips, outcome) = probe_round_trip(tenant_id, &dek);
    report.add(
        "data key round-trips",
        round_trips,
        format!("unwrapped in {unwrap_ms:.1} ms; {outcome}"),
    );
    let budget_ms = crate::gucs::kms_timeout_ms() as f64;
    report.add(
        "latency within byok.kms_timeout_ms",
        generate_ms.max(unwrap_ms) < budget_ms,
        format!("generate {generate_ms:.1} ms, unwrap {unwrap_ms:.1} ms, budget {budget_ms:.0} ms"),
    );
    Some(())
}

/// Seals a probe value under the key and opens it again.
fn probe_round_trip(tenant_id: &str, dek: &DataKey) -> (bool, String) {
    let probe = b"byok_pg validate_tenant probe";
    let round_trip = DekCipher::new(PROBE_DEK_ID, tenant_id, dek).and_then(|cipher| {
        let mut sealed = vec![0u8; envelope::sealed_len(probe.len())];
        cipher.seal_into(probe, b"validate", &mut sealed)?;
        let parsed = Envelope::parse(&sealed)
            .map_err(|_| byok_core::crypto::CryptoError::AuthenticationFailed)?;
        let mut opened = vec![0u8; probe.len()];
        cipher.open_into(&parsed, b"validate", &mut opened)?;
        Ok(opened == probe)
    });
    match round_trip {
        Ok(true) => (true, "a value sealed under it opens".to_string()),
        Ok(false) => (
            false,
            "a value sealed under it opened to something else".to_string(),
        ),
        Err(e) => (false, format!("sealing or opening with it failed: {e}")),
    }
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
