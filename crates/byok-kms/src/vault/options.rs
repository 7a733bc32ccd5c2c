//! The `vault` block of a tenant's configuration.
//!
//! ```yaml
//! vault:
//!   address: "https://vault.example:8200"
//!   replica_addresses: ["https://vault-dr.example:8200"]   # optional: tried in order
//!                                    # when the address cannot be reached (never on a refusal)
//!   mount: "transit"                 # default
//!   key_name: "byok"                 # a transit key created with derived=true
//!   namespace: "admin/team-a"        # optional (HCP Vault / Enterprise)
//!   ca_cert_file: "/etc/byok/vault-ca.pem"   # optional, extra CA to trust
//!   tls_skip_verify: false           # refused unless allow_insecure_tls is also true
//!   auth:
//!     method: "approle"              # token | approle | kubernetes
//!     mount: "approle"               # optional, the auth mount
//!     role_id: "..."                 # approle
//!     secret_id_file: "/etc/byok/secret-id"    # approle: the secret id, in a file
//!     token_file: "/etc/byok/token"  # token: the token, in a file (never inline in SQL)
//!     role: "byok"                   # kubernetes
//!     jwt_file: "/var/run/secrets/kubernetes.io/serviceaccount/token"   # kubernetes
//! ```

use serde::Deserialize;
use serde_json::{Map, Value};

use super::VaultError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultOptions {
    pub address: String,
    /// Standby or DR clusters holding the same transit keys, tried in order
    /// when `address` cannot be reached.
    #[serde(default)]
    pub replica_addresses: Vec<String>,
    #[serde(default = "default_mount")]
    pub mount: String,
    pub key_name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub ca_cert_file: Option<String>,
    #[serde(default)]
    pub tls_skip_verify: bool,
    #[serde(default)]
    pub allow_insecure_tls: bool,
    pub auth: AuthOptions,
}

fn default_mount() -> String {
    "transit".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthOptions {
    Token {
        token_file: String,
    },
    Approle {
        #[serde(default = "approle_mount")]
        mount: String,
        role_id: String,
        secret_id_file: String,
    },
    Kubernetes {
        #[serde(default = "kubernetes_mount")]
        mount: String,
        role: String,
        #[serde(default = "kubernetes_jwt_file")]
        jwt_file: String,
    },
}

fn approle_mount() -> String {
    "approle".into()
}

fn kubernetes_mount() -> String {
    "kubernetes".into()
}

fn kubernetes_jwt_file() -> String {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

impl VaultOptions {
    pub fn parse(block: &Map<String, Value>) -> Result<Self, VaultError> {
        let options: VaultOptions = serde_json::from_value(Value::Object(block.clone()))
            .map_err(|e| VaultError::Config(format!("encryption.vault: {e}")))?;
        let is_url = |a: &str| a.starts_with("https://") || a.starts_with("http://");
        if !is_url(&options.address) {
            return Err(VaultError::Config(format!(
                "encryption.vault.address: \"{}\" is not an http(s) URL",
                options.address
            )));
        }
        if let Some(bad) = options.replica_addresses.iter().find(|a| !is_url(a)) {
            return Err(VaultError::Config(format!(
                "encryption.vault.replica_addresses: \"{bad}\" is not an http(s) URL"
            )));
        }
        if options.replica_addresses.len() > crate::replicas::MAX_REPLICAS {
            return Err(VaultError::Config(format!(
                "encryption.vault.replica_addresses: at most {}",
                crate::replicas::MAX_REPLICAS
            )));
        }
        if options.tls_skip_verify && !options.allow_insecure_tls {
            return Err(VaultError::Config(
                "encryption.vault.tls_skip_verify: refused; it disables server authentication. Give ca_cert_file instead, or set allow_insecure_tls: true to accept the risk".into(),
            ));
        }
        Ok(options)
    }
}
