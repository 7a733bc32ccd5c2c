//! Arbitrary JSON as a tenant configuration: parsing never panics, and every
//! refusal names a field.
#![no_main]

use byok_core::config::TenantConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match TenantConfig::from_json(&doc) {
        Ok(config) => {
            assert!(!config.tenant_id.is_empty() && !config.master_key_id.trim().is_empty())
        }
        Err(e) => assert!(!e.field.is_empty()),
    }
});
