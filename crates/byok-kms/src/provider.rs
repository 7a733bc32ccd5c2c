//! The provider interface. Calls are async: the key broker runs them on its
//! tokio runtime, so a slow key manager never blocks another tenant's call.

use std::future::Future;
use std::pin::Pin;

use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, ProviderError};

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

/// A key manager, as the broker uses it.
///
/// A back end implements `kind`, `unwrap` and `describe_master_key`, and then
/// either `wrap` (a key manager that wraps bytes it is given: the defaults of
/// `generate_data_key` and `rewrap` build on it) or both `generate_data_key`
/// and `rewrap` (a key manager that generates data keys or rewraps them
/// itself, keeping the plaintext inside it).
pub trait KeyProvider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// A new random data key and its wrapped form under `cmk_id`. By default
    /// the key comes from the OS CSPRNG here and is wrapped by
    /// [`wrap`](Self::wrap).
    fn generate_data_key<'a>(
        &'a self,
        cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, (DataKey, WrappedDek)> {
        Box::pin(async move {
            let dek = DataKey::generate().map_err(|_| {
                ProviderError::new(
                    self.kind(),
                    ErrorKind::Unavailable,
                    "the operating system's random number generator is unavailable",
                )
            })?;
            let wrapped = self.wrap(cmk_id, &dek, context).await?;
            Ok((dek, wrapped))
        })
    }

    /// `dek`, generated here, wrapped under `cmk_id`. The default refuses:
    /// a provider that does not implement it overrides
    /// [`generate_data_key`](Self::generate_data_key) and
    /// [`rewrap`](Self::rewrap), the only callers.
    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        let _ = (cmk_id, dek, context);
        let kind = self.kind();
        Box::pin(async move {
            Err(ProviderError::new(
                kind,
                ErrorKind::NotSupported,
                "this key provider does not wrap data keys generated outside the key manager",
            ))
        })
    }

    /// The plaintext of a wrapped data key.
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey>;

    /// Checks that `cmk_id` exists, is enabled and may wrap and unwrap.
    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo>;

    /// Whether the master key that wrapped `wrapped` may still be used: the key
    /// manager's own answer that the key is enabled *and* that we are still
    /// permitted to use it (the key broker's revocation check). By default a
    /// real unwrap, whose plaintext is dropped (zeroized) at once. A provider
    /// whose unwrap does not prove both overrides it.
    fn check_master_key<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, ()> {
        Box::pin(async move { self.unwrap(wrapped, context).await.map(drop) })
    }

    /// The same data key wrapped under `new_cmk_id` (a master-key rotation).
    /// By default [`unwrap_and_wrap`]: the plaintext passes through the broker.
    /// Providers with a native rewrap override it to keep the plaintext inside
    /// the key manager.
    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        new_cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(unwrap_and_wrap(self, wrapped, new_cmk_id, context))
    }
}

/// A rotation for key managers without a rewrap of their own: unwrap, and wrap
/// again under `new_cmk_id` here, in the broker. The default of
/// [`KeyProvider::rewrap`], also for providers that rewrap natively only in
/// some cases.
pub async fn unwrap_and_wrap<P: KeyProvider + ?Sized>(
    provider: &P,
    wrapped: &WrappedDek,
    new_cmk_id: &str,
    context: KeyContext<'_>,
) -> Result<WrappedDek, ProviderError> {
    let dek = provider.unwrap(wrapped, context).await?;
    provider.wrap(new_cmk_id, &dek, context).await
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A key manager that only wraps and unwraps (XOR with a key per id,
    /// tagged with the tenant): what the trait's defaults build on.
    #[derive(Default)]
    struct Wrapping {
        unwraps: AtomicUsize,
    }

    fn pad(cmk_id: &str) -> u8 {
        cmk_id.bytes().fold(0x5a, |a, b| a ^ b)
    }

    impl KeyProvider for Wrapping {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Local
        }

        fn wrap<'a>(
            &'a self,
            cmk_id: &'a str,
            dek: &'a DataKey,
            context: KeyContext<'a>,
        ) -> ProviderFuture<'a, WrappedDek> {
            let mut blob: Vec<u8> = dek.expose().iter().map(|b| b ^ pad(cmk_id)).collect();
            blob.extend_from_slice(context.tenant_id.as_bytes());
            Box::pin(async move {
                Ok(WrappedDek {
                    blob,
                    cmk_id: cmk_id.to_string(),
                    cmk_version: "1".into(),
                })
            })
        }

        fn unwrap<'a>(
            &'a self,
            wrapped: &'a WrappedDek,
            context: KeyContext<'a>,
        ) -> ProviderFuture<'a, DataKey> {
            self.unwraps.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let (key, tenant) = wrapped.blob.split_at(32);
                if tenant != context.tenant_id.as_bytes() {
                    return Err(ProviderError::new(
                        self.kind(),
                        ErrorKind::UnwrapFailed,
                        "another tenant's key",
                    ));
                }
                let plain: Vec<u8> = key.iter().map(|b| b ^ pad(&wrapped.cmk_id)).collect();
                Ok(DataKey::from_slice(&plain).expect("32 bytes"))
            })
        }

        fn describe_master_key<'a>(&'a self, _: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
            unimplemented!("not used here")
        }
    }

    #[tokio::test]
    async fn defaults_generate_here_and_rewrap_through_unwrap_and_wrap() {
        let p = Wrapping::default();
        let context = KeyContext::new("tenant_a", 7);
        let (dek, wrapped) = p.generate_data_key("cmk-1", context).await.unwrap();
        assert_eq!(wrapped.cmk_id, "cmk-1");
        assert_eq!(p.unwrap(&wrapped, context).await.unwrap(), dek);

        let moved = p.rewrap(&wrapped, "cmk-2", context).await.unwrap();
        assert_eq!(moved.cmk_id, "cmk-2");
        assert_ne!(moved.blob, wrapped.blob);
        assert_eq!(p.unwrap(&moved, context).await.unwrap(), dek);
        assert_eq!(p.unwraps.load(Ordering::SeqCst), 3);

        // A failed unwrap ends the rotation.
        let e = p
            .rewrap(&wrapped, "cmk-2", KeyContext::new("tenant_b", 7))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnwrapFailed);
    }
}
