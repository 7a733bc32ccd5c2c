//! Requests from backends to the key broker and its answers, as carried through
//! the shared-memory slots. Encoded as JSON: they are small, rare (only cache
//! misses and administration), and readable when debugging. A plaintext data key
//! never goes through this encoding; it travels in a separate, zeroized field of
//! the slot.

use byok_core::config::ProviderKind;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ErrorKind, ProviderError};
use crate::provider::{MasterKeyInfo, WrappedDek};

/// The data-key id validation probes use: the largest a bigint holds, which the
/// key id sequence never reaches. A probe key is generated, unwrapped and
/// discarded; the audit trail shows no key id for it.
pub const PROBE_DEK_ID: u64 = i64::MAX as u64;

/// A tenant's cache settings, from its `cache_config` (or the server defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSettings {
    pub ttl_seconds: u32,
    pub max_entries: u32,
    pub grace_period_seconds: u32,
    /// How often the broker re-checks, with the key manager, the master key
    /// protecting this cached key (0: never; it is then trusted for the TTL).
    #[serde(default = "default_revocation_check_seconds")]
    pub revocation_check_seconds: u32,
}

/// `byok.revocation_check_seconds`'s default.
pub const DEFAULT_REVOCATION_CHECK_SECONDS: u32 = 30;

fn default_revocation_check_seconds() -> u32 {
    DEFAULT_REVOCATION_CHECK_SECONDS
}

/// Who a request is for: the database (OID) whose catalog holds the tenant, and
/// the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRef {
    pub database: u32,
    pub tenant_id: String,
    /// The role (OID) the request is made for, as the audit trail records it.
    #[serde(default)]
    pub role: u32,
    /// Its name, resolved when the request was made (the role may be dropped
    /// before the audit record is written).
    #[serde(default)]
    pub role_name: String,
}

/// Which key manager, configured how (the tenant's provider block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderRef {
    pub provider: ProviderKind,
    pub options: Map<String, Value>,
    /// May the local provider create its key file? Only when configuring a tenant,
    /// so a lost file is never silently replaced while data still needs it.
    #[serde(default)]
    pub create_key_store: bool,
    /// This is the tenant's backup key manager (`encryption.backup`): its
    /// calls are audited and counted as such.
    #[serde(default)]
    pub backup: bool,
}

/// The same data key wrapped under the tenant's backup master key: tried
/// when the primary key manager cannot be reached, never when it refuses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupWrap {
    pub provider: ProviderRef,
    pub wrapped: WrappedDek,
}

/// Where a new data key is also wrapped (the tenant's backup master key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupTarget {
    pub provider: ProviderRef,
    pub cmk_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The plaintext of a wrapped data key (from the shared cache or the key manager).
    Unwrap {
        tenant: TenantRef,
        provider: ProviderRef,
        dek_id: u64,
        wrapped: WrappedDek,
        cache: CacheSettings,
        /// The backup wrap, used only while `provider` is unreachable.
        #[serde(default)]
        backup: Option<BackupWrap>,
    },
    /// A new data key, wrapped under `cmk_id` (and under the backup key too,
    /// when one is given: the key is refused unless both wraps succeed).
    Generate {
        tenant: TenantRef,
        provider: ProviderRef,
        dek_id: u64,
        cmk_id: String,
        #[serde(default)]
        backup: Option<BackupTarget>,
    },
    /// The data key `wrapped` holds (opened by `from`), wrapped under `cmk_id`
    /// of another key manager `to`: a backup wrap added to an existing key, or
    /// the primary wrap of a key made while DR was active. The plaintext never
    /// leaves the broker.
    CopyWrap {
        tenant: TenantRef,
        dek_id: u64,
        from: ProviderRef,
        wrapped: WrappedDek,
        to: ProviderRef,
        cmk_id: String,
    },
    /// The same data key wrapped under another master key (rotation); the
    /// plaintext never leaves the broker (or, where it can, the key manager).
    Rewrap {
        tenant: TenantRef,
        provider: ProviderRef,
        dek_id: u64,
        wrapped: WrappedDek,
        new_cmk_id: String,
    },
    /// What the key manager says about a master key.
    Validate {
        tenant: TenantRef,
        provider: ProviderRef,
        cmk_id: String,
    },
    /// Drops shared-cache entries (and remembered refusals) of a database, of
    /// one tenant in it, or of one data key.
    Flush {
        database: u32,
        tenant_id: Option<String>,
        #[serde(default)]
        dek_id: Option<u64>,
    },
}

impl Request {
    /// The key manager the request is for (`None`: the broker's own business).
    pub fn provider(&self) -> Option<ProviderKind> {
        match self {
            Request::Unwrap { provider, .. }
            | Request::Generate { provider, .. }
            | Request::Rewrap { provider, .. }
            | Request::Validate { provider, .. } => Some(provider.provider),
            Request::CopyWrap { to, .. } => Some(to.provider),
            Request::Flush { .. } => None,
        }
    }
}

/// A provider error as it crosses the slot. `provider` is `None` when the
/// broker itself failed the request (it restarted, or the request was
/// malformed) before any provider was involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorWire {
    pub provider: Option<ProviderKind>,
    pub kind: ErrorKind,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl From<&ProviderError> for ErrorWire {
    fn from(e: &ProviderError) -> Self {
        ErrorWire {
            provider: Some(e.provider),
            kind: e.kind,
            message: e.message.clone(),
            detail: e.detail.clone(),
            hint: e.hint.clone(),
        }
    }
}

impl ErrorWire {
    /// A failure of the broker itself, not of a key manager.
    pub fn broker(kind: ErrorKind, message: String) -> Self {
        ErrorWire {
            provider: None,
            kind,
            message,
            detail: None,
            hint: None,
        }
    }

    /// The provider's error, or the broker's message when no provider was involved.
    pub fn into_error(self) -> Result<ProviderError, String> {
        match self.provider {
            Some(provider) => Ok(ProviderError {
                provider,
                kind: self.kind,
                message: self.message,
                detail: self.detail,
                hint: self.hint,
            }),
            None => Err(self.message),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The plaintext key is in the slot's key field. `stale` says it was served
    /// from the shared cache past its TTL because the key manager was unreachable.
    DataKey {
        stale: bool,
    },
    Generated {
        wrapped: WrappedDek,
        /// The backup wrap, when the request named a backup key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<WrappedDek>,
    },
    KeyInfo {
        info: MasterKeyInfo,
    },
    Flushed {
        entries: u64,
    },
    Failed {
        error: ErrorWire,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_json() {
        let request = Request::Unwrap {
            tenant: TenantRef {
                database: 5,
                tenant_id: "t".into(),
                role: 10,
                role_name: "postgres".into(),
            },
            provider: ProviderRef {
                provider: ProviderKind::Local,
                options: Map::new(),
                create_key_store: false,
                backup: false,
            },
            dek_id: 9,
            wrapped: WrappedDek {
                blob: vec![0, 1, 254, 255],
                cmk_id: "k".into(),
                cmk_version: "v".into(),
            },
            cache: CacheSettings {
                ttl_seconds: 1,
                max_entries: 2,
                grace_period_seconds: 3,
                revocation_check_seconds: 4,
            },
            backup: None,
        };
        let json = serde_json::to_vec(&request).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"blob\":\"0001feff\""));
        assert!(String::from_utf8_lossy(&json).contains("\"provider\":\"local\""));
        assert_eq!(serde_json::from_slice::<Request>(&json).unwrap(), request);
    }
}
