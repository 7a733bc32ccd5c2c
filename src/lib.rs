//! byok_pg: per-tenant column encryption under customer-held keys.
//!
//! This crate is the thin PostgreSQL layer; the format, crypto, cache and
//! configuration live in `byok-core`, the key providers in `byok-kms`.

use pgrx::prelude::*;

mod api;
mod audit;
mod broker;
mod catalog;
mod errors;
mod gucs;
mod jobs;
mod keyring;
mod postgres;
mod providers;
mod types;

::pgrx::pg_module_magic!(name, version);

// The type and the per-row C functions come first, the catalog last.
extension_sql_file!("../sql/types.sql", name = "types", bootstrap);
extension_sql_file!("../sql/catalog.sql", name = "catalog", finalize);
extension_sql!(
    r#"
-- Administration is for superusers (or roles they grant it to).
REVOKE EXECUTE ON FUNCTION byok.configure_tenant(jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.rotate_data_key(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.set_data_key_state(bigint, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.destroy_data_key(bigint, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.flush_cache(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.rotate_master_key_step(text, text, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.launch_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.validate_tenant(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION byok.destroy_tenant_keys(text, text) FROM PUBLIC;

-- The guide's customer-initiated rotation. Commits after every batch, so it can
-- run on a live database and, after a crash, be called again to finish.
CREATE PROCEDURE byok.rotate_master_key(tenant_id text, new_key_id text,
                                        grace_period interval DEFAULT '24 hours')
LANGUAGE plpgsql AS $proc$
DECLARE
    rewrapped bigint;
    total bigint := 0;
BEGIN
    LOOP
        rewrapped := byok.rotate_master_key_step(tenant_id, new_key_id, grace_period);
        total := total + rewrapped;
        COMMIT;
        EXIT WHEN rewrapped = 0;
    END LOOP;
    PERFORM byok.audit_event('rotate_master_key', tenant_id, NULL, 'ok', NULL,
                             jsonb_build_object('new_key_id', new_key_id, 'rewrapped', total));
    RAISE NOTICE 'tenant %: % data key(s) rewrapped under master key %', tenant_id, total, new_key_id;
END
$proc$;
REVOKE EXECUTE ON PROCEDURE byok.rotate_master_key(text, text, interval) FROM PUBLIC;

-- Monitoring, named as in the guide's monitoring_rules.yaml.
CREATE VIEW byok.metrics AS
SELECT d.datname AS database, m.provider, m.tenant_id,
       CASE WHEN m.kms_calls > 0
            THEN (m.kms_calls - m.kms_failures)::float8 / m.kms_calls END AS kms_api_success_rate,
       m.dek_generation_p99_ms,
       CASE WHEN m.l1_hits + m.l1_misses > 0
            THEN (m.l1_hits + m.l2_hits)::float8 / (m.l1_hits + m.l1_misses) END AS key_cache_hit_ratio,
       CASE WHEN m.decrypts > 0
            THEN m.decrypt_failures::float8 / m.decrypts END AS decrypt_failures_rate,
       m.kms_calls, m.kms_failures, m.dek_generations,
       m.l1_hits, m.l1_misses, m.l2_hits, m.l2_misses, m.served_stale, m.served_by_replica,
       m.decrypts, m.decrypt_failures, m.encrypts, m.kms_latency_histogram
  FROM byok.metrics_counters() m
  LEFT JOIN pg_catalog.pg_database d ON d.oid = m.database_oid;
COMMENT ON VIEW byok.metrics IS
    'Per provider and tenant: kms_api_success_rate, dek_generation_p99_ms, key_cache_hit_ratio, decrypt_failures_rate, and their counters';
"#,
    name = "grants",
    requires = [
        api::tenants::configure_tenant,
        api::tenants::rotate_data_key,
        api::tenants::set_data_key_state,
        api::tenants::destroy_data_key,
        api::tenants::flush_cache,
        api::rotation::rotate_master_key_step,
        api::jobs::launch_job,
        api::governance::validate_tenant,
        api::governance::destroy_tenant_keys,
        broker::metrics::metrics_counters
    ]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    check_cpu();
    gucs::init();
    postgres::invalidation::register();
    // The broker and its shared memory can only be set up from shared_preload_libraries;
    // loaded any other way, key operations fail with a message saying so.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        broker::shmem::install_hooks();
        broker::worker::register();
        jobs::register_launcher();
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
    if broker::shmem::shared().is_none() {
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
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "this build of byok_pg needs a CPU with AES-NI, PCLMULQDQ and AVX2",
                "rebuild it for this CPU with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"\" cargo pgrx install"
            );
        }
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
