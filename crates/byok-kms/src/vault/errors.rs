//! Vault failures mapped to the provider error kinds, with Vault's own message
//! in the detail. Tokens and secret ids never appear: they are read from files
//! and only ever sent in headers.

use vaultrs::error::ClientError;

use crate::error::{ErrorKind, ProviderError, error_chain};
use byok_core::config::ProviderKind;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault {operation} failed (HTTP {status})")]
    Api {
        operation: &'static str,
        status: u16,
        errors: Vec<String>,
    },
    #[error("Vault could not be reached for {operation}")]
    Unreachable {
        operation: &'static str,
        cause: String,
    },
    #[error("Vault configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Policy(crate::policy::PolicyError),
    #[error("unexpected answer from Vault: {0}")]
    Protocol(String),
}

impl VaultError {
    pub fn from_client(operation: &'static str, e: ClientError) -> Self {
        match e {
            ClientError::APIError { code, errors } => VaultError::Api {
                operation,
                status: code,
                errors,
            },
            ClientError::FileReadError { path, .. } => {
                VaultError::Config(format!("cannot read \"{path}\""))
            }
            ClientError::FileNotFoundError { path } => {
                VaultError::Config(format!("file \"{path}\" not found"))
            }
            ClientError::ParseCertificateError { path, .. } => {
                VaultError::Config(format!("ca_cert_file \"{path}\" is not a PEM certificate"))
            }
            other => VaultError::Unreachable {
                operation,
                cause: error_chain(&other),
            },
        }
    }

    pub fn is_forbidden(&self) -> bool {
        matches!(self, VaultError::Api { status: 403, .. })
    }

    fn text(&self) -> String {
        match self {
            VaultError::Api { errors, .. } => errors.join("; "),
            _ => String::new(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            VaultError::Api {
                status, operation, ..
            } => {
                let text = self.text().to_lowercase();
                match status {
                    401 | 403 => ErrorKind::AccessDenied,
                    // A login refused (an expired or unknown service-account
                    // token, a bad role): a credential problem, like a 403.
                    400 if operation.ends_with("login") => ErrorKind::AccessDenied,
                    404 => ErrorKind::KeyNotFound,
                    429 => ErrorKind::Throttled,
                    503 => ErrorKind::Unavailable,
                    500..=599 => ErrorKind::Unavailable,
                    _ if text.contains("not found") || text.contains("no existing key") => {
                        ErrorKind::KeyNotFound
                    }
                    _ if text.contains("too old") || text.contains("disallowed by policy") => {
                        ErrorKind::KeyDisabled
                    }
                    _ if text.contains("message authentication failed")
                        || text.contains("cipher: message authentication")
                        || text.contains("invalid ciphertext") =>
                    {
                        ErrorKind::UnwrapFailed
                    }
                    _ => ErrorKind::Misconfigured,
                }
            }
            VaultError::Unreachable { .. } => ErrorKind::Unavailable,
            VaultError::Config(_) => ErrorKind::Misconfigured,
            VaultError::Policy(_) => ErrorKind::NotPermitted,
            VaultError::Protocol(_) => ErrorKind::Unavailable,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        if let VaultError::Policy(e) = self {
            return Some(e.hint());
        }
        match self.kind() {
            ErrorKind::AccessDenied => Some(
                "the Vault policy must allow update on MOUNT/datakey/plaintext/KEY, MOUNT/decrypt/KEY, MOUNT/encrypt/KEY, MOUNT/rewrap/KEY and read on MOUNT/keys/KEY",
            ),
            ErrorKind::KeyNotFound => {
                Some("check key_name and mount, and that the transit key exists")
            }
            ErrorKind::KeyDisabled => Some(
                "the ciphertext's key version is below min_decryption_version; lower it, or rewrap first with CALL byok.rotate_master_key(tenant, key)",
            ),
            ErrorKind::UnwrapFailed => Some("the data key was wrapped for another tenant or key"),
            ErrorKind::Unavailable => {
                Some("check the Vault address, TLS settings and that Vault is unsealed")
            }
            _ => None,
        }
    }
}

impl From<VaultError> for ProviderError {
    fn from(e: VaultError) -> Self {
        let kind = e.kind();
        let detail = match &e {
            VaultError::Api { errors, .. } if !errors.is_empty() => {
                Some(format!("Vault says: {}", errors.join("; ")))
            }
            VaultError::Unreachable { cause, .. } => Some(cause.clone()),
            _ => None,
        };
        let hint = e.hint();
        ProviderError::new(ProviderKind::Vault, kind, e.to_string()).with_any(detail, hint)
    }
}
