//! AWS KMS (`provider: aws_kms`), through the official `aws-sdk-kms`.
//!
//! - New data keys: `GenerateDataKey` (AES_256); unwrap: `Decrypt`; master-key
//!   rotation: `ReEncrypt` (the plaintext never leaves KMS); validation:
//!   `DescribeKey` (state Enabled, usage ENCRYPT_DECRYPT).
//! - Every call carries an encryption context binding the data key to its tenant
//!   and id, so a wrapped key moved to another tenant does not decrypt.
//! - Credentials: the standard chain (environment, shared files, web identity,
//!   instance metadata), or `role_arn` (+ `external_id`) assumed through STS; the
//!   SDK's identity cache refreshes them before they expire.
//! - Disaster recovery: `replica_key_arns` (multi-Region replicas) are tried in
//!   order when the primary Region cannot be reached.
//! - Throttling and transient faults are retried by the SDK with exponential
//!   backoff and jitter; the broker bounds the whole call by `byok.kms_timeout_ms`.

mod errors;
mod options;
#[cfg(test)]
mod tests;

use crate::policy::Service;
use std::collections::HashMap;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::operation::RequestId;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState, KeyUsageType};
use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use serde_json::{Map, Value};
use zeroize::Zeroize;

pub use errors::AwsError;
pub use options::AwsOptions;

use crate::error::{ErrorKind, ProviderError};
use crate::provider::{KeyContext, KeyProvider, MasterKeyInfo, ProviderFuture, WrappedDek};

/// One Region's client and the key to use there.
struct Target {
    client: Client,
    key_id: String,
    region: String,
}

impl AwsKmsProvider {
    fn target(&self, index: usize) -> &Target {
        if index == 0 {
            &self.primary
        } else {
            &self.replicas[index - 1]
        }
    }

    /// The target at `index` and the key to name there: `primary_key` (what the
    /// caller named) on the primary, the replica's own key on a replica.
    fn target_and_key<'a>(&'a self, index: usize, primary_key: &'a str) -> (&'a Target, &'a str) {
        let target = self.target(index);
        let key_id = if index == 0 {
            primary_key
        } else {
            target.key_id.as_str()
        };
        (target, key_id)
    }
}

pub struct AwsKmsProvider {
    primary: Target,
    replicas: Vec<Target>,
}

/// The encryption context every wrapped data key is bound to.
fn encryption_context(context: &KeyContext<'_>) -> HashMap<String, String> {
    HashMap::from([
        ("byok:tenant".to_string(), context.tenant_id.to_string()),
        ("byok:dek_id".to_string(), context.dek_id.to_string()),
    ])
}

impl AwsKmsProvider {
    pub async fn from_options(
        options: &Map<String, Value>,
        timeout: Duration,
        policy: &crate::policy::AccessPolicy,
    ) -> Result<Self, ProviderError> {
        let options = AwsOptions::parse(options)?;
        // The SDK derives kms.REGION.amazonaws.com from a Region; any other
        // endpoint is the tenant's choice and must be one the server allows.
        let refused = |e| ProviderError::from_policy(ProviderKind::AwsKms, e);
        if let Some(url) = &options.endpoint_url {
            policy
                .check_endpoint("encryption.aws_kms.endpoint_url", url, Service::AwsKms)
                .map_err(refused)?;
        }
        for url in options.replica_endpoint_urls.values() {
            policy
                .check_endpoint(
                    "encryption.aws_kms.replica_endpoint_urls",
                    url,
                    Service::AwsKms,
                )
                .map_err(refused)?;
        }
        // Each Region gets a share of the call's time, so replicas are still
        // asked within byok.kms_timeout_ms when the primary hangs.
        let timeout = crate::replicas::share(timeout, 1 + options.replica_key_arns.len());
        let primary = Self::build_target(
            &options,
            &options.key_arn,
            options.primary_region()?,
            options.endpoint_url.clone(),
            timeout,
        )
        .await;
        let mut replicas = Vec::new();
        for arn in &options.replica_key_arns {
            let region = options::region_of_arn(arn).ok_or_else(|| {
                AwsError::config(format!(
                    "replica_key_arns: \"{arn}\" is not a KMS key ARN with a Region"
                ))
            })?;
            let endpoint = options.replica_endpoint_urls.get(&region).cloned();
            replicas.push(Self::build_target(&options, arn, region, endpoint, timeout).await);
        }
        Ok(AwsKmsProvider { primary, replicas })
    }

    async fn build_target(
        options: &AwsOptions,
        key_id: &str,
        region: String,
        endpoint: Option<String>,
        timeout: Duration,
    ) -> Target {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.clone()))
            // Standard retry mode: exponential backoff with jitter, throttling included.
            // Backoff from 100 ms, at most 1 s between attempts: a Region that keeps
            // failing must leave time (within byok.kms_timeout_ms) for the replicas.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(4)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(1)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_secs(3)))
                    .build(),
            );
        if let Some(endpoint) = &endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &options.profile {
            loader = loader.profile_name(profile);
        }
        let base = loader.load().await;
        let config = match &options.role_arn {
            None => base,
            Some(role_arn) => {
                let mut assume = aws_config::sts::AssumeRoleProvider::builder(role_arn)
                    .session_name(
                        options
                            .session_name
                            .clone()
                            .unwrap_or_else(|| "byok_pg".into()),
                    )
                    .region(aws_config::Region::new(region.clone()))
                    .configure(&base);
                if let Some(external_id) = &options.external_id {
                    assume = assume.external_id(external_id);
                }
                let provider = assume.build().await;
                return Target {
                    client: Client::from_conf(
                        aws_sdk_kms::config::Builder::from(&base)
                            .credentials_provider(provider)
                            .build(),
                    ),
                    key_id: key_id.to_string(),
                    region,
                };
            }
        };
        Target {
            client: Client::new(&config),
            key_id: key_id.to_string(),
            region,
        }
    }

    /// Runs `call` against the primary, then each replica while the failure is
    /// one of reaching the Region (not a refusal): [`crate::replicas`].
    /// `call` gets the index of the target: 0 the primary, 1.. the replicas.
    async fn with_fallback<T, F, Fut>(
        &self,
        context: Option<&KeyContext<'_>>,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let labels: Vec<&str> = std::iter::once(&self.primary)
            .chain(&self.replicas)
            .map(|target| target.region.as_str())
            .collect();
        crate::replicas::first_reachable(&labels, context.map(|c| c.report), call).await
    }
}

fn blob_to_key(blob: Option<&Blob>) -> Result<DataKey, ProviderError> {
    let bytes = blob.ok_or_else(|| AwsError::protocol("the answer had no plaintext"))?;
    DataKey::from_slice(bytes.as_ref())
        .map_err(|_| AwsError::protocol("the data key is not 32 bytes").into())
}

impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsKms
    }

    fn generate_data_key<'a>(
        &'a self,
        cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, (DataKey, WrappedDek)> {
        Box::pin(async move {
            // A multi-Region replica generates keys its primary can decrypt, and the
            // other way round, so generation falls back to replicas too.
            let out = self
                .with_fallback(Some(&context), |index| async move {
                    let (target, key_id) = self.target_and_key(index, cmk_id);
                    target
                        .client
                        .generate_data_key()
                        .key_id(key_id)
                        .key_spec(DataKeySpec::Aes256)
                        .set_encryption_context(Some(encryption_context(&context)))
                        .send()
                        .await
                        .inspect(|out| context.report.note_request_id(out.request_id()))
                        .map_err(|e| {
                            context.report.note_request_id(e.request_id());
                            errors::from_sdk("GenerateDataKey", e)
                        })
                })
                .await?;
            let dek = blob_to_key(out.plaintext())?;
            let blob = out
                .ciphertext_blob()
                .ok_or_else(|| AwsError::protocol("the answer had no ciphertext"))?
                .as_ref()
                .to_vec();
            let version = out.key_id().unwrap_or(cmk_id).to_string();
            // The SDK's copy of the plaintext goes with `out`; ours is a zeroizing DataKey.
            drop(out);
            Ok((
                dek,
                WrappedDek {
                    blob,
                    cmk_id: cmk_id.to_string(),
                    cmk_version: version,
                },
            ))
        })
    }

    /// `Encrypt` of a data key made elsewhere (a backup wrap of another key
    /// manager's key), with the same encryption context as a generated one.
    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(async move {
            let out = self
                .with_fallback(Some(&context), |index| async move {
                    let (target, key_id) = self.target_and_key(index, cmk_id);
                    target
                        .client
                        .encrypt()
                        .key_id(key_id)
                        .plaintext(Blob::new(dek.expose().to_vec()))
                        .set_encryption_context(Some(encryption_context(&context)))
                        .send()
                        .await
                        .inspect(|out| context.report.note_request_id(out.request_id()))
                        .map_err(|e| {
                            context.report.note_request_id(e.request_id());
                            errors::from_sdk("Encrypt", e)
                        })
                })
                .await?;
            let blob = out
                .ciphertext_blob()
                .ok_or_else(|| AwsError::protocol("Encrypt returned no ciphertext"))?
                .as_ref()
                .to_vec();
            Ok(WrappedDek {
                blob,
                cmk_id: cmk_id.to_string(),
                cmk_version: out.key_id().unwrap_or(cmk_id).to_string(),
            })
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            self.with_fallback(Some(&context), |index| async move {
                // Name the key, so KMS refuses a blob wrapped by another key
                // (IncorrectKeyException) instead of trusting the blob's own header.
                let (target, key_id) = self.target_and_key(index, &wrapped.cmk_version);
                let mut out = target
                    .client
                    .decrypt()
                    .ciphertext_blob(Blob::new(wrapped.blob.clone()))
                    .key_id(key_id)
                    .set_encryption_context(Some(encryption_context(&context)))
                    .send()
                    .await
                    .map_err(|e| {
                        context.report.note_request_id(e.request_id());
                        errors::from_sdk("Decrypt", e)
                    })?;
                context.report.note_request_id(out.request_id());
                let dek = blob_to_key(out.plaintext());
                if let Some(plain) = out.plaintext.take() {
                    plain.into_inner().zeroize();
                }
                dek
            })
            .await
        })
    }

    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
        Box::pin(async move {
            let out = self
                .with_fallback(None, |index| async move {
                    let (target, key_id) = self.target_and_key(index, cmk_id);
                    target
                        .client
                        .describe_key()
                        .key_id(key_id)
                        .send()
                        .await
                        .map_err(|e| errors::from_sdk("DescribeKey", e))
                })
                .await?;
            let meta = out
                .key_metadata()
                .ok_or_else(|| AwsError::protocol("DescribeKey returned no key metadata"))?;
            let state = meta.key_state().cloned();
            Ok(MasterKeyInfo {
                cmk_id: cmk_id.to_string(),
                version: meta.arn().unwrap_or(cmk_id).to_string(),
                enabled: meta.enabled() && state == Some(KeyState::Enabled),
                // An absent KeyUsage is KMS's default, ENCRYPT_DECRYPT.
                can_wrap: meta
                    .key_usage()
                    .is_none_or(|u| *u == KeyUsageType::EncryptDecrypt),
                description: format!(
                    "AWS KMS key {} in {} (state {})",
                    meta.arn().unwrap_or(cmk_id),
                    self.primary.region,
                    state
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|| "unknown".into())
                ),
            })
        })
    }

    /// `DescribeKey` (the key's state: disabled, pending deletion) and then a
    /// real `Decrypt` (our permission, which `DescribeKey` does not need).
    /// Two requests because each proves half: KMS refuses `Decrypt` under a
    /// disabled key, but emulators such as moto do not, and a policy may deny
    /// `kms:Decrypt` while still allowing `kms:DescribeKey`.
    fn check_master_key<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let info = self.describe_master_key(&wrapped.cmk_version).await?;
            if !info.enabled {
                return Err(ProviderError::new(
                    ProviderKind::AwsKms,
                    ErrorKind::KeyDisabled,
                    format!("master key \"{}\" is not enabled", wrapped.cmk_id),
                )
                .with_detail(info.description));
            }
            self.unwrap(wrapped, context).await.map(drop)
        })
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        new_cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(async move {
            let encryption_context = encryption_context(&context);
            let out = self
                .primary
                .client
                .re_encrypt()
                .ciphertext_blob(Blob::new(wrapped.blob.clone()))
                .source_key_id(&wrapped.cmk_version)
                .set_source_encryption_context(Some(encryption_context.clone()))
                .destination_key_id(new_cmk_id)
                .set_destination_encryption_context(Some(encryption_context))
                .send()
                .await
                .map_err(|e| {
                    context.report.note_request_id(e.request_id());
                    errors::from_sdk("ReEncrypt", e)
                })?;
            context.report.note_request_id(out.request_id());
            let blob = out
                .ciphertext_blob()
                .ok_or_else(|| AwsError::protocol("ReEncrypt returned no ciphertext"))?
                .as_ref()
                .to_vec();
            Ok(WrappedDek {
                blob,
                cmk_id: new_cmk_id.to_string(),
                cmk_version: out.key_id().unwrap_or(new_cmk_id).to_string(),
            })
        })
    }
}

impl From<AwsError> for ProviderError {
    fn from(e: AwsError) -> Self {
        ProviderError::new(ProviderKind::AwsKms, e.kind(), e.to_string())
            .with_any(e.detail(), e.hint())
    }
}
