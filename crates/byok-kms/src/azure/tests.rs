use serde_json::json;

use super::errors::AzureError;
use super::options::{AuthOptions, AzureOptions};
use super::{binding, version_of};
use crate::error::ErrorKind;
use crate::provider::KeyContext;

fn block(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

fn base() -> serde_json::Value {
    json!({
        "vault_url": "https://byok-vault-acme.vault.azure.net",
        "key_name": "platform-cmk",
        "auth": {"method": "service_principal", "tenant_id": "t", "client_id": "c",
                 "client_secret_file": "/etc/byok/secret"}
    })
}

#[test]
fn service_principal_block_parses_with_defaults() {
    let o = AzureOptions::parse(&block(base())).unwrap();
    assert!(
        o.verify_challenge_resource,
        "the challenge check is on by default"
    );
    assert_eq!(o.authority(), "https://login.microsoftonline.com");
    assert_eq!(o.key_version, None);
    assert!(
        matches!(o.auth, AuthOptions::ServicePrincipal { ref client_id, .. } if client_id == "c")
    );
}

#[test]
fn bad_blocks_are_refused_with_the_field() {
    let cases = [
        ("vault_url", json!("http://vault.example"), "vault_url"),
        ("key_name", json!("has/slash"), "key_name"),
        (
            "authority_host",
            json!("http://login.example"),
            "authority_host",
        ),
        ("client_secret", json!("inline"), "client_secret"),
    ];
    for (field, value, expected) in cases {
        let mut doc = base();
        if field == "client_secret" {
            doc["auth"][field] = value;
        } else {
            doc[field] = value;
        }
        let err = AzureOptions::parse(&block(doc)).unwrap_err().to_string();
        assert!(err.contains(expected), "{field}: {err}");
    }
    // Exactly one of secret file and certificate file.
    let mut both = base();
    both["auth"]["client_certificate_file"] = json!("/etc/byok/sp.pem");
    assert!(AzureOptions::parse(&block(both)).is_err());
    let mut neither = base();
    neither["auth"]
        .as_object_mut()
        .unwrap()
        .remove("client_secret_file");
    assert!(AzureOptions::parse(&block(neither)).is_err());
}

#[test]
fn other_auth_methods_parse() {
    let mut mi = base();
    mi["auth"] = json!({"method": "managed_identity"});
    assert!(AzureOptions::parse(&block(mi)).is_ok());
    let mut tf = base();
    tf["auth"] = json!({"method": "token_file", "token_file": "/run/token"});
    assert!(AzureOptions::parse(&block(tf)).is_ok());
}

#[test]
fn binding_depends_on_tenant_and_key_id() {
    let a = binding(&KeyContext::new("acme", 1));
    assert_eq!(a, binding(&KeyContext::new("acme", 1)));
    assert_ne!(a, binding(&KeyContext::new("acme", 2)));
    assert_ne!(a, binding(&KeyContext::new("acme2", 1)));
    // Length-prefixed: ("ab", ..) and ("a", "b"..) cannot collide.
    assert_ne!(
        binding(&KeyContext::new("ab", 1)),
        binding(&KeyContext::new("a", 1))
    );
}

#[test]
fn version_comes_from_the_kid() {
    assert_eq!(
        version_of(Some(
            "https://v.vault.azure.net/keys/k/78deebed173b48e48f55abf87ed4cf71"
        ))
        .unwrap(),
        "78deebed173b48e48f55abf87ed4cf71"
    );
    assert!(version_of(Some("https://v/keys/k/")).is_err());
    assert!(version_of(None).is_err());
}

#[test]
fn errors_map_to_kinds() {
    let api = |status: u16, code: &str, inner: Option<&str>, operation| AzureError::Api {
        operation,
        status,
        code: Some(code.into()),
        inner: inner.map(str::to_string),
        message: None,
        retry_after: None,
    };
    assert_eq!(
        api(403, "Forbidden", Some("KeyDisabled"), "unwrapKey").kind(),
        ErrorKind::KeyDisabled
    );
    assert_eq!(
        api(403, "Forbidden", Some("AccessDenied"), "wrapKey").kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        api(401, "Unauthorized", None, "get").kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(
        api(404, "KeyNotFound", None, "get").kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        api(400, "BadParameter", None, "unwrapKey").kind(),
        ErrorKind::UnwrapFailed
    );
    assert_eq!(
        api(400, "BadParameter", None, "wrapKey").kind(),
        ErrorKind::Misconfigured
    );
    assert_eq!(
        api(503, "ServiceUnavailable", None, "get").kind(),
        ErrorKind::Unavailable
    );
    assert!(api(429, "Throttled", None, "get").retry_after().is_some());
    assert!(api(404, "KeyNotFound", None, "get").retry_after().is_none());
    assert_eq!(AzureError::Binding.kind(), ErrorKind::UnwrapFailed);
}

#[test]
fn replica_vault_urls_are_https_and_few() {
    let with = |replicas: serde_json::Value| {
        let mut b = base();
        b["replica_vault_urls"] = replicas;
        AzureOptions::parse(&block(b))
    };
    let o = with(json!(["https://byok-vault-acme-dr.vault.azure.net"])).unwrap();
    assert_eq!(
        o.replica_vault_urls,
        ["https://byok-vault-acme-dr.vault.azure.net"]
    );
    assert!(
        AzureOptions::parse(&block(base()))
            .unwrap()
            .replica_vault_urls
            .is_empty()
    );
    for bad in [
        json!(["http://dr.vault.azure.net"]),
        json!("https://dr.vault.azure.net"),
        json!([
            "https://a",
            "https://b",
            "https://c",
            "https://d",
            "https://e"
        ]),
    ] {
        let e = with(bad.clone()).unwrap_err().to_string();
        // (serde names the field only for the values it parsed)
        assert!(
            e.contains("replica_vault_urls") || e.contains("expected a sequence"),
            "{bad}: {e}"
        );
    }
}
