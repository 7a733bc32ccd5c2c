//! The provider interface. Calls are async: the key broker runs them on its
//! tokio runtime, so a slow key manager never blocks another tenant's call.

use std::future::Future;
use std::pin::Pin;

use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use serde::{Deserialize, Serialize};

use crate::error::ProviderError;

/// What a wrapped data key is bound to. Providers authenticate it (AAD or
/// encryption context), so a wrapped DEK moved to another tenant or key id fails.
#[derive(Debug, Clone, Copy)]
pub struct KeyContext<'a> {
    pub tenant_id: &'a str,
    pub dek_id: u64,
    /// Where the provider notes facts about the call for the metrics.
    pub report: &'a CallReport,
}

impl<'a> KeyContext<'a> {
    /// A context whose report nobody reads.
    pub fn new(tenant_id: &'a str, dek_id: u64) -> Self {
        KeyContext {
            tenant_id,
            dek_id,
            report: &NO_REPORT,
        }
    }
}

/// Facts a provider notes about one call.
#[derive(Debug, Default)]
pub struct CallReport {
    /// Set when a replica (another region) answered because the primary failed.
    pub served_by_replica: std::sync::Mutex<Option<String>>,
    /// The key manager's own id of the (last) request, for the audit trail.
    pub request_id: std::sync::Mutex<Option<String>>,
}

static NO_REPORT: CallReport = CallReport {
    served_by_replica: std::sync::Mutex::new(None),
    request_id: std::sync::Mutex::new(None),
};

impl CallReport {
    pub fn replica(&self) -> Option<String> {
        self.served_by_replica.lock().ok().and_then(|r| r.clone())
    }

    pub fn request_id(&self) -> Option<String> {
        self.request_id.lock().ok().and_then(|r| r.clone())
    }

    pub fn note_request_id(&self, id: Option<&str>) {
        if let (Some(id), Ok(mut r)) = (id, self.request_id.lock()) {
            *r = Some(id.to_string());
        }
    }

    pub fn note_replica(&self, which: &str) {
        if let Ok(mut r) = self.served_by_replica.lock() {
            *r = Some(which.to_string());
        }
    }
}

/// A data key as stored: wrapped by a master key, never in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedDek {
    #[serde(with = "hex_bytes")]
    pub blob: Vec<u8>,
    /// The master key that wrapped it, as the provider names it.
    pub cmk_id: String,
    /// The master key's version (or, for `local`, its key check value).
    pub cmk_version: String,
}

/// What validation learns about a master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterKeyInfo {
    pub cmk_id: String,
    pub version: String,
    pub enabled: bool,
    pub can_wrap: bool,
    pub description: String,
}

pub type ProviderFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

pub trait KeyProvider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// A new random data key and its wrapped form under `cmk_id`.
    fn generate_data_key<'a>(
        &'a self,
        cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, (DataKey, WrappedDek)>;

    /// The plaintext of a wrapped data key.
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey>;

    /// Checks that `cmk_id` exists, is enabled and may wrap and unwrap.
    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo>;

    /// The same data key wrapped under `new_cmk_id` (a master-key rotation).
    /// Providers with a native rewrap keep the plaintext inside the key manager.
    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        new_cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek>;
}

/// Bytes as lowercase hex in JSON.
pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from_digit((b >> 4) as u32, 16).expect("nibble"));
            out.push(char::from_digit((b & 15) as u32, 16).expect("nibble"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}
