//! Every configuration parameter of byok_pg, in one place.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `byok.tenant` (any user, per session or transaction): when set, this session
/// may only encrypt for and decrypt values of this tenant; anything else fails
/// with SQLSTATE 42501. Applications set it per connection or per transaction
/// (`SET LOCAL byok.tenant = 'tenant_12345'`) as a guard against cross-tenant reads.
static TENANT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `byok.local_master_key_file` (server configuration, visible to superusers
/// only): path of the `local` provider's root secret, read by the key broker.
/// Empty (the default) means `byok_local_master.key` in the data directory,
/// created with mode 0600 the first time a local tenant is configured.
static LOCAL_MASTER_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `byok.backend_cache_max_entries` (superuser only): upper bound on the data
/// keys one backend keeps ready, across all tenants; each tenant's own
/// `cache_config.max_entries` applies within it.
static BACKEND_CACHE_MAX_ENTRIES: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `byok.kms_timeout_ms` (any user): how long a request to the key broker, and
/// the broker's call to the key manager, may take before failing.
static KMS_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);

/// `byok.revocation_check_seconds` (server configuration): how often the key
/// broker re-checks each master key behind a cached data key, unless the
/// tenant's cache_config says otherwise (0: never).
static REVOCATION_CHECK_SECONDS: GucSetting<i32> =
    GucSetting::<i32>::new(byok_kms::protocol::DEFAULT_REVOCATION_CHECK_SECONDS as i32);

/// `byok.alert_details` (server configuration): whether `NOTIFY byok_alerts`
/// payloads carry the tenant, data key, reason and details (read by
/// `byok.audit_event` in SQL), not only the audit row's id and event.
static ALERT_DETAILS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `byok.metrics_listen_address` (server configuration, superuser only):
/// `host:port` where the key broker serves Prometheus metrics (`/metrics`);
/// empty (the default): not served. Plain HTTP on loopback addresses; bound
/// elsewhere it needs TLS (`byok.metrics_tls_cert_file`/`_key_file`) or basic
/// authentication (`byok.metrics_basic_auth_file`).
static METRICS_LISTEN_ADDRESS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `byok.metrics_tls_cert_file` / `byok.metrics_tls_key_file` (server
/// configuration, superuser only): PEM certificate chain and private key; both
/// set: the endpoint speaks HTTPS only.
static METRICS_TLS_CERT_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
static METRICS_TLS_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `byok.metrics_basic_auth_file` (server configuration, superuser only): a
/// file whose first line is `user:password`; set: every scrape must present them.
static METRICS_BASIC_AUTH_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `byok.metrics_tenant_labels` (server configuration): whether the Prometheus
/// series carry a `tenant` label (one series group per tenant) rather than
/// summing tenants per database and provider (the default, bounded however
/// many tenants there are).
static METRICS_TENANT_LABELS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `byok.cache_ttl_seconds` (server configuration): how long a data key stays
/// ready in the caches, for tenants whose `cache_config` sets no `ttl_seconds`.
static CACHE_TTL_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// `byok.cache_max_entries` (server configuration): how many of a tenant's data
/// keys the caches keep, for tenants whose `cache_config` sets no `max_entries`.
static CACHE_MAX_ENTRIES: GucSetting<i32> = GucSetting::<i32>::new(1_000);

/// `byok.reencrypt_batch_size` (server configuration): values a re-encryption
/// job rewrites per transaction (about; batches are ranges of pages sized to it).
static REENCRYPT_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1_000);

/// `byok.reencrypt_max_rows_per_second` (server configuration): a ceiling on
/// each re-encryption job's rate, so it leaves I/O to the application; 0 = none.
static REENCRYPT_MAX_ROWS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `byok.scheduler_naptime_seconds` (server configuration): how often the job
/// launcher looks in every database for due data-key rotations and jobs to resume.
static SCHEDULER_NAPTIME_SECONDS: GucSetting<i32> = GucSetting::<i32>::new(60);

/// The deployment environments of the guide's `segregation_matrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum Environment {
    /// No segregation policy (the default): any master key, no approvals.
    #[name = c"none"]
    Unset,
    #[name = c"development"]
    Development,
    #[name = c"staging"]
    Staging,
    #[name = c"production"]
    Production,
}

/// The AES-256-GCM implementations `byok.aes_gcm_implementation` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PostgresGucEnum)]
pub enum AesGcmImplementation {
    /// By length (the default): RustCrypto's below a length chosen for the
    /// CPU (`byok_core::crypto::aws_lc_from_bytes`), aws-lc's from it.
    #[name = c"auto"]
    Auto,
    #[name = c"rustcrypto"]
    RustCrypto,
    #[name = c"aws-lc"]
    AwsLc,
}

/// `byok.aes_gcm_implementation` (superuser): which AES-256-GCM code seals
/// and opens values. Both make the same bytes, so it changes speed only
/// (`bench/per_row.sh` compares them in one run).
static AES_GCM_IMPLEMENTATION: GucSetting<AesGcmImplementation> =
    GucSetting::<AesGcmImplementation>::new(AesGcmImplementation::Auto);

/// `byok.environment` (server configuration, superuser only): which row of the
/// guide's `segregation_matrix` this server follows. Tenants' master keys must
/// carry the environment's key prefix (`prod-`, `stage-`, `dev-`), and in
/// `production` destroying, rotating and granting need dual control
/// (`byok.request_operation` + `byok.approve_operation`).
static ENVIRONMENT: GucSetting<Environment> = GucSetting::<Environment>::new(Environment::Unset);

/// `byok.key_prefix` (server configuration, superuser only): overrides the
/// environment's key prefix from the guide's matrix; empty = the guide's.
static KEY_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `byok.approval_expiry_minutes` (server configuration, superuser only): how
/// long a dual-control request waits for its approval.
static APPROVAL_EXPIRY_MINUTES: GucSetting<i32> = GucSetting::<i32>::new(60);

/// `byok.credential_directories` (server configuration): comma-separated
/// absolute directories that tenants' credential files (tokens, secret ids,
/// service-account keys, client certificates, CA bundles) may come from. Files
/// must be owned by the server's OS user with mode 0600 or stricter; symbolic
/// links below a directory are refused. Empty (the default): no credential file
/// may be named in a tenant configuration.
static CREDENTIAL_DIRECTORIES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `byok.allowed_endpoints` (server configuration): comma-separated host
/// patterns (`host`, `host:port`, `*.domain`) a tenant configuration may name
/// as a key-manager or token endpoint, besides the cloud providers' public
/// service domains (always allowed).
static ALLOWED_ENDPOINTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `byok.allow_insecure_transport` (server configuration): lets tenant
/// configurations use plain `http://` endpoints and turn TLS certificate
/// checks off. For tests against local emulators; never in production.
static ALLOW_INSECURE_TRANSPORT: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `byok.dual_control_approvers` (superuser only): comma-separated login roles
/// that may approve dual-control requests. Empty (the default): any other
/// byok_admin may, except one whose membership the requester granted and, on
/// either side, a holder of CREATEROLE (who could mint a second approver).
static DUAL_CONTROL_APPROVERS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `byok.max_encryptions_per_key` (server configuration): how many values one
/// data key may seal before the key is rotated automatically. AES-GCM with
/// random 96-bit nonces stays within NIST SP 800-38D's bound (2^32 per key)
/// with a wide margin at the default, 2^30.
static MAX_ENCRYPTIONS_PER_KEY: GucSetting<i32> = GucSetting::<i32>::new(1 << 30);

/// `byok.audit_key_file` (server configuration, superuser only): the secret
/// that keys the audit trail's hash chain (HMAC-SHA-256). Empty: `byok_audit.key`
/// in the data directory, created with mode 0600 on first use.
static AUDIT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Registers every `byok.*` setting. Long on purpose: one flat registration per
/// setting, in the order the reference documents them, so a reader finds a
/// setting's name, default, bounds and context in one place.
pub fn init() {
    GucRegistry::define_string_guc(
        c"byok.credential_directories",
        c"Directories tenants' credential files may come from.",
        c"Comma-separated absolute paths; files must be owned by the server's OS user with mode 0600 or stricter, and symbolic links are refused. Empty: no credential files.",
        &CREDENTIAL_DIRECTORIES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.allowed_endpoints",
        c"Private key-manager endpoints tenant configurations may name.",
        c"Comma-separated host patterns (host, host:port, *.domain); the cloud providers' public domains are always allowed.",
        &ALLOWED_ENDPOINTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"byok.allow_insecure_transport",
        c"Allows plain http endpoints and disabled TLS checks in tenant configurations (tests only).",
        c"Never enable it in production: credentials and wrapped keys would cross the network unprotected.",
        &ALLOW_INSECURE_TRANSPORT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.dual_control_approvers",
        c"Login roles that may approve dual-control requests (empty: any other byok_admin, with checks).",
        c"When set, only these roles approve, and CREATEROLE holders may request.",
        &DUAL_CONTROL_APPROVERS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.max_encryptions_per_key",
        c"Values one data key may seal before it is rotated automatically.",
        c"Counted across backends and restarts; the default 2^30 keeps AES-GCM's random nonces far within NIST's 2^32 bound.",
        &MAX_ENCRYPTIONS_PER_KEY,
        1_000,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.audit_key_file",
        c"Path of the secret keying the audit trail's hash chain.",
        c"Empty means byok_audit.key in the data directory, created with mode 0600 on first use.",
        &AUDIT_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_enum_guc(
        c"byok.aes_gcm_implementation",
        c"Which AES-256-GCM implementation seals and opens values.",
        c"auto (the default) picks by length: RustCrypto's aes-gcm for short values, aws-lc for long ones; rustcrypto or aws-lc pins one. Both make and accept the same values: this changes speed only. A FIPS build ignores it: every value goes through the FIPS module.",
        &AES_GCM_IMPLEMENTATION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"byok.environment",
        c"The deployment environment whose key segregation policy applies.",
        c"none, development, staging or production: master keys must carry the environment's key prefix; production requires dual control for destructive and rotating operations.",
        &ENVIRONMENT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.key_prefix",
        c"Prefix every tenant's master key name must carry (empty: the environment's).",
        c"Defaults follow the guide's segregation_matrix: prod-, stage-, dev-.",
        &KEY_PREFIX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.approval_expiry_minutes",
        c"How long a dual-control request stays open for approval.",
        c"byok.approve_operation() refuses a request older than this.",
        &APPROVAL_EXPIRY_MINUTES,
        1,
        10_080,
        GucContext::Suset,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"byok.reencrypt_batch_size",
        c"Values a re-encryption job rewrites per transaction.",
        c"Each batch is one short transaction that locks only the rows it rewrites.",
        &REENCRYPT_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.reencrypt_max_rows_per_second",
        c"Upper bound on a re-encryption job's rate (0: no bound).",
        c"Jobs sleep between batches to stay under it.",
        &REENCRYPT_MAX_ROWS_PER_SECOND,
        0,
        100_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.scheduler_naptime_seconds",
        c"How often the job launcher visits every database.",
        c"Each visit rotates due data keys (key_rotation.interval_days) and resumes unfinished re-encryption jobs.",
        &SCHEDULER_NAPTIME_SECONDS,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"byok.tenant",
        c"Restricts this session to one tenant's data.",
        c"When set, encrypting for or decrypting values of any other tenant fails with SQLSTATE 42501.",
        &TENANT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.local_master_key_file",
        c"Path of the local key provider's master key file.",
        c"Empty means byok_local_master.key in the data directory, created with mode 0600 on first use.",
        &LOCAL_MASTER_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"byok.kms_timeout_ms",
        c"How long a key request may wait for the key broker and the key manager.",
        c"Past it the request fails; query cancel and statement_timeout interrupt the wait at once.",
        &KMS_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"byok.cache_ttl_seconds",
        c"How long a data key stays cached, unless the tenant's cache_config says otherwise.",
        c"Applies to the backends' caches and the key broker's shared cache.",
        &CACHE_TTL_SECONDS,
        1,
        31_536_000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"byok.alert_details",
        c"Whether NOTIFY byok_alerts payloads name the tenant, data key and reason.",
        c"Any role that may connect to the database can LISTEN: off, a payload names only the audit row (audit_id, event, outcome, at), which byok_admin reads in byok.audit_log.",
        &ALERT_DETAILS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"byok.metrics_listen_address",
        c"host:port where the key broker serves Prometheus metrics at /metrics (empty: off).",
        c"Loopback addresses may be plain HTTP; any other address needs byok.metrics_tls_cert_file and byok.metrics_tls_key_file, or byok.metrics_basic_auth_file.",
        &METRICS_LISTEN_ADDRESS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"byok.metrics_tls_cert_file",
        c"PEM certificate chain of the metrics endpoint (with byok.metrics_tls_key_file: HTTPS).",
        c"",
        &METRICS_TLS_CERT_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"byok.metrics_tls_key_file",
        c"PEM private key of the metrics endpoint.",
        c"",
        &METRICS_TLS_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"byok.metrics_basic_auth_file",
        c"File whose first line is user:password, required of every scrape of the metrics endpoint.",
        c"Empty: no authentication (allowed on loopback addresses only, unless TLS is on).",
        &METRICS_BASIC_AUTH_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"byok.metrics_tenant_labels",
        c"Whether Prometheus series carry a tenant label.",
        c"Off (the default): tenants are summed per database and provider, so the number of series does not grow with the number of tenants.",
        &METRICS_TENANT_LABELS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.revocation_check_seconds",
        c"How often the key broker asks the key manager whether each master key behind a cached data key may still be used, unless the tenant's cache_config says otherwise.",
        c"A refusal (disabled key, permission removed) evicts the tenant's keys from every cache within this interval plus a second. 0 turns the check off: cached keys are then trusted until their TTL.",
        &REVOCATION_CHECK_SECONDS,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"byok.cache_max_entries",
        c"How many of a tenant's data keys stay cached, unless its cache_config says otherwise.",
        c"Applies to the backends' caches and the key broker's shared cache.",
        &CACHE_MAX_ENTRIES,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"byok.backend_cache_max_entries",
        c"Most data keys one backend keeps ready, across all tenants.",
        c"Each tenant's cache_config.max_entries applies within this bound.",
        &BACKEND_CACHE_MAX_ENTRIES,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    // The prefix is ours: a misspelt byok.* setting is an error, not a silent
    // placeholder that leaves the real setting at its default.
    // SAFETY: called from _PG_init, after every byok.* setting is defined.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"byok".as_ptr()) };
}

/// The metrics endpoint's settings (`None`: not served); an error names the
/// setting that is wrong.
pub fn metrics_exporter() -> Result<Option<byok_exporter::ExporterConfig>, String> {
    let address = string_setting(&METRICS_LISTEN_ADDRESS);
    if address.is_empty() {
        return Ok(None);
    }
    // An IP address, not a name: resolving one would stall the key broker's
    // main loop on a slow DNS server at every reload.
    let address: std::net::SocketAddr = address.parse().map_err(|_| {
        format!(
            "byok.metrics_listen_address \"{address}\" is not an IP address and port (such as 127.0.0.1:9187 or [::1]:9187)"
        )
    })?;
    let tls = match (
        string_setting(&METRICS_TLS_CERT_FILE),
        string_setting(&METRICS_TLS_KEY_FILE),
    ) {
        (cert, key) if cert.is_empty() && key.is_empty() => None,
        (cert, key) if cert.is_empty() || key.is_empty() => {
            return Err(
                "byok.metrics_tls_cert_file and byok.metrics_tls_key_file must be set together"
                    .into(),
            );
        }
        (cert, key) => Some({
            check_private_file(&key)
                .map_err(|problem| format!("byok.metrics_tls_key_file: {key} {problem}"))?;
            byok_exporter::TlsFiles {
                cert_file: cert.into(),
                key_file: key.into(),
            }
        }),
    };
    let basic_auth = match string_setting(&METRICS_BASIC_AUTH_FILE) {
        path if path.is_empty() => None,
        path => {
            check_private_file(&path)
                .map_err(|problem| format!("byok.metrics_basic_auth_file: {path} {problem}"))?;
            let contents = std::fs::read_to_string(&path)
                .map_err(|e| format!("byok.metrics_basic_auth_file: could not read {path}: {e}"))?;
            Some(
                byok_exporter::BasicAuth::from_file_contents(&contents)
                    .map_err(|e| format!("byok.metrics_basic_auth_file: {e}"))?,
            )
        }
    };
    Ok(Some(byok_exporter::ExporterConfig {
        address,
        tls,
        basic_auth,
    }))
}

/// A secret file must be the server OS user's and unreadable by others.
fn check_private_file(path: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot be read: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err("must be owned by the server's OS user".into());
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "must not be readable or writable by group or others (mode {:o}; use 0600)",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// byok.metrics_tenant_labels.
pub fn metrics_tenant_labels() -> bool {
    METRICS_TENANT_LABELS.get()
}

/// byok.backend_cache_max_entries.
pub fn backend_cache_max_entries() -> usize {
    BACKEND_CACHE_MAX_ENTRIES.get().max(0) as usize
}

/// byok.kms_timeout_ms: how long a backend waits for the key broker.
pub fn kms_timeout_ms() -> u64 {
    KMS_TIMEOUT_MS.get().max(1) as u64
}

/// byok.revocation_check_seconds: the default interval of revocation checks.
pub fn revocation_check_seconds() -> u32 {
    REVOCATION_CHECK_SECONDS.get().max(0) as u32
}

/// byok.cache_ttl_seconds: the default time a data key stays cached.
pub fn cache_ttl_seconds() -> u32 {
    CACHE_TTL_SECONDS.get().max(0) as u32
}

/// byok.cache_max_entries: the default per-tenant cache size.
pub fn cache_max_entries() -> u32 {
    CACHE_MAX_ENTRIES.get().max(0) as u32
}

/// byok.reencrypt_batch_size: rows per re-encryption batch.
pub fn reencrypt_batch_size() -> i32 {
    REENCRYPT_BATCH_SIZE.get().max(1)
}

/// byok.reencrypt_max_rows_per_second: a job's throttle (0: none).
pub fn reencrypt_max_rows_per_second() -> i32 {
    REENCRYPT_MAX_ROWS_PER_SECOND.get().max(0)
}

/// byok.scheduler_naptime_seconds: how often the scheduler looks for due work.
pub fn scheduler_naptime_seconds() -> u64 {
    SCHEDULER_NAPTIME_SECONDS.get().max(1) as u64
}

/// byok.approval_expiry_minutes: how long a dual-control request stays open.
pub fn approval_expiry_minutes() -> i32 {
    APPROVAL_EXPIRY_MINUTES.get().max(1)
}

/// The AES-256-GCM implementation `cipher` runs for a value of `len` bytes:
/// the setting's, or with `auto` the cipher's choice for this CPU (per-row
/// path: one read of the setting, no CPU detection).
#[inline]
pub fn aes_gcm_for(
    cipher: &byok_core::crypto::DekCipher,
    len: usize,
) -> byok_core::crypto::GcmImpl {
    use byok_core::crypto::GcmImpl;
    match AES_GCM_IMPLEMENTATION.get() {
        AesGcmImplementation::Auto => cipher.implementation_for(len),
        AesGcmImplementation::RustCrypto => GcmImpl::RustCrypto,
        AesGcmImplementation::AwsLc => GcmImpl::AwsLc,
    }
}

/// The session's tenant restriction, read in place (no copy: this is on the per-row path).
#[inline]
pub fn session_tenant() -> Option<&'static CStr> {
    // SAFETY: the GUC machinery owns the string and only replaces it between
    // statements; we never hold the reference across one.
    unsafe {
        let raw = *TENANT.as_ptr();
        if raw.is_null() {
            return None;
        }
        let value = CStr::from_ptr(raw);
        if value.is_empty() { None } else { Some(value) }
    }
}

fn string_setting(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The policy tenants' configurations are held to (byok.credential_directories,
/// byok.allowed_endpoints, byok.allow_insecure_transport).
pub fn access_policy() -> byok_kms::AccessPolicy {
    byok_kms::AccessPolicy::new(
        &string_setting(&CREDENTIAL_DIRECTORIES),
        &string_setting(&ALLOWED_ENDPOINTS),
        ALLOW_INSECURE_TRANSPORT.get(),
    )
}

/// The roles named in byok.dual_control_approvers.
pub fn dual_control_approvers() -> Vec<String> {
    string_setting(&DUAL_CONTROL_APPROVERS)
        .split(',')
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect()
}

/// byok.max_encryptions_per_key.
pub fn max_encryptions_per_key() -> u64 {
    MAX_ENCRYPTIONS_PER_KEY.get().max(1) as u64
}

/// byok.audit_key_file, or `byok_audit.key` in the data directory.
pub fn audit_key_file() -> std::path::PathBuf {
    match string_setting(&AUDIT_KEY_FILE) {
        path if !path.is_empty() => path.into(),
        _ => crate::postgres::data_directory().join("byok_audit.key"),
    }
}

/// The configured local master key file, if one is set.
pub fn local_master_key_file() -> Option<String> {
    LOCAL_MASTER_KEY_FILE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// The segregation policy in force: the environment, the key prefix its master
/// keys must carry, and whether destructive operations need dual control.
pub struct SegregationPolicy {
    pub environment: Environment,
    pub key_prefix: String,
    pub approval_required: bool,
}

pub fn segregation_policy() -> SegregationPolicy {
    let environment = ENVIRONMENT.get();
    let guide_prefix = match environment {
        Environment::Unset => "",
        Environment::Development => "dev-",
        Environment::Staging => "stage-",
        Environment::Production => "prod-",
    };
    let key_prefix = KEY_PREFIX
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| guide_prefix.to_string());
    SegregationPolicy {
        environment,
        key_prefix,
        approval_required: environment == Environment::Production,
    }
}

impl Environment {
    pub fn name(self) -> &'static str {
        match self {
            Environment::Unset => "none",
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}
