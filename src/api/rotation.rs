//! Master-key rotation: the SQL form of the guide's customer-initiated rotation
//! (`POST /byok/rotation`).
//!
//! `CALL byok.rotate_master_key(tenant_id, new_key_id, grace_period)` points the
//! tenant at the new master key (new data keys are wrapped under it at once),
//! or, given the key it already uses, moves its data keys to that key's newest
//! version (after a rotation inside the key manager, e.g. Vault's `keys/K/rotate`),
//! then rewraps its existing data keys in batches, committing after each, with
//! the provider's native rewrap where it has one (AWS `ReEncrypt`), so
//! plaintext keys stay inside the key manager or the broker. Calling it again
//! after a crash finishes the job; calling it when done changes nothing.

use byok_core::config::ProviderKind;
use byok_kms::WrappedDek;
use byok_kms::protocol::ProviderRef;
use pgrx::JsonB;
use pgrx::datum::DatumWithOid;
use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::broker;
use crate::errors::{ByokError, OrRaise};
use crate::keyring;

/// Data keys rewrapped per transaction.
const BATCH: i64 = 100;

struct Tenant {
    kind: ProviderKind,
    provider: ProviderRef,
    master_key_id: String,
}

fn load_tenant(tenant_id: &str) -> Result<Tenant, ByokError> {
    Spi::connect_mut(|client| {
        let row = client.update(
            "SELECT provider, master_key_id, provider_options FROM byok.tenant_config WHERE tenant_id = $1 FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(tenant_id)],
        )?;
        if row.is_empty() {
            return Err(ByokError::UnknownTenant(tenant_id.to_string()));
        }
        let row = row.first();
        let name: String = row.get(1)?.unwrap_or_default();
        let kind = ProviderKind::from_name(&name)
            .ok_or_else(|| ByokError::Catalog(format!("unknown provider \"{name}\"")))?;
        let options = match row.get::<JsonB>(3)?.map(|j| j.0) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        Ok(Tenant {
            kind,
            provider: ProviderRef {
                provider: name,
                options,
                create_key_store: false,
            },
            master_key_id: row.get(2)?.unwrap_or_default(),
        })
    })
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn rotate_master_key_step(tenant_id: &str, new_key_id: &str, grace_period: Interval) -> i64 {
    let _audit = crate::audit::Operation::begin("rotate_master_key", Some(tenant_id), None);
    super::governance::require_dual_control(
        "rotate_master_key",
        tenant_id,
        &serde_json::json!({"new_key_id": new_key_id}).to_string(),
    );
    crate::catalog::as_extension_owner(|| {
        rotate_master_key_step_as_owner(tenant_id, new_key_id, grace_period)
    })
}

/// One step of `byok.rotate_master_key`: on first call switches the tenant to
/// `new_key_id`; each call rewraps up to `BATCH` data keys still under another
/// master key. Returns how many it rewrapped (0 when the rotation is complete).
pub(crate) fn rotate_master_key_step_as_owner(
    tenant_id: &str,
    new_key_id: &str,
    grace_period: Interval,
) -> i64 {
    super::require_primary("rotate a master key");
    let new_key_id = new_key_id.trim();
    if new_key_id.is_empty() || new_key_id.chars().any(char::is_control) {
        ByokError::InvalidArgument {
            message: "new_key_id must be a non-empty key id without control characters".into(),
            hint: None,
        }
        .raise();
    }
    let tenant = load_tenant(tenant_id).or_raise();
    if tenant.master_key_id != new_key_id {
        super::governance::check_key_prefix(new_key_id).or_raise();
    }
    let tenant_ref = broker::tenant_ref(tenant_id);
    // The new key must exist, be enabled and allow wrapping before anything moves;
    // its current version is what every data key should end up wrapped under.
    let info = broker::validate(tenant_ref.clone(), tenant.provider.clone(), new_key_id).or_raise();
    if tenant.master_key_id != new_key_id {
        if !info.enabled || !info.can_wrap {
            ByokError::Provider(byok_kms::ProviderError::new(
                tenant.kind,
                byok_kms::ErrorKind::KeyDisabled,
                format!("master key \"{new_key_id}\" is not enabled for wrapping keys"),
            ))
            .raise();
        }
        Spi::run_with_args(
            "UPDATE byok.tenant_config
                SET previous_master_key_id = master_key_id,
                    previous_master_key_retires_at = now() + $3,
                    master_key_id = $2,
                    provider_options = jsonb_set(provider_options,
                        ARRAY[(SELECT CASE provider WHEN 'local' THEN 'key_id' WHEN 'aws_kms' THEN 'key_arn' ELSE 'key_name' END)],
                        to_jsonb($2)),
                    updated_at = now()
              WHERE tenant_id = $1",
            &[
                DatumWithOid::from(tenant_id),
                DatumWithOid::from(new_key_id),
                DatumWithOid::from(grace_period),
            ],
        )
        .map_err(ByokError::from)
        .or_raise();
        // The rotation's start; its end is recorded when every key is rewrapped
        // (byok.rotate_master_key, or an approved request).
        crate::catalog::audit(
            "rotate_master_key_start",
            Some(tenant_id),
            None,
            true,
            None,
            Some(serde_json::json!({
                "previous_key_id": tenant.master_key_id,
                "new_key_id": new_key_id,
            })),
        )
        .or_raise();
    }
    let rewrapped = Spi::connect_mut(|client| -> Result<i64, ByokError> {
        let batch = client.update(
            "SELECT dek_id, wrapped_dek, cmk_id, cmk_version FROM byok.wrapped_data_keys
              WHERE tenant_id = $1 AND (cmk_id <> $2 OR cmk_version <> $3) AND state <> 'destroyed'
              ORDER BY dek_id LIMIT $4 FOR UPDATE",
            None,
            &[
                DatumWithOid::from(tenant_id),
                DatumWithOid::from(new_key_id),
                DatumWithOid::from(info.version.as_str()),
                DatumWithOid::from(BATCH),
            ],
        )?;
        let mut keys = Vec::new();
        for row in batch {
            keys.push((
                row.get::<i64>(1)?.unwrap_or_default(),
                WrappedDek {
                    blob: row.get::<Vec<u8>>(2)?.unwrap_or_default(),
                    cmk_id: row.get::<String>(3)?.unwrap_or_default(),
                    cmk_version: row.get::<String>(4)?.unwrap_or_default(),
                },
            ));
        }
        for (dek_id, wrapped) in &keys {
            let rewrapped = broker::rewrap(tenant_ref.clone(), tenant.provider.clone(), *dek_id as u64, wrapped.clone(), new_key_id)?;
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
    .or_raise();
    keyring::invalidate_all();
    rewrapped
}
