//! The error every provider's own error type converts into. The SQL layer maps
//! `kind` to a SQLSTATE; `message` and `detail` are shown to the user, so they
//! never carry key material, credentials or plaintext.

use byok_core::config::ProviderKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The master key (or a version of it) does not exist.
    KeyNotFound,
    /// The key manager refused: permissions, credentials.
    AccessDenied,
    /// The master key (version) exists but is disabled or scheduled for deletion.
    KeyDisabled,
    /// The wrapped key does not open: wrong master key, wrong tenant binding, or
    /// a modified blob.
    UnwrapFailed,
    /// The key manager could not be reached or is not working.
    Unavailable,
    /// The key manager throttled us past our retry budget.
    Throttled,
    /// The provider's configuration or local files are wrong.
    Misconfigured,
    /// The provider is known but not part of this build.
    NotSupported,
    /// The tenant's configuration asks for something the server's policy does
    /// not allow (a credential file outside byok.credential_directories, an
    /// endpoint not in byok.allowed_endpoints, plain http).
    NotPermitted,
}

impl ErrorKind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::KeyNotFound,
        ErrorKind::AccessDenied,
        ErrorKind::KeyDisabled,
        ErrorKind::UnwrapFailed,
        ErrorKind::Unavailable,
        ErrorKind::Throttled,
        ErrorKind::Misconfigured,
        ErrorKind::NotSupported,
        ErrorKind::NotPermitted,
    ];

    /// Its name, as serialized (`key_disabled`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::KeyNotFound => "key_not_found",
            ErrorKind::AccessDenied => "access_denied",
            ErrorKind::KeyDisabled => "key_disabled",
            ErrorKind::UnwrapFailed => "unwrap_failed",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Misconfigured => "misconfigured",
            ErrorKind::NotSupported => "not_supported",
            ErrorKind::NotPermitted => "not_permitted",
        }
    }

    /// Failures of reaching the key manager, as opposed to its refusals. Only these
    /// let the shared cache serve a key past its TTL (the grace period): a refusal
    /// (revoked access, disabled key) must take effect.
    pub fn is_availability(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Throttled)
    }

    /// A key manager's "no" about a key (access denied, the key disabled or
    /// missing, a wrapped key that does not open), as opposed to its being
    /// unreachable: final, never routed around.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            ErrorKind::AccessDenied
                | ErrorKind::KeyDisabled
                | ErrorKind::KeyNotFound
                | ErrorKind::UnwrapFailed
        )
    }

    /// The key manager could not be reached at all. Only this sends a call
    /// to a replica or the backup: a throttled key manager is reachable, and
    /// may be refusing the key behind its throttling (AWS throttles before it
    /// looks at the key's state).
    pub fn is_unreachable(self) -> bool {
        self == ErrorKind::Unavailable
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub provider: ProviderKind,
    pub kind: ErrorKind,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ProviderError {
    pub fn new(provider: ProviderKind, kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            provider,
            kind,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// With whatever detail and hint there are: the end of each back end's
    /// conversion of its own error.
    #[cfg(any(feature = "aws", feature = "azure", feature = "gcp", feature = "vault"))]
    pub(crate) fn with_any(mut self, detail: Option<String>, hint: Option<&str>) -> Self {
        self.detail = detail.or(self.detail);
        self.hint = hint.map(str::to_string).or(self.hint);
        self
    }
}

impl ProviderError {
    /// A refusal by the server's policy ([`crate::policy`]), for provider `kind`.
    pub fn from_policy(provider: ProviderKind, e: crate::policy::PolicyError) -> Self {
        let hint = e.hint();
        ProviderError::new(provider, ErrorKind::NotPermitted, e.to_string()).with_hint(hint)
    }
}

/// An error's chain of causes on one line, each cause once: addresses, TLS
/// reasons, the service's codes. Callers only pass errors that hold no secret
/// (clients never put credentials or key material in their errors).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    // Some SDKs add line breaks and troubleshooting links; keep one line.
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_kinds_in_declaration_order_with_their_serialized_names() {
        for (index, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index);
            assert_eq!(
                serde_json::to_string(kind).unwrap(),
                format!("\"{}\"", kind.name())
            );
        }
    }
}
