//! Azure Key Vault and Managed HSM (`provider: azure_kv`), through the official
//! SDK (`azure_security_keyvault_keys` 1.0, `azure_identity` 1.0).
//!
//! - New data keys come from the OS CSPRNG here and are wrapped by Key Vault:
//!   `wrapKey` with RSA-OAEP-256 for RSA and RSA-HSM keys, A256KW for the AES
//!   (`oct-HSM`) keys of Managed HSM; unwrap with `unwrapKey` at the recorded
//!   version. Rotation to a new key version (or another key) is unwrap + wrap in
//!   the broker (Key Vault has no rewrap: the trait's default); validation reads
//!   the key (`get`).
//! - Binding: RSA-OAEP and AES-KW take no associated data, so what is wrapped
//!   is the data key followed by a SHA-256 digest of (tenant, data-key id); an
//!   unwrapped value whose digest does not match is refused, so a wrapped key
//!   copied to another tenant's row does not open.
//! - The stored blob is one algorithm byte (1 = RSA-OAEP-256, 2 = A256KW)
//!   followed by Key Vault's output; the version that wrapped it (from the `kid`
//!   of the answer) is the data key's `cmk_version`.
//! - Throttling (429) and transient faults (5xx, connection errors) are retried
//!   here, honouring `Retry-After`, only while the wait fits in
//!   `byok.kms_timeout_ms`; the SDK's own retry (which would sleep past it) is off.
//! - Auth: service principal (secret, or certificate signing a client
//!   assertion), managed identity, or a token from a file. Tokens are cached and
//!   refreshed by the SDK.
//! - Disaster recovery: `replica_vault_urls` (vaults the keys were backed up
//!   to and restored in: same names and versions) are tried in order when the
//!   vault cannot be reached, never after a refusal ([`crate::replicas`]).

mod credentials;
mod errors;
mod options;
#[cfg(test)]
mod tests;

use crate::policy::Service;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertionCredential, ClientAssertionCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, KeyClientGetKeyOptions, KeyClientWrapKeyOptions, KeyOperationParameters,
    KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use errors::AzureError;
pub use options::{AuthOptions, AzureOptions};

use crate::error::ProviderError;
use crate::policy::AccessPolicy;
use crate::provider::{KeyContext, KeyProvider, MasterKeyInfo, ProviderFuture, WrappedDek};
use crate::retry::RetrySchedule;

const ALG_RSA_OAEP_256: u8 = 1;
const ALG_A256KW: u8 = 2;
const DEK_LEN: usize = 32;
const BINDING_LEN: usize = 32;

pub struct AzureKvProvider {
    options: AzureOptions,
    /// The vault's client, then its replicas', with their URLs.
    clients: Vec<(String, KeyClient)>,
    /// Each vault's share of the call's time.
    timeout: Duration,
    /// Key type per key name (it never changes for a key): picks the algorithm.
    key_types: Mutex<HashMap<String, u8>>,
}

/// What is wrapped besides the data key: a digest of what it belongs to.
fn binding(context: &KeyContext<'_>) -> [u8; BINDING_LEN] {
    let mut h = Sha256::new();
    h.update(b"byok_pg azure_kv binding\0");
    h.update((context.tenant_id.len() as u64).to_be_bytes());
    h.update(context.tenant_id.as_bytes());
    h.update(context.dek_id.to_be_bytes());
    h.finalize().into()
}

/// `https://vault/keys/NAME/VERSION` -> `VERSION`.
fn version_of(kid: Option<&str>) -> Result<String, AzureError> {
    kid.and_then(|k| k.rsplit('/').next())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or_else(|| AzureError::Protocol("the answer names no key version".into()))
}

fn algorithm_for(kty: &KeyType) -> Option<u8> {
    match kty {
        KeyType::Rsa | KeyType::RsaHsm => Some(ALG_RSA_OAEP_256),
        KeyType::OctHsm | KeyType::Oct => Some(ALG_A256KW),
        _ => None,
    }
}

fn sdk_algorithm(alg: u8) -> EncryptionAlgorithm {
    if alg == ALG_A256KW {
        EncryptionAlgorithm::A256Kw
    } else {
        EncryptionAlgorithm::RsaOaep256
    }
}

impl AzureKvProvider {
    pub fn from_options(
        options: &Map<String, Value>,
        timeout: Duration,
        policy: Arc<AccessPolicy>,
    ) -> Result<Self, ProviderError> {
        let options = AzureOptions::parse(options)?;
        let refused = |e| ProviderError::from_policy(ProviderKind::AzureKv, e);
        policy
            .check_endpoint(
                "encryption.azure_kv.vault_url",
                &options.vault_url,
                Service::AzureKeyVault,
            )
            .map_err(refused)?;
        for url in &options.replica_vault_urls {
            policy
                .check_endpoint(
                    "encryption.azure_kv.replica_vault_urls",
                    url,
                    Service::AzureKeyVault,
                )
                .map_err(refused)?;
        }
        policy
            .check_endpoint(
                "encryption.azure_kv.authority_host",
                options.authority(),
                Service::AzureLogin,
            )
            .map_err(refused)?;
        let mut files = vec![
            options
                .ca_cert_file
                .as_deref()
                .map(|f| ("encryption.azure_kv.ca_cert_file", f)),
        ];
        match &options.auth {
            AuthOptions::ServicePrincipal {
                client_secret_file,
                client_certificate_file,
                ..
            } => {
                files.push(
                    client_secret_file
                        .as_deref()
                        .map(|f| ("encryption.azure_kv.auth.client_secret_file", f)),
                );
                files.push(
                    client_certificate_file
                        .as_deref()
                        .map(|f| ("encryption.azure_kv.auth.client_certificate_file", f)),
                );
            }
            AuthOptions::TokenFile { token_file } => {
                files.push(Some((
                    "encryption.azure_kv.auth.token_file",
                    token_file.as_str(),
                )));
            }
            AuthOptions::ManagedIdentity { .. } => {}
        }
        for (what, path) in files.into_iter().flatten() {
            policy
                .check_credential_location(what, path)
                .map_err(refused)?;
        }
        let timeout = crate::replicas::share(timeout, 1 + options.replica_vault_urls.len());
        let clients = std::iter::once(&options.vault_url)
            .chain(&options.replica_vault_urls)
            .map(|url| {
                Ok((
                    url.clone(),
                    Self::build_client(&options, url, timeout, &policy)?,
                ))
            })
            .collect::<Result<Vec<_>, AzureError>>()?;
        Ok(AzureKvProvider {
            options,
            clients,
            timeout,
            key_types: Mutex::new(HashMap::new()),
        })
    }

    /// One HTTP client (with the extra CA, if any) for Key Vault and Entra ID.
    fn client_options(
        options: &AzureOptions,
        timeout: Duration,
        policy: &AccessPolicy,
    ) -> Result<ClientOptions, AzureError> {
        let mut http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(path) = &options.ca_cert_file {
            let pem = policy
                .read_credential_file("encryption.azure_kv.ca_cert_file", path)
                .map_err(AzureError::Policy)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                AzureError::Config(format!("ca_cert_file \"{path}\" is not a PEM certificate"))
            })?;
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .build()
            .map_err(|e| AzureError::Config(format!("HTTP client: {e}")))?;
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = options.authority().to_string();
        Ok(ClientOptions {
            transport: Some(Transport::new(Arc::new(http))),
            retry: RetryOptions::none(),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        })
    }

    fn credential(
        options: &AzureOptions,
        client_options: ClientOptions,
        policy: &Arc<AccessPolicy>,
    ) -> Result<Arc<dyn TokenCredential>, AzureError> {
        let sdk = |e: azure_core::Error| AzureError::Config(format!("credential: {e}"));
        Ok(match &options.auth {
            AuthOptions::ServicePrincipal {
                tenant_id,
                client_id,
                client_secret_file: Some(path),
                ..
            } => {
                let secret = policy
                    .read_credential_text("encryption.azure_kv.auth.client_secret_file", path)
                    .map_err(AzureError::Policy)?;
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    secret.trim().to_string().into(),
                    Some(ClientSecretCredentialOptions { client_options }),
                )
                .map_err(sdk)?
            }
            AuthOptions::ServicePrincipal {
                tenant_id,
                client_id,
                client_certificate_file: Some(path),
                ..
            } => {
                let assertion = credentials::CertificateAssertion {
                    policy: policy.clone(),
                    path: path.clone(),
                    client_id: client_id.clone(),
                    audience: format!("{}/{tenant_id}/oauth2/v2.0/token", options.authority()),
                };
                assertion.check().map_err(AzureError::Config)?;
                ClientAssertionCredential::new(
                    tenant_id.clone(),
                    client_id.clone(),
                    assertion,
                    Some(ClientAssertionCredentialOptions { client_options }),
                )
                .map_err(sdk)?
            }
            AuthOptions::ServicePrincipal { .. } => {
                return Err(AzureError::Config(
                    "auth: a service principal needs client_secret_file or client_certificate_file"
                        .into(),
                ));
            }
            AuthOptions::ManagedIdentity { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options,
                }))
                .map_err(sdk)?
            }
            AuthOptions::TokenFile { token_file } => Arc::new(credentials::TokenFileCredential {
                policy: policy.clone(),
                path: token_file.clone(),
            }),
        })
    }

    fn build_client(
        options: &AzureOptions,
        vault_url: &str,
        timeout: Duration,
        policy: &Arc<AccessPolicy>,
    ) -> Result<KeyClient, AzureError> {
        let client_options = Self::client_options(options, timeout, policy)?;
        let credential = Self::credential(options, client_options.clone(), policy)?;
        KeyClient::new(
            vault_url,
            credential,
            Some(KeyClientOptions {
                client_options,
                verify_challenge_resource: Some(options.verify_challenge_resource),
                ..Default::default()
            }),
        )
        .map_err(|e| AzureError::Config(format!("vault_url: {e}")))
    }

    /// Runs `call` with the vault's client, then each replica's while the
    /// failure is one of reaching the vault ([`crate::replicas`]), each with
    /// [`with_retry`](Self::with_retry).
    async fn on_vaults<'a, T, F, Fut>(
        &'a self,
        operation: &'static str,
        report: Option<&crate::provider::CallReport>,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(&'a KeyClient) -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let labels: Vec<&str> = self.clients.iter().map(|(url, _)| url.as_str()).collect();
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

    /// Runs `call`, retrying throttling and transient faults while the wait
    /// (Retry-After, or a short backoff) still fits in the timeout.
    async fn with_retry<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T, AzureError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let mut schedule = RetrySchedule::within(self.timeout);
        loop {
            let error = match call().await {
                Ok(value) => return Ok(value),
                Err(e) => AzureError::from_sdk(operation, e),
            };
            let Some(asked) = error.retry_after() else {
                return Err(error);
            };
            let Some(wait) = schedule.next_wait(asked) else {
                return Err(match error {
                    AzureError::Api { status: 429, .. } => AzureError::Throttled {
                        operation,
                        retry_after: asked,
                    },
                    other => other,
                });
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The algorithm for a key, from its type (read once per key name).
    async fn algorithm(&self, key_name: &str) -> Result<u8, ProviderError> {
        if let Some(alg) = self.key_types.lock().expect("key types lock").get(key_name) {
            return Ok(*alg);
        }
        let key = self.get_key(key_name).await?;
        let kty = key.key.and_then(|k| k.kty).ok_or_else(|| {
            ProviderError::from(AzureError::Protocol("the key has no type".into()))
        })?;
        let alg = algorithm_for(&kty).ok_or_else(|| {
            ProviderError::from(AzureError::Config(format!(
                "key \"{key_name}\" is of type {kty}; byok_pg wraps with RSA, RSA-HSM or oct-HSM keys"
            )))
        })?;
        self.key_types
            .lock()
            .expect("key types lock")
            .insert(key_name.to_string(), alg);
        Ok(alg)
    }

    /// The version wraps use: the configured one for the configured key, else the newest.
    fn wrap_version(&self, key_name: &str) -> Option<String> {
        (key_name == self.options.key_name)
            .then(|| self.options.key_version.clone())
            .flatten()
    }

    async fn get_key(
        &self,
        key_name: &str,
    ) -> Result<azure_security_keyvault_keys::models::Key, ProviderError> {
        let version = self.wrap_version(key_name);
        self.on_vaults("get", None, |client| {
            let options = KeyClientGetKeyOptions {
                key_version: version.clone(),
                ..Default::default()
            };
            async move { client.get_key(key_name, Some(options)).await?.into_model() }
        })
        .await
    }
}

impl KeyProvider for AzureKvProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AzureKv
    }

    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(async move {
            let alg = self.algorithm(cmk_id).await?;
            let mut payload = Zeroizing::new(Vec::with_capacity(DEK_LEN + BINDING_LEN));
            payload.extend_from_slice(dek.expose());
            payload.extend_from_slice(&binding(&context));
            let version = self.wrap_version(cmk_id);
            let result = self
                .on_vaults("wrapKey", Some(context.report), |client| {
                    let parameters = KeyOperationParameters {
                        algorithm: Some(sdk_algorithm(alg)),
                        value: Some(payload.to_vec()),
                        ..Default::default()
                    };
                    let options = KeyClientWrapKeyOptions {
                        key_version: version.clone(),
                        ..Default::default()
                    };
                    async move {
                        client
                            .wrap_key(cmk_id, parameters.try_into()?, Some(options))
                            .await?
                            .into_model()
                    }
                })
                .await?;
            let wrapped = result
                .result
                .ok_or_else(|| AzureError::Protocol("wrapKey returned no value".into()))?;
            let mut blob = Vec::with_capacity(1 + wrapped.len());
            blob.push(alg);
            blob.extend_from_slice(&wrapped);
            Ok(WrappedDek {
                blob,
                cmk_id: cmk_id.to_string(),
                cmk_version: version_of(result.kid.as_deref())?,
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let (&alg, value) = wrapped
                .blob
                .split_first()
                .filter(|(alg, _)| matches!(**alg, ALG_RSA_OAEP_256 | ALG_A256KW))
                .ok_or_else(|| {
                    AzureError::Protocol("the wrapped key is not an azure_kv blob".into())
                })?;
            let result = self
                .on_vaults("unwrapKey", Some(context.report), |client| {
                    let parameters = KeyOperationParameters {
                        algorithm: Some(sdk_algorithm(alg)),
                        value: Some(value.to_vec()),
                        ..Default::default()
                    };
                    async move {
                        client
                            .unwrap_key(
                                &wrapped.cmk_id,
                                &wrapped.cmk_version,
                                parameters.try_into()?,
                                None,
                            )
                            .await?
                            .into_model()
                    }
                })
                .await?;
            let plain = Zeroizing::new(result.result.unwrap_or_default());
            if plain.len() != DEK_LEN + BINDING_LEN {
                return Err(AzureError::Binding.into());
            }
            let expected = binding(&context);
            // Not secret, but compare without an early exit anyway.
            let differs = plain[DEK_LEN..]
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if differs != 0 {
                return Err(AzureError::Binding.into());
            }
            Ok(DataKey::from_slice(&plain[..DEK_LEN])
                .map_err(|_| AzureError::Protocol("the data key is not 32 bytes".into()))?)
        })
    }

    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
        Box::pin(async move {
            let key = self.get_key(cmk_id).await?;
            let jwk = key
                .key
                .ok_or_else(|| AzureError::Protocol("the answer holds no key".into()))?;
            let version = version_of(jwk.kid.as_deref())?;
            let enabled = key
                .attributes
                .as_ref()
                .and_then(|a| a.enabled)
                .unwrap_or(false);
            let ops = jwk.key_ops.unwrap_or_default();
            let has = |op: &str| ops.iter().any(|o| o == op);
            let kty = jwk.kty.as_ref().map(|k| k.to_string()).unwrap_or_default();
            let supported = jwk.kty.as_ref().and_then(algorithm_for);
            let missing: Vec<&str> = ["wrapKey", "unwrapKey"]
                .into_iter()
                .filter(|op| !has(op))
                .collect();
            let description = if supported.is_none() {
                format!(
                    "key \"{cmk_id}\" is of type {kty}; byok_pg wraps with RSA, RSA-HSM or oct-HSM keys"
                )
            } else if !missing.is_empty() {
                format!(
                    "key \"{cmk_id}\" does not allow {}; create it with --ops wrapKey unwrapKey",
                    missing.join(" and ")
                )
            } else if !enabled {
                format!("key \"{cmk_id}\" version {version} is disabled")
            } else {
                format!(
                    "{kty} key \"{cmk_id}\" in {}, version {version}",
                    self.options.vault_url
                )
            };
            if let Some(alg) = supported {
                self.key_types
                    .lock()
                    .expect("key types lock")
                    .insert(cmk_id.to_string(), alg);
            }
            Ok(MasterKeyInfo {
                cmk_id: cmk_id.to_string(),
                version,
                enabled,
                can_wrap: supported.is_some() && missing.is_empty(),
                description,
            })
        })
    }
}
