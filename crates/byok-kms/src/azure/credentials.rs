//! Credentials the SDK does not provide without OpenSSL or a process: a bearer
//! token from a file, and the client assertion of certificate auth (an RS256
//! JWT signed with the service principal's key, through aws-lc-rs).

use async_trait::async_trait;
use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::{Error, ErrorKind};
use azure_core::http::ClientMethodOptions;
use azure_core::time::{Duration, OffsetDateTime};
use azure_identity::ClientAssertion;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use std::sync::Arc;

use crate::jwt;
use crate::policy::AccessPolicy;

/// A bearer token kept in a file by something else (a sidecar, a workload
/// identity agent). Read on every use, so a refreshed file takes effect at once.
#[derive(Debug)]
pub struct TokenFileCredential {
    pub policy: Arc<AccessPolicy>,
    pub path: String,
}

#[async_trait]
impl TokenCredential for TokenFileCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let text = self
            .policy
            .read_credential_text("encryption.azure_kv.auth.token_file", &self.path)
            .map_err(|e| Error::with_message(ErrorKind::Credential, e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::with_message(
                ErrorKind::Credential,
                format!("the token file \"{}\" is empty", self.path),
            ));
        }
        // The file's token has no known expiry; a short one makes the SDK come back soon.
        Ok(AccessToken::new(
            token.to_string(),
            OffsetDateTime::now_utc() + Duration::minutes(5),
        ))
    }
}

/// Signs client assertions with the certificate and PKCS#8 RSA key in one PEM file.
#[derive(Debug)]
pub struct CertificateAssertion {
    pub policy: Arc<AccessPolicy>,
    pub path: String,
    pub client_id: String,
    /// The token endpoint, the assertion's audience.
    pub audience: String,
}

fn credential_error(text: String) -> Error {
    Error::with_message(ErrorKind::Credential, text)
}

impl CertificateAssertion {
    /// Checks the file now, so a bad file fails at configuration time.
    pub fn check(&self) -> Result<(), String> {
        self.material().map(|_| ())
    }

    fn material(&self) -> Result<(Vec<u8>, aws_lc_rs::signature::RsaKeyPair), String> {
        let pem = self
            .policy
            .read_credential_file(
                "encryption.azure_kv.auth.client_certificate_file",
                &self.path,
            )
            .map_err(|e| e.to_string())?;
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| format!("\"{}\" holds no PEM certificate", self.path))?;
        let pair = jwt::rsa_key_from_pem(&pem, &format!("\"{}\"", self.path))?;
        Ok((cert.to_vec(), pair))
    }

    fn assertion(&self) -> Result<String, String> {
        let (cert, pair) = self.material()?;
        let thumbprint = digest(&SHA1_FOR_LEGACY_USE_ONLY, &cert);
        let header = serde_json::json!({
            "alg": "RS256", "typ": "JWT", "x5t": B64URL.encode(thumbprint.as_ref())
        });
        let now = jwt::now_seconds();
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| "no randomness".to_string())?;
        let claims = serde_json::json!({
            "aud": self.audience, "iss": self.client_id, "sub": self.client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "nbf": now, "iat": now, "exp": now + 600,
        });
        jwt::sign_rs256(&pair, &header, &claims)
    }
}

#[async_trait]
impl ClientAssertion for CertificateAssertion {
    async fn secret(
        &self,
        _options: Option<ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        self.assertion().map_err(credential_error)
    }
}
