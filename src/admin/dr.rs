//! Disaster recovery: a tenant's backup master key (`encryption.backup`),
//! the second wrap of its data keys, and DR activation.
//!
//! - Every data key made while a backup is configured is wrapped under both
//!   keys by the broker (both, or the key is not made).
//! - `byok.complete_key_wraps` adds what is missing: the backup wrap of keys
//!   made before the backup was configured (or under a backup since
//!   replaced), and the primary wrap of keys made while DR was active.
//! - The broker asks the backup only when the primary cannot be reached;
//!   a refusal is final (`byok_kms::service`).
//! - `byok.activate_dr` makes the backup the only key manager asked, for new
//!   keys and unwraps alike; `byok.deactivate_dr` returns to the primary once
//!   it answers again.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use byok_kms::WrappedDek;

use crate::broker::{self, tenant_ref};
use crate::catalog::{self, BackupKeyRecord, TenantRecord};
use crate::errors::ByokError;
use crate::keyring;
use crate::postgres::spi::Required;

use super::rotation::BATCH;

/// Refuses `what` while DR is active, or while some data key has no primary
/// wrap yet (it would be left out).
pub fn refuse_while_active(
    tenant_id: &str,
    tenant: &TenantRecord,
    what: &str,
) -> Result<(), ByokError> {
    if tenant.dr_active {
        return Err(ByokError::WrongState {
            message: format!("tenant \"{tenant_id}\" runs on its backup master key (DR is active)"),
            detail: Some(format!("{what} needs the primary key manager")),
            hint: Some(format!(
                "once the primary answers again: SELECT byok.deactivate_dr('{tenant_id}')"
            )),
        });
    }
    let unwrapped = keys_without_primary_wrap(tenant_id)?;
    if unwrapped > 0 {
        return Err(ByokError::WrongState {
            message: format!(
                "{unwrapped} data key(s) of tenant \"{tenant_id}\" made while DR was active are not wrapped by the primary master key yet"
            ),
            detail: Some(format!("{what} would leave them out")),
            hint: Some(format!("CALL byok.complete_key_wraps('{tenant_id}') first")),
        });
    }
    Ok(())
}

fn count(sql: &str, tenant_id: &str) -> Result<i64, ByokError> {
    Ok(catalog::read_one::<i64>(sql, &[DatumWithOid::from(tenant_id)])?.unwrap_or(0))
}

fn keys_without_primary_wrap(tenant_id: &str) -> Result<i64, ByokError> {
    count(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
            AND wrapped_dek IS NULL",
        tenant_id,
    )
}

/// Live data keys without a backup wrap under the tenant's current backup.
pub fn keys_without_backup_wrap(
    tenant_id: &str,
    backup: &BackupKeyRecord,
) -> Result<i64, ByokError> {
    Ok(catalog::read_one::<i64>(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
            AND (backup_wrapped_dek IS NULL
                 OR backup_provider IS DISTINCT FROM $2 OR backup_cmk_id IS DISTINCT FROM $3)
            AND NOT EXISTS (SELECT 1 FROM byok.retired_master_keys r
                             WHERE r.tenant_id OPERATOR(pg_catalog.=) byok.wrapped_data_keys.tenant_id
                               AND r.master_key_id OPERATOR(pg_catalog.=) byok.wrapped_data_keys.cmk_id)",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(backup.provider.provider.name()),
            DatumWithOid::from(backup.master_key_id.as_str()),
        ],
    )?
    .unwrap_or(0))
}

/// Refuses a change of the tenant's backup while some live data key is
/// wrapped by the backup alone (made during DR): it would be lost with it.
pub fn refuse_backup_change(tenant_id: &str) -> Result<(), ByokError> {
    let backup_only = keys_without_primary_wrap(tenant_id)?;
    if backup_only > 0 {
        return Err(ByokError::WrongState {
            message: format!(
                "{backup_only} data key(s) of tenant \"{tenant_id}\" are wrapped by its backup master key alone; its encryption.backup cannot change"
            ),
            detail: Some("they were made while DR was active".into()),
            hint: Some(format!(
                "wrap them under the primary first: SELECT byok.deactivate_dr('{tenant_id}'), or CALL byok.complete_key_wraps('{tenant_id}')"
            )),
        });
    }
    Ok(())
}

fn keys_wrapped_by_both(tenant_id: &str, backup: &BackupKeyRecord) -> Result<i64, ByokError> {
    Ok(catalog::read_one::<i64>(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'
            AND wrapped_dek IS NOT NULL AND backup_wrapped_dek IS NOT NULL
            AND backup_provider OPERATOR(pg_catalog.=) $2 AND backup_cmk_id OPERATOR(pg_catalog.=) $3",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(backup.provider.provider.name()),
            DatumWithOid::from(backup.master_key_id.as_str()),
        ],
    )?
    .unwrap_or(0))
}

fn load(tenant_id: &str) -> Result<TenantRecord, ByokError> {
    catalog::load_tenant(tenant_id, true)?
        .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))
}

fn no_backup(tenant_id: &str) -> ByokError {
    ByokError::WrongState {
        message: format!("tenant \"{tenant_id}\" has no backup master key"),
        detail: Some("DR needs encryption.backup in the tenant's configuration".into()),
        hint: Some(
            "add an encryption.backup section with byok.configure_tenant(), then CALL byok.complete_key_wraps(tenant_id)"
                .into(),
        ),
    }
}

/// A data key's row, as one step of `complete_key_wraps` reads it.
struct KeyRow {
    dek_id: i64,
    wrapped: WrappedDek,
}

fn key_rows(sql: &str, args: &[DatumWithOid]) -> Result<Vec<KeyRow>, ByokError> {
    Spi::connect_mut(|client| {
        let rows = client.update(sql, None, args)?;
        let mut keys = Vec::new();
        for row in rows {
            let dek_id = row.required::<i64>(1)?;
            keys.push(KeyRow {
                dek_id,
                wrapped: WrappedDek {
                    blob: row.get::<Vec<u8>>(2)?.ok_or_else(|| {
                        ByokError::Catalog(format!("data key {dek_id} has no wrapped form"))
                    })?,
                    cmk_id: row.required::<String>(3)?,
                    cmk_version: row.required::<String>(4)?,
                },
            });
        }
        Ok(keys)
    })
}

/// Wraps up to `limit` data keys made during DR (wrapped by the backup
/// alone) under the tenant's primary master key; returns how many.
fn add_primary_wraps(
    tenant_id: &str,
    tenant: &TenantRecord,
    backup: &BackupKeyRecord,
    limit: i64,
) -> Result<i64, ByokError> {
    let rows = key_rows(
        "SELECT dek_id, backup_wrapped_dek, backup_cmk_id, backup_cmk_version
           FROM byok.wrapped_data_keys
          WHERE tenant_id = $1 AND state <> 'destroyed' AND wrapped_dek IS NULL
            AND backup_wrapped_dek IS NOT NULL AND backup_provider = $2
          ORDER BY dek_id LIMIT $3 FOR UPDATE",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(backup.provider.provider.name()),
            DatumWithOid::from(limit),
        ],
    )?;
    for row in &rows {
        let wrapped = broker::copy_wrap(
            tenant_ref(tenant_id),
            row.dek_id as u64,
            backup.provider.clone(),
            row.wrapped.clone(),
            tenant.provider.clone(),
            &tenant.master_key_id,
        )?;
        Spi::run_with_args(
            "UPDATE byok.wrapped_data_keys SET wrapped_dek = $2, cmk_id = $3, cmk_version = $4
              WHERE dek_id = $1",
            &[
                DatumWithOid::from(row.dek_id),
                DatumWithOid::from(wrapped.blob),
                DatumWithOid::from(wrapped.cmk_id.as_str()),
                DatumWithOid::from(wrapped.cmk_version.as_str()),
            ],
        )?;
    }
    Ok(rows.len() as i64)
}

/// One step of `CALL byok.complete_key_wraps`: up to `BATCH` data keys get
/// the wrap they lack (see the module docs); with no backup configured,
/// backup wraps of keys the primary wraps are dropped (the customer withdrew
/// the escrow). Returns how many keys it changed (0: complete).
pub fn complete_key_wraps_step(tenant_id: &str) -> Result<i64, ByokError> {
    let tenant = load(tenant_id)?;
    let tenant_ref = tenant_ref(tenant_id);
    let Some(backup) = &tenant.backup else {
        let dropped = Spi::connect_mut(|client| {
            Ok::<_, ByokError>(
                client
                    .update(
                        "UPDATE byok.wrapped_data_keys
                    SET backup_wrapped_dek = NULL, backup_provider = NULL,
                        backup_cmk_id = NULL, backup_cmk_version = NULL
                  WHERE tenant_id = $1 AND wrapped_dek IS NOT NULL AND backup_provider IS NOT NULL",
                        None,
                        &[DatumWithOid::from(tenant_id)],
                    )?
                    .len() as i64,
            )
        })?;
        keyring::invalidate_all();
        return Ok(dropped);
    };
    let mut changed = 0;
    if !tenant.dr_active {
        // Keys made during DR: the primary wraps them now.
        changed += add_primary_wraps(tenant_id, &tenant, backup, BATCH)?;
        // Keys without a backup wrap under the current backup key.
        let rows = key_rows(
            "SELECT dek_id, wrapped_dek, cmk_id, cmk_version FROM byok.wrapped_data_keys
              WHERE tenant_id = $1 AND state <> 'destroyed' AND wrapped_dek IS NOT NULL
                AND (backup_wrapped_dek IS NULL
                     OR backup_provider IS DISTINCT FROM $2 OR backup_cmk_id IS DISTINCT FROM $3)
                -- (a key under a retired master key is refused: no escrow copy of it)
                AND NOT EXISTS (SELECT 1 FROM byok.retired_master_keys r
                                 WHERE r.tenant_id = byok.wrapped_data_keys.tenant_id
                                   AND r.master_key_id = byok.wrapped_data_keys.cmk_id)
              ORDER BY dek_id LIMIT $4 FOR UPDATE",
            &[
                DatumWithOid::from(tenant_id),
                DatumWithOid::from(backup.provider.provider.name()),
                DatumWithOid::from(backup.master_key_id.as_str()),
                DatumWithOid::from(BATCH),
            ],
        )?;
        for row in &rows {
            let wrapped = broker::copy_wrap(
                tenant_ref.clone(),
                row.dek_id as u64,
                tenant.provider.clone(),
                row.wrapped.clone(),
                backup.provider.clone(),
                &backup.master_key_id,
            )?;
            Spi::run_with_args(
                "UPDATE byok.wrapped_data_keys
                    SET backup_wrapped_dek = $2, backup_provider = $3, backup_cmk_id = $4,
                        backup_cmk_version = $5
                  WHERE dek_id = $1",
                &[
                    DatumWithOid::from(row.dek_id),
                    DatumWithOid::from(wrapped.blob),
                    DatumWithOid::from(backup.provider.provider.name()),
                    DatumWithOid::from(wrapped.cmk_id.as_str()),
                    DatumWithOid::from(wrapped.cmk_version.as_str()),
                ],
            )?;
        }
        changed += rows.len() as i64;
    }
    if changed > 0 {
        keyring::invalidate_all();
    }
    Ok(changed)
}

/// The end of `CALL byok.complete_key_wraps`: what is wrapped how, audited.
pub fn complete_key_wraps_finish(tenant_id: &str) -> Result<String, ByokError> {
    let tenant = load(tenant_id)?;
    let without_primary = keys_without_primary_wrap(tenant_id)?;
    let without_backup = match &tenant.backup {
        Some(backup) => keys_without_backup_wrap(tenant_id, backup)?,
        None => 0,
    };
    let live = count(
        "SELECT count(*) FROM byok.wrapped_data_keys
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed'",
        tenant_id,
    )?;
    let complete = without_backup == 0 && (tenant.dr_active || without_primary == 0);
    catalog::audit(
        "complete_key_wraps",
        Some(tenant_id),
        None,
        complete,
        (!complete)
            .then_some("some data keys still lack a wrap (DR is active: the primary is not asked)"),
        Some(serde_json::json!({
            "data_keys": live,
            "without_primary_wrap": without_primary,
            "without_backup_wrap": without_backup,
            "backup_provider": tenant.backup.as_ref().map(|b| b.provider.provider.name()),
            "backup_master_key_id": tenant.backup.as_ref().map(|b| b.master_key_id.clone()),
        })),
    )?;
    Ok(match &tenant.backup {
        Some(backup) => format!(
            "{} of {live} data key(s) wrapped by both master keys ({} {}, backup {} {})",
            keys_wrapped_by_both(tenant_id, backup)?,
            tenant.provider.provider.name(),
            tenant.master_key_id,
            backup.provider.provider.name(),
            backup.master_key_id
        ),
        None => format!("{live} data key(s); tenant \"{tenant_id}\" has no backup master key"),
    })
}

/// Switches the tenant to its backup master key for new keys and unwraps.
pub fn activate(tenant_id: &str) -> Result<String, ByokError> {
    let tenant = load(tenant_id)?;
    let backup = tenant.backup.as_ref().ok_or_else(|| no_backup(tenant_id))?;
    if tenant.dr_active {
        return Ok(format!("DR is already active for tenant \"{tenant_id}\""));
    }
    refuse_if_primary_refuses(tenant_id, &tenant)?;
    // The backup must be able to take over before anything switches.
    super::keys::check_master_key(
        tenant_id,
        backup.provider.provider,
        &backup.provider,
        &backup.master_key_id,
    )?;
    let without_backup = keys_without_backup_wrap(tenant_id, backup)?;
    Spi::run_with_args(
        "UPDATE byok.tenant_config SET dr_active = true, dr_activated_at = now(), updated_at = now()
          WHERE tenant_id = $1",
        &[DatumWithOid::from(tenant_id)],
    )?;
    catalog::invalidate_everywhere()?;
    keyring::invalidate_all();
    catalog::audit(
        "activate_dr",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "backup_provider": backup.provider.provider.name(),
            "backup_master_key_id": backup.master_key_id,
            "data_keys_without_backup_wrap": without_backup,
        })),
    )?;
    let mut message = format!(
        "DR active for tenant \"{tenant_id}\": backup master key {} ({}) now makes and opens its data keys",
        backup.master_key_id,
        backup.provider.provider.name()
    );
    if without_backup > 0 {
        message.push_str(&format!(
            "; {without_backup} data key(s) have no backup wrap and cannot be read until the primary returns"
        ));
    }
    Ok(message)
}

/// DR is for a primary that is lost, not one that says no: a customer who
/// disabled its key (or withdrew access), as the key manager answers now or
/// as the broker's last revocation check found, is not routed around.
fn refuse_if_primary_refuses(tenant_id: &str, tenant: &TenantRecord) -> Result<(), ByokError> {
    let refusal = |reason: String| {
        ByokError::WrongState {
        message: format!(
            "the primary master key of tenant \"{tenant_id}\" is refused by its key manager; DR is not a way around a revocation"
        ),
        detail: Some(reason),
        hint: Some("DR takes over from a key manager that cannot be reached; ask the customer about the key".into()),
    }
    };
    let checked = catalog::read_one::<String>(
        "SELECT status FROM byok.key_status()
          WHERE tenant_id OPERATOR(pg_catalog.=) $1 AND provider OPERATOR(pg_catalog.=) $2",
        &[
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(tenant.provider.provider.name()),
        ],
    )?;
    if checked.as_deref() == Some("revoked") {
        return Err(refusal(
            "the key broker's last revocation check found it revoked".into(),
        ));
    }
    // Describing the key says whether it is enabled; only a real unwrap of one
    // of the tenant's keys says whether we may still use it.
    let answer = broker::validate(
        tenant_ref(tenant_id),
        tenant.provider.clone(),
        &tenant.master_key_id,
    )
    .and_then(|info| match info.enabled {
        false => Err(refusal(info.description)),
        true => unwrap_one_key(tenant_id, tenant),
    });
    match answer {
        // Reachable and usable (a planned switch), or unreachable (the loss DR is for).
        Ok(()) => Ok(()),
        Err(ByokError::Provider(e)) if e.kind.is_unreachable() => Ok(()),
        // (a key manager that hangs: the broker's call outlasts the wait for it)
        Err(ByokError::BrokerTimeout {
            broker_up: true, ..
        }) => Ok(()),
        Err(ByokError::Provider(e)) if e.kind.is_refusal() => Err(refusal(e.message)),
        Err(ByokError::WrongState { .. }) => answer,
        // Throttled, misconfigured, the broker down: not known to be lost.
        Err(other) => Err(ByokError::WrongState {
            message: format!(
                "the primary key manager of tenant \"{tenant_id}\" neither answered nor was unreachable; DR is not activated"
            ),
            detail: Some(other.summary()),
            hint: Some("try again; DR takes over from a key manager that cannot be reached".into()),
        }),
    }
}

/// Unwraps one of the tenant's live data keys with the primary (its own
/// wrap, no backup): the key manager's answer on whether we may use the key.
fn unwrap_one_key(tenant_id: &str, tenant: &TenantRecord) -> Result<(), ByokError> {
    let rows = key_rows(
        "SELECT dek_id, wrapped_dek, cmk_id, cmk_version FROM byok.wrapped_data_keys
          WHERE tenant_id = $1 AND state IN ('active', 'decrypt-only') AND wrapped_dek IS NOT NULL
          ORDER BY state = 'active' DESC, dek_id DESC LIMIT 1",
        &[DatumWithOid::from(tenant_id)],
    )?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(());
    };
    // (with the tenant's own cache settings: the broker watches the key with them)
    let cache = catalog::load_tenant_key_info(tenant_id)?
        .map(|info| info.cache)
        .unwrap_or_else(|| catalog::cache_settings(None, None, None, None));
    broker::unwrap(
        tenant_ref(tenant_id),
        tenant.provider.clone(),
        row.dek_id as u64,
        row.wrapped,
        cache,
        None,
    )
    .map(drop)
}

/// Returns the tenant to its primary master key, which must answer again.
pub fn deactivate(tenant_id: &str) -> Result<String, ByokError> {
    let tenant = load(tenant_id)?;
    if !tenant.dr_active {
        return Ok(format!("DR is not active for tenant \"{tenant_id}\""));
    }
    super::keys::check_master_key(
        tenant_id,
        tenant.provider.provider,
        &tenant.provider,
        &tenant.master_key_id,
    )?;
    // Keys made during DR get the primary's wrap now, before the switch:
    // from then on the primary (and its customer's revocations) decides.
    let backup = tenant.backup.as_ref().ok_or_else(|| no_backup(tenant_id))?;
    let made_during_dr = add_primary_wraps(tenant_id, &tenant, backup, i64::MAX)?;
    let left = keys_without_primary_wrap(tenant_id)?;
    if left > 0 {
        return Err(ByokError::WrongState {
            message: format!(
                "{left} data key(s) of tenant \"{tenant_id}\" made during DR could not be wrapped under the primary; DR stays active"
            ),
            detail: Some("they are wrapped by another backup key manager than the tenant's".into()),
            hint: None,
        });
    }
    Spi::run_with_args(
        "UPDATE byok.tenant_config SET dr_active = false, dr_activated_at = NULL, updated_at = now()
          WHERE tenant_id = $1",
        &[DatumWithOid::from(tenant_id)],
    )?;
    catalog::invalidate_everywhere()?;
    keyring::invalidate_all();
    catalog::audit(
        "deactivate_dr",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "master_key_id": tenant.master_key_id,
            "data_keys_wrapped_by_the_primary": made_during_dr,
        })),
    )?;
    Ok(format!(
        "DR ended for tenant \"{tenant_id}\": master key {} ({}) is used again; {} data key(s) made during DR wrapped by it",
        tenant.master_key_id,
        tenant.provider.provider.name(),
        made_during_dr
    ))
}
