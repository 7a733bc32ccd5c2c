//! RS256 JSON Web Tokens, for the assertions some key managers' identity
//! services take (Entra ID's client assertion, Google's JWT bearer grant).
//! Signing is aws-lc-rs's RSASSA-PKCS1-v1_5 with SHA-256.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

/// The RSA key in a PEM text ("BEGIN PRIVATE KEY", PKCS#8). `what` names the source in errors.
pub fn rsa_key_from_pem(pem: &[u8], what: &str) -> Result<RsaKeyPair, String> {
    let key = PrivatePkcs8KeyDer::from_pem_slice(pem)
        .map_err(|_| format!("{what} holds no PKCS#8 private key (\"BEGIN PRIVATE KEY\")"))?;
    RsaKeyPair::from_pkcs8(key.secret_pkcs8_der())
        .map_err(|e| format!("the private key in {what} is not a usable RSA key: {e}"))
}

/// `header.claims.signature`, base64url without padding.
pub fn sign_rs256(
    key: &RsaKeyPair,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<String, String> {
    let signing_input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the assertion failed".to_string())?;
    Ok(format!("{signing_input}.{}", B64URL.encode(signature)))
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_pem_is_refused_with_its_source() {
        let err = rsa_key_from_pem(b"not pem", "\"/etc/byok/sa.json\"").unwrap_err();
        assert!(err.contains("/etc/byok/sa.json"), "{err}");
    }
}
