//! Google Cloud KMS (`provider: gcp_kms`), through the official client
//! (`google-cloud-kms-v1` 1.16, REST transport).
//!
//! - New data keys come from the OS CSPRNG here and are encrypted by Cloud KMS
//!   under the key's primary version (`encrypt`); `decrypt` opens them (the
//!   ciphertext names its version). EKM (Cloud External Key Manager) keys take
//!   the same calls: Cloud KMS forwards them to the external manager.
//! - Binding: `additionalAuthenticatedData` is the tenant and data-key id, so a
//!   wrapped key copied to another tenant does not decrypt.
//! - Integrity: every request carries the CRC32C of its plaintext or ciphertext
//!   and AAD; every answer is checked (`verified...` flags, the CRC32C of the
//!   output). A mismatch is retried; it never yields a wrong key.
//! - Versions: the version that encrypted each data key (from the answer's
//!   `name`) is its `cmk_version`; after the primary changes,
//!   `CALL byok.rotate_master_key(tenant, key)` re-encrypts under the new primary
//!   (Cloud KMS has no re-encrypt: decrypt and encrypt again in the broker, the
//!   trait's default).
//! - RESOURCE_EXHAUSTED, UNAVAILABLE and lost connections are retried with
//!   backoff while the wait fits in `byok.kms_timeout_ms` (the client's own
//!   retry is off).
//! - Disaster recovery: `replica_endpoints` (the same key through other
//!   endpoints) are tried in order when the endpoint cannot be reached, never
//!   after a refusal ([`crate::replicas`]). A key in another location is
//!   another key: it is a tenant's `encryption.backup`, not a replica.

mod credentials;
mod errors;
mod options;
#[cfg(test)]
mod tests;

use crate::policy::Service;
use std::time::Duration;

use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use google_cloud_auth::credentials::Credentials;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

pub use errors::GcpError;
pub use options::{AuthOptions, GcpOptions};

use crate::error::ProviderError;
use crate::provider::{KeyContext, KeyProvider, MasterKeyInfo, ProviderFuture, WrappedDek};
use crate::retry::RetrySchedule;

pub struct GcpKmsProvider {
    options: GcpOptions,
    /// The endpoint's client, then the replicas', with their endpoints.
    clients: Vec<(String, KeyManagementService)>,
    /// Each endpoint's share of the call's time.
    timeout: Duration,
}

/// The additional authenticated data binding a data key to its tenant and id.
fn aad(context: &KeyContext<'_>) -> Vec<u8> {
    format!("byok_pg\0{}\0{}", context.tenant_id, context.dek_id).into_bytes()
}

fn crc(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

/// `.../cryptoKeyVersions/3` -> `3`.
fn version_of(name: &str) -> Result<String, GcpError> {
    name.rsplit_once("/cryptoKeyVersions/")
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| GcpError::Protocol(format!("\"{name}\" names no key version")))
}

impl GcpKmsProvider {
    pub async fn from_options(
        options: &Map<String, Value>,
        timeout: Duration,
        policy: std::sync::Arc<crate::policy::AccessPolicy>,
    ) -> Result<Self, ProviderError> {
        let options = GcpOptions::parse(options)?;
        let refused = |e| ProviderError::from_policy(ProviderKind::GcpKms, e);
        policy
            .check_endpoint(
                "encryption.gcp_kms.endpoint",
                options.endpoint(),
                Service::GcpKms,
            )
            .map_err(refused)?;
        for endpoint in &options.replica_endpoints {
            policy
                .check_endpoint(
                    "encryption.gcp_kms.replica_endpoints",
                    endpoint,
                    Service::GcpKms,
                )
                .map_err(refused)?;
        }
        let timeout = crate::replicas::share(timeout, 1 + options.replica_endpoints.len());
        match &options.auth {
            AuthOptions::ServiceAccountKey { key_file } => policy
                .check_credential_location("encryption.gcp_kms.auth.key_file", key_file)
                .map_err(refused)?,
            AuthOptions::TokenFile { token_file } => policy
                .check_credential_location("encryption.gcp_kms.auth.token_file", token_file)
                .map_err(refused)?,
            AuthOptions::MetadataServer => {}
        }
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| GcpError::Config(format!("HTTP client: {e}")))?;
        let credentials: Credentials = match &options.auth {
            AuthOptions::ServiceAccountKey { key_file } => {
                credentials::JwtGrantCredentials::new(policy.clone(), key_file.clone(), http)
                    .map_err(GcpError::Config)?
                    .into()
            }
            AuthOptions::TokenFile { token_file } => credentials::TokenFileCredentials {
                policy: policy.clone(),
                path: token_file.clone(),
            }
            .into(),
            AuthOptions::MetadataServer => google_cloud_auth::credentials::mds::Builder::default()
                .build()
                .map_err(|e| GcpError::Config(format!("metadata server credentials: {e}")))?,
        };
        let mut clients = Vec::new();
        for endpoint in options.endpoints() {
            let client = KeyManagementService::builder()
                .with_endpoint(endpoint)
                .with_credentials(credentials.clone())
                .with_retry_policy(NeverRetry)
                .build()
                .await
                .map_err(|e| GcpError::Config(format!("Cloud KMS client: {e}")))?;
            clients.push((endpoint.to_string(), client));
        }
        Ok(GcpKmsProvider {
            options,
            clients,
            timeout,
        })
    }

    /// Runs `call` with the endpoint's client, then each replica's while the
    /// failure is one of reaching it ([`crate::replicas`]), each with
    /// [`with_retry`](Self::with_retry).
    async fn on_endpoints<'a, T, F, Fut>(
        &'a self,
        operation: &'static str,
        report: Option<&crate::provider::CallReport>,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(&'a KeyManagementService) -> Fut,
        Fut: std::future::Future<Output = Result<T, GcpError>>,
    {
        let labels: Vec<&str> = self.clients.iter().map(|(e, _)| e.as_str()).collect();
        crate::replicas::first_reachable(&labels, report, |index| {
            let client = &self.clients[index].1;
            let call = &call;
            async move {
                self.with_retry(operation, || call(client))
                    .await
                    .map_err(ProviderError::from)
            }
        })
        .await
    }

    /// Runs `call`, retrying transient failures while the wait still fits in the timeout.
    async fn with_retry<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, GcpError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, GcpError>>,
    {
        let mut schedule = RetrySchedule::within(self.timeout);
        loop {
            let error = match tokio::time::timeout(schedule.remaining(), call()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => e,
                Err(_) => GcpError::Unreachable {
                    operation,
                    cause: format!("no answer within {} ms", self.timeout.as_millis()),
                },
            };
            if !error.is_transient() {
                return Err(error);
            }
            let Some(wait) = schedule.next_wait(None) else {
                return Err(error);
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl KeyProvider for GcpKmsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::GcpKms
    }

    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(async move {
            let aad = aad(&context);
            let answer = self
                .on_endpoints("encrypt", Some(context.report), |client| async {
                    let answer = client
                        .encrypt()
                        .set_name(cmk_id)
                        .set_plaintext(dek.expose().to_vec())
                        .set_plaintext_crc32c(crc(dek.expose()))
                        .set_additional_authenticated_data(aad.clone())
                        .set_additional_authenticated_data_crc32c(crc(&aad))
                        .send()
                        .await
                        .map_err(|e| GcpError::from_sdk("encrypt", e))?;
                    // The request arrived intact, and so did the answer.
                    if !answer.verified_plaintext_crc32c {
                        return Err(GcpError::Integrity {
                            operation: "encrypt",
                            what: "the plaintext sent",
                        });
                    }
                    if !answer.verified_additional_authenticated_data_crc32c {
                        return Err(GcpError::Integrity {
                            operation: "encrypt",
                            what: "the additional authenticated data sent",
                        });
                    }
                    if answer.ciphertext_crc32c != Some(crc(&answer.ciphertext)) {
                        return Err(GcpError::Integrity {
                            operation: "encrypt",
                            what: "the ciphertext received",
                        });
                    }
                    Ok(answer)
                })
                .await?;
            Ok(WrappedDek {
                cmk_version: version_of(&answer.name)?,
                blob: answer.ciphertext.to_vec(),
                cmk_id: cmk_id.to_string(),
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let aad = aad(&context);
            let plaintext = self
                .on_endpoints("decrypt", Some(context.report), |client| async {
                    let answer = client
                        .decrypt()
                        .set_name(&wrapped.cmk_id)
                        .set_ciphertext(wrapped.blob.clone())
                        .set_ciphertext_crc32c(crc(&wrapped.blob))
                        .set_additional_authenticated_data(aad.clone())
                        .set_additional_authenticated_data_crc32c(crc(&aad))
                        .send()
                        .await
                        .map_err(|e| GcpError::from_sdk("decrypt", e))?;
                    let plaintext = Zeroizing::new(answer.plaintext.to_vec());
                    if answer.plaintext_crc32c != Some(crc(&plaintext)) {
                        return Err(GcpError::Integrity {
                            operation: "decrypt",
                            what: "the plaintext received",
                        });
                    }
                    Ok(plaintext)
                })
                .await?;
            Ok(DataKey::from_slice(&plaintext)
                .map_err(|_| GcpError::Protocol("the data key is not 32 bytes".into()))?)
        })
    }

    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
        Box::pin(async move {
            if !options::is_crypto_key_name(cmk_id) {
                return Err(GcpError::Config(format!(
                    "\"{cmk_id}\" is not projects/P/locations/L/keyRings/R/cryptoKeys/K"
                ))
                .into());
            }
            let key = self
                .on_endpoints("get", None, |client| async {
                    client
                        .get_crypto_key()
                        .set_name(cmk_id)
                        .send()
                        .await
                        .map_err(|e| GcpError::from_sdk("get", e))
                })
                .await?;
            let purpose_ok = key.purpose == CryptoKeyPurpose::EncryptDecrypt;
            let (version, enabled, state) = match &key.primary {
                Some(primary) => (
                    version_of(&primary.name)?,
                    primary.state == CryptoKeyVersionState::Enabled,
                    primary.state.name().unwrap_or("UNKNOWN").to_string(),
                ),
                None => (String::new(), false, "none".to_string()),
            };
            let protection = key
                .primary
                .as_ref()
                .and_then(|p| p.protection_level.name())
                .unwrap_or("UNKNOWN")
                .to_string();
            let description = if !purpose_ok {
                format!(
                    "key \"{cmk_id}\" has purpose {}; byok_pg needs ENCRYPT_DECRYPT",
                    key.purpose.name().unwrap_or("UNKNOWN")
                )
            } else if !enabled {
                format!("the primary version of \"{cmk_id}\" is {state}")
            } else {
                format!(
                    "{protection} key \"{cmk_id}\" at {}, primary version {version}",
                    self.options.endpoint()
                )
            };
            Ok(MasterKeyInfo {
                cmk_id: cmk_id.to_string(),
                version,
                enabled,
                can_wrap: purpose_ok,
                description,
            })
        })
    }
}
