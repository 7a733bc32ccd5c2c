use serde_json::json;

use super::errors::GcpError;
use super::options::{AuthOptions, GcpOptions, is_crypto_key_name};
use super::{aad, crc, version_of};
use crate::error::ErrorKind;
use crate::provider::KeyContext;
use google_cloud_gax::error::rpc::Code;

const KEY: &str =
    "projects/acme-byok/locations/us-east1/keyRings/byok-keyring/cryptoKeys/platform-cmk";

fn block(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn service_account_block_parses_with_defaults() {
    let o = GcpOptions::parse(&block(json!({
        "key_name": KEY, "auth": {"method": "service_account_key", "key_file": "/etc/byok/sa.json"}
    })))
    .unwrap();
    assert_eq!(o.endpoint(), "https://cloudkms.googleapis.com");
    assert!(matches!(o.auth, AuthOptions::ServiceAccountKey { .. }));
}

#[test]
fn bad_blocks_are_refused_with_the_field() {
    for (doc, field) in [
        (
            json!({"key_name": "platform-cmk", "auth": {"method": "metadata_server"}}),
            "key_name",
        ),
        (
            json!({"key_name": KEY, "endpoint": "cloudkms", "auth": {"method": "metadata_server"}}),
            "endpoint",
        ),
        (
            json!({"key_name": KEY, "auth": {"method": "service_account_key", "private_key": "x"}}),
            "private_key",
        ),
        (json!({"key_name": KEY}), "auth"),
    ] {
        let err = GcpOptions::parse(&block(doc)).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn key_names_are_checked() {
    assert!(is_crypto_key_name(KEY));
    assert!(!is_crypto_key_name(&format!("{KEY}/cryptoKeyVersions/1")));
    assert!(!is_crypto_key_name(
        "projects//locations/l/keyRings/r/cryptoKeys/k"
    ));
    assert!(!is_crypto_key_name(
        "projects/p/locations/l/keyRings/r/cryptoKeys/k'"
    ));
}

#[test]
fn aad_binds_tenant_and_key_id_and_crc_is_castagnoli() {
    assert_ne!(
        aad(&KeyContext::new("acme", 1)),
        aad(&KeyContext::new("acme", 2))
    );
    assert_ne!(
        aad(&KeyContext::new("acme", 1)),
        aad(&KeyContext::new("acme2", 1))
    );
    assert_eq!(crc(b"123456789"), 0xE306_9283);
    assert_eq!(
        version_of(&format!("{KEY}/cryptoKeyVersions/12")).unwrap(),
        "12"
    );
    assert!(version_of(KEY).is_err());
}

#[test]
fn errors_map_to_kinds_and_retries() {
    let api = |code: Code, operation| GcpError::Api {
        operation,
        status: code.name().into(),
        code: Some(code),
        http: None,
        message: String::new(),
    };
    assert_eq!(
        api(Code::PermissionDenied, "encrypt").kind(),
        ErrorKind::AccessDenied
    );
    assert_eq!(api(Code::NotFound, "get").kind(), ErrorKind::KeyNotFound);
    assert_eq!(
        api(Code::FailedPrecondition, "decrypt").kind(),
        ErrorKind::KeyDisabled
    );
    assert_eq!(
        api(Code::InvalidArgument, "decrypt").kind(),
        ErrorKind::UnwrapFailed
    );
    assert_eq!(
        api(Code::InvalidArgument, "encrypt").kind(),
        ErrorKind::Misconfigured
    );
    assert_eq!(
        api(Code::ResourceExhausted, "encrypt").kind(),
        ErrorKind::Throttled
    );
    assert!(api(Code::ResourceExhausted, "encrypt").is_transient());
    assert!(api(Code::Unavailable, "encrypt").is_transient());
    assert!(!api(Code::PermissionDenied, "encrypt").is_transient());
    let integrity = GcpError::Integrity {
        operation: "decrypt",
        what: "the plaintext received",
    };
    assert!(integrity.is_transient());
    assert_eq!(integrity.kind(), ErrorKind::Unavailable);
}

#[test]
fn replica_endpoints_are_urls_and_few() {
    let with = |replicas: serde_json::Value| {
        GcpOptions::parse(&block(json!({
            "key_name": KEY, "replica_endpoints": replicas, "auth": {"method": "metadata_server"}
        })))
    };
    let o = with(json!(["https://cloudkms.europe-west4.rep.googleapis.com/"])).unwrap();
    assert_eq!(
        o.endpoints(),
        [
            "https://cloudkms.googleapis.com",
            "https://cloudkms.europe-west4.rep.googleapis.com"
        ]
    );
    for bad in [
        json!(["cloudkms.europe-west4.rep.googleapis.com"]),
        json!("https://cloudkms.googleapis.com"),
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
            e.contains("replica_endpoints") || e.contains("expected a sequence"),
            "{bad}: {e}"
        );
    }
}
