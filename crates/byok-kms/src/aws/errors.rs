//! AWS failures mapped to the provider error kinds, with the AWS error code in
//! the detail. Credentials never appear: the SDK's messages name principals and
//! keys, not secrets, and we add only codes and operation names.

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{message}")]
    Service {
        operation: &'static str,
        code: String,
        message: String,
    },
    #[error("AWS KMS could not be reached for {operation}: {reason}")]
    Unreachable {
        operation: &'static str,
        reason: String,
        /// The SDK's error chain (endpoints, credential providers; never secrets).
        cause: String,
    },
    #[error("AWS KMS configuration: {0}")]
    Config(String),
    #[error("unexpected answer from AWS KMS: {0}")]
    Protocol(String),
}

impl AwsError {
    pub fn config(message: impl Into<String>) -> Self {
        AwsError::Config(message.into())
    }

    pub fn protocol(message: &str) -> Self {
        AwsError::Protocol(message.to_string())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AwsError::Service { code, .. } => kind_of_code(code),
            AwsError::Unreachable { .. } => ErrorKind::Unavailable,
            AwsError::Config(_) => ErrorKind::Misconfigured,
            AwsError::Protocol(_) => ErrorKind::Unavailable,
        }
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            AwsError::Service {
                operation, code, ..
            } => Some(format!("AWS error code {code} from {operation}")),
            AwsError::Unreachable { cause, .. } => Some(cause.clone()),
            _ => None,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            AwsError::Service { code, .. } => match kind_of_code(code) {
                ErrorKind::AccessDenied => Some(
                    "the key policy must allow kms:Decrypt, kms:GenerateDataKey, kms:ReEncrypt* and kms:DescribeKey for the platform role",
                ),
                ErrorKind::KeyDisabled => {
                    Some("enable the key (or cancel its deletion) in AWS KMS")
                }
                ErrorKind::KeyNotFound => {
                    Some("check key_arn (key id, ARN or alias) and its Region")
                }
                ErrorKind::UnwrapFailed => Some(
                    "the data key was wrapped by another KMS key or for another tenant; check the tenant's key_arn",
                ),
                ErrorKind::Throttled => Some(
                    "AWS KMS throttled the requests even after retries; raise the quota or byok.kms_timeout_ms",
                ),
                _ => None,
            },
            AwsError::Unreachable { .. } => {
                Some("check the network path to AWS KMS (endpoint_url, PrivateLink, proxies)")
            }
            _ => None,
        }
    }
}

/// The provider error kind of an AWS error code.
pub fn kind_of_code(code: &str) -> ErrorKind {
    match code {
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "MissingAuthenticationToken" => ErrorKind::AccessDenied,
        "DisabledException" | "KMSInvalidStateException" => ErrorKind::KeyDisabled,
        "NotFoundException" => ErrorKind::KeyNotFound,
        "IncorrectKeyException" | "InvalidCiphertextException" => ErrorKind::UnwrapFailed,
        "ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded" => {
            ErrorKind::Throttled
        }
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "InternalFailure" => ErrorKind::Unavailable,
        _ => ErrorKind::Misconfigured,
    }
}

/// The error code implied by an HTTP status, for answers whose body has none.
pub fn code_of_status(status: u16) -> &'static str {
    match status {
        401 | 403 => "AccessDeniedException",
        404 => "NotFoundException",
        429 => "ThrottlingException",
        500..=599 => "KMSInternalException",
        _ => "Unknown",
    }
}

/// Maps an SDK error of `operation`.
pub fn from_sdk<E>(operation: &'static str, e: SdkError<E>) -> crate::error::ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let unreachable = |reason: &str| AwsError::Unreachable {
        operation,
        reason: reason.to_string(),
        cause: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
    };
    let error = match &e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            // A body without a readable code (proxies, emulators) still has a status.
            let code = err
                .code()
                .map(str::to_string)
                .unwrap_or_else(|| code_of_status(service.raw().status().as_u16()).to_string());
            AwsError::Service {
                operation,
                code,
                message: err
                    .message()
                    .map(|m| format!("{operation} failed: {m}"))
                    .unwrap_or_else(|| format!("{operation} failed")),
            }
        }
        SdkError::TimeoutError(_) => unreachable("timed out"),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => unreachable("timed out"),
        SdkError::DispatchFailure(failure) if failure.is_io() => unreachable("connection failed"),
        SdkError::DispatchFailure(_) => unreachable("the request could not be sent"),
        SdkError::ResponseError(_) => unreachable("the response could not be read"),
        _ => unreachable("the request could not be built"),
    };
    error.into()
}
