//! Azure failures mapped to the provider error kinds, with the service's own
//! error code and message in the detail. Client secrets, certificates and tokens
//! never appear: they are read from files and only ever sent in request bodies
//! and headers.

use std::time::Duration;

use azure_core::error::ErrorKind as AzureKind;
use azure_core::http::headers::{HeaderName, RETRY_AFTER};
use byok_core::config::ProviderKind;

use crate::error::{ErrorKind, ProviderError, error_chain};

#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    #[error("Azure Key Vault {operation} failed (HTTP {status}{})", code_suffix(.code, .inner))]
    Api {
        operation: &'static str,
        status: u16,
        code: Option<String>,
        inner: Option<String>,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("Microsoft Entra ID did not issue a token for Azure Key Vault")]
    Credential { cause: String },
    #[error("Azure Key Vault could not be reached for {operation}")]
    Unreachable {
        operation: &'static str,
        cause: String,
    },
    #[error("Azure Key Vault throttled {operation} past byok.kms_timeout_ms")]
    Throttled {
        operation: &'static str,
        retry_after: Option<Duration>,
    },
    #[error("Azure Key Vault configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Policy(crate::policy::PolicyError),
    #[error("unexpected answer from Azure Key Vault: {0}")]
    Protocol(String),
    #[error("the data key was wrapped for another tenant or data key id")]
    Binding,
}

fn code_suffix(code: &Option<String>, inner: &Option<String>) -> String {
    match (code, inner) {
        (Some(c), Some(i)) => format!(", {c}/{i}"),
        (Some(c), None) => format!(", {c}"),
        _ => String::new(),
    }
}

/// `{"error": {"code", "message", "innererror": {"code"}}}`, Key Vault's error body.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
    innererror: Option<InnerError>,
}

#[derive(serde::Deserialize)]
struct InnerError {
    code: Option<String>,
}

impl AzureError {
    pub fn from_sdk(operation: &'static str, e: azure_core::Error) -> Self {
        match e.kind() {
            AzureKind::HttpResponse {
                status,
                error_code,
                raw_response,
            } => {
                let mut code = error_code.clone();
                let (mut inner, mut message, mut retry_after) = (None, None, None);
                if let Some(raw) = raw_response {
                    if let Ok(body) = serde_json::from_slice::<ErrorBody>(raw.body().as_ref()) {
                        code = body.error.code.or(code);
                        message = body.error.message;
                        inner = body.error.innererror.and_then(|i| i.code);
                    }
                    retry_after = retry_after_of(raw.headers());
                }
                AzureError::Api {
                    operation,
                    status: u16::from(*status),
                    code,
                    inner,
                    message,
                    retry_after,
                }
            }
            AzureKind::Credential => {
                // A token endpoint that cannot be reached is an outage, not a refusal.
                if chain_has_kind(&e, |k| matches!(k, AzureKind::Connection | AzureKind::Io)) {
                    AzureError::Unreachable {
                        operation: "token request",
                        cause: error_chain(&e),
                    }
                } else {
                    AzureError::Credential {
                        cause: error_chain(&e),
                    }
                }
            }
            AzureKind::Connection | AzureKind::Io => AzureError::Unreachable {
                operation,
                cause: error_chain(&e),
            },
            // The SDK's own refusal of a challenge naming another resource.
            _ if e.to_string().contains("verify_challenge_resource") => {
                AzureError::Config(format!(
                    "the vault's authentication challenge names another resource than vault_url's host ({}); for a vault reached by IP address set verify_challenge_resource: false",
                    error_chain(&e)
                ))
            }
            _ => AzureError::Protocol(format!("{operation}: {}", error_chain(&e))),
        }
    }

    /// How long the service asked us to wait, for the answers worth retrying.
    pub fn retry_after(&self) -> Option<Option<Duration>> {
        match self {
            AzureError::Api {
                status: 429 | 503,
                retry_after,
                ..
            } => Some(*retry_after),
            AzureError::Api {
                status: 500 | 502 | 504,
                ..
            }
            | AzureError::Unreachable { .. } => Some(None),
            _ => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AzureError::Api {
                status,
                code,
                inner,
                operation,
                ..
            } => match (status, inner.as_deref(), code.as_deref()) {
                (403, Some("KeyDisabled"), _) => ErrorKind::KeyDisabled,
                (401 | 403, _, _) => ErrorKind::AccessDenied,
                (404, _, _) => ErrorKind::KeyNotFound,
                (429, _, _) => ErrorKind::Throttled,
                (400, _, _) if *operation == "unwrapKey" => ErrorKind::UnwrapFailed,
                (500..=599, _, _) => ErrorKind::Unavailable,
                _ => ErrorKind::Misconfigured,
            },
            AzureError::Credential { .. } => ErrorKind::AccessDenied,
            AzureError::Unreachable { .. } => ErrorKind::Unavailable,
            AzureError::Throttled { .. } => ErrorKind::Throttled,
            AzureError::Config(_) => ErrorKind::Misconfigured,
            AzureError::Policy(_) => ErrorKind::NotPermitted,
            AzureError::Protocol(_) => ErrorKind::Unavailable,
            AzureError::Binding => ErrorKind::UnwrapFailed,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            AzureError::Policy(e) => Some(e.hint()),
            AzureError::Credential { .. } => Some(
                "check auth.tenant_id, auth.client_id and the secret or certificate file; AADSTS codes are explained at https://login.microsoftonline.com/error",
            ),
            AzureError::Throttled { .. } => Some(
                "Key Vault limits requests per vault; raise byok.kms_timeout_ms or spread tenants over vaults",
            ),
            _ => match self.kind() {
                ErrorKind::AccessDenied => Some(
                    "the service principal needs the key permissions get, wrapKey and unwrapKey on the vault (access policy) or the Key Vault Crypto Service Encryption User role (RBAC)",
                ),
                ErrorKind::KeyDisabled => Some(
                    "enable the key version again (az keyvault key set-attributes --enabled true), or rotate and rewrap with CALL byok.rotate_master_key(tenant, key)",
                ),
                ErrorKind::KeyNotFound => Some(
                    "check vault_url, key_name and key_version, and that the key was not deleted",
                ),
                ErrorKind::UnwrapFailed => Some(
                    "the data key was wrapped by another key or version, or for another tenant",
                ),
                ErrorKind::Unavailable => Some(
                    "check vault_url, authority_host, the network path and TLS (ca_cert_file for a private CA)",
                ),
                _ => None,
            },
        }
    }
}

/// `Retry-After` in seconds (or an HTTP date, which the SDK's parser does not
/// need here), or Azure's `x-ms-retry-after-ms` / `retry-after-ms`.
fn retry_after_of(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    for name in ["x-ms-retry-after-ms", "retry-after-ms"] {
        if let Some(ms) = headers
            .get_optional_str(&HeaderName::from_static(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    headers
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn chain_has_kind(e: &azure_core::Error, wanted: impl Fn(&AzureKind) -> bool) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(az) = s.downcast_ref::<azure_core::Error>()
            && wanted(az.kind())
        {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<AzureError> for ProviderError {
    fn from(e: AzureError) -> Self {
        let kind = e.kind();
        let detail = match &e {
            AzureError::Api { message, .. } => {
                message.as_ref().map(|m| format!("Key Vault says: {m}"))
            }
            AzureError::Credential { cause } | AzureError::Unreachable { cause, .. } => {
                Some(cause.clone())
            }
            AzureError::Throttled { retry_after, .. } => Some(match retry_after {
                Some(d) => format!(
                    "the last answer was 429 with Retry-After {} s, beyond the time left",
                    d.as_secs_f64()
                ),
                None => "the last answer was 429 Too Many Requests".to_string(),
            }),
            _ => None,
        };
        let hint = e.hint();
        ProviderError::new(ProviderKind::AzureKv, kind, e.to_string()).with_any(detail, hint)
    }
}
