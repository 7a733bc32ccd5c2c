//! byok_pg's core, free of PostgreSQL: the sealed-value envelope, AES-256-GCM
//! sealing under data keys, the data-key cache, and tenant configuration.
//! Everything here is covered by plain `cargo test`.

pub mod audit_ring;
pub mod cache;
pub mod clock;
pub mod config;
pub mod counters;
pub mod crypto;
pub mod envelope;
pub mod histogram;
pub mod key_usage;
pub mod secret_mem;
pub mod slots;
