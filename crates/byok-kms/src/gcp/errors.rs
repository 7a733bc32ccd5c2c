//! Cloud KMS failures mapped to the provider error kinds, with Google's own
//! status and message in the detail. Keys and tokens never appear: the
//! service-account key is read from its file and only its signature is sent.

use byok_core::config::ProviderKind;
use google_cloud_gax::error::rpc::Code;

use crate::error::{ErrorKind, ProviderError, error_chain};

#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    #[error("Cloud KMS {operation} failed ({status})")]
    Api {
        operation: &'static str,
        status: String,
        code: Option<Code>,
        http: Option<u16>,
        message: String,
    },
    #[error("Google did not issue an access token for Cloud KMS")]
    Credential { cause: String, transient: bool },
    #[error("Cloud KMS could not be reached for {operation}")]
    Unreachable {
        operation: &'static str,
        cause: String,
    },
    #[error("Cloud KMS {operation}: the answer failed its CRC32C integrity check")]
    Integrity {
        operation: &'static str,
        what: &'static str,
    },
    #[error("Cloud KMS configuration: {0}")]
    Config(String),
    #[error("unexpected answer from Cloud KMS: {0}")]
    Protocol(String),
}

impl GcpError {
    pub fn from_sdk(operation: &'static str, e: google_cloud_gax::error::Error) -> Self {
        if let Some(status) = e.status() {
            return GcpError::Api {
                operation,
                status: status.code.name().to_string(),
                code: Some(status.code),
                http: e.http_status_code(),
                message: status.message.clone(),
            };
        }
        if e.is_authentication() {
            // A token endpoint that cannot be reached is an outage, not a refusal.
            let mut transient = false;
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if let Some(c) = s.downcast_ref::<google_cloud_auth::errors::CredentialsError>() {
                    transient |= c.is_transient();
                }
                source = s.source();
            }
            return GcpError::Credential {
                cause: error_chain(&e),
                transient,
            };
        }
        if let Some(http) = e.http_status_code() {
            return GcpError::Api {
                operation,
                status: format!("HTTP {http}"),
                code: None,
                http: Some(http),
                message: String::new(),
            };
        }
        if e.is_io() || e.is_connect() || e.is_transport() || e.is_timeout() {
            return GcpError::Unreachable {
                operation,
                cause: error_chain(&e),
            };
        }
        GcpError::Protocol(format!("{operation}: {}", error_chain(&e)))
    }

    /// Failures worth another try (within the timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            GcpError::Api { code, http, .. } => {
                matches!(
                    code,
                    Some(Code::ResourceExhausted | Code::Unavailable | Code::Internal)
                ) || matches!(http, Some(429 | 500 | 502 | 503 | 504))
            }
            GcpError::Unreachable { .. } | GcpError::Integrity { .. } => true,
            GcpError::Credential { transient, .. } => *transient,
            _ => false,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            GcpError::Api {
                code,
                http,
                operation,
                ..
            } => match (code, http) {
                (Some(Code::PermissionDenied | Code::Unauthenticated), _)
                | (None, Some(401 | 403)) => ErrorKind::AccessDenied,
                (Some(Code::NotFound), _) | (None, Some(404)) => ErrorKind::KeyNotFound,
                (Some(Code::FailedPrecondition), _) => ErrorKind::KeyDisabled,
                (Some(Code::ResourceExhausted), _) | (None, Some(429)) => ErrorKind::Throttled,
                (Some(Code::InvalidArgument), _) if *operation == "decrypt" => {
                    ErrorKind::UnwrapFailed
                }
                (Some(Code::Unavailable | Code::Internal | Code::DeadlineExceeded), _)
                | (None, Some(500..=599)) => ErrorKind::Unavailable,
                _ => ErrorKind::Misconfigured,
            },
            GcpError::Credential {
                transient: true, ..
            } => ErrorKind::Unavailable,
            GcpError::Credential { .. } => ErrorKind::AccessDenied,
            GcpError::Unreachable { .. } | GcpError::Integrity { .. } => ErrorKind::Unavailable,
            GcpError::Config(_) => ErrorKind::Misconfigured,
            GcpError::Protocol(_) => ErrorKind::Unavailable,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            GcpError::Credential { .. } => Some(
                "check the service-account key file (a JSON key of an active key) and its token_uri",
            ),
            GcpError::Integrity { .. } => Some(
                "the data was damaged between Cloud KMS and this server; it was retried until byok.kms_timeout_ms",
            ),
            _ => match self.kind() {
                ErrorKind::AccessDenied => Some(
                    "grant the service account roles/cloudkms.cryptoKeyEncrypterDecrypter and roles/cloudkms.viewer on the key",
                ),
                ErrorKind::KeyNotFound => {
                    Some("check key_name, and that the key ring and key exist")
                }
                ErrorKind::KeyDisabled => Some(
                    "enable the key version again, or rotate and re-encrypt with CALL byok.rotate_master_key(tenant, key)",
                ),
                ErrorKind::UnwrapFailed => Some(
                    "the data key was encrypted by another key, or for another tenant (its additional authenticated data differs)",
                ),
                ErrorKind::Throttled => {
                    Some("Cloud KMS quota exceeded; raise the quota or byok.kms_timeout_ms")
                }
                ErrorKind::Unavailable => Some("check the endpoint and the network path"),
                _ => None,
            },
        }
    }
}

impl From<GcpError> for ProviderError {
    fn from(e: GcpError) -> Self {
        let kind = e.kind();
        let detail = match &e {
            GcpError::Api { message, .. } if !message.is_empty() => {
                Some(format!("Cloud KMS says: {message}"))
            }
            GcpError::Credential { cause, .. } | GcpError::Unreachable { cause, .. } => {
                Some(cause.clone())
            }
            GcpError::Integrity { what, .. } => Some(format!("the CRC32C of {what} did not match")),
            _ => None,
        };
        let hint = e.hint();
        ProviderError::new(ProviderKind::GcpKms, kind, e.to_string()).with_any(detail, hint)
    }
}
