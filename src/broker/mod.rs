//! The key broker: one background worker owns every key-provider client and the
//! shared data-key cache; backends reach it through request slots in shared
//! memory. See `byok_core::slots` for the slot protocol, `crate::shmem` for
//! where it lives, `client` for the backend side and `worker` for the broker
//! process.

pub mod client;
pub mod worker;

use crate::errors::ByokError;
use crate::postgres::session;
use byok_core::crypto::DataKey;
use byok_kms::protocol::{
    BackupTarget, BackupWrap, CacheSettings, ProviderRef, Request, Response, TenantRef,
};
use byok_kms::{MasterKeyInfo, WrappedDek};

/// Who a request is for: this database, the tenant, and the acting role.
pub fn tenant_ref(tenant_id: &str) -> TenantRef {
    let role = session::acting_role();
    TenantRef {
        database: session::database(),
        tenant_id: tenant_id.to_string(),
        role: u32::from(role),
        role_name: session::role_name(role),
    }
}

fn failed(response: Response) -> ByokError {
    match response {
        Response::Failed { error } => match error.into_error() {
            Ok(provider_error) => ByokError::Provider(provider_error),
            Err(message) => ByokError::BrokerFailed(message),
        },
        other => ByokError::Internal(format!("unexpected answer from the key broker: {other:?}")),
    }
}

/// The plaintext of a wrapped data key, from the shared cache or the key
/// manager (or, while it cannot be reached, the backup key manager).
pub fn unwrap(
    tenant: TenantRef,
    provider: ProviderRef,
    dek_id: u64,
    wrapped: WrappedDek,
    cache: CacheSettings,
    backup: Option<BackupWrap>,
) -> Result<(DataKey, bool), ByokError> {
    let answer = client::call(&Request::Unwrap {
        tenant,
        provider,
        dek_id,
        wrapped,
        cache,
        backup,
    })?;
    match (answer.response, answer.data_key) {
        (Response::DataKey { stale }, Some(dek)) => Ok((dek, stale)),
        (other, _) => Err(failed(other)),
    }
}

/// A new data key wrapped under `cmk_id` (and under the backup key too when
/// `backup` names one: both wraps, or an error).
pub fn generate(
    tenant: TenantRef,
    provider: ProviderRef,
    dek_id: u64,
    cmk_id: &str,
    backup: Option<BackupTarget>,
) -> Result<(WrappedDek, Option<WrappedDek>), ByokError> {
    let wants_backup = backup.is_some();
    let answer = client::call(&Request::Generate {
        tenant,
        provider,
        dek_id,
        cmk_id: cmk_id.to_string(),
        backup,
    })?;
    match answer.response {
        Response::Generated { wrapped, backup } if backup.is_some() == wants_backup => {
            Ok((wrapped, backup))
        }
        other => Err(failed(other)),
    }
}

/// The data key `wrapped` holds (opened by `from`) wrapped under `cmk_id` of
/// `to`; the plaintext stays in the broker.
pub fn copy_wrap(
    tenant: TenantRef,
    dek_id: u64,
    from: ProviderRef,
    wrapped: WrappedDek,
    to: ProviderRef,
    cmk_id: &str,
) -> Result<WrappedDek, ByokError> {
    let answer = client::call(&Request::CopyWrap {
        tenant,
        dek_id,
        from,
        wrapped,
        to,
        cmk_id: cmk_id.to_string(),
    })?;
    match answer.response {
        Response::Generated { wrapped, .. } => Ok(wrapped),
        other => Err(failed(other)),
    }
}

/// The same data key wrapped under `new_cmk_id`; the plaintext stays in the broker
/// (or, where the provider can rewrap natively, in the key manager).
pub fn rewrap(
    tenant: TenantRef,
    provider: ProviderRef,
    dek_id: u64,
    wrapped: WrappedDek,
    new_cmk_id: &str,
) -> Result<WrappedDek, ByokError> {
    let answer = client::call(&Request::Rewrap {
        tenant,
        provider,
        dek_id,
        wrapped,
        new_cmk_id: new_cmk_id.to_string(),
    })?;
    match answer.response {
        Response::Generated { wrapped, .. } => Ok(wrapped),
        other => Err(failed(other)),
    }
}

/// What the key manager says about a master key.
pub fn validate(
    tenant: TenantRef,
    provider: ProviderRef,
    cmk_id: &str,
) -> Result<MasterKeyInfo, ByokError> {
    let answer = client::call(&Request::Validate {
        tenant,
        provider,
        cmk_id: cmk_id.to_string(),
    })?;
    match answer.response {
        Response::KeyInfo { info } => Ok(info),
        other => Err(failed(other)),
    }
}

/// Drops the shared cache's keys (and remembered refusals) of this database,
/// of one of its tenants, or of one data key.
pub fn flush(tenant_id: Option<String>, dek_id: Option<u64>) -> Result<u64, ByokError> {
    let answer = client::call(&Request::Flush {
        database: session::database(),
        tenant_id,
        dek_id,
    })?;
    match answer.response {
        Response::Flushed { entries } => Ok(entries),
        other => Err(failed(other)),
    }
}
