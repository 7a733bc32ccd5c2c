//! Options and error mapping. The calls themselves are tested against moto
//! through the extension (tests/scripts/aws_kms.sh).

use serde_json::json;

use super::errors::kind_of_code;
use super::options::{AwsOptions, region_of_arn};
use crate::error::ErrorKind;

fn block(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn guide_block_parses_and_region_comes_from_the_arn() {
    let o = AwsOptions::parse(&block(json!({
        "key_arn": "arn:aws:kms:us-east-1:123456789:key/abc-123",
        "role_arn": "arn:aws:iam::123456789:role/byok-access",
        "external_id": "unique-external-id-12345"
    })))
    .unwrap();
    assert_eq!(o.primary_region().unwrap(), "us-east-1");
    assert_eq!(o.external_id.as_deref(), Some("unique-external-id-12345"));
}

#[test]
fn bad_blocks_are_refused() {
    for bad in [
        json!({"key_arn": "k", "colour": "red"}),
        json!({"role_arn": "r"}),
        json!({"key_arn": "k", "external_id": "x"}),
        json!({"key_arn": "k", "endpoint_url": "ftp://x"}),
        json!({"key_arn": "k", "replica_key_arns": "not a list"}),
    ] {
        assert!(AwsOptions::parse(&block(bad.clone())).is_err(), "{bad}");
    }
}

#[test]
fn regions_of_arns() {
    assert_eq!(
        region_of_arn("arn:aws:kms:eu-west-1:1:key/x").as_deref(),
        Some("eu-west-1")
    );
    assert_eq!(
        region_of_arn("arn:aws:kms:us-west-2:1:alias/x").as_deref(),
        Some("us-west-2")
    );
    assert_eq!(region_of_arn("alias/x"), None);
    assert_eq!(region_of_arn("1234abcd-12ab"), None);
}

#[test]
fn statuses_without_a_code_map_to_codes() {
    use super::errors::code_of_status;
    assert_eq!(kind_of_code(code_of_status(403)), ErrorKind::AccessDenied);
    assert_eq!(kind_of_code(code_of_status(429)), ErrorKind::Throttled);
    assert_eq!(kind_of_code(code_of_status(503)), ErrorKind::Unavailable);
    assert_eq!(code_of_status(400), "Unknown");
}

#[test]
fn error_codes_map_to_kinds() {
    assert_eq!(
        kind_of_code("AccessDeniedException"),
        ErrorKind::AccessDenied
    );
    assert_eq!(kind_of_code("DisabledException"), ErrorKind::KeyDisabled);
    assert_eq!(
        kind_of_code("KMSInvalidStateException"),
        ErrorKind::KeyDisabled
    );
    assert_eq!(kind_of_code("NotFoundException"), ErrorKind::KeyNotFound);
    assert_eq!(
        kind_of_code("IncorrectKeyException"),
        ErrorKind::UnwrapFailed
    );
    assert_eq!(
        kind_of_code("InvalidCiphertextException"),
        ErrorKind::UnwrapFailed
    );
    assert_eq!(kind_of_code("ThrottlingException"), ErrorKind::Throttled);
    assert_eq!(kind_of_code("KMSInternalException"), ErrorKind::Unavailable);
}
