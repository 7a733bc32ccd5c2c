//! The provider interface.

use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;

use crate::error::ProviderError;

/// What a wrapped data key is bound to. Providers authenticate it (AAD or
/// encryption context), so a wrapped DEK moved to another tenant or key id fails.
#[derive(Debug, Clone, Copy)]
pub struct KeyContext<'a> {
    pub tenant_id: &'a str,
    pub dek_id: u64,
}

/// A data key as stored: wrapped by a master key, never in the clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDek {
    pub blob: Vec<u8>,
    /// The master key that wrapped it, as the provider names it.
    pub cmk_id: String,
    /// The master key's version (or, for `local`, its key check value).
    pub cmk_version: String,
}

/// What validation learns about a master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyInfo {
    pub cmk_id: String,
    pub version: String,
    pub enabled: bool,
    pub can_wrap: bool,
    pub description: String,
}

pub trait KeyProvider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// A new random data key and its wrapped form under `cmk_id`.
    fn generate_data_key(
        &self,
        cmk_id: &str,
        context: &KeyContext<'_>,
    ) -> Result<(DataKey, WrappedDek), ProviderError>;

    /// The plaintext of a wrapped data key.
    fn unwrap(
        &self,
        wrapped: &WrappedDek,
        context: &KeyContext<'_>,
    ) -> Result<DataKey, ProviderError>;

    /// Checks that `cmk_id` exists, is enabled and may wrap and unwrap.
    fn describe_master_key(&self, cmk_id: &str) -> Result<MasterKeyInfo, ProviderError>;
}
