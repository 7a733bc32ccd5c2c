//! The `azure_kv` block of a tenant's configuration.
//!
//! ```yaml
//! azure_kv:
//!   vault_url: "https://byok-vault-acme.vault.azure.net"
//!   replica_vault_urls: ["https://byok-vault-acme-dr.vault.azure.net"]   # optional: tried in
//!                                        # order when vault_url cannot be reached (never on a refusal)
//!   key_name: "platform-cmk"             # RSA or RSA-HSM (RSA-OAEP-256), or oct-HSM (A256KW)
//!   key_version: "0123abcd..."           # optional: wrap with this version, not the newest
//!   authority_host: "https://login.microsoftonline.com"   # optional (sovereign clouds, tests)
//!   ca_cert_file: "/etc/byok/extra-ca.pem"                # optional, extra CA to trust
//!   verify_challenge_resource: true      # default; see below
//!   auth:
//!     method: "service_principal"        # service_principal | managed_identity | token_file
//!     tenant_id: "72f988bf-..."          # service_principal
//!     client_id: "b5b6c9a5-..."          # service_principal; managed_identity: optional (user-assigned)
//!     client_secret_file: "/etc/byok/azure-secret"        # service_principal: one of these two
//!     client_certificate_file: "/etc/byok/azure-sp.pem"   #   (PEM: certificate and PKCS#8 key)
//!     token_file: "/run/byok/azure-token"                 # token_file: a bearer token, re-read per use
//! ```
//!
//! `verify_challenge_resource` (the SDK's check that the vault's 401 challenge
//! names a resource the vault host belongs to, e.g. `vault.azure.net`) stays on
//! for real vaults; turning it off is only for a vault reached by IP address.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::AzureError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureOptions {
    pub vault_url: String,
    /// Vaults holding the same keys (a secondary vault the keys were backed
    /// up to and restored in), tried in order when `vault_url` cannot be reached.
    #[serde(default)]
    pub replica_vault_urls: Vec<String>,
    pub key_name: String,
    #[serde(default)]
    pub key_version: Option<String>,
    #[serde(default)]
    pub authority_host: Option<String>,
    #[serde(default)]
    pub ca_cert_file: Option<String>,
    #[serde(default = "yes")]
    pub verify_challenge_resource: bool,
    pub auth: AuthOptions,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthOptions {
    ServicePrincipal {
        tenant_id: String,
        client_id: String,
        #[serde(default)]
        client_secret_file: Option<String>,
        #[serde(default)]
        client_certificate_file: Option<String>,
    },
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
    TokenFile {
        token_file: String,
    },
}

impl AzureOptions {
    pub fn parse(block: &Map<String, Value>) -> Result<Self, AzureError> {
        let options: AzureOptions = serde_json::from_value(Value::Object(block.clone()))
            .map_err(|e| AzureError::Config(format!("encryption.azure_kv: {e}")))?;
        if !options.vault_url.starts_with("https://") {
            return Err(AzureError::Config(format!(
                "encryption.azure_kv.vault_url: \"{}\" is not an https URL",
                options.vault_url
            )));
        }
        if let Some(bad) = options
            .replica_vault_urls
            .iter()
            .find(|u| !u.starts_with("https://"))
        {
            return Err(AzureError::Config(format!(
                "encryption.azure_kv.replica_vault_urls: \"{bad}\" is not an https URL"
            )));
        }
        if options.replica_vault_urls.len() > crate::replicas::MAX_REPLICAS {
            return Err(AzureError::Config(format!(
                "encryption.azure_kv.replica_vault_urls: at most {}",
                crate::replicas::MAX_REPLICAS
            )));
        }
        if let Some(host) = &options.authority_host
            && !host.starts_with("https://")
        {
            return Err(AzureError::Config(format!(
                "encryption.azure_kv.authority_host: \"{host}\" is not an https URL"
            )));
        }
        if options.key_name.is_empty()
            || !options
                .key_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(AzureError::Config(format!(
                "encryption.azure_kv.key_name: \"{}\" is not a Key Vault key name (letters, digits and -)",
                options.key_name
            )));
        }
        if let AuthOptions::ServicePrincipal {
            client_secret_file,
            client_certificate_file,
            ..
        } = &options.auth
            && client_secret_file.is_some() == client_certificate_file.is_some()
        {
            return Err(AzureError::Config(
                "encryption.azure_kv.auth: a service principal needs exactly one of client_secret_file and client_certificate_file".into(),
            ));
        }
        Ok(options)
    }

    /// The host Entra ID tokens come from.
    pub fn authority(&self) -> &str {
        self.authority_host
            .as_deref()
            .unwrap_or("https://login.microsoftonline.com")
            .trim_end_matches('/')
    }
}
