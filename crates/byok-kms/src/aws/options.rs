//! The `aws_kms` block of a tenant's configuration (the guide's shape, plus
//! what a real deployment needs).
//!
//! ```yaml
//! aws_kms:
//!   key_arn: "arn:aws:kms:us-east-1:123456789:key/abc-123"   # key id, ARN or alias
//!   role_arn: "arn:aws:iam::123456789:role/byok-access"       # optional: assumed through STS
//!   external_id: "unique-external-id-12345"                  # optional, with role_arn
//!   region: "us-east-1"                                       # optional when key_arn is an ARN
//!   endpoint_url: "https://kms.us-east-1.amazonaws.com"       # optional: PrivateLink, emulators
//!   replica_key_arns: ["arn:aws:kms:us-west-2:123456789:key/mrk-..."]  # optional, tried in order
//!   replica_endpoint_urls: {"us-west-2": "https://..."}       # optional, per replica Region
//!   profile: "tenant-a"                                       # optional: profile in the server's AWS files
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::AwsError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsOptions {
    pub key_arn: String,
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub session_name: Option<String>,
    /// A named profile of the server's AWS shared config/credentials files, so
    /// tenants can use different credentials without any secret in SQL.
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub replica_key_arns: Vec<String>,
    #[serde(default)]
    pub replica_endpoint_urls: BTreeMap<String, String>,
}

/// Whether `region` looks like an AWS Region name (`us-east-1`, `cn-north-1`):
/// the SDK builds the endpoint's host name from it.
pub fn is_region_name(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 40
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The Region of a KMS ARN (`arn:aws:kms:REGION:ACCOUNT:key/...` or `alias/...`).
pub fn region_of_arn(arn: &str) -> Option<String> {
    let mut parts = arn.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_partition), Some("kms"), Some(region)) if is_region_name(region) => {
            Some(region.to_string())
        }
        _ => None,
    }
}

impl AwsOptions {
    pub fn parse(block: &Map<String, Value>) -> Result<Self, AwsError> {
        let options: AwsOptions = serde_json::from_value(Value::Object(block.clone()))
            .map_err(|e| AwsError::config(format!("encryption.aws_kms: {e}")))?;
        if options.external_id.is_some() && options.role_arn.is_none() {
            return Err(AwsError::config(
                "encryption.aws_kms.external_id needs role_arn",
            ));
        }
        if let Some(url) = &options.endpoint_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(AwsError::config(format!(
                "encryption.aws_kms.endpoint_url: \"{url}\" is not an http(s) URL"
            )));
        }
        for region in options
            .region
            .iter()
            .chain(options.replica_endpoint_urls.keys())
        {
            if !is_region_name(region) {
                return Err(AwsError::config(format!(
                    "encryption.aws_kms: \"{region}\" is not an AWS Region name"
                )));
            }
        }
        Ok(options)
    }

    /// The Region to call: `region`, else the one in `key_arn`, else the environment's.
    pub fn primary_region(&self) -> Result<String, AwsError> {
        if let Some(region) = &self.region {
            return Ok(region.clone());
        }
        if let Some(region) = region_of_arn(&self.key_arn) {
            return Ok(region);
        }
        std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .map_err(|_| {
                AwsError::config(
                    "encryption.aws_kms: no Region: give region, a key ARN, or set AWS_REGION for the server"
                )
            })
    }
}
