//! Every failure the extension reports, each with its SQLSTATE, message, and
//! detail/hint where they help. Messages never carry key material, plaintext or
//! credentials; a value that fails authentication is never described byte by byte.
//!
//! | condition                                   | SQLSTATE |
//! |---------------------------------------------|----------|
//! | malformed `byok.encrypted` text literal       | 22P02    |
//! | malformed `byok.encrypted` binary input       | 22P03    |
//! | invalid tenant configuration                | 22023    |
//! | provider named but not in this build        | 0A000    |
//! | unknown tenant or data key                  | 42704    |
//! | other tenant than `byok.tenant`; KMS refused  | 42501    |
//! | tenant not granted to the role; dual control needed | 42501 |
//! | master key without the environment's prefix | 22023    |
//! | authentication failed (tampered, truncated, wrong context or tenant) | 22000 |
//! | stored value structurally malformed          | 22000    |
//! | data key retired, destroyed, or disabled    | 55000    |
//! | decrypted bytes not valid text              | 22021    |
//! | value too large                             | 54000    |
//! | wrapped data key does not unwrap            | 39000    |
//! | key manager unreachable, throttling, or broker timeout | 58000 |
//! | all broker request slots busy past the timeout | 53000 |
//! | not loaded through shared_preload_libraries | 55000    |
//! | key administration on a standby             | 25006    |
//! | key administration on a Citus worker node     | 0A000    |
//! | a distributed statement byok.tenant would not reach; non-default term settings on a Citus table | 0A000 |
//! | local master key file malformed or readable by others | F0000 |

use byok_core::config::ConfigError;
use byok_core::envelope::{FormatError, TextError};
use byok_kms::{ErrorKind, ProviderError};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, Clone)]
pub enum ByokError {
    MalformedText(TextError),
    MalformedBinary(FormatError),
    /// A `bytea` cast to `byok.encrypted` that is not a sealed value (22P02).
    MalformedBytes(FormatError),
    InvalidConfig(ConfigError),
    InvalidArgument {
        message: String,
        hint: Option<String>,
    },
    /// A required argument was NULL (22004).
    NullArgument(&'static str),
    /// A refusal on privilege grounds not covered by a more specific variant (42501).
    NotAllowed {
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// Something named does not exist (42704), when no variant below fits.
    NotFound {
        message: String,
        hint: Option<String>,
    },
    /// An object not in the state an operation needs (55000), when no variant below fits.
    WrongState {
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// A column that does not exist (42703).
    UndefinedColumn(String),
    /// A value or column of the wrong type (42804).
    WrongType {
        message: String,
        hint: String,
    },
    UnknownTenant(String),
    UnknownRole(String),
    UnknownDataKey(u64),
    NoActiveDataKey(String),
    /// A searchable value or a probe for a tenant without an index key.
    NoIndexKey(String),
    /// A key used for the other purpose (a value naming an index key as its
    /// data key, say): never trusted, whatever the value claims.
    WrongKeyPurpose {
        key_id: u64,
        expected: &'static str,
    },
    TenantMismatchOnEncrypt {
        requested: String,
        session: String,
    },
    TenantMismatchOnDecrypt {
        session: String,
    },
    /// A probe (or a searchable seal's term) for a tenant other than `byok.tenant`.
    TenantMismatchOnSearch {
        requested: String,
        session: String,
    },
    TenantNotGranted {
        tenant: String,
        role: String,
    },
    /// A session whose login role holds CREATEROLE using a tenant not granted
    /// to that login role directly.
    CreateRoleSession {
        role: String,
        tenant: String,
    },
    /// Decrypting a value whose data key belongs to a tenant the role is not
    /// granted. The message names the key, not the tenant: a crafted envelope
    /// must not tell an ungranted role which tenant owns which key.
    DataKeyNotGranted {
        dek_id: u64,
        /// For the audit trail only, never shown.
        tenant: String,
        role: String,
    },
    DualControlRequired {
        operation: &'static str,
        tenant: String,
        args: String,
    },
    SegregationViolation {
        master_key_id: String,
        key_prefix: String,
        environment: &'static str,
    },
    AuthenticationFailed {
        dek_id: u64,
        tenant: Option<String>,
    },
    KeyDestroyed {
        dek_id: u64,
        tenant: Option<String>,
    },
    /// The tenant's index keys were destroyed (crypto-shredding): no term
    /// can be computed, so no probe and no searchable seal.
    IndexKeyDestroyed {
        key_id: u64,
        tenant: String,
    },
    KeyRetired {
        dek_id: u64,
        tenant: Option<String>,
    },
    /// The master key that wrapped the data key was retired at the end of a
    /// rotation's grace period.
    MasterKeyRetired {
        dek_id: u64,
        tenant: String,
        master_key_id: String,
    },
    InvalidKeyState {
        dek_id: u64,
        from: String,
        to: String,
    },
    KeyStillReferenced {
        dek_id: u64,
        values: i64,
    },
    NotText,
    ValueTooLarge(usize),
    /// The memory context could not hand out a value's buffer (this many bytes).
    OutOfMemory(usize),
    MalformedValue(FormatError),
    NotPreloaded,
    ReadOnlyStandby(&'static str),
    /// Key administration on a Citus worker whose key catalog is a reference
    /// table: the coordinator changes it on every node at once.
    CitusWorkerNode(&'static str),
    /// A distributed query would run on Citus workers without the session's
    /// `byok.tenant`, which Citus carries there only as `SET LOCAL`.
    TenantNotCarriedToWorkers,
    /// A searchable column of a Citus table with other term settings than the
    /// defaults, which the worker nodes (computing terms by context, without
    /// the coordinator's column registry) would not apply.
    CitusSearchSettings(String),
    BrokerTimeout {
        timeout_ms: u64,
        broker_up: bool,
    },
    BrokerBusy {
        slots: usize,
        timeout_ms: u64,
    },
    /// The broker failed a request itself, before any key manager was involved
    /// (it restarted mid-request, or could not read the request).
    BrokerFailed(String),
    Provider(ProviderError),
    Catalog(String),
    /// A function meant to run as a trigger was called some other way.
    NotATrigger(&'static str),
    /// This build uses CPU instructions (AES-NI, PCLMULQDQ, AVX2) the server lacks.
    UnsupportedCpu,
    /// The cryptography failed its checks (`CryptoStatus::problem`) (58000).
    CryptoCheckFailed(&'static str),
    Internal(String),
}

impl From<ProviderError> for ByokError {
    fn from(e: ProviderError) -> Self {
        ByokError::Provider(e)
    }
}

impl From<pgrx::spi::Error> for ByokError {
    fn from(e: pgrx::spi::Error) -> Self {
        ByokError::Catalog(e.to_string())
    }
}

impl ByokError {
    /// The message and detail a user would see, as one line (for results that
    /// report a failure without raising it).
    pub fn summary(self) -> String {
        let report = self.into_report();
        match report.detail() {
            Some(detail) => format!("{}: {detail}", report.message()),
            None => report.message().to_string(),
        }
    }

    /// The report of each error: its SQLSTATE, message, detail and hint. Long
    /// on purpose: one arm per variant, a flat table a reviewer reads in one
    /// place (splitting it would scatter the SQLSTATE choices).
    pub fn into_report(self) -> ErrorReport {
        use PgSqlErrorCode::*;
        let report = |code, message: String| ErrorReport::new(code, message, "byok_pg");
        match self {
            ByokError::MalformedText(e) => report(
                ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!("invalid input syntax for type byok.encrypted: {e}"),
            )
            .set_hint("byok.encrypted literals are produced by byok.encrypt(); they look like \"byok:\" followed by base64"),
            ByokError::MalformedBinary(e) => report(
                ERRCODE_INVALID_BINARY_REPRESENTATION,
                format!("invalid binary representation of byok.encrypted: {e}"),
            ),
            ByokError::MalformedBytes(e) => report(
                ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!("invalid input for type byok.encrypted: {e}"),
            )
            .set_hint("a bytea cast to byok.encrypted must hold a sealed value's bytes, as byok.encrypted::bytea or a binary-mode fetch gives them"),
            ByokError::InvalidConfig(e) => report(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid tenant configuration: {e}"),
            )
            .set_detail(format!("field: {}", e.field))
            .set_hint("the document follows byok_config.yaml: customer, tenant_id, encryption.provider and its block, key_rotation, cache_config, audit"),
            ByokError::InvalidArgument { message, hint } => {
                let r = report(ERRCODE_INVALID_PARAMETER_VALUE, message);
                match hint {
                    Some(h) => r.set_hint(h),
                    None => r,
                }
            }
            ByokError::NullArgument(name) => report(
                ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{name} must not be NULL"),
            ),
            ByokError::NotAllowed { message, detail, hint } => {
                let mut r = report(ERRCODE_INSUFFICIENT_PRIVILEGE, message);
                if let Some(d) = detail {
                    r = r.set_detail(d);
                }
                if let Some(h) = hint {
                    r = r.set_hint(h);
                }
                r
            }
            ByokError::NotFound { message, hint } => {
                let r = report(ERRCODE_UNDEFINED_OBJECT, message);
                match hint {
                    Some(h) => r.set_hint(h),
                    None => r,
                }
            }
            ByokError::WrongState { message, detail, hint } => {
                let mut r = report(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, message);
                if let Some(d) = detail {
                    r = r.set_detail(d);
                }
                if let Some(h) = hint {
                    r = r.set_hint(h);
                }
                r
            }
            ByokError::UndefinedColumn(message) => report(ERRCODE_UNDEFINED_COLUMN, message),
            ByokError::WrongType { message, hint } => {
                report(ERRCODE_DATATYPE_MISMATCH, message).set_hint(hint)
            }
            ByokError::UnknownTenant(t) => report(ERRCODE_UNDEFINED_OBJECT, format!("tenant \"{t}\" does not exist"))
                .set_hint("create it with byok.configure_tenant()"),
            ByokError::UnknownRole(r) => report(ERRCODE_UNDEFINED_OBJECT, format!("role \"{r}\" does not exist")),
            ByokError::UnknownDataKey(id) => report(
                ERRCODE_UNDEFINED_OBJECT,
                format!("data key {id} does not exist"),
            )
            .set_hint("see byok.data_keys; a value naming a missing key was copied from another database, or the key catalog was not restored with it"),
            ByokError::NoActiveDataKey(t) => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("tenant \"{t}\" has no active data key"),
            )
            .set_hint("create one with byok.rotate_data_key()"),
            ByokError::NoIndexKey(t) => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("tenant \"{t}\" has no index key, so its values cannot be made searchable"),
            )
            .set_hint(format!("create one with SELECT byok.rotate_index_key('{}')", t.replace('\'', "''"))),
            ByokError::WrongKeyPurpose { key_id, expected } => report(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("key {key_id} is not a {expected} key"),
            )
            .set_detail("a value names an index key as its data key, or the reverse: it was not sealed by byok_pg"),
            ByokError::TenantMismatchOnEncrypt { requested, session } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("cannot encrypt for tenant \"{requested}\": this session is restricted to tenant \"{session}\""),
            )
            .set_detail("byok.tenant is set"),
            ByokError::TenantMismatchOnSearch { requested, session } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("cannot compute terms for tenant \"{requested}\": this session is restricted to tenant \"{session}\""),
            )
            .set_detail("byok.tenant is set"),
            ByokError::TenantMismatchOnDecrypt { session } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("cannot decrypt a value of another tenant: this session is restricted to tenant \"{session}\""),
            )
            .set_detail("byok.tenant is set"),
            ByokError::TenantNotGranted { tenant, role } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("role \"{role}\" may not use the keys of tenant \"{tenant}\""),
            )
            .set_detail("encrypting and decrypting a tenant's values needs a per-tenant grant")
            .set_hint(format!("a byok_admin grants it: SELECT byok.grant_tenant('{role}', '{tenant}')")),
            ByokError::CreateRoleSession { role, .. } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("role \"{role}\" holds CREATEROLE: it may only use tenants granted to it directly, as itself"),
            )
            .set_detail("a CREATEROLE holder can make itself a member of any role, so grants reached through memberships (or SET ROLE) do not count for it")
            .set_hint("use a login without CREATEROLE for data access, or grant the tenant to this role directly"),
            ByokError::DataKeyNotGranted { dek_id, role, .. } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("role \"{role}\" may not use data key {dek_id}"),
            )
            .set_detail("decrypting a value needs a grant on the tenant that owns its data key")
            .set_hint("a byok_admin finds the tenant in byok.data_keys and grants it with byok.grant_tenant()"),
            ByokError::DualControlRequired { operation, tenant, args } => report(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{operation} needs dual control in this environment"),
            )
            .set_detail("byok.environment's segregation policy requires a second administrator's approval for operations that destroy, retire, rotate or grant keys, or change an existing tenant")
            .set_hint(format!("request it with SELECT byok.request_operation('{operation}', '{tenant}', '{args}'); another byok_admin runs it with byok.approve_operation(request_id)")),
            ByokError::SegregationViolation { master_key_id, key_prefix, environment } => report(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("master key \"{master_key_id}\" does not carry the {environment} key prefix \"{key_prefix}\""),
            )
            .set_detail("byok.environment's segregation policy keeps each environment to its own master keys; the key's name (the last segment of its id or alias) must start with the prefix")
            .set_hint(format!("use a key (or an alias) named {key_prefix}..., or check byok.environment")),
            ByokError::AuthenticationFailed { dek_id, .. } => report(
                ERRCODE_DATA_EXCEPTION,
                "cannot decrypt: the value or its context does not match (authentication failed)".to_string(),
            )
            .set_detail(format!("data key {dek_id}; the value was modified or truncated, belongs to another tenant, or was sealed with another context"))
            .set_hint("pass the same context that was given to byok.encrypt()"),
            ByokError::KeyDestroyed { dek_id: id, .. } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("data key {id} has been destroyed"),
            )
            .set_detail("values sealed under a destroyed key can no longer be decrypted"),
            ByokError::IndexKeyDestroyed { key_id, tenant } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("index key {key_id} of tenant \"{tenant}\" has been destroyed"),
            )
            .set_detail("the tenant's keys were destroyed: its values can no longer be searched or decrypted"),
            ByokError::KeyRetired { dek_id: id, .. } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("data key {id} is retired"),
            )
            .set_hint(format!("to read values still sealed under it, run SELECT byok.set_data_key_state({id}, 'decrypt-only')")),
            ByokError::MasterKeyRetired {
                dek_id,
                tenant,
                master_key_id,
            } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("data key {dek_id} of tenant \"{tenant}\" is wrapped by master key \"{master_key_id}\", retired at the end of its rotation's grace period"),
            )
            .set_hint(format!("rewrap it under the tenant's current master key: CALL byok.rotate_master_key('{tenant}', <current key id>)")),
            ByokError::InvalidKeyState { dek_id, from, to } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("data key {dek_id} cannot go from state \"{from}\" to \"{to}\""),
            )
            .set_hint("allowed: decrypt-only <-> retired, and decrypt-only or retired -> destroyed; the active key changes with byok.rotate_data_key()"),
            ByokError::KeyStillReferenced { dek_id, values } => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("data key {dek_id} still seals {values} value(s) in registered columns"),
            )
            .set_detail("destroying it would make them unreadable forever")
            .set_hint("re-encrypt them first: SELECT byok.wait_job(byok.start_reencrypt(tenant))"),
            ByokError::NotText => report(
                ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                "decrypted value is not valid text in the database encoding".to_string(),
            )
            .set_hint("use byok.decrypt() to get the bytes"),
            ByokError::ValueTooLarge(len) => report(
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("value of {len} bytes is too large to encrypt"),
            )
            .set_detail("a sealed value must fit in 1 GB"),
            ByokError::OutOfMemory(size) => report(ERRCODE_OUT_OF_MEMORY, "out of memory".into())
                .set_detail(format!("Failed on request of size {size}.")),
            ByokError::Provider(e) => provider_report(e),
            ByokError::MalformedValue(e) => report(
                ERRCODE_DATA_EXCEPTION,
                format!("cannot decrypt: the stored value is malformed: {e}"),
            )
            .set_detail("the value was modified or truncated"),
            ByokError::ReadOnlyStandby(action) => report(
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("cannot {action} on a standby server"),
            )
            .set_detail("the key catalog is read-only during recovery; standbys decrypt with the keys replicated from the primary")
            .set_hint("run it on the primary; the standby follows through replication"),
            ByokError::CitusWorkerNode(action) => report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("cannot {action} on a Citus worker node"),
            )
            .set_detail("the key catalog is a set of Citus reference tables, changed from the coordinator on every node in one distributed transaction")
            .set_hint("run it on the coordinator"),
            ByokError::CitusSearchSettings(table) => report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("a searchable column of Citus table {table} must keep the default term settings"),
            )
            .set_detail("the worker nodes seal and probe without the coordinator's column registry: they compute terms with the defaults (8-byte terms, exact values), so terms under other settings would not match")
            .set_hint("term_length => 8, normalization => 'exact' (normalize in the query instead), or keep the table local"),
            ByokError::TenantNotCarriedToWorkers => report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "byok.tenant would not reach the Citus worker nodes this statement runs on".to_string(),
            )
            .set_detail("Citus sends the workers only the SET LOCAL statements of the current transaction block; the shards' part of this statement (or a procedure call Citus delegates) would run there without the tenant restriction")
            .set_hint("set it per transaction: BEGIN; SET LOCAL byok.tenant = '...'; (with citus.propagate_set_commands = 'local' and citus.select_opens_transaction_block on), or RESET byok.tenant for distributed queries"),
            ByokError::NotPreloaded => report(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "byok_pg is not loaded through shared_preload_libraries".to_string(),
            )
            .set_detail("the key broker and its shared memory only exist when the library is preloaded")
            .set_hint("add byok_pg to shared_preload_libraries in postgresql.conf (shared_preload_libraries = 'byok_pg') and restart the server"),
            ByokError::BrokerTimeout { timeout_ms, broker_up } => {
                let r = report(
                    ERRCODE_SYSTEM_ERROR,
                    format!("the key broker did not answer within {timeout_ms} ms"),
                );
                if broker_up {
                    r.set_detail("the key manager is slow or unreachable")
                        .set_hint("check byok.metrics and the key manager; byok.kms_timeout_ms sets the limit")
                } else {
                    r.set_detail("the key broker process is not running")
                        .set_hint("it is restarted automatically; see the server log")
                }
            }
            ByokError::BrokerFailed(message) => report(
                ERRCODE_SYSTEM_ERROR,
                format!("the key broker could not handle the request: {message}"),
            )
            .set_hint("see the server log; the request can be retried"),
            ByokError::BrokerBusy { slots, timeout_ms } => report(
                ERRCODE_INSUFFICIENT_RESOURCES,
                format!("all {slots} key broker request slots stayed busy for {timeout_ms} ms"),
            )
            .set_hint("the key manager is slow or many keys are being fetched at once; retry, or check byok.metrics"),
            ByokError::NotATrigger(function) => report(
                ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                format!("{function} may only be called as a trigger"),
            ),
            ByokError::UnsupportedCpu => report(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "this build of byok_pg needs a CPU with AES-NI, PCLMULQDQ and AVX2".into(),
            )
            .set_hint("rebuild it for this CPU with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"\" cargo pgrx install"),
            ByokError::CryptoCheckFailed(problem) => report(
                ERRCODE_SYSTEM_ERROR,
                format!("byok_pg cannot run: {problem}"),
            )
            .set_hint("see byok.crypto_info() and docs/security.md, \"FIPS build\""),
            ByokError::Internal(msg) => report(ERRCODE_INTERNAL_ERROR, format!("byok_pg internal error: {msg}")),
            ByokError::Catalog(msg) => report(
                ERRCODE_INTERNAL_ERROR,
                format!("byok_pg catalog query failed: {msg}"),
            ),
        }
    }

    /// Raises this error as an ERROR; does not return. (Recording failures in
    /// the audit trail is the caller's business: the administrative executor
    /// and the per-row path do it.)
    pub fn raise(self) -> ! {
        self.into_report().report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }

    /// [`summary`](Self::summary) without consuming the error.
    pub fn summary_ref(&self) -> String {
        self.clone().summary()
    }
}

fn provider_report(e: ProviderError) -> ErrorReport {
    use PgSqlErrorCode::*;
    let code = match e.kind {
        ErrorKind::KeyNotFound => ERRCODE_UNDEFINED_OBJECT,
        ErrorKind::AccessDenied => ERRCODE_INSUFFICIENT_PRIVILEGE,
        ErrorKind::KeyDisabled => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        ErrorKind::UnwrapFailed => ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
        ErrorKind::Unavailable | ErrorKind::Throttled => ERRCODE_SYSTEM_ERROR,
        ErrorKind::Misconfigured => ERRCODE_CONFIG_FILE_ERROR,
        ErrorKind::NotSupported => ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorKind::NotPermitted => ERRCODE_INSUFFICIENT_PRIVILEGE,
    };
    let mut report = ErrorReport::new(
        code,
        format!("key provider \"{}\": {}", e.provider.name(), e.message),
        "byok_pg",
    );
    if let Some(detail) = e.detail {
        report = report.set_detail(detail);
    }
    if let Some(hint) = e.hint {
        report = report.set_hint(hint);
    }
    report
}

/// `Result<T, ByokError>` unwrapped, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<ByokError>> OrRaise<T> for Result<T, E> {
    #[inline]
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().raise(),
        }
    }
}
