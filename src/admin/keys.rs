//! Tenants and data keys: configure, rotate, change state, destroy, shred,
//! flush. Each runs inside [`super::execute`] (as the extension's owner, after
//! the dual-control check), invalidates the caches it affects and writes its
//! own success record in its transaction.

use byok_core::config::{ProviderKind, TenantConfig};
use byok_kms::protocol::{BackupTarget, ProviderRef};
use byok_kms::{ErrorKind, ProviderError};
use pgrx::JsonB;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::broker::{self, tenant_ref};
use crate::catalog::{self, KeyState, TenantRecord};
use crate::errors::ByokError;
use crate::keyring;
use crate::postgres::spi::Required;

/// Creates or updates a tenant from its `byok_config` document (as JSON) and
/// makes sure it has an active data key. Returns the tenant id.
pub fn configure_tenant(document: &serde_json::Value) -> Result<String, ByokError> {
    let config = TenantConfig::from_json(document).map_err(ByokError::InvalidConfig)?;
    super::policy::check_key_prefix(&config.master_key_id)?;
    // Configuring is the one time the local provider may create its key file.
    let provider = ProviderRef {
        provider: config.provider,
        options: config.provider_options.clone(),
        create_key_store: true,
        backup: false,
    };
    check_master_key(
        &config.tenant_id,
        config.provider,
        &provider,
        &config.master_key_id,
    )?;
    // The backup key is held to the same checks: an escrow nobody can use is none.
    let backup = match &config.backup {
        Some(backup) => {
            super::policy::check_key_prefix(&backup.master_key_id)?;
            let backup_provider = ProviderRef {
                create_key_store: true,
                ..catalog::backup_provider_ref(backup.provider, backup.provider_options.clone())
            };
            check_master_key(
                &config.tenant_id,
                backup.provider,
                &backup_provider,
                &backup.master_key_id,
            )
            .map_err(|e| backup_error(e, "encryption.backup"))?;
            Some(catalog::BackupKeyRecord {
                provider: ProviderRef {
                    create_key_store: false,
                    ..backup_provider
                },
                master_key_id: backup.master_key_id.clone(),
            })
        }
        None => None,
    };
    let record = TenantRecord {
        provider,
        master_key_id: config.master_key_id.clone(),
        backup,
        dr_active: false,
    };
    // (locked until the transaction ends: nothing changes between the check and the update)
    if let Some(existing) = catalog::load_tenant(&config.tenant_id, true)? {
        let backup_of = |r: &TenantRecord| {
            r.backup.as_ref().map(|b| {
                (
                    b.provider.provider,
                    b.provider.options.clone(),
                    b.master_key_id.clone(),
                )
            })
        };
        if backup_of(&existing) != backup_of(&record) {
            super::dr::refuse_backup_change(&config.tenant_id)?;
        }
    }
    Spi::connect_mut(|client| upsert_tenant(client, &config, record))?;
    keyring::invalidate_all();
    let mut details = serde_json::json!({
        "provider": config.provider.name(),
        "master_key_id": config.master_key_id,
    });
    if let Some(backup) = &config.backup {
        details["backup_provider"] = backup.provider.name().into();
        details["backup_master_key_id"] = backup.master_key_id.clone().into();
    }
    catalog::audit(
        "configure_tenant",
        Some(&config.tenant_id),
        None,
        true,
        None,
        Some(details),
    )?;
    Ok(config.tenant_id)
}

/// Whether the catalog has 0.2.0's backup columns: between installing the
/// library and `ALTER EXTENSION byok_pg UPDATE` it does not, and the key
/// lifecycle (rotation, destruction, configuration without a backup) works
/// on the 0.1.0 columns alone.
fn has_backup_columns(client: &mut SpiClient<'_>) -> Result<bool, ByokError> {
    Ok(client
        .update(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid OPERATOR(pg_catalog.=) 'byok.wrapped_data_keys'::pg_catalog.regclass
                               AND attname OPERATOR(pg_catalog.=) 'backup_wrapped_dek' AND NOT attisdropped)",
            Some(1),
            &[],
        )?
        .first()
        .get_one::<bool>()?
        .unwrap_or(false))
}

/// The SET clause that erases a data key: both wraps (the primary's only
/// before the 0.2.0 catalog).
fn erase_clause(client: &mut SpiClient<'_>) -> Result<&'static str, ByokError> {
    Ok(match has_backup_columns(client)? {
        true => {
            "state = 'destroyed', wrapped_dek = NULL, backup_wrapped_dek = NULL, destroyed_at = now()"
        }
        false => "state = 'destroyed', wrapped_dek = NULL, destroyed_at = now()",
    })
}

/// A backup key manager's error, saying that it is about the backup.
fn backup_error(e: ByokError, field: &str) -> ByokError {
    match e {
        ByokError::Provider(mut provider_error) => {
            provider_error.message = format!("{field}: {}", provider_error.message);
            ByokError::Provider(provider_error)
        }
        other => other,
    }
}

/// The master key must exist, be enabled and allow wrapping (asked through the
/// broker, which also applies the server's policy to the configuration).
pub fn check_master_key(
    tenant_id: &str,
    kind: ProviderKind,
    provider: &ProviderRef,
    cmk_id: &str,
) -> Result<byok_kms::MasterKeyInfo, ByokError> {
    let info = broker::validate(tenant_ref(tenant_id), provider.clone(), cmk_id)?;
    if !info.enabled {
        return Err(ProviderError::new(
            kind,
            ErrorKind::KeyDisabled,
            format!("master key \"{cmk_id}\" is disabled"),
        )
        .into());
    }
    if !info.can_wrap {
        return Err(ProviderError::new(
            kind,
            ErrorKind::AccessDenied,
            format!("master key \"{cmk_id}\" may not wrap and unwrap keys"),
        )
        .with_detail(info.description)
        .into());
    }
    Ok(info)
}

fn upsert_tenant(
    client: &mut SpiClient<'_>,
    config: &TenantConfig,
    mut record: TenantRecord,
) -> Result<(), ByokError> {
    let tenant_id = config.tenant_id.as_str();
    let existing = catalog::load_tenant_with(client, tenant_id, true)?;
    if let Some(existing) = &existing
        && existing.dr_active
    {
        record.dr_active = true;
        if record.backup.is_none() {
            return Err(ByokError::InvalidArgument {
                message: format!(
                    "tenant \"{tenant_id}\" runs on its backup master key (DR is active); its encryption.backup cannot be removed"
                ),
                hint: Some(format!("SELECT byok.deactivate_dr('{tenant_id}') first")),
            });
        }
    }
    if let Some(existing) = existing
        && (existing.provider.provider != config.provider
            || existing.master_key_id != config.master_key_id)
    {
        return Err(ByokError::InvalidArgument {
            message: format!(
                "tenant \"{tenant_id}\" already uses master key \"{}\" of provider \"{}\"; configure_tenant does not change a tenant's master key",
                existing.master_key_id,
                existing.provider.provider.name()
            ),
            hint: Some(format!(
                "moving a tenant to a new master key rewraps its data keys: CALL byok.rotate_master_key('{tenant_id}', 'NEW-KEY-ID')"
            )),
        });
    }
    let c = config;
    let provider_options = JsonB(serde_json::Value::Object(c.provider_options.clone()));
    let document = JsonB(config_document(c));
    let backup = c.backup.as_ref();
    let with_backup = has_backup_columns(client)?;
    if !with_backup && backup.is_some() {
        return Err(ByokError::WrongState {
            message: "encryption.backup needs the 0.2.0 catalog".into(),
            detail: None,
            hint: Some("ALTER EXTENSION byok_pg UPDATE".into()),
        });
    }
    const BACKUP_COLUMNS: &str = ",
              backup_provider, backup_master_key_id, backup_provider_options)";
    const BACKUP_VALUES: &str = ", $14, $15, $16)";
    const BACKUP_SET: &str = "
              backup_provider = excluded.backup_provider,
              backup_master_key_id = excluded.backup_master_key_id,
              backup_provider_options = excluded.backup_provider_options,";
    let mut sql = String::from(
        "INSERT INTO byok.tenant_config AS t
             (tenant_id, customer, provider, master_key_id, provider_options,
              rotation_enabled, rotation_interval_days,
              cache_ttl_seconds, cache_max_entries, cache_grace_period_seconds,
              audit_log_all_operations, audit_alert_on_failures, config,
              backup_provider, backup_master_key_id, backup_provider_options)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         ON CONFLICT (tenant_id) DO UPDATE SET
              customer = excluded.customer,
              provider_options = excluded.provider_options,
              rotation_enabled = excluded.rotation_enabled,
              rotation_interval_days = excluded.rotation_interval_days,
              cache_ttl_seconds = excluded.cache_ttl_seconds,
              cache_max_entries = excluded.cache_max_entries,
              cache_grace_period_seconds = excluded.cache_grace_period_seconds,
              audit_log_all_operations = excluded.audit_log_all_operations,
              audit_alert_on_failures = excluded.audit_alert_on_failures,
              config = excluded.config,
              backup_provider = excluded.backup_provider,
              backup_master_key_id = excluded.backup_master_key_id,
              backup_provider_options = excluded.backup_provider_options,
              -- (the proposed row's created_at is this statement's now(): Citus
              -- runs DO UPDATE SET on a reference table only when it calls no
              -- function that is not immutable)
              updated_at = excluded.created_at",
    );
    if !with_backup {
        // (before ALTER EXTENSION byok_pg UPDATE: the 0.1.0 columns only)
        sql = sql
            .replace(BACKUP_COLUMNS, ")")
            .replace(BACKUP_VALUES, ")")
            .replace(BACKUP_SET, "");
    }
    let mut args = vec![
        DatumWithOid::from(tenant_id),
        DatumWithOid::from(c.customer.as_str()),
        DatumWithOid::from(c.provider.name()),
        DatumWithOid::from(c.master_key_id.as_str()),
        DatumWithOid::from(provider_options),
        DatumWithOid::from(c.rotation.enabled),
        DatumWithOid::from(c.rotation.interval_days as i32),
        DatumWithOid::from(c.cache.ttl_seconds.map(|v| v as i32)),
        DatumWithOid::from(c.cache.max_entries.map(|v| v as i32)),
        DatumWithOid::from(c.cache.grace_period_seconds as i32),
        DatumWithOid::from(c.audit.log_all_operations),
        DatumWithOid::from(c.audit.alert_on_failures),
        DatumWithOid::from(document),
        DatumWithOid::from(backup.map(|b| b.provider.name())),
        DatumWithOid::from(backup.map(|b| b.master_key_id.as_str())),
        DatumWithOid::from(
            backup.map(|b| JsonB(serde_json::Value::Object(b.provider_options.clone()))),
        ),
    ];
    if !with_backup {
        args.truncate(13);
    }
    client.update(&sql, None, &args)?;
    let active = client.update(
        &format!(
            "SELECT dek_id FROM byok.wrapped_data_keys k WHERE tenant_id = $1 AND state = 'active' AND {}",
            catalog::data_keys_only()?
        ),
        Some(1),
        &[DatumWithOid::from(tenant_id)],
    )?;
    if active.is_empty() {
        create_data_key(client, tenant_id, &record)?;
    }
    Ok(())
}

/// The configuration as stored: the normalised document with every default filled in.
/// Whether `document` changes a tenant that exists (creating one, or
/// repeating its configuration unchanged, changes nothing that needs a
/// second person). Call as the extension's owner.
pub fn changes_existing_tenant(document: &serde_json::Value) -> Result<bool, ByokError> {
    let config = TenantConfig::from_json(document).map_err(ByokError::InvalidConfig)?;
    let stored = catalog::read_one::<JsonB>(
        "SELECT config FROM byok.tenant_config WHERE tenant_id OPERATOR(pg_catalog.=) $1",
        &[DatumWithOid::from(config.tenant_id.as_str())],
    )?;
    Ok(stored.is_some_and(|stored| stored.0 != config_document(&config)))
}

fn config_document(c: &TenantConfig) -> serde_json::Value {
    let mut document = serde_json::json!({
        "customer": c.customer,
        "tenant_id": c.tenant_id,
        "encryption": {
            "provider": c.provider.name(),
            c.provider.name(): c.provider_options,
            "key_rotation": {"enabled": c.rotation.enabled, "interval_days": c.rotation.interval_days},
            "cache_config": {
                "ttl_seconds": c.cache.ttl_seconds,
                "max_entries": c.cache.max_entries,
                "grace_period_seconds": c.cache.grace_period_seconds,
                "revocation_check_seconds": c.cache.revocation_check_seconds
            },
            "audit": {"log_all_operations": c.audit.log_all_operations, "alert_on_failures": c.audit.alert_on_failures}
        }
    });
    if let Some(backup) = &c.backup {
        document["encryption"]["backup"] = serde_json::json!({
            "provider": backup.provider.name(),
            backup.provider.name(): backup.provider_options,
        });
    }
    // Only when it differs from the guide's: tenants configured before
    // monitoring_rules existed keep the same stored document.
    if c.monitoring != byok_core::monitors::default_rules() {
        document["encryption"]["monitoring_rules"] =
            byok_core::monitors::rules_document(&c.monitoring);
    }
    document
}

/// Generates a data key for the tenant, stores it wrapped and active; returns
/// its id. Wrapped under the master key and the backup key when the tenant has
/// one (both, or the key is not made); while DR is active, under the backup
/// only (`byok.complete_key_wraps` adds the primary's wrap once it is back).
fn create_data_key(
    client: &mut SpiClient<'_>,
    tenant_id: &str,
    tenant: &TenantRecord,
) -> Result<i64, ByokError> {
    create_key(client, tenant_id, tenant, false)
}

/// [`create_data_key`], or with `index` an index key (the HMAC key of the
/// tenant's blind index terms), made, wrapped and stored the same way.
fn create_key(
    client: &mut SpiClient<'_>,
    tenant_id: &str,
    tenant: &TenantRecord,
    index: bool,
) -> Result<i64, ByokError> {
    let dek_id: i64 = client
        .update("SELECT nextval('byok.data_key_id_seq')", Some(1), &[])?
        .first()
        .get_one()?
        .ok_or_else(|| ByokError::Internal("nextval returned NULL".into()))?;
    // Generated by the key broker; only the wrapped forms come back.
    let (provider, cmk_id) = tenant.generating_key();
    let backup_target = match (&tenant.backup, tenant.dr_active) {
        (Some(backup), false) => Some(BackupTarget {
            provider: backup.provider.clone(),
            cmk_id: backup.master_key_id.clone(),
        }),
        _ => None,
    };
    let (wrapped, second) = broker::generate(
        tenant_ref(tenant_id),
        provider.clone(),
        dek_id as u64,
        cmk_id,
        backup_target,
    )
    .map_err(|e| match tenant.dr_active {
        true => backup_error(e, "backup key manager (DR is active)"),
        false => e,
    })?;
    let (primary, backup) = match tenant.dr_active {
        true => (None, Some(wrapped)),
        false => (Some(wrapped), second),
    };
    let backup_kind = tenant.backup.as_ref().map(|b| b.provider.provider.name());
    // (before the 0.2.0 catalog there is no backup, and no column for one)
    // (index keys exist only on the 0.2.0 catalog, which has the purpose column)
    let sql = match has_backup_columns(client)? {
        true if index => {
            "INSERT INTO byok.wrapped_data_keys (dek_id, tenant_id, wrapped_dek, provider, cmk_id, cmk_version, state,
                                                 backup_wrapped_dek, backup_provider, backup_cmk_id, backup_cmk_version, purpose)
             VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9, $10, 'index')"
        }
        true => {
            "INSERT INTO byok.wrapped_data_keys (dek_id, tenant_id, wrapped_dek, provider, cmk_id, cmk_version, state,
                                                 backup_wrapped_dek, backup_provider, backup_cmk_id, backup_cmk_version)
             VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9, $10)"
        }
        false if index => {
            return Err(ByokError::WrongState {
                message: "index keys need the 0.2.0 catalog".into(),
                detail: None,
                hint: Some("ALTER EXTENSION byok_pg UPDATE".into()),
            });
        }
        false => {
            "INSERT INTO byok.wrapped_data_keys (dek_id, tenant_id, wrapped_dek, provider, cmk_id, cmk_version, state)
             VALUES ($1, $2, $3, $4, $5, $6, 'active')"
        }
    };
    let mut args = vec![
        DatumWithOid::from(dek_id),
        DatumWithOid::from(tenant_id),
        DatumWithOid::from(primary.as_ref().map(|w| w.blob.clone())),
        DatumWithOid::from(tenant.provider.provider.name()),
        DatumWithOid::from(
            primary
                .as_ref()
                .map_or(tenant.master_key_id.as_str(), |w| w.cmk_id.as_str()),
        ),
        // (not wrapped by the primary yet: no version)
        DatumWithOid::from(primary.as_ref().map_or("", |w| w.cmk_version.as_str())),
        DatumWithOid::from(backup.as_ref().map(|w| w.blob.clone())),
        DatumWithOid::from(backup.as_ref().and(backup_kind)),
        DatumWithOid::from(backup.as_ref().map(|w| w.cmk_id.as_str())),
        DatumWithOid::from(backup.as_ref().map(|w| w.cmk_version.as_str())),
    ];
    if !sql.contains("backup_wrapped_dek") {
        args.truncate(6);
    }
    client.update(sql, None, &args)?;
    Ok(dek_id)
}

/// Makes a new active data key for the tenant; the previous one becomes
/// decrypt-only. Returns the new key's id. `reason` says why when it is not a
/// person's request (a schedule, the encryption budget).
pub fn rotate_data_key(tenant_id: &str, reason: Option<&str>) -> Result<i64, ByokError> {
    let dek_id = Spi::connect_mut(|client| -> Result<i64, ByokError> {
        let tenant = catalog::load_tenant_with(client, tenant_id, true)?
            .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
        client.update(
            &format!(
                "UPDATE byok.wrapped_data_keys k SET state = 'decrypt-only', rotated_at = now()
                  WHERE tenant_id = $1 AND state = 'active' AND {}",
                catalog::data_keys_only()?
            ),
            None,
            &[DatumWithOid::from(tenant_id)],
        )?;
        create_data_key(client, tenant_id, &tenant)
    })?;
    keyring::invalidate_all();
    catalog::audit(
        "rotate_data_key",
        Some(tenant_id),
        Some(dek_id),
        true,
        None,
        reason.map(|r| serde_json::json!({"reason": r})),
    )?;
    Ok(dek_id)
}

/// Makes a new active index key for the tenant (its first, or a rotation:
/// the previous one becomes decrypt-only, and probes use both until a
/// re-encryption job has rewritten every term and retired it). Returns its id.
pub fn rotate_index_key(tenant_id: &str) -> Result<i64, ByokError> {
    let (key_id, previous) = Spi::connect_mut(|client| -> Result<(i64, Vec<i64>), ByokError> {
        let tenant = catalog::load_tenant_with(client, tenant_id, true)?
            .ok_or_else(|| ByokError::UnknownTenant(tenant_id.to_string()))?;
        let previous = client
            .update(
                "UPDATE byok.wrapped_data_keys SET state = 'decrypt-only', rotated_at = now()
                  WHERE tenant_id = $1 AND state = 'active' AND purpose = 'index' RETURNING dek_id",
                None,
                &[DatumWithOid::from(tenant_id)],
            )?
            .filter_map(|row| row.get::<i64>(1).ok().flatten())
            .collect();
        Ok((create_key(client, tenant_id, &tenant, true)?, previous))
    })?;
    keyring::invalidate_all();
    catalog::audit(
        "rotate_index_key",
        Some(tenant_id),
        Some(key_id),
        true,
        None,
        Some(serde_json::json!({"previous_index_keys": previous})),
    )?;
    Ok(key_id)
}

/// Moves a data key between `decrypt-only` and `retired`. A retired key
/// refuses to decrypt, which shows whether any data still needs it before it
/// is destroyed; setting it back to `decrypt-only` undoes that.
pub fn set_data_key_state(dek_id: i64, state: &str) -> Result<String, ByokError> {
    let target = KeyState::from_name(state)
        .filter(|s| matches!(s, KeyState::DecryptOnly | KeyState::Retired))
        .ok_or_else(|| ByokError::InvalidArgument {
            message: format!("invalid data key state \"{}\"", state.chars().take(40).collect::<String>()),
            hint: Some("use 'decrypt-only' or 'retired'; rotate with byok.rotate_data_key() and destroy with byok.destroy_data_key()".into()),
        })?;
    Spi::connect_mut(|client| -> Result<(), ByokError> {
        let current = current_state(client, dek_id)?;
        if current == target {
            return Ok(());
        }
        if !matches!(current, KeyState::DecryptOnly | KeyState::Retired) {
            return Err(ByokError::InvalidKeyState {
                dek_id: dek_id as u64,
                from: current.name().into(),
                to: target.name().into(),
            });
        }
        client.update(
            "UPDATE byok.wrapped_data_keys SET state = $2 WHERE dek_id = $1",
            None,
            &[
                DatumWithOid::from(dek_id),
                DatumWithOid::from(target.name()),
            ],
        )?;
        Ok(())
    })?;
    keyring::invalidate_all();
    catalog::audit(
        "set_data_key_state",
        catalog::tenant_of_data_key(dek_id)?.as_deref(),
        Some(dek_id),
        true,
        None,
        Some(serde_json::json!({"state": target.name()})),
    )?;
    Ok(target.name().to_string())
}

fn current_state(client: &mut SpiClient<'_>, dek_id: i64) -> Result<KeyState, ByokError> {
    let row = client.update(
        "SELECT state FROM byok.wrapped_data_keys WHERE dek_id = $1 FOR UPDATE",
        Some(1),
        &[DatumWithOid::from(dek_id)],
    )?;
    if row.is_empty() {
        return Err(ByokError::UnknownDataKey(dek_id as u64));
    }
    let name: String = row.first().required(1)?;
    KeyState::from_name(&name)
        .ok_or_else(|| ByokError::Catalog(format!("unknown key state \"{name}\"")))
}

/// Destroys a data key of `tenant_id` that is no longer active: its wrapped
/// form is erased (and every cached copy dropped), so values sealed under it
/// can never be decrypted again. Irreversible.
pub fn destroy_data_key(tenant_id: &str, dek_id: i64) -> Result<String, ByokError> {
    // (An approved request named the tenant: the key must still be one of its.)
    if catalog::tenant_of_data_key(dek_id)?.as_deref() != Some(tenant_id) {
        return Err(ByokError::UnknownDataKey(dek_id as u64));
    }
    Spi::connect_mut(|client| -> Result<(), ByokError> {
        let current = current_state(client, dek_id)?;
        match current {
            KeyState::Destroyed => return Ok(()),
            KeyState::Active => {
                return Err(ByokError::InvalidKeyState {
                    dek_id: dek_id as u64,
                    from: current.name().into(),
                    to: KeyState::Destroyed.name().into(),
                });
            }
            KeyState::DecryptOnly | KeyState::Retired => {}
        }
        // A key that registered columns still use is never destroyed.
        let values = crate::columns::data_key_references(dek_id)?;
        if values > 0 {
            return Err(ByokError::KeyStillReferenced {
                dek_id: dek_id as u64,
                values,
            });
        }
        let erase = erase_clause(client)?;
        client.update(
            &format!("UPDATE byok.wrapped_data_keys SET {erase} WHERE dek_id = $1"),
            None,
            &[DatumWithOid::from(dek_id)],
        )?;
        Ok(())
    })?;
    // The broker's copy goes now; every backend's at commit.
    broker::flush(Some(tenant_id.to_string()), Some(dek_id as u64))?;
    catalog::invalidate_everywhere()?;
    keyring::invalidate_all();
    catalog::audit(
        "destroy_data_key",
        Some(tenant_id),
        Some(dek_id),
        true,
        None,
        None,
    )?;
    Ok(KeyState::Destroyed.name().to_string())
}

/// Crypto-shredding (key compromise, tenant off-boarding): every data key of the
/// tenant is erased (its wrapped form deleted), every cache flushed. Afterwards
/// each of the tenant's values fails with "data key destroyed"; other tenants are
/// untouched. Irreversible.
pub fn destroy_tenant_keys(tenant_id: &str) -> Result<i64, ByokError> {
    let destroyed = Spi::connect_mut(|client| -> Result<i64, ByokError> {
        if catalog::load_tenant_with(client, tenant_id, true)?.is_none() {
            return Err(ByokError::UnknownTenant(tenant_id.to_string()));
        }
        let erase = erase_clause(client)?;
        let rows = client.update(
            &format!(
                "UPDATE byok.wrapped_data_keys SET {erase} WHERE tenant_id = $1 AND state <> 'destroyed'"
            ),
            None,
            &[DatumWithOid::from(tenant_id)],
        )?;
        Ok(rows.len() as i64)
    })?;
    // The broker's copies go now; every backend's at commit (relcache invalidation).
    broker::flush(Some(tenant_id.to_string()), None)?;
    catalog::invalidate_everywhere()?;
    keyring::invalidate_all();
    catalog::audit(
        "destroy_tenant_keys",
        Some(tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({"data_keys_destroyed": destroyed})),
    )?;
    Ok(destroyed)
}

/// Drops cached data keys: from the key broker's shared cache (this database's,
/// or one tenant's), and from every backend's cache in this database when the
/// transaction commits (this one's at once). Returns how many shared entries
/// went. The next use of a key fetches it from the key manager again.
pub fn flush_cache(tenant_id: Option<&str>) -> Result<i64, ByokError> {
    let mut flushed = broker::flush(tenant_id.map(str::to_string), None)? as i64;
    catalog::invalidate_everywhere()?;
    keyring::invalidate_all();
    // On a Citus coordinator: every worker's key broker too (each audits its own).
    if catalog::cluster_role()? == catalog::ClusterRole::Coordinator {
        flushed += catalog::on_every_worker("SELECT byok.flush_cache(%L)", tenant_id)?;
    }
    catalog::audit(
        "flush_cache",
        tenant_id,
        None,
        true,
        None,
        Some(serde_json::json!({"shared_entries": flushed})),
    )?;
    Ok(flushed)
}
