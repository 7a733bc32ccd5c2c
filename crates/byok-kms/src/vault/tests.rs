use serde_json::json;

use super::errors::VaultError;
use super::options::{AuthOptions, VaultOptions};
use crate::error::ErrorKind;

fn block(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn approle_block_parses_with_defaults() {
    let o = VaultOptions::parse(&block(json!({
        "address": "https://vault.example:8200", "key_name": "byok",
        "auth": {"method": "approle", "role_id": "r", "secret_id_file": "/s"}
    })))
    .unwrap();
    assert_eq!(o.mount, "transit");
    assert!(matches!(o.auth, AuthOptions::Approle { ref mount, .. } if mount == "approle"));
}

#[test]
fn insecure_tls_needs_an_explicit_opt_in_and_tokens_are_never_inline() {
    let base = json!({"address": "https://v:8200", "key_name": "k", "auth": {"method": "token", "token_file": "/t"}});
    let mut skip = base.clone();
    skip["tls_skip_verify"] = json!(true);
    assert!(VaultOptions::parse(&block(skip.clone())).is_err());
    skip["allow_insecure_tls"] = json!(true);
    assert!(VaultOptions::parse(&block(skip)).is_ok());
    let mut inline = base.clone();
    inline["auth"] = json!({"method": "token", "token": "s.secret"});
    assert!(
        VaultOptions::parse(&block(inline)).is_err(),
        "an inline token is refused"
    );
    let mut bad = base;
    bad["address"] = json!("vault:8200");
    assert!(VaultOptions::parse(&block(bad)).is_err());
}

#[test]
fn replica_addresses_are_urls_and_few() {
    let base = json!({"address": "https://v:8200", "key_name": "k",
        "auth": {"method": "token", "token_file": "/t"}});
    let with = |replicas: serde_json::Value| {
        let mut b = base.clone();
        b["replica_addresses"] = replicas;
        VaultOptions::parse(&block(b))
    };
    assert_eq!(
        with(json!(["https://dr:8200"])).unwrap().replica_addresses,
        ["https://dr:8200"]
    );
    assert!(
        VaultOptions::parse(&block(base.clone()))
            .unwrap()
            .replica_addresses
            .is_empty()
    );
    assert!(with(json!(["dr:8200"])).is_err());
    assert!(with(json!("https://dr:8200")).is_err());
    assert!(
        with(json!([
            "https://a",
            "https://b",
            "https://c",
            "https://d",
            "https://e"
        ]))
        .is_err()
    );
}

#[test]
fn api_errors_map_to_kinds() {
    let api = |status, msg: &str| VaultError::Api {
        operation: "decrypt",
        status,
        errors: vec![msg.to_string()],
    };
    assert_eq!(
        api(403, "permission denied").kind(),
        ErrorKind::AccessDenied
    );
    let login = VaultError::Api {
        operation: "Kubernetes login",
        status: 400,
        errors: vec!["error validating token: token is expired".to_string()],
    };
    assert_eq!(login.kind(), ErrorKind::AccessDenied);
    assert_eq!(
        api(400, "encryption key not found").kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        api(
            400,
            "ciphertext or signature version is disallowed by policy (too old)"
        )
        .kind(),
        ErrorKind::KeyDisabled
    );
    assert_eq!(
        api(400, "cipher: message authentication failed").kind(),
        ErrorKind::UnwrapFailed
    );
    assert_eq!(api(503, "Vault is sealed").kind(), ErrorKind::Unavailable);
}
