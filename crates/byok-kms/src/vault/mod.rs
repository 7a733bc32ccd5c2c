//! HashiCorp Vault (and OpenBao) transit engine (`provider: vault`), through `vaultrs`.
//!
//! - New data keys: `transit/datakey/plaintext`; unwrap: `decrypt`; rotation to
//!   the key's newest version: `rewrap` (the plaintext stays in Vault); to another
//!   key: decrypt and encrypt inside the broker; validation: key read.
//! - Binding: the transit key must be a *derived* key (`derived=true`); every call
//!   passes a derivation `context` made of the tenant and data-key id, so a wrapped
//!   key moved to another tenant does not decrypt. (`associated_data` would not
//!   do: `rewrap` does not accept it.)
//! - The version of each wrapped key (`vault:vN:`) is recorded; after
//!   `transit/keys/K/rotate`, `CALL byok.rotate_master_key(tenant, K)` moves every
//!   data key to the newest version, after which `min_decryption_version` can be raised.
//! - Auth: a token read from a file, AppRole (secret id from a file), or
//!   Kubernetes. Tokens are renewed (or logins repeated) before they expire, and
//!   re-acquired once after a 403.
//! - Disaster recovery: `replica_addresses` (performance standbys, a DR
//!   cluster) are tried in order when the address cannot be reached, never
//!   after a refusal; each is logged in to on its own, and each gets an equal
//!   share of the call's time.

mod errors;
mod options;
#[cfg(test)]
mod tests;

use crate::policy::Service;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use byok_core::config::ProviderKind;
use byok_core::crypto::DataKey;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use vaultrs::api::transit::requests::{
    DataKeyType, DecryptDataRequest, EncryptDataRequest, GenerateDataKeyRequest, RewrapDataRequest,
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use zeroize::Zeroizing;

pub use errors::VaultError;
pub use options::{AuthOptions, VaultOptions};

use crate::error::ProviderError;
use crate::policy::AccessPolicy;
use crate::provider::{
    CallReport, KeyContext, KeyProvider, MasterKeyInfo, ProviderFuture, WrappedDek, unwrap_and_wrap,
};

struct Session {
    client: Arc<VaultClient>,
    /// When to renew or log in again (two thirds of the token's lifetime).
    refresh_at: Option<Instant>,
}

/// One cluster: the primary address or a replica, with its own login.
struct Endpoint {
    address: String,
    session: Mutex<Option<Session>>,
}

pub struct VaultProvider {
    options: VaultOptions,
    /// Bound on each endpoint's requests (the call's time, shared among them).
    timeout: Duration,
    /// Which credential files and endpoints the server allows (checked per use).
    policy: Arc<AccessPolicy>,
    /// The address, then the replicas, in order.
    endpoints: Vec<Endpoint>,
}

/// The derivation context binding a data key to its tenant and id.
fn derivation_context(context: &KeyContext<'_>) -> String {
    BASE64.encode(format!(
        "byok_pg\0{}\0{}",
        context.tenant_id, context.dek_id
    ))
}

/// `vault:v3:...` -> `v3`.
fn version_of(ciphertext: &str) -> String {
    ciphertext.split(':').nth(1).unwrap_or("v?").to_string()
}

fn read_secret_file(
    policy: &AccessPolicy,
    what: &str,
    path: &str,
) -> Result<Zeroizing<String>, VaultError> {
    let text = policy
        .read_credential_text(what, path)
        .map_err(VaultError::Policy)?;
    Ok(Zeroizing::new(text.trim().to_string()))
}

impl VaultProvider {
    pub fn from_options(
        options: &Map<String, Value>,
        timeout: Duration,
        policy: Arc<AccessPolicy>,
    ) -> Result<Self, ProviderError> {
        let options = VaultOptions::parse(options)?;
        let refused = |e| ProviderError::from_policy(ProviderKind::Vault, e);
        policy
            .check_endpoint(
                "encryption.vault.address",
                &options.address,
                Service::Private,
            )
            .map_err(refused)?;
        for replica in &options.replica_addresses {
            policy
                .check_endpoint(
                    "encryption.vault.replica_addresses",
                    replica,
                    Service::Private,
                )
                .map_err(refused)?;
        }
        if options.tls_skip_verify {
            policy
                .check_insecure_tls("encryption.vault.tls_skip_verify")
                .map_err(refused)?;
        }
        let files = [
            options
                .ca_cert_file
                .as_deref()
                .map(|f| ("encryption.vault.ca_cert_file", f)),
            match &options.auth {
                AuthOptions::Token { token_file } => {
                    Some(("encryption.vault.auth.token_file", token_file.as_str()))
                }
                AuthOptions::Approle { secret_id_file, .. } => Some((
                    "encryption.vault.auth.secret_id_file",
                    secret_id_file.as_str(),
                )),
                AuthOptions::Kubernetes { jwt_file, .. } => {
                    Some(("encryption.vault.auth.jwt_file", jwt_file.as_str()))
                }
            },
        ];
        for (what, path) in files.into_iter().flatten() {
            policy
                .check_credential_location(what, path)
                .map_err(refused)?;
        }
        let endpoints: Vec<Endpoint> = std::iter::once(&options.address)
            .chain(&options.replica_addresses)
            .map(|address| Endpoint {
                address: address.clone(),
                session: Mutex::new(None),
            })
            .collect();
        Ok(VaultProvider {
            timeout: crate::replicas::share(timeout, endpoints.len()),
            options,
            policy,
            endpoints,
        })
    }

    fn client_with(&self, address: &str, token: &str) -> Result<VaultClient, VaultError> {
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(address)
            .token(token)
            .timeout(Some(self.timeout))
            .verify(!self.options.tls_skip_verify);
        if let Some(ns) = &self.options.namespace {
            settings.namespace(Some(ns.clone()));
        }
        if let Some(ca) = &self.options.ca_cert_file {
            // vaultrs reads the file itself: check it against the policy first.
            let checked = self
                .policy
                .check_credential_file("encryption.vault.ca_cert_file", ca)
                .map_err(VaultError::Policy)?;
            settings.ca_certs(vec![checked.display().to_string()]);
        }
        let settings = settings
            .build()
            .map_err(|e| VaultError::Config(format!("vault client settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| VaultError::from_client("connect", e))
    }

    /// A fresh session with the cluster at `address`: the token from its
    /// file, or a login.
    async fn login(&self, address: &str) -> Result<Session, VaultError> {
        let (token, lease) = match &self.options.auth {
            AuthOptions::Token { token_file } => {
                let token =
                    read_secret_file(&self.policy, "encryption.vault.auth.token_file", token_file)?;
                let client = self.client_with(address, &token)?;
                let ttl = vaultrs::token::lookup_self(&client)
                    .await
                    .map_err(|e| VaultError::from_client("token lookup", e))?
                    .ttl;
                (token, ttl)
            }
            AuthOptions::Approle {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret_file(
                    &self.policy,
                    "encryption.vault.auth.secret_id_file",
                    secret_id_file,
                )?;
                let client = self.client_with(address, "")?;
                let auth = vaultrs::auth::approle::login(&client, mount, role_id, &secret_id)
                    .await
                    .map_err(|e| VaultError::from_client("AppRole login", e))?;
                (Zeroizing::new(auth.client_token), auth.lease_duration)
            }
            AuthOptions::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt =
                    read_secret_file(&self.policy, "encryption.vault.auth.jwt_file", jwt_file)?;
                let client = self.client_with(address, "")?;
                let auth = vaultrs::auth::kubernetes::login(&client, mount, role, &jwt)
                    .await
                    .map_err(|e| VaultError::from_client("Kubernetes login", e))?;
                (Zeroizing::new(auth.client_token), auth.lease_duration)
            }
        };
        Ok(Session {
            client: Arc::new(self.client_with(address, &token)?),
            // Tokens without a TTL (root, some periodic tokens) never need refreshing.
            refresh_at: (lease > 0).then(|| Instant::now() + Duration::from_secs(lease * 2 / 3)),
        })
    }

    async fn client(
        &self,
        endpoint: &Endpoint,
        force_new: bool,
    ) -> Result<Arc<VaultClient>, VaultError> {
        let mut session = endpoint.session.lock().await;
        let stale = match session.as_ref() {
            None => true,
            Some(s) => force_new || s.refresh_at.is_some_and(|at| Instant::now() >= at),
        };
        if stale {
            *session = Some(self.login(&endpoint.address).await?);
        }
        Ok(session.as_ref().expect("set above").client.clone())
    }

    /// Runs `call` on the first endpoint, then on each replica while the
    /// failure is one of reaching the cluster, never after a refusal
    /// ([`crate::replicas`]); a replica's answer is noted in `report`.
    async fn with_client<T, F, Fut>(
        &self,
        report: Option<&CallReport>,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, VaultError>>,
    {
        let labels: Vec<&str> = self.endpoints.iter().map(|e| e.address.as_str()).collect();
        crate::replicas::first_reachable(&labels, report, |index| {
            self.with_endpoint(&self.endpoints[index], &call)
        })
        .await
    }

    /// Runs `call` on one endpoint; after a 403 (expired or revoked token)
    /// logs in again and retries once.
    async fn with_endpoint<T, F, Fut>(
        &self,
        endpoint: &Endpoint,
        call: &F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, VaultError>>,
    {
        let result = call(self.client(endpoint, false).await?).await;
        match result {
            Err(e) if e.is_forbidden() => {
                let retry = call(self.client(endpoint, true).await?).await;
                retry.map_err(Into::into)
            }
            other => other.map_err(Into::into),
        }
    }

    fn key_from_base64(plaintext: &str) -> Result<DataKey, VaultError> {
        let bytes = Zeroizing::new(
            BASE64
                .decode(plaintext)
                .map_err(|_| VaultError::Protocol("the plaintext is not base64".into()))?,
        );
        DataKey::from_slice(&bytes)
            .map_err(|_| VaultError::Protocol("the data key is not 32 bytes".into()))
    }

    /// Runs `call` as [`with_client`](Self::with_client) does, with the
    /// transit ciphertext of `wrapped` and the derivation context of `context`.
    async fn with_ciphertext<T, F, Fut>(
        &self,
        wrapped: &WrappedDek,
        context: &KeyContext<'_>,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(Arc<VaultClient>, String, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, VaultError>>,
    {
        let ciphertext = Self::ciphertext_of(wrapped)?;
        let derivation = derivation_context(context);
        self.with_client(Some(context.report), |client| {
            call(client, ciphertext.clone(), derivation.clone())
        })
        .await
    }

    /// A wrapped data key's blob, as the transit ciphertext it is.
    fn ciphertext_of(wrapped: &WrappedDek) -> Result<String, VaultError> {
        String::from_utf8(wrapped.blob.clone())
            .map_err(|_| VaultError::Protocol("the wrapped key is not a Vault ciphertext".into()))
    }
}

/// A transit ciphertext (`vault:vN:...`) stored as the data key wrapped by `cmk_id`.
fn wrapped_dek(ciphertext: String, cmk_id: &str) -> WrappedDek {
    WrappedDek {
        cmk_version: version_of(&ciphertext),
        blob: ciphertext.into_bytes(),
        cmk_id: cmk_id.to_string(),
    }
}

impl KeyProvider for VaultProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vault
    }

    fn generate_data_key<'a>(
        &'a self,
        cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, (DataKey, WrappedDek)> {
        Box::pin(async move {
            let derivation = derivation_context(&context);
            let out = self
                .with_client(Some(context.report), |client| {
                    let derivation = derivation.clone();
                    async move {
                        let mut opts = GenerateDataKeyRequest::builder();
                        opts.context(derivation).bits(256u16);
                        vaultrs::transit::generate::data_key(
                            client.as_ref(),
                            &self.options.mount,
                            cmk_id,
                            DataKeyType::Plaintext,
                            Some(&mut opts),
                        )
                        .await
                        .map_err(|e| VaultError::from_client("datakey", e))
                    }
                })
                .await?;
            let plaintext = Zeroizing::new(out.plaintext.unwrap_or_default());
            let dek = Self::key_from_base64(&plaintext)?;
            Ok((dek, wrapped_dek(out.ciphertext, cmk_id)))
        })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey> {
        Box::pin(async move {
            let out = self
                .with_ciphertext(
                    wrapped,
                    &context,
                    |client, ciphertext, derivation| async move {
                        let mut opts = DecryptDataRequest::builder();
                        opts.context(derivation);
                        vaultrs::transit::data::decrypt(
                            client.as_ref(),
                            &self.options.mount,
                            &wrapped.cmk_id,
                            &ciphertext,
                            Some(&mut opts),
                        )
                        .await
                        .map_err(|e| VaultError::from_client("decrypt", e))
                    },
                )
                .await?;
            let plaintext = Zeroizing::new(out.plaintext);
            Ok(Self::key_from_base64(&plaintext)?)
        })
    }

    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
        Box::pin(async move {
            let key = self
                .with_client(None, |client| async move {
                    vaultrs::transit::key::read(client.as_ref(), &self.options.mount, cmk_id)
                        .await
                        .map_err(|e| VaultError::from_client("key read", e))
                })
                .await?;
            let latest = match &key.keys {
                vaultrs::api::transit::responses::ReadKeyData::Symmetric(versions) => versions
                    .keys()
                    .filter_map(|v| v.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0),
                _ => 0,
            };
            let usable = key.supports_encryption && key.supports_decryption;
            Ok(MasterKeyInfo {
                cmk_id: cmk_id.to_string(),
                version: format!("v{latest}"),
                enabled: true,
                can_wrap: usable && key.derived,
                description: if !key.derived {
                    format!(
                        "transit key \"{cmk_id}\" is not a derived key; create it with derived=true so data keys can be bound to their tenant"
                    )
                } else {
                    format!(
                        "transit key \"{cmk_id}\" at {}/{}, version {latest}, min_decryption_version {}",
                        self.options.address, self.options.mount, key.min_decryption_version
                    )
                },
            })
        })
    }

    /// Encrypts the plaintext with transit `encrypt` (used for a rotation to
    /// another transit key).
    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        Box::pin(async move {
            let plaintext = Zeroizing::new(BASE64.encode(dek.expose()));
            let derivation = derivation_context(&context);
            let out = self
                .with_client(Some(context.report), |client| {
                    let (plaintext, derivation) = (plaintext.clone(), derivation.clone());
                    async move {
                        let mut opts = EncryptDataRequest::builder();
                        opts.context(derivation);
                        vaultrs::transit::data::encrypt(
                            client.as_ref(),
                            &self.options.mount,
                            cmk_id,
                            &plaintext,
                            Some(&mut opts),
                        )
                        .await
                        .map_err(|e| VaultError::from_client("encrypt", e))
                    }
                })
                .await?;
            Ok(wrapped_dek(out.ciphertext, cmk_id))
        })
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        new_cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        if new_cmk_id != wrapped.cmk_id {
            // Another transit key: decrypt and encrypt again here, in the broker.
            return Box::pin(unwrap_and_wrap(self, wrapped, new_cmk_id, context));
        }
        Box::pin(async move {
            // Same key, newest version: Vault rewraps without revealing the plaintext.
            let out = self
                .with_ciphertext(
                    wrapped,
                    &context,
                    |client, ciphertext, derivation| async move {
                        let mut opts = RewrapDataRequest::builder();
                        opts.context(derivation);
                        vaultrs::transit::data::rewrap(
                            client.as_ref(),
                            &self.options.mount,
                            new_cmk_id,
                            &ciphertext,
                            Some(&mut opts),
                        )
                        .await
                        .map_err(|e| VaultError::from_client("rewrap", e))
                    },
                )
                .await?;
            Ok(wrapped_dek(out.ciphertext, new_cmk_id))
        })
    }
}
