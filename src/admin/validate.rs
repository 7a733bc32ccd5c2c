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

/// What the checks of one tenant talk to: its master key, or its backup
/// master key (`label` then prefixes every check's name).
struct Target {
    tenant: TenantRef,
    provider: ProviderRef,
    master_key_id: String,
    label: &'static str,
}

impl Target {
    fn name(&self, check: &str) -> String {
        format!("{}{check}", self.label)
    }
}

fn run_checks(tenant_id: &str) -> Checks {
    let mut report = Report::default();
    let Some((target, record)) = check_tenant(&mut report, tenant_id) else {
        return report.checks;
    };
    if check_master_key(&mut report, &target).is_some() {
        check_probe_key(&mut report, tenant_id, target);
    }
    if let Some(backup) = &record.backup {
        check_backup(&mut report, tenant_id, &record, backup);
    }
    report.checks
}

/// The backup master key: the same checks as the primary's, whether every
/// live data key has its backup wrap, and DR's state.
fn check_backup(
    report: &mut Report,
    tenant_id: &str,
    record: &catalog::TenantRecord,
    backup: &catalog::BackupKeyRecord,
) {
    let target = Target {
        tenant: broker::tenant_ref(tenant_id),
        provider: backup.provider.clone(),
        master_key_id: backup.master_key_id.clone(),
        label: "backup: ",
    };
    if check_master_key(report, &target).is_some() {
        check_probe_key(report, tenant_id, target);
    }
    if let Some(missing) = report.passed(
        "backup: every data key has a backup wrap",
        super::dr::keys_without_backup_wrap(tenant_id, backup),
    ) {
        report.add(
            "backup: every data key has a backup wrap",
            missing == 0,
            match missing {
                0 => "yes".to_string(),
                n => format!(
                    "{n} data key(s) without one: CALL byok.complete_key_wraps('{tenant_id}')"
                ),
            },
        );
    }
    report.add(
        "DR",
        true,
        match record.dr_active {
            true => "active: the backup master key makes and opens data keys".into(),
            false => "not active: the backup is asked only while the primary is unreachable".into(),
        },
    );
}

fn check_tenant(report: &mut Report, tenant_id: &str) -> Option<(Target, catalog::TenantRecord)> {
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
    Some((
        Target {
            tenant: broker::tenant_ref(tenant_id),
            provider: config.provider.clone(),
            master_key_id: config.master_key_id.clone(),
            label: "",
        },
        config,
    ))
}

fn check_master_key(report: &mut Report, target: &Target) -> Option<()> {
    let started = Instant::now();
    let validated = broker::validate(
        target.tenant.clone(),
        target.provider.clone(),
        &target.master_key_id,
    );
    let info = report.passed(&target.name("provider reachable"), validated)?;
    report.add(
        &target.name("provider reachable"),
        true,
        format!(
            "answered in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
    );
    report.add(
        &target.name("master key exists"),
        true,
        info.description.clone(),
    );
    report.add(
        &target.name("master key enabled"),
        info.enabled,
        format!("version {}", info.version),
    );
    let usage = if info.can_wrap {
        "yes".into()
    } else {
        info.description.clone()
    };
    report.add(
        &target.name("key usage allows wrap and unwrap"),
        info.can_wrap,
        usage,
    );
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
        None,
    )
    .map(|(wrapped, _)| wrapped);
    let wrapped = report.passed(&target.name("data key generates"), generated)?;
    let generate_ms = started.elapsed().as_secs_f64() * 1e3;
    report.add(
        &target.name("data key generates"),
        true,
        format!("{generate_ms:.1} ms"),
    );
    let started = Instant::now();
    let cache = catalog::cache_settings(Some(1), Some(1), Some(0), Some(0));
    let name = target.name("data key round-trips");
    let unwrapped = broker::unwrap(
        target.tenant.clone(),
        target.provider.clone(),
        PROBE_DEK_ID,
        wrapped,
        cache,
        None,
    );
    let (dek, _) = report.passed(&name, unwrapped)?;
    let unwrap_ms = started.elapsed().as_secs_f64() * 1e3;
    let (round_trips, outcome) = probe_round_trip(tenant_id, &dek);
    report.add(
        &name,
        round_trips,
        format!("unwrapped in {unwrap_ms:.1} ms; {outcome}"),
    );
    let budget_ms = crate::gucs::kms_timeout_ms() as f64;
    report.add(
        &target.name("latency within byok.kms_timeout_ms"),
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
