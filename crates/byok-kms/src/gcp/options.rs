//! The `gcp_kms` block of a tenant's configuration.
//!
//! ```yaml
//! gcp_kms:
//!   key_name: "projects/acme-byok/locations/us-east1/keyRings/byok-keyring/cryptoKeys/platform-cmk"
//!   endpoint: "https://cloudkms.googleapis.com"   # optional: regional / PSC endpoints, tests
//!   replica_endpoints: ["https://cloudkms.europe-west4.rep.googleapis.com"]   # optional: the
//!                                    # same key through other endpoints, tried in order when
//!                                    # the endpoint cannot be reached (never on a refusal)
//!   auth:
//!     method: "service_account_key"              # service_account_key | metadata_server | token_file
//!     key_file: "/etc/byok/gcp-sa.json"          # the JSON key; its token_uri gets the JWT grant
//!     token_file: "/run/byok/gcp-token"          # token_file: a bearer token, re-read per use
//! ```

use serde::Deserialize;
use serde_json::{Map, Value};

use super::GcpError;

pub const DEFAULT_ENDPOINT: &str = "https://cloudkms.googleapis.com";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpOptions {
    pub key_name: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Other endpoints serving the same key (a multi-region key's regional
    /// endpoints, a Private Service Connect endpoint), tried in order when
    /// `endpoint` cannot be reached. A key in another location is another
    /// key (Cloud KMS ciphertexts name their key): use `encryption.backup`.
    #[serde(default)]
    pub replica_endpoints: Vec<String>,
    pub auth: AuthOptions,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthOptions {
    ServiceAccountKey { key_file: String },
    MetadataServer,
    TokenFile { token_file: String },
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
pub fn is_crypto_key_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 8
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "keyRings"
        && parts[6] == "cryptoKeys"
        && [1, 3, 5, 7].iter().all(|&i| {
            !parts[i].is_empty()
                && parts[i]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl GcpOptions {
    pub fn parse(block: &Map<String, Value>) -> Result<Self, GcpError> {
        let options: GcpOptions = serde_json::from_value(Value::Object(block.clone()))
            .map_err(|e| GcpError::Config(format!("encryption.gcp_kms: {e}")))?;
        if !is_crypto_key_name(&options.key_name) {
            return Err(GcpError::Config(format!(
                "encryption.gcp_kms.key_name: \"{}\" is not projects/P/locations/L/keyRings/R/cryptoKeys/K",
                options.key_name
            )));
        }
        let is_url = |e: &str| e.starts_with("https://") || e.starts_with("http://");
        if let Some(endpoint) = &options.endpoint
            && !is_url(endpoint)
        {
            return Err(GcpError::Config(format!(
                "encryption.gcp_kms.endpoint: \"{endpoint}\" is not an http(s) URL"
            )));
        }
        if let Some(bad) = options.replica_endpoints.iter().find(|e| !is_url(e)) {
            return Err(GcpError::Config(format!(
                "encryption.gcp_kms.replica_endpoints: \"{bad}\" is not an http(s) URL"
            )));
        }
        if options.replica_endpoints.len() > crate::replicas::MAX_REPLICAS {
            return Err(GcpError::Config(format!(
                "encryption.gcp_kms.replica_endpoints: at most {}",
                crate::replicas::MAX_REPLICAS
            )));
        }
        Ok(options)
    }

    /// The endpoint, then the replicas, without trailing slashes.
    pub fn endpoints(&self) -> Vec<&str> {
        std::iter::once(self.endpoint())
            .chain(
                self.replica_endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/')),
            )
            .collect()
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint
            .as_deref()
            .unwrap_or(DEFAULT_ENDPOINT)
            .trim_end_matches('/')
    }
}
