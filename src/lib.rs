//! byok_pg: per-tenant column encryption under customer-held keys.
//!
//! This crate is the thin PostgreSQL layer; the format, crypto, cache and
//! configuration live in `byok-core`, the key providers in `byok-kms`.

use pgrx::prelude::*;

mod admin;
mod api;
mod audit;
mod broker;
mod catalog;
mod columns;
mod errors;
mod gucs;
mod jobs;
mod keyring;
mod locks;
mod postgres;
mod providers;
mod shmem;
mod types;

::pgrx::pg_module_magic!(name, version);

// The type and the per-row C functions come first; the catalog, by concern,
// last (after every function pgrx generates), ending with every privilege.
extension_sql_file!("../sql/types.sql", name = "types", bootstrap);
extension_sql_file!(
    "../sql/keys.sql",
    name = "keys",
    requires = [
        api::monitoring::metrics_counters,
        api::monitoring::key_status,
        api::monitoring::alert_states,
        api::rotation::rotate_master_key_step,
        api::rotation::rotate_master_key_finish
    ]
);
extension_sql_file!(
    "../sql/access.sql",
    name = "access",
    requires = ["keys", api::governance::tenant_visible]
);
extension_sql_file!("../sql/jobs.sql", name = "jobs", requires = ["access"]);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "jobs",
        audit::chain::audit_mac,
        audit::chain::lock_audit_chain
    ]
);
extension_sql_file!(
    "../sql/dual_control.sql",
    name = "dual_control",
    requires = ["audit"]
);
extension_sql_file!(
    "../sql/dr.sql",
    name = "dr",
    requires = [
        "dual_control",
        api::dr::complete_key_wraps_step,
        api::dr::complete_key_wraps_finish,
        api::dr::start_compromise_response,
        api::dr::compromise_response_step
    ]
);
extension_sql_file!("../sql/search.sql", name = "search", requires = ["dr"]);
extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["search"]);
extension_sql_file!(
    "../sql/transparent.sql",
    name = "transparent",
    requires = ["citus"]
);
extension_sql_file!(
    "../sql/crypto_check.sql",
    name = "crypto_check",
    requires = ["citus", api::monitoring::crypto_info]
);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    check_cpu();
    check_crypto();
    gucs::init();
    keyring::invalidation::register();
    // The broker and its shared memory can only be set up from shared_preload_libraries;
    // loaded any other way, key operations fail with a message saying so.
    // SAFETY: a plain global PostgreSQL sets before loading preloaded libraries;
    // _PG_init runs on the postmaster's only thread.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::install_hooks();
        keyring::citus_tenant::install_hooks();
        broker::worker::register();
        jobs::workers::register_launcher();
    }
}

postgres::fmgr::pg_function_info_v1!(byok_require_preload);

/// Called first by the extension script: CREATE EXTENSION fails, saying what to
/// add to postgresql.conf, when the library was not preloaded.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn byok_require_preload(
    _fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    if shmem::shared().is_none() {
        errors::ByokError::NotPreloaded.raise();
    }
    pg_sys::Datum::from(0)
}

/// x86-64 builds use AES-NI, PCLMULQDQ and AVX2 directly (see .cargo/config.toml).
fn check_cpu() {
    #[cfg(all(target_arch = "x86_64", target_feature = "aes"))]
    {
        let ok = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2");
        if !ok {
            errors::ByokError::UnsupportedCpu.raise();
        }
    }
}

/// Refuses to load (so, preloaded, the server refuses to start) when the
/// cryptography fails its checks: a FIPS build whose module is not in FIPS
/// mode, or AES-256-GCM failing a NIST known-answer test
/// (`byok.crypto_info()` reports the same; `CREATE EXTENSION` checks it too).
/// Starting the FIPS module here also runs its power-on self-tests, which
/// abort the process on failure, before any backend exists.
fn check_crypto() {
    if let Some(problem) = byok_core::crypto::CryptoStatus::check().problem() {
        errors::ByokError::CryptoCheckFailed(problem).raise();
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries='byok_pg'"]
    }
}
