//! Tenant and data-key administration: `byok.configure_tenant`,
//! `byok.rotate_data_key`, `byok.set_data_key_state`, `byok.destroy_data_key`,
//! and `byok.backend_cache_stats` for observing this backend's key cache.
//!
//! These run with the caller's rights: only roles allowed to write the catalog
//! tables (superusers, unless granted) can use them.

use byok_core::config::{ProviderKind, TenantConfig};
use byok_kms::protocol::ProviderRef;
use byok_kms::{ErrorKind, ProviderError};
use pgrx::JsonB;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::catalog::KeyState;
use crate::errors::{ByokError, OrRaise};
use crate::{broker, keyring};

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn configure_tenant(config: JsonB) -> String {
    let tenant_id = config
        .0
        .get("tenant_id")
        .and_then(|t| t.as_str())
        .map(str::to_string);
    let _audit = crate::audit::Operation::begin("configure_tenant", tenant_id.as_deref(), None);
    crate::catalog::as_extension_owner(|| configure_tenant_as_owner(config))
}

/// Creates or updates a tenant from its `byok_config` document (as JSON) and
/// makes sure it has an active data key. Returns the tenant id.
fn configure_tenant_as_owner(config: JsonB) -> String {
    super::require_primary("configure a tenant");
    let config = TenantConfig::from_json(&config.0)
        .map_err(ByokError::InvalidConfig)
        .or_raise();
    super::governance::check_key_prefix(&config.master_key_id).or_raise();
    // Configuring is the one time the local provider may create its key file.
    let provider = ProviderRef {
        provider: config.provider.name().to_string(),
        options: config.provider_options.clone(),
        create_key_store: true,
    };
    check_master_key(
        &config.tenant_id,
        config.provider,
        &provider,
        &config.master_key_id,
    )
    .or_raise();
    Spi::connect_mut(|client| upsert_tenant(client, &config, &provider)).or_raise();
    keyring::invalidate_all();
    crate::catalog::audit(
        "configure_tenant",
        Some(&config.tenant_id),
        None,
        true,
        None,
        Some(serde_json::json!({
            "provider": config.provider.name(),
            "master_key_id": config.master_key_id,
        })),
    )
    .or_raise();
    config.tenant_id
}

use crate::broker::tenant_ref;

fn check_master_key(
    tenant_id: &str,
    kind: ProviderKind,
    provider: &ProviderRef,
    cmk_id: &str,
) -> Result<(), ByokError> {
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
    Ok(())
}

fn upsert_tenant(
    client: &mut SpiClient<'_>,
    config: &TenantConfig,
    provider: &ProviderRef,
) -> Result<(), ByokError> {
    let tenant_id = config.tenant_id.as_str();
    let existing = client.update(
        "SELECT provider, master_key_id FROM byok.tenant_config WHERE tenant_id = $1 FOR UPDATE",
        Some(1),
        &[DatumWithOid::from(tenant_id)],
    )?;
    if !existing.is_empty() {
        let row = existing.first();
        let provider_name: String = row.get(1)?.unwrap_or_default();
        let master_key_id: String = row.get(2)?.unwrap_or_default();
        if provider_name != config.provider.name() || master_key_id != config.master_key_id {
            return Err(ByokError::InvalidArgument {
                message: format!(
                    "tenant \"{tenant_id}\" already uses master key \"{master_key_id}\" of provider \"{provider_name}\"; configure_tenant does not change a tenant's master key"
                ),
                hint: Some(format!(
                    "moving a tenant to a new master key rewraps its data keys: CALL byok.rotate_master_key('{tenant_id}', 'NEW-KEY-ID')"
                )),
            });
        }
    }
    let c = config;
    let provider_options = JsonB(serde_json::Value::Object(c.provider_options.clone()));
    let document = JsonB(config_document(c));
    client.update(
        "INSERT INTO byok.tenant_config AS t
             (tenant_id, customer, provider, master_key_id, provider_options,
              rotation_enabled, rotation_interval_days,
              cache_ttl_seconds, cache_max_entries, cache_grace_period_seconds,
              audit_log_all_operations, audit_alert_on_failures, config)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
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
              updated_at = now()",
        None,
        &[
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
        ],
    )?;
    let active = client.update(
        "SELECT dek_id FROM byok.wrapped_data_keys WHERE tenant_id = $1 AND state = 'active'",
        Some(1),
        &[DatumWithOid::from(tenant_id)],
    )?;
    if active.is_empty() {
        create_data_key(
            client,
            tenant_id,
            c.provider,
            provider.clone(),
            &c.master_key_id,
        )?;
    }
    Ok(())
}

/// The configuration as stored: the normalised document with every default filled in.
fn config_document(c: &TenantConfig) -> serde_json::Value {
    serde_json::json!({
        "customer": c.customer,
        "tenant_id": c.tenant_id,
        "encryption": {
            "provider": c.provider.name(),
            c.provider.name(): c.provider_options,
            "key_rotation": {"enabled": c.rotation.enabled, "interval_days": c.rotation.interval_days},
            "cache_config": {
                "ttl_seconds": c.cache.ttl_seconds,
                "max_entries": c.cache.max_entries,
                "grace_period_seconds": c.cache.grace_period_seconds
            },
            "audit": {"log_all_operations": c.audit.log_all_operations, "alert_on_failures": c.audit.alert_on_failures}
        }
    })
}

/// Generates a data key under `cmk_id`, stores it wrapped and active; returns its id.
fn create_data_key(
    client: &mut SpiClient<'_>,
    tenant_id: &str,
    kind: ProviderKind,
    provider: ProviderRef,
    cmk_id: &str,
) -> Result<i64, ByokError> {
    let dek_id: i64 = client
        .update("SELECT nextval('byok.data_key_id_seq')", Some(1), &[])?
        .first()
        .get_one()?
        .ok_or_else(|| ByokError::Internal("nextval returned NULL".into()))?;
    // Generated by the key broker; only the wrapped form comes back.
    let wrapped = broker::generate(tenant_ref(tenant_id), provider, dek_id as u64, cmk_id)?;
    client.update(
        "INSERT INTO byok.wrapped_data_keys (dek_id, tenant_id, wrapped_dek, provider, cmk_id, cmk_version, state)
         VALUES ($1, $2, $3, $4, $5, $6, 'active')",
        None,
        &[
            DatumWithOid::from(dek_id),
            DatumWithOid::from(tenant_id),
            DatumWithOid::from(wrapped.blob),
            DatumWithOid::from(kind.name()),
            DatumWithOid::from(wrapped.cmk_id.as_str()),
            DatumWithOid::from(wrapped.cmk_version.as_str()),
        ],
    )?;
    Ok(dek_id)
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn rotate_data_key(tenant_id: &str) -> i64 {
    let _audit = crate::audit::Operation::begin("rotate_data_key", Some(tenant_id), None);
    super::governance::require_dual_control("rotate_data_key", tenant_id, "{}");
    crate::catalog::as_extension_owner(|| rotate_data_key_as_owner(tenant_id))
}

/// Makes a new active data key for the tenant; the previous one becomes
/// decrypt-only. Returns the new key's id.
pub(crate) fn rotate_data_key_as_owner(tenant_id: &str) -> i64 {
    super::require_primary("rotate a data key");
    let dek_id = Spi::connect_mut(|client| -> Result<i64, ByokError> {
        let tenant = client.update(
            "SELECT provider, master_key_id, provider_options FROM byok.tenant_config WHERE tenant_id = $1 FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(tenant_id)],
        )?;
        if tenant.is_empty() {
            return Err(ByokError::UnknownTenant(tenant_id.to_string()));
        }
        let row = tenant.first();
        let provider_name: String = row.get(1)?.unwrap_or_default();
        let master_key_id: String = row.get(2)?.unwrap_or_default();
        let options = match row.get::<JsonB>(3)?.map(|j| j.0) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let kind = ProviderKind::from_name(&provider_name)
            .ok_or_else(|| ByokError::Catalog(format!("unknown provider \"{provider_name}\"")))?;
        let provider = ProviderRef {
            provider: provider_name,
            options,
            create_key_store: false,
        };
        client.update(
            "UPDATE byok.wrapped_data_keys SET state = 'decrypt-only', rotated_at = now()
              WHERE tenant_id = $1 AND state = 'active'",
            None,
            &[DatumWithOid::from(tenant_id)],
        )?;
        create_data_key(client, tenant_id, kind, provider, &master_key_id)
    })
    .or_raise();
    keyring::invalidate_all();
    crate::catalog::audit(
        "rotate_data_key",
        Some(tenant_id),
        Some(dek_id),
        true,
        None,
        None,
    )
    .or_raise();
    dek_id
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn set_data_key_state(dek_id: i64, state: &str) -> String {
    let _audit = crate::audit::Operation::begin("set_data_key_state", None, Some(dek_id));
    crate::catalog::as_extension_owner(|| set_data_key_state_as_owner(dek_id, state))
}

/// Moves a data key between `decrypt-only` and `retired`. A retired key
/// refuses to decrypt, which shows whether any data still needs it before it
/// is destroyed; setting it back to `decrypt-only` undoes that.
fn set_data_key_state_as_owner(dek_id: i64, state: &str) -> String {
    super::require_primary("change a data key's state");
    let target = KeyState::from_name(state)
        .filter(|s| matches!(s, KeyState::DecryptOnly | KeyState::Retired))
        .ok_or_else(|| ByokError::InvalidArgument {
            message: format!("invalid data key state \"{}\"", state.chars().take(40).collect::<String>()),
            hint: Some("use 'decrypt-only' or 'retired'; rotate with byok.rotate_data_key() and destroy with byok.destroy_data_key()".into()),
        })
        .or_raise();
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
    })
    .or_raise();
    keyring::invalidate_all();
    crate::catalog::audit(
        "set_data_key_state",
        None,
        Some(dek_id),
        true,
        None,
        Some(serde_json::json!({"state": target.name()})),
    )
    .or_raise();
    target.name().to_string()
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
    let name: String = row.first().get(1)?.unwrap_or_default();
    KeyState::from_name(&name)
        .ok_or_else(|| ByokError::Catalog(format!("unknown key state \"{name}\"")))
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn destroy_data_key(dek_id: i64, confirm: i64) -> String {
    let _audit = crate::audit::Operation::begin("destroy_data_key", None, Some(dek_id));
    if super::governance::dual_control_applies() {
        let tenant = crate::catalog::as_extension_owner(|| {
            Spi::get_one_with_args::<String>(
                "SELECT tenant_id FROM byok.wrapped_data_keys WHERE dek_id = $1",
                &[DatumWithOid::from(dek_id)],
            )
        })
        .ok()
        .flatten()
        .unwrap_or_default();
        super::governance::require_dual_control(
            "destroy_data_key",
            &tenant,
            &format!("{{\"dek_id\": {dek_id}}}"),
        );
    }
    crate::catalog::as_extension_owner(|| destroy_data_key_as_owner(dek_id, confirm))
}

/// Destroys a data key that is no longer active: its wrapped form is erased, so
/// values sealed under it can never be decrypted again. `confirm` must repeat
/// the key id. Irreversible.
pub(crate) fn destroy_data_key_as_owner(dek_id: i64, confirm: i64) -> String {
    super::require_primary("destroy a data key");
    if confirm != dek_id {
        ByokError::InvalidArgument {
            message: "destroy_data_key: confirm must repeat the data key id".into(),
            hint: Some(format!("SELECT byok.destroy_data_key({dek_id}, {dek_id})")),
        }
        .raise();
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
        let values = client
            .select(
                "SELECT byok.data_key_references($1)",
                None,
                &[DatumWithOid::from(dek_id)],
            )?
            .first()
            .get::<i64>(1)?
            .unwrap_or(0);
        if values > 0 {
            return Err(ByokError::KeyStillReferenced {
                dek_id: dek_id as u64,
                values,
            });
        }
        client.update(
            "UPDATE byok.wrapped_data_keys
                SET state = 'destroyed', wrapped_dek = NULL, destroyed_at = now()
              WHERE dek_id = $1",
            None,
            &[DatumWithOid::from(dek_id)],
        )?;
        Ok(())
    })
    .or_raise();
    keyring::invalidate_all();
    crate::catalog::audit("destroy_data_key", None, Some(dek_id), true, None, None).or_raise();
    KeyState::Destroyed.name().to_string()
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog)]
fn flush_cache(tenant_id: default!(Option<&str>, "NULL")) -> i64 {
    let _audit = crate::audit::Operation::begin("flush_cache", tenant_id, None);
    crate::catalog::as_extension_owner(|| flush_cache_as_owner(tenant_id))
}

/// Drops cached data keys: from the key broker's shared cache (this database's,
/// or one tenant's), and from every backend's cache in this database when the
/// transaction commits (this one's at once). Returns how many shared entries
/// went. The next use of a key fetches it from the key manager again.
fn flush_cache_as_owner(tenant_id: Option<&str>) -> i64 {
    let flushed = broker::flush(tenant_id.map(str::to_string)).or_raise();
    crate::catalog::invalidate_everywhere().or_raise();
    keyring::invalidate_all();
    crate::catalog::audit(
        "flush_cache",
        tenant_id,
        None,
        true,
        None,
        Some(serde_json::json!({"shared_entries": flushed})),
    )
    .or_raise();
    flushed as i64
}

/// This backend's data-key cache: how many keys are ready and how lookups went.
#[pg_extern(volatile, parallel_restricted)]
fn backend_cache_stats() -> TableIterator<
    'static,
    (
        name!(cached_keys, i64),
        name!(hits, i64),
        name!(misses, i64),
        name!(expirations, i64),
        name!(evictions, i64),
        name!(invalidations, i64),
    ),
> {
    let (len, s) = keyring::stats();
    TableIterator::once((
        len as i64,
        s.hits as i64,
        s.misses as i64,
        s.expirations as i64,
        s.evictions as i64,
        s.invalidations as i64,
    ))
}
