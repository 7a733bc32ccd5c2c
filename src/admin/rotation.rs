//! Master-key rotation: the SQL form of the guide's customer-initiated rotation
//! (`POST /byok/rotation`).
//!
//! `CALL byok.rotate_master_key(tenant_id, new_key_id, grace_period)` points the
//! tenant at the new master key (new data keys are wrapped under it at once),
//! or, given the key it already uses, moves its data keys to that key's newest
//! version (after a rotation inside the key manager, e.g. Vault's `keys/K/rotate`),
//! then rewraps its existing data keys in batches ([`step`]), committing after
//! each, with the provider's native rewrap where it has one (AWS `ReEncrypt`),
//! so plaintext keys stay inside the key manager or the broker. Calling it
//! again after a crash finishes the job; calling it when done changes nothing.
//! The procedure ends with [`finish`], which checks and records completion.
//!
//! The guide's rotation workflow around it: a customer's notice of a pending
//! rotation is [`schedule`]d and run by the job launcher at its time; when the
//! grace period of the replaced key ends, [`retire_previous_master_key`]
//! rewraps any data key still under it and records the key as retired, after
//! which data keys wrapped by it are refused (`catalog::load_data_key`).

use byok_kms::protocol::{ProviderRef, TenantRef};
use byok_kms::{MasterKeyInfo, WrappedDek};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;

use crate::broker;
use crate::catalog::{self, TenantRecord};
use crate::errors::ByokError;
use crate::keyring;
use crate::postgres::spi::Required;

/// Data keys rewrapped per transaction.
pub(super) const BATCH: i64 = 100;

fn checked_key_id(new_key_id: &str) -> Result<&str, ByokError> {
    let new_key_id = new_key_id.trim();
    if new_key_id.is_empty() || new_key_id.chars().any(char::is_control) {
        return Err(ByokError::InvalidArgument {
            message: "new_key_id must be a non-empty key id without control characters".into(),
            hint: None,
        });
    }
    Ok(new_key_id)
}

fn interval(text: &str) -> Result<Interval, ByokError> {
    Spi::get_one_with_args::<Interval>(
        "SELECT $1::pg_catalog.interval",
        &[DatumWithOid::from(text)],
    )?
    .ok_or_else(|| ByokError::InvalidArgument {
        message: "grace_period must be an interval".into(),
        hint: None,
    })
}

/// One step: on first call switches the tenant to `new_key_id`; each call
/// rewraps up to `BATCH` data keys still under another master key (or an
/// older version of it). Returns how many it rewrapped (0: complete).
pub fn step(tenant_id: &str, new_key_id: &str, grace_period: &str) -> Result<i64, ByokError> {
    let new_key_id = checked_key_id(new_key_id)?;
    let grace_period = interval(grace_period)?;
    let tenant = catalog::load_tenant(tenant_id, true)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
    super::dr::refuse_while_active(tenant_id, &tenant, "a master-key rotation")?;
    if tenant.master_key_id != new_key_id {
        super::policy::check_key_prefix(new_key_id)?;
    }
    let tenant_ref = broker::tenant_ref(tenant_id);
    // The new key must exist, be enabled and allow wrapping before anything moves;
    // its current version is what every data key should end up wrapped under.
    let info = broker::validate(tenant_ref.clone(), tenant.provider.clone(), new_key_id)?;
    if tenant.master_key_id != new_key_id {
        switch_master_key(tenant_id, &tenant, new_key_id, grace_period, &info)?;
    }
    let rewrapped = rewrap_batch(
        tenant_id,
        &tenant_ref,
        &tenant.provider,
        new_key_id,
        &info.version,
    )?;
    keyring::invalidate_all();
    Ok(rewrapped)
}

/// The first step of a rotation: the tenant's master key becomes `new_key_id`
/// and the previous one is kept for the grace period.
fn switch_master_key(
    tenant_id: &str,
    tenant: &TenantRecord,
    new_key_id: &str,
    grace_period: Interval,
    info: &MasterKeyInfo,
) -> Result<(), ByokError> {
    if !info.enabled || !info.can_wrap {
        return Err(ByokError::Provider(byok_kms::ProviderError::new(
            tenant.provider.provider,
            byok_kms::ErrorKind::KeyDisabled,
            format!("master key \"{new_key_id}\" is not enabled for wrapping keys"),
        )));
    }
    // Rotating back to a key retired earlier makes it usable again.
    Spi::run_with_args(
        "DELETE FROM byok.retired_master_keys WHERE tenant_id = $1 AND master_key_id = $2",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(new_key_id),
        ],
    )?;
    Spi::run_with_args(
        "UPDATE byok.tenant_config
            SET previous_master_key_id = master_key_id,
                previous_master_key_retires_at = now() + $3,
                master_key_id = $2,
                provider_options = jsonb_set(provider_options, ARRAY[$4], to_jsonb($2)),
                updated_at = now()
          WHERE tenant_id = $1",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(new_key_id),
            DatumWithOid::from(grace_period),
            DatumWithOid::from(tenant.provider.provider.master_key_field()),
        ],
    )?;
    // The rotation's start; its end is recorded when every key is rewrapped.
    catalog::audit(
        "rotate_master_key_start",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "previous_key_id": tenant.master_key_id,
            "new_key_id": new_key_id,
        })),
    )?;
    Ok(())
}

/// Rewraps up to BATCH of the tenant's live data keys not yet under
/// `new_key_id` at `version`; returns how many.
fn rewrap_batch(
    tenant_id: &str,
    tenant: &TenantRef,
    provider: &ProviderRef,
    new_key_id: &str,
    version: &str,
) -> Result<i64, ByokError> {
    Spi::connect_mut(|client| -> Result<i64, ByokError> {
        let batch = client.update(
            "SELECT dek_id, wrapped_dek, cmk_id, cmk_version FROM byok.wrapped_data_keys
              WHERE tenant_id = $1 AND (cmk_id <> $2 OR cmk_version <> $3) AND state <> 'destroyed'
                AND wrapped_dek IS NOT NULL
              ORDER BY dek_id LIMIT $4 FOR UPDATE",
            None,
            &[
                DatumWithOid::from(tenant_id),
                DatumWithOid::from(new_key_id),
                DatumWithOid::from(version),
                DatumWithOid::from(BATCH),
            ],
        )?;
        let mut keys = Vec::new();
        for row in batch {
            let dek_id = row
                .get::<i64>(1)?
                .ok_or_else(|| ByokError::Catalog("a data key without an id".into()))?;
            keys.push((
                dek_id,
                WrappedDek {
                    blob: row.get::<Vec<u8>>(2)?.ok_or_else(|| {
                        ByokError::Catalog(format!("data key {dek_id} has no wrapped form"))
                    })?,
                    cmk_id: row.required::<String>(3)?,
                    cmk_version: row.required::<String>(4)?,
                },
            ));
        }
        for (dek_id, wrapped) in &keys {
            let rewrapped = broker::rewrap(
                tenant.clone(),
                provider.clone(),
                *dek_id as u64,
                wrapped.clone(),
                new_key_id,
            )?;
            client.update(
                "UPDATE byok.wrapped_data_keys SET wrapped_dek = $2, cmk_id = $3, cmk_version = $4 WHERE dek_id = $1",
                None,
                &[
                    DatumWithOid::from(*dek_id),
                    DatumWithOid::from(rewrapped.blob),
                    DatumWithOid::from(rewrapped.cmk_id.as_str()),
                    DatumWithOid::from(rewrapped.cmk_version.as_str()),
                ],
            )?;
        }
        Ok(keys.len() as i64)
    })
}

/// The end of a rotation: the tenant is on `new_key_id` and no live data key
/// is wrapped by another master key. Records the rotation's end (the
/// procedure commits between steps, so it cannot count them itself).
pub fn finish(tenant_id: &str, new_key_id: &str) -> Result<String, ByokError> {
    let new_key_id = checked_key_id(new_key_id)?;
    let (current, left, under_new): (Option<String>, i64, i64) = Spi::connect(|client| {
        let row = client.select(
            "SELECT t.master_key_id,
                    (SELECT count(*) FROM byok.wrapped_data_keys k
                      WHERE k.tenant_id = t.tenant_id AND k.state <> 'destroyed' AND k.cmk_id <> $2),
                    (SELECT count(*) FROM byok.wrapped_data_keys k
                      WHERE k.tenant_id = t.tenant_id AND k.state <> 'destroyed' AND k.cmk_id = $2)
               FROM byok.tenant_config t WHERE t.tenant_id = $1",
            Some(1),
            &[DatumWithOid::from(tenant_id), DatumWithOid::from(new_key_id)],
        )?;
        if row.is_empty() {
            return Ok::<_, ByokError>((None, 0, 0));
        }
        let row = row.first();
        Ok((
            row.get::<String>(1)?,
            row.required::<i64>(2)?,
            row.required::<i64>(3)?,
        ))
    })?;
    let current = current.ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
    if current != new_key_id || left > 0 {
        return Err(ByokError::InvalidArgument {
            message: format!(
                "the rotation of tenant \"{tenant_id}\" to master key \"{new_key_id}\" is not complete ({left} data key(s) under another key)"
            ),
            hint: Some(format!(
                "CALL byok.rotate_master_key('{tenant_id}', '{new_key_id}') finishes it"
            )),
        });
    }
    catalog::audit(
        "rotate_master_key",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({"new_key_id": new_key_id, "data_keys": under_new})),
    )?;
    Ok(format!(
        "{under_new} data key(s) under master key {new_key_id}"
    ))
}

/// The whole rotation in one transaction (an approved request).
pub fn rotate_master_key(
    tenant_id: &str,
    new_key_id: &str,
    grace_period: &str,
) -> Result<String, ByokError> {
    let mut rewrapped = 0;
    loop {
        let n = step(tenant_id, new_key_id, grace_period)?;
        rewrapped += n;
        if n == 0 {
            break;
        }
    }
    finish(tenant_id, new_key_id)?;
    Ok(format!(
        "{rewrapped} data key(s) rewrapped under master key {}",
        new_key_id.trim()
    ))
}

/// Longest grace period a scheduled rotation may ask for (a year).
const MAX_GRACE_HOURS: f64 = 8_760.0;

/// Records the customer's notice of a pending rotation; returns its id. The
/// tenant, the key's name (segregation policy) and the time are checked now;
/// the key itself when the rotation runs (the customer may create it later).
pub fn schedule(
    tenant_id: &str,
    new_key_id: &str,
    rotation_time: &str,
    grace_period_hours: f64,
    approved: bool,
) -> Result<i64, ByokError> {
    let new_key_id = checked_key_id(new_key_id)?;
    if !grace_period_hours.is_finite() || !(0.0..=MAX_GRACE_HOURS).contains(&grace_period_hours) {
        return Err(ByokError::InvalidArgument {
            message: format!("grace_period_hours must be between 0 and {MAX_GRACE_HOURS}"),
            hint: None,
        });
    }
    let tenant = catalog::load_tenant(tenant_id, true)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
    if tenant.master_key_id != new_key_id {
        super::policy::check_key_prefix(new_key_id)?;
    }
    let rotation_time = Spi::get_one_with_args::<pgrx::datum::TimestampWithTimeZone>(
        "SELECT $1::pg_catalog.timestamptz",
        &[DatumWithOid::from(rotation_time)],
    )?
    .ok_or_else(|| ByokError::InvalidArgument {
        message: "rotation_time must be a timestamp".into(),
        hint: Some("ISO 8601 with a time zone, e.g. 2027-01-15T02:00:00Z".into()),
    })?;
    let role = crate::postgres::session::role_name(crate::postgres::session::acting_role());
    let rotation_id = Spi::get_one_with_args::<i64>(
        "INSERT INTO byok.scheduled_rotations
                (tenant_id, new_key_id, rotation_time, grace_period, scheduled_by, approved)
         VALUES ($1, $2, $3, pg_catalog.make_interval(secs => $4), $5, $6)
         RETURNING rotation_id",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(new_key_id),
            DatumWithOid::from(rotation_time),
            DatumWithOid::from(grace_period_hours * 3600.0),
            DatumWithOid::from(role.as_str()),
            DatumWithOid::from(approved),
        ],
    )?
    .ok_or_else(|| ByokError::Catalog("the scheduled rotation was not recorded".into()))?;
    catalog::audit(
        "schedule_master_key_rotation",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "rotation_id": rotation_id,
            "new_key_id": new_key_id,
            "rotation_time": rotation_time.to_string(),
            "grace_period_hours": grace_period_hours,
        })),
    )?;
    Ok(rotation_id)
}

/// Cancels a scheduled rotation of `tenant_id` that has not started.
pub fn cancel_scheduled(tenant_id: &str, rotation_id: i64) -> Result<String, ByokError> {
    let state = Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT state FROM byok.scheduled_rotations
              WHERE rotation_id OPERATOR(pg_catalog.=) $1 AND tenant_id OPERATOR(pg_catalog.=) $2
                FOR UPDATE",
            Some(1),
            &[
                DatumWithOid::from(rotation_id),
                DatumWithOid::from(tenant_id),
            ],
        )?;
        match rows.is_empty() {
            true => Ok::<_, ByokError>(None),
            false => Ok(rows.first().get::<String>(1)?),
        }
    })?;
    match state.as_deref() {
        Some("scheduled") => {}
        Some(other) => {
            return Err(ByokError::InvalidArgument {
                message: format!(
                    "scheduled rotation {rotation_id} of tenant \"{tenant_id}\" is {other}; only a rotation that has not started can be cancelled"
                ),
                hint: None,
            });
        }
        None => {
            return Err(ByokError::InvalidArgument {
                message: format!("tenant \"{tenant_id}\" has no scheduled rotation {rotation_id}"),
                hint: Some("SELECT * FROM byok.scheduled_rotations".into()),
            });
        }
    }
    Spi::run_with_args(
        "UPDATE byok.scheduled_rotations SET state = 'cancelled', finished_at = now() WHERE rotation_id = $1",
        &[DatumWithOid::from(rotation_id)],
    )?;
    catalog::audit(
        "cancel_scheduled_rotation",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({"rotation_id": rotation_id})),
    )?;
    Ok(format!("scheduled rotation {rotation_id} cancelled"))
}

/// Ends the grace period of the master key the tenant's last rotation
/// replaced: every live data key still wrapped by another key (or an older
/// version of the current one) is rewrapped under the current key, the
/// previous key is recorded as retired (data keys wrapped by it are refused
/// from then on), and the end is audited.
pub fn retire_previous_master_key(tenant_id: &str) -> Result<String, ByokError> {
    let tenant = catalog::load_tenant(tenant_id, true)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
    let previous = catalog::read_one::<String>(
        "SELECT previous_master_key_id FROM byok.tenant_config WHERE tenant_id OPERATOR(pg_catalog.=) $1",
        &[DatumWithOid::from(tenant_id)],
    )?;
    let Some(previous) = previous else {
        return Ok(format!(
            "tenant \"{tenant_id}\" has no previous master key in a grace period"
        ));
    };
    let current = tenant.master_key_id.clone();
    let mut stragglers = 0;
    loop {
        let n = step(tenant_id, &current, "0")?;
        stragglers += n;
        if n == 0 {
            break;
        }
    }
    let still_under = catalog::read_one::<i64>(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
            AND cmk_id OPERATOR(pg_catalog.=) $2",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(previous.as_str()),
        ],
    )?
    .unwrap_or(0);
    if still_under > 0 && previous != current {
        return Err(ByokError::Internal(format!(
            "{still_under} data key(s) of tenant \"{tenant_id}\" are still wrapped by master key \"{previous}\""
        )));
    }
    if previous != current {
        Spi::run_with_args(
            "INSERT INTO byok.retired_master_keys (tenant_id, master_key_id, data_keys_rewrapped)
             VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id, master_key_id) DO UPDATE
                SET retired_at = now(), data_keys_rewrapped = excluded.data_keys_rewrapped",
            &[
                DatumWithOid::from(tenant_id),
                DatumWithOid::from(previous.as_str()),
                DatumWithOid::from(stragglers),
            ],
        )?;
    }
    Spi::run_with_args(
        "UPDATE byok.tenant_config
            SET previous_master_key_id = NULL, previous_master_key_retires_at = NULL, updated_at = now()
          WHERE tenant_id = $1",
        &[DatumWithOid::from(tenant_id)],
    )?;
    catalog::audit(
        "master_key_retired",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "retired_key_id": previous,
            "current_key_id": current,
            "data_keys_rewrapped": stragglers,
        })),
    )?;
    keyring::invalidate_all();
    Ok(format!(
        "master key {previous} retired; {stragglers} data key(s) still under it rewrapped under {current}"
    ))
}
