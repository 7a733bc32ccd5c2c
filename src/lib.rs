//! byok_pg: per-tenant column encryption under customer-held keys.
//!
//! This crate is the thin PostgreSQL layer; the format, crypto, cache and
//! configuration live in `byok-core`, the key providers in `byok-kms`.

use pgrx::prelude::*;

mod api;
mod catalog;
mod errors;
mod gucs;
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
"#,
    name = "grants",
    requires = [
        api::tenants::configure_tenant,
        api::tenants::rotate_data_key,
        api::tenants::set_data_key_state,
        api::tenants::destroy_data_key
    ]
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    check_cpu();
    gucs::init();
    postgres::invalidation::register();
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
