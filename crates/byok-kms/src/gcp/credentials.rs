//! Access tokens for Cloud KMS: the service-account JWT bearer grant (RFC 7523)
//! to the key file's `token_uri`, or a token kept in a file by something else.
//!
//! (google-cloud-auth's own service-account credentials send self-signed JWTs
//! instead of asking `token_uri`; the grant is what the guide's set-up and
//! private `token_uri` endpoints expect, and what the tests' stand-in checks.)

use crate::policy::Service;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::{CacheableResource, CredentialsProvider, EntityTag};
use google_cloud_auth::errors::CredentialsError;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use std::sync::Arc;

use crate::jwt;
use crate::policy::AccessPolicy;

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a service-account JSON key that the grant needs.
#[derive(Deserialize)]
struct ServiceAccountKey {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: Zeroizing<String>,
    private_key_id: String,
    token_uri: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Zeroizing<String>,
    expires_in: u64,
}

#[derive(Deserialize)]
struct TokenError {
    error: String,
    #[serde(default)]
    error_description: String,
}

fn bearer(token: &str) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| CredentialsError::from_msg(false, "the access token is not a valid header"))?;
    value.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, value);
    Ok(CacheableResource::New {
        entity_tag: EntityTag::new(),
        data: headers,
    })
}

#[derive(Debug)]
pub struct JwtGrantCredentials {
    pub policy: Arc<AccessPolicy>,
    pub key_file: String,
    pub http: reqwest::Client,
    /// The current token and when to fetch the next (a minute before it expires).
    cached: Mutex<Option<(Zeroizing<String>, Instant)>>,
}

impl JwtGrantCredentials {
    pub fn new(
        policy: Arc<AccessPolicy>,
        key_file: String,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let credentials = JwtGrantCredentials {
            policy,
            key_file,
            http,
            cached: Mutex::new(None),
        };
        credentials.read_key()?; // a bad file fails at configuration time
        Ok(credentials)
    }

    fn read_key(&self) -> Result<ServiceAccountKey, String> {
        let text = self
            .policy
            .read_credential_text("encryption.gcp_kms.auth.key_file", &self.key_file)
            .map_err(|e| e.to_string())?;
        let key: ServiceAccountKey = serde_json::from_str(&text).map_err(|e| {
            format!(
                "\"{}\" is not a service-account JSON key: {e}",
                self.key_file
            )
        })?;
        // The key file names where its grant goes: held to the same endpoint rules.
        self.policy
            .check_endpoint(
                "the key file's token_uri",
                &key.token_uri,
                Service::GcpToken,
            )
            .map_err(|e| e.to_string())?;
        if key.kind != "service_account" {
            return Err(format!(
                "\"{}\" is a \"{}\" credential, not a service-account key",
                self.key_file, key.kind
            ));
        }
        jwt::rsa_key_from_pem(
            key.private_key.as_bytes(),
            &format!("\"{}\"", self.key_file),
        )?;
        Ok(key)
    }

    async fn fetch(&self) -> Result<(Zeroizing<String>, Duration), CredentialsError> {
        let key = self
            .read_key()
            .map_err(|e| CredentialsError::from_msg(false, e))?;
        let signer = jwt::rsa_key_from_pem(key.private_key.as_bytes(), "the key file")
            .map_err(|e| CredentialsError::from_msg(false, e))?;
        let now = jwt::now_seconds();
        let assertion = jwt::sign_rs256(
            &signer,
            &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": key.private_key_id}),
            &serde_json::json!({
                "iss": key.client_email, "scope": SCOPE, "aud": key.token_uri,
                "iat": now, "exp": now + 3600,
            }),
        )
        .map_err(|e| CredentialsError::from_msg(false, e))?;
        let response = self
            .http
            .post(&key.token_uri)
            .form(&[("grant_type", JWT_BEARER), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| {
                CredentialsError::from_msg(
                    true,
                    format!(
                        "token_uri {} could not be reached: {}",
                        key.token_uri,
                        crate::error::error_chain(&e)
                    ),
                )
            })?;
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            let reason = serde_json::from_slice::<TokenError>(&body)
                .map(|e| format!("{}: {}", e.error, e.error_description))
                .unwrap_or_else(|_| "no error description".into());
            return Err(CredentialsError::from_msg(
                status.is_server_error(),
                format!(
                    "token_uri {} answered {}: {reason} (service account {})",
                    key.token_uri,
                    status.as_u16(),
                    key.client_email
                ),
            ));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            CredentialsError::from_msg(false, "token_uri answered without an access_token")
        })?;
        Ok((answer.access_token, Duration::from_secs(answer.expires_in)))
    }
}

impl CredentialsProvider for JwtGrantCredentials {
    async fn headers(
        &self,
        _extensions: http::Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, refresh_at)) = cached.as_ref()
            && Instant::now() < *refresh_at
        {
            return bearer(token);
        }
        let (token, lifetime) = self.fetch().await?;
        let refresh_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(60));
        let headers = bearer(&token);
        *cached = Some((token, refresh_at));
        headers
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}

/// A bearer token kept fresh in a file by something else; re-read on every use.
#[derive(Debug)]
pub struct TokenFileCredentials {
    pub policy: Arc<AccessPolicy>,
    pub path: String,
}

impl CredentialsProvider for TokenFileCredentials {
    async fn headers(
        &self,
        _extensions: http::Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        let text = self
            .policy
            .read_credential_text("encryption.gcp_kms.auth.token_file", &self.path)
            .map_err(|e| CredentialsError::from_msg(false, e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CredentialsError::from_msg(
                false,
                format!("the token file \"{}\" is empty", self.path),
            ));
        }
        bearer(token)
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}
