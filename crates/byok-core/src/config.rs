//! Tenant configuration: the customer's `byok_config.yaml` document (as JSON),
//! checked field by field so that every error names the field at fault.
//!
//! ```yaml
//! customer: acme_corp
//! tenant_id: tenant_12345
//! encryption:
//!   provider: "local"            # local | aws_kms | azure_kv | gcp_kms | vault
//!   local: { key_id: "acme-cmk-1" }
//!   key_rotation: { enabled: true, interval_days: 90 }
//!   cache_config: { ttl_seconds: 86400, max_entries: 1000, grace_period_seconds: 0,
//!                   revocation_check_seconds: 30 }
//!   audit: { log_all_operations: true, alert_on_failures: true }
//!   backup:                      # optional: every data key also wrapped here (escrow)
//!     provider: "vault"
//!     vault: { address: "https://vault-dr:8200", key_name: "acme-escrow" }
//! ```
//!
//! `key_rotation`, `cache_config` and `audit` sit under `encryption` as in the
//! guide; they are also accepted at the top level (but not in both places).

use serde_json::{Map, Value};

use crate::crypto::MAX_TENANT_ID_LEN;

pub const DEFAULT_ROTATION_INTERVAL_DAYS: u32 = 90;
pub const DEFAULT_CACHE_TTL_SECONDS: u32 = 86_400;
pub const DEFAULT_CACHE_MAX_ENTRIES: u32 = 1_000;
pub const DEFAULT_GRACE_PERIOD_SECONDS: u32 = 0;

const MAX_TTL_SECONDS: i64 = 31_536_000;
const MAX_CACHE_ENTRIES: i64 = 1_000_000;
const MAX_INTERVAL_DAYS: i64 = 3_650;
const MAX_GRACE_SECONDS: i64 = 2_592_000;
const MAX_REVOCATION_CHECK_SECONDS: i64 = 86_400;
const MAX_CUSTOMER_LEN: usize = 200;
const MAX_KEY_ID_LEN: usize = 2_048;

/// The key managers byok_pg knows by name. Whether one is available in this
/// build is the provider layer's business, not the parser's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Local,
    AwsKms,
    AzureKv,
    GcpKms,
    Vault,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::Local,
        ProviderKind::AwsKms,
        ProviderKind::AzureKv,
        ProviderKind::GcpKms,
        ProviderKind::Vault,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::AwsKms => "aws_kms",
            ProviderKind::AzureKv => "azure_kv",
            ProviderKind::GcpKms => "gcp_kms",
            ProviderKind::Vault => "vault",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The field of the provider block that names the master key.
    pub fn master_key_field(self) -> &'static str {
        match self {
            ProviderKind::Local => "key_id",
            ProviderKind::AwsKms => "key_arn",
            ProviderKind::AzureKv | ProviderKind::GcpKms | ProviderKind::Vault => "key_name",
        }
    }

    /// Other fields a block must have for this provider.
    fn other_required_fields(self) -> &'static [&'static str] {
        match self {
            ProviderKind::AzureKv => &["vault_url"],
            ProviderKind::Vault => &["address"],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    pub enabled: bool,
    pub interval_days: u32,
}

/// A tenant's cache settings. `None` means the server's default
/// (`byok.cache_ttl_seconds`, `byok.cache_max_entries`,
/// `byok.revocation_check_seconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    pub ttl_seconds: Option<u32>,
    pub max_entries: Option<u32>,
    pub grace_period_seconds: u32,
    /// How often the master key behind cached keys is re-checked (0: never).
    pub revocation_check_seconds: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPolicy {
    pub log_all_operations: bool,
    pub alert_on_failures: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub tenant_id: String,
    pub customer: String,
    pub provider: ProviderKind,
    pub master_key_id: String,
    /// The provider's block as given (e.g. the `aws_kms` object).
    pub provider_options: Map<String, Value>,
    pub rotation: RotationPolicy,
    pub cache: CachePolicy,
    pub audit: AuditPolicy,
    /// The guide's monitors, with this tenant's overrides (`monitoring_rules`).
    pub monitoring: crate::monitors::Rules,
    /// A second master key every data key is also wrapped under (`backup`).
    pub backup: Option<BackupKey>,
}

/// `encryption.backup`: a second master key, on the same or another key
/// manager, that every data key of the tenant is also wrapped under. It is
/// used to unwrap only while the primary key manager is unreachable (never
/// when it refuses), or for every operation once DR is activated.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupKey {
    pub provider: ProviderKind,
    pub master_key_id: String,
    /// The backup provider's block as given.
    pub provider_options: Map<String, Value>,
}

/// A configuration problem: `field` is a dotted path such as
/// `encryption.cache_config.ttl_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// Checks a tenant id: 1 to 128 characters from `A-Z a-z 0-9 _ . : @ -`, starting
/// with a letter or digit. Tenant ids appear in AADs, audit rows and messages,
/// so a narrow alphabet keeps them unambiguous and harmless to print.
pub fn check_tenant_id(tenant_id: &str) -> Result<(), String> {
    if tenant_id.is_empty() {
        return Err("must not be empty".into());
    }
    if tenant_id.len() > MAX_TENANT_ID_LEN {
        return Err(format!("must be at most {MAX_TENANT_ID_LEN} characters"));
    }
    let first_ok = tenant_id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = tenant_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-'));
    if !first_ok || !rest_ok {
        return Err(
            "must start with a letter or digit and contain only letters, digits, '_', '.', ':', '@' and '-'"
                .into(),
        );
    }
    Ok(())
}

/// The keys a document may have at its top level.
const TOP_LEVEL_FIELDS: &[&str] = &[
    "customer",
    "tenant_id",
    "encryption",
    "key_rotation",
    "cache_config",
    "audit",
    "monitoring_rules",
];

impl TenantConfig {
    /// Parses and checks a tenant's configuration document.
    ///
    /// The checks run in a fixed order and the first that fails is the error
    /// returned, so the order of the calls below is part of the behaviour
    /// (tests compare the messages): unknown top-level keys, identity
    /// (`tenant_id`, `customer`), then `encryption` and its provider block,
    /// then the optional sections (`key_rotation`, `cache_config`, `audit`).
    pub fn from_json(doc: &Value) -> Result<Self, ConfigError> {
        let root = doc
            .as_object()
            .ok_or_else(|| err("(document)", "must be a JSON object"))?;
        check_keys(root, "", TOP_LEVEL_FIELDS)?;
        let tenant_id = read_tenant_id(root)?;
        let customer = read_customer(root)?;
        let encryption = encryption_section(root)?;
        let provider = read_provider(encryption)?;
        let (block_path, block) = provider_block(encryption, provider)?;
        let master_key_id = read_master_key_id(block, &block_path, provider)?;
        for field in provider.other_required_fields() {
            required_str(block, &block_path, field)?;
        }
        let rotation = rotation_policy(section(root, encryption, "key_rotation")?)?;
        let cache = cache_policy(section(root, encryption, "cache_config")?)?;
        let audit = audit_policy(section(root, encryption, "audit")?)?;
        let monitoring = monitoring_rules(section(root, encryption, "monitoring_rules")?)?;
        let backup = backup_key(encryption, provider, master_key_id, block)?;
        Ok(TenantConfig {
            tenant_id: tenant_id.to_string(),
            customer: customer.to_string(),
            provider,
            master_key_id: master_key_id.to_string(),
            provider_options: block.clone(),
            rotation,
            cache,
            audit,
            monitoring,
            backup,
        })
    }
}

/// `encryption.backup`: `provider` and that provider's block, like the
/// primary's. A backup under the very key the primary uses protects nothing,
/// so it is refused.
fn backup_key(
    encryption: &Map<String, Value>,
    primary: ProviderKind,
    primary_key: &str,
    primary_block: &Map<String, Value>,
) -> Result<Option<BackupKey>, ConfigError> {
    let Some(value) = encryption.get("backup") else {
        return Ok(None);
    };
    let path = "encryption.backup";
    let backup = value
        .as_object()
        .ok_or_else(|| err(path, "must be an object"))?;
    let mut allowed: Vec<&str> = vec!["provider"];
    allowed.extend(ProviderKind::ALL.iter().map(|p| p.name()));
    check_keys(backup, path, &allowed)?;
    let provider_name = required_str(backup, path, "provider")?;
    let provider = ProviderKind::from_name(provider_name).ok_or_else(|| {
        err(
            "encryption.backup.provider",
            format!(
                "unknown provider \"{}\"; expected one of: {}",
                printable(provider_name),
                ProviderKind::ALL.map(|p| p.name()).join(", ")
            ),
        )
    })?;
    if let Some(other) = backup
        .keys()
        .find(|k| k.as_str() != "provider" && k.as_str() != provider.name())
    {
        return Err(err(
            &format!("{path}.{}", printable(other)),
            format!(
                "the backup's provider is \"{}\"; only its block may be given",
                provider.name()
            ),
        ));
    }
    let block_path = format!("{path}.{}", provider.name());
    let block = backup
        .get(provider.name())
        .ok_or_else(|| {
            err(
                &block_path,
                format!(
                    "is required when the backup's provider is \"{}\"",
                    provider.name()
                ),
            )
        })?
        .as_object()
        .ok_or_else(|| err(&block_path, "must be an object"))?;
    for (key, value) in block {
        if value.is_null() {
            return Err(err(&format!("{block_path}.{key}"), "must not be null"));
        }
    }
    if provider == ProviderKind::Local {
        check_keys(block, &block_path, &["key_id"])?;
    }
    let master_key_id = read_master_key_id(block, &block_path, provider)?;
    for field in provider.other_required_fields() {
        required_str(block, &block_path, field)?;
    }
    if provider == primary && master_key_id == primary_key && block == primary_block {
        return Err(err(
            path,
            "names the primary master key itself; a backup must be another key (another key manager, account, location or cluster)",
        ));
    }
    Ok(Some(BackupKey {
        provider,
        master_key_id: master_key_id.to_string(),
        provider_options: block.clone(),
    }))
}

/// `tenant_id`: required, in the alphabet of [`check_tenant_id`].
fn read_tenant_id(root: &Map<String, Value>) -> Result<&str, ConfigError> {
    let tenant_id = required_str(root, "", "tenant_id")?;
    check_tenant_id(tenant_id).map_err(|p| err("tenant_id", p))?;
    Ok(tenant_id)
}

/// `customer`: required, at most [`MAX_CUSTOMER_LEN`] bytes.
fn read_customer(root: &Map<String, Value>) -> Result<&str, ConfigError> {
    let customer = required_str(root, "", "customer")?;
    if customer.len() > MAX_CUSTOMER_LEN {
        return Err(err(
            "customer",
            format!("must be at most {MAX_CUSTOMER_LEN} characters"),
        ));
    }
    Ok(customer)
}

/// `encryption`: a required object whose keys are `provider`, a block per
/// provider name and the sections that may also sit at the top level.
fn encryption_section(root: &Map<String, Value>) -> Result<&Map<String, Value>, ConfigError> {
    let encryption = root
        .get("encryption")
        .ok_or_else(|| err("encryption", "is required"))?
        .as_object()
        .ok_or_else(|| err("encryption", "must be an object"))?;
    let mut allowed: Vec<&str> = vec![
        "provider",
        "key_rotation",
        "cache_config",
        "audit",
        "monitoring_rules",
        "backup",
    ];
    allowed.extend(ProviderKind::ALL.iter().map(|p| p.name()));
    check_keys(encryption, "encryption", &allowed)?;
    Ok(encryption)
}

/// `encryption.provider`: one of the names of [`ProviderKind`].
fn read_provider(encryption: &Map<String, Value>) -> Result<ProviderKind, ConfigError> {
    let provider_name = required_str(encryption, "encryption", "provider")?;
    ProviderKind::from_name(provider_name).ok_or_else(|| {
        err(
            "encryption.provider",
            format!(
                "unknown provider \"{}\"; expected one of: {}",
                printable(provider_name),
                ProviderKind::ALL.map(|p| p.name()).join(", ")
            ),
        )
    })
}

/// The chosen provider's block (`encryption.<provider>`) and its path. Its
/// fields are checked in full by the provider; here only nulls are refused,
/// and for `local` (whose only field is the key id) unknown fields.
fn provider_block(
    encryption: &Map<String, Value>,
    provider: ProviderKind,
) -> Result<Section<'_>, ConfigError> {
    let block_path = format!("encryption.{}", provider.name());
    let block = encryption
        .get(provider.name())
        .ok_or_else(|| {
            err(
                &block_path,
                format!("is required when provider is \"{}\"", provider.name()),
            )
        })?
        .as_object()
        .ok_or_else(|| err(&block_path, "must be an object"))?;
    for (key, value) in block {
        if value.is_null() {
            return Err(err(&format!("{block_path}.{key}"), "must not be null"));
        }
    }
    if provider == ProviderKind::Local {
        check_keys(block, &block_path, &["key_id"])?;
    }
    Ok((block_path, block))
}

/// The master key's name in the provider block (the field
/// [`ProviderKind::master_key_field`] names): at most [`MAX_KEY_ID_LEN`]
/// bytes, no control characters.
fn read_master_key_id<'a>(
    block: &'a Map<String, Value>,
    block_path: &str,
    provider: ProviderKind,
) -> Result<&'a str, ConfigError> {
    let field = provider.master_key_field();
    let master_key_id = required_str(block, block_path, field)?;
    if master_key_id.len() > MAX_KEY_ID_LEN {
        return Err(err(
            &join(block_path, field),
            format!("must be at most {MAX_KEY_ID_LEN} characters"),
        ));
    }
    if master_key_id.chars().any(char::is_control) {
        return Err(err(
            &join(block_path, field),
            "must not contain control characters",
        ));
    }
    Ok(master_key_id)
}

/// `key_rotation`: off unless enabled; every [`DEFAULT_ROTATION_INTERVAL_DAYS`] by default.
fn rotation_policy(section: Option<Section<'_>>) -> Result<RotationPolicy, ConfigError> {
    let Some((path, obj)) = section else {
        return Ok(RotationPolicy {
            enabled: false,
            interval_days: DEFAULT_ROTATION_INTERVAL_DAYS,
        });
    };
    check_keys(obj, &path, &["enabled", "interval_days"])?;
    Ok(RotationPolicy {
        enabled: opt_bool(obj, &path, "enabled", false)?,
        interval_days: opt_int(
            obj,
            &path,
            "interval_days",
            DEFAULT_ROTATION_INTERVAL_DAYS,
            1,
            MAX_INTERVAL_DAYS,
        )?,
    })
}

/// `cache_config`: a TTL or size left out means the server's default
/// (`byok.cache_ttl_seconds`, `byok.cache_max_entries`), so those stay `None`.
fn cache_policy(section: Option<Section<'_>>) -> Result<CachePolicy, ConfigError> {
    let Some((path, obj)) = section else {
        return Ok(CachePolicy {
            ttl_seconds: None,
            max_entries: None,
            grace_period_seconds: DEFAULT_GRACE_PERIOD_SECONDS,
            revocation_check_seconds: None,
        });
    };
    check_keys(
        obj,
        &path,
        &[
            "ttl_seconds",
            "max_entries",
            "grace_period_seconds",
            "revocation_check_seconds",
        ],
    )?;
    Ok(CachePolicy {
        ttl_seconds: present_int(obj, &path, "ttl_seconds", 1, MAX_TTL_SECONDS)?,
        max_entries: present_int(obj, &path, "max_entries", 1, MAX_CACHE_ENTRIES)?,
        grace_period_seconds: opt_int(
            obj,
            &path,
            "grace_period_seconds",
            DEFAULT_GRACE_PERIOD_SECONDS,
            0,
            MAX_GRACE_SECONDS,
        )?,
        revocation_check_seconds: present_int(
            obj,
            &path,
            "revocation_check_seconds",
            0,
            MAX_REVOCATION_CHECK_SECONDS,
        )?,
    })
}

/// `audit`: everything logged and alerted on unless turned off.
fn audit_policy(section: Option<Section<'_>>) -> Result<AuditPolicy, ConfigError> {
    let Some((path, obj)) = section else {
        return Ok(AuditPolicy {
            log_all_operations: true,
            alert_on_failures: true,
        });
    };
    check_keys(obj, &path, &["log_all_operations", "alert_on_failures"])?;
    Ok(AuditPolicy {
        log_all_operations: opt_bool(obj, &path, "log_all_operations", true)?,
        alert_on_failures: opt_bool(obj, &path, "alert_on_failures", true)?,
    })
}

/// `monitoring_rules`: the guide's monitors unless overridden.
fn monitoring_rules(section: Option<Section<'_>>) -> Result<crate::monitors::Rules, ConfigError> {
    match section {
        None => Ok(crate::monitors::default_rules()),
        Some((path, obj)) => crate::monitors::parse_rules(&path, obj)
            .map_err(|(field, problem)| ConfigError { field, problem }),
    }
}

/// A located section: its dotted path and its object.
type Section<'a> = (String, &'a Map<String, Value>);

/// A section that may sit under `encryption` (the guide's place) or at the top level.
fn section<'a>(
    root: &'a Map<String, Value>,
    encryption: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<Section<'a>>, ConfigError> {
    let (path, value) = match (encryption.get(name), root.get(name)) {
        (Some(_), Some(_)) => {
            return Err(err(
                name,
                format!(
                    "is given both at the top level and under encryption; keep encryption.{name}"
                ),
            ));
        }
        (Some(v), None) => (format!("encryption.{name}"), v),
        (None, Some(v)) => (name.to_string(), v),
        (None, None) => return Ok(None),
    };
    let obj = value
        .as_object()
        .ok_or_else(|| err(&path, "must be an object"))?;
    Ok(Some((path, obj)))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Refuses unknown keys, so a typo such as `ttl_second` is an error, not a silent default.
fn check_keys(obj: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(err(
                &join(path, &printable(key)),
                format!("unknown field; expected one of: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

fn required_str<'a>(
    obj: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'a str, ConfigError> {
    let field = join(path, key);
    match obj.get(key) {
        None | Some(Value::Null) => Err(err(&field, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err(&field, "must not be empty")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(err(&field, "must be a string")),
    }
}

fn opt_bool(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match obj.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(&join(path, key), "must be true or false")),
    }
}

/// An integer field with a default when absent.
fn opt_int(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
    default: u32,
    min: i64,
    max: i64,
) -> Result<u32, ConfigError> {
    Ok(present_int(obj, path, key, min, max)?.unwrap_or(default))
}

/// An integer field in `min..=max` (both within `u32`), `None` when absent.
/// A field given as `null` is not absent: it is refused like any non-integer.
fn present_int(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
    min: i64,
    max: i64,
) -> Result<Option<u32>, ConfigError> {
    let Some(value) = obj.get(key) else {
        return Ok(None);
    };
    match value.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n as u32)),
        _ => Err(err(
            &join(path, key),
            format!("must be an integer between {min} and {max}"),
        )),
    }
}

/// Field names and provider names from user input are echoed in messages; keep
/// them short and free of control characters.
pub(crate) fn printable(s: &str) -> String {
    if s.is_empty() {
        // An empty JSON key must still name something in the error.
        return "\"\"".to_string();
    }
    let cleaned: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
    if cleaned.len() < s.len() {
        format!("{cleaned}...")
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The metrics table stores a provider as `kind as u32` and reads it back
    /// as `ALL[n]`; and the wire (serde) name is the catalog name.
    #[test]
    fn provider_kinds_listed_in_declaration_order_under_one_name() {
        for (index, kind) in ProviderKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index, "{kind:?} out of order in ALL");
            let wire = serde_json::to_value(kind).unwrap();
            assert_eq!(
                wire,
                json!(kind.name()),
                "{kind:?}: serde and name() differ"
            );
        }
    }

    fn guide_doc() -> Value {
        json!({
            "customer": "acme_corp",
            "tenant_id": "tenant_12345",
            "encryption": {
                "provider": "local",
                "local": {"key_id": "acme-cmk-1"},
                "key_rotation": {"enabled": true, "interval_days": 90},
                "cache_config": {"ttl_seconds": 86400, "max_entries": 1000},
                "audit": {"log_all_operations": true, "alert_on_failures": true}
            }
        })
    }

    fn error_of(doc: Value) -> ConfigError {
        TenantConfig::from_json(&doc).unwrap_err()
    }

    #[test]
    fn guide_shaped_document_parses() {
        let c = TenantConfig::from_json(&guide_doc()).unwrap();
        assert_eq!(c.tenant_id, "tenant_12345");
        assert_eq!(c.customer, "acme_corp");
        assert_eq!(c.provider, ProviderKind::Local);
        assert_eq!(c.master_key_id, "acme-cmk-1");
        assert_eq!(
            c.rotation,
            RotationPolicy {
                enabled: true,
                interval_days: 90
            }
        );
        assert_eq!(c.cache.ttl_seconds, Some(86_400));
        assert_eq!(c.cache.max_entries, Some(1_000));
        assert_eq!(c.cache.grace_period_seconds, 0);
        assert!(c.audit.log_all_operations && c.audit.alert_on_failures);
    }

    #[test]
    fn guide_aws_block_parses_with_its_master_key() {
        let doc = json!({
            "customer": "acme_corp", "tenant_id": "tenant_12345",
            "encryption": {"provider": "aws_kms", "aws_kms": {
                "key_arn": "arn:aws:kms:us-east-1:123456789:key/abc-123",
                "role_arn": "arn:aws:iam::123456789:role/byok-access",
                "external_id": "unique-external-id-12345"}}
        });
        let c = TenantConfig::from_json(&doc).unwrap();
        assert_eq!(c.provider, ProviderKind::AwsKms);
        assert_eq!(
            c.master_key_id,
            "arn:aws:kms:us-east-1:123456789:key/abc-123"
        );
        assert_eq!(
            c.provider_options["external_id"],
            "unique-external-id-12345"
        );
    }

    #[test]
    fn defaults_apply_when_sections_are_absent() {
        let doc = json!({"customer": "c", "tenant_id": "t1",
            "encryption": {"provider": "local", "local": {"key_id": "k"}}});
        let c = TenantConfig::from_json(&doc).unwrap();
        assert!(!c.rotation.enabled);
        assert_eq!(c.rotation.interval_days, DEFAULT_ROTATION_INTERVAL_DAYS);
        // No cache_config: the server's defaults apply.
        assert_eq!(c.cache.ttl_seconds, None);
        assert_eq!(c.cache.max_entries, None);
    }

    #[test]
    fn top_level_sections_are_accepted_but_not_twice() {
        let mut doc = guide_doc();
        let cache = doc["encryption"]
            .as_object_mut()
            .unwrap()
            .remove("cache_config")
            .unwrap();
        doc.as_object_mut()
            .unwrap()
            .insert("cache_config".into(), cache.clone());
        assert_eq!(
            TenantConfig::from_json(&doc).unwrap().cache.max_entries,
            Some(1000)
        );
        doc["encryption"]
            .as_object_mut()
            .unwrap()
            .insert("cache_config".into(), cache);
        assert_eq!(error_of(doc).field, "cache_config");
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = fn(&mut Value);
        let cases: Vec<(Mutation, &str)> = vec![
            (|d| d["tenant_id"] = json!(""), "tenant_id"),
            (
                |d| d["tenant_id"] = json!("a'; drop table x; --"),
                "tenant_id",
            ),
            (|d| d["tenant_id"] = json!(7), "tenant_id"),
            (
                |d| {
                    d.as_object_mut().unwrap().remove("tenant_id");
                },
                "tenant_id",
            ),
            (
                |d| {
                    d.as_object_mut().unwrap().remove("customer");
                },
                "customer",
            ),
            (
                |d| {
                    d.as_object_mut().unwrap().remove("encryption");
                },
                "encryption",
            ),
            (
                |d| d["encryption"]["provider"] = json!("rot13"),
                "encryption.provider",
            ),
            (
                |d| {
                    d["encryption"].as_object_mut().unwrap().remove("provider");
                },
                "encryption.provider",
            ),
            (
                |d| {
                    d["encryption"].as_object_mut().unwrap().remove("local");
                },
                "encryption.local",
            ),
            (
                |d| d["encryption"]["local"] = json!({}),
                "encryption.local.key_id",
            ),
            (
                |d| d["encryption"]["local"]["key_id"] = json!("  "),
                "encryption.local.key_id",
            ),
            (
                |d| d["encryption"]["local"]["colour"] = json!("red"),
                "encryption.local.colour",
            ),
            (
                |d| d["encryption"]["cache_config"]["ttl_seconds"] = json!(0),
                "encryption.cache_config.ttl_seconds",
            ),
            (
                |d| d["encryption"]["cache_config"]["ttl_seconds"] = json!("86400"),
                "encryption.cache_config.ttl_seconds",
            ),
            (
                |d| d["encryption"]["cache_config"]["max_entries"] = json!(-1),
                "encryption.cache_config.max_entries",
            ),
            (
                |d| d["encryption"]["cache_config"]["ttl_second"] = json!(5),
                "encryption.cache_config.ttl_second",
            ),
            (
                |d| d["encryption"]["key_rotation"]["interval_days"] = json!(1.5),
                "encryption.key_rotation.interval_days",
            ),
            (
                |d| d["encryption"]["key_rotation"]["enabled"] = json!("yes"),
                "encryption.key_rotation.enabled",
            ),
            (
                |d| d["encryption"]["audit"]["alert_on_failures"] = json!(1),
                "encryption.audit.alert_on_failures",
            ),
            (|d| d["surprise"] = json!(1), "surprise"),
        ];
        for (mutate, field) in cases {
            let mut doc = guide_doc();
            mutate(&mut doc);
            assert_eq!(error_of(doc.clone()).field, field, "document: {doc}");
        }
        assert_eq!(error_of(json!([1, 2])).field, "(document)");
    }

    /// Found by the tenant_config fuzz target: an empty key gave an error with an empty field.
    #[test]
    fn an_empty_key_is_named_in_the_error() {
        let doc = serde_json::json!({"": {"provider": "local"}});
        let e = error_of(doc);
        assert_eq!(e.field, "\"\"");
        assert!(e.to_string().starts_with("\"\": unknown field"), "{e}");
        let doc = serde_json::json!({"customer": "c", "tenant_id": "t",
            "encryption": {"provider": "local", "local": {"key_id": "k"}, "": 1}});
        assert_eq!(error_of(doc).field, "encryption.\"\"");
    }

    #[test]
    fn other_providers_need_their_fields() {
        let doc = json!({"customer": "c", "tenant_id": "t",
            "encryption": {"provider": "azure_kv", "azure_kv": {"key_name": "platform-cmk"}}});
        assert_eq!(error_of(doc).field, "encryption.azure_kv.vault_url");
        let doc = json!({"customer": "c", "tenant_id": "t",
            "encryption": {"provider": "vault", "vault": {"address": "https://v:8200"}}});
        assert_eq!(error_of(doc).field, "encryption.vault.key_name");
    }

    #[test]
    fn a_backup_key_on_another_provider() {
        let mut doc = guide_doc();
        doc["encryption"]["backup"] = json!({"provider": "vault",
            "vault": {"address": "https://vault-dr:8200", "key_name": "acme-escrow"}});
        let c = TenantConfig::from_json(&doc).unwrap();
        let backup = c.backup.unwrap();
        assert_eq!(backup.provider, ProviderKind::Vault);
        assert_eq!(backup.master_key_id, "acme-escrow");
        assert_eq!(backup.provider_options["address"], "https://vault-dr:8200");
        assert!(
            TenantConfig::from_json(&guide_doc())
                .unwrap()
                .backup
                .is_none()
        );
    }

    #[test]
    fn a_bad_backup_is_named() {
        let cases = [
            (json!("vault"), "encryption.backup"),
            (json!({}), "encryption.backup.provider"),
            (json!({"provider": "rot13"}), "encryption.backup.provider"),
            (json!({"provider": "vault"}), "encryption.backup.vault"),
            (
                json!({"provider": "vault", "vault": {"key_name": "k"}}),
                "encryption.backup.vault.address",
            ),
            (
                json!({"provider": "local", "local": {"key_id": "k"}, "vault": {}}),
                "encryption.backup.vault",
            ),
            (
                json!({"provider": "local", "local": {"key_id": "k", "x": 1}}),
                "encryption.backup.local.x",
            ),
            (
                json!({"provider": "local", "local": {"key_id": "acme-cmk-1"}}),
                "encryption.backup",
            ),
            (
                json!({"provider": "local", "surprise": 1}),
                "encryption.backup.surprise",
            ),
        ];
        for (backup, field) in cases {
            let mut doc = guide_doc();
            doc["encryption"]["backup"] = backup.clone();
            assert_eq!(error_of(doc).field, field, "backup: {backup}");
        }
        // Another key id under the same local file is a different key.
        let mut doc = guide_doc();
        doc["encryption"]["backup"] =
            json!({"provider": "local", "local": {"key_id": "acme-escrow"}});
        assert!(TenantConfig::from_json(&doc).is_ok());
    }

    #[test]
    fn tenant_id_alphabet() {
        for ok in ["t", "tenant_12345", "acme:prod@eu-1.a"] {
            assert!(check_tenant_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-t", "a b", "t\n", "ünï", "a\"b", &"x".repeat(129)] {
            assert!(check_tenant_id(bad).is_err(), "{bad:?}");
        }
    }
}
