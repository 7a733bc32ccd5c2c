//! byok_pg's core, free of PostgreSQL: the sealed-value envelope, AES-256-GCM
//! sealing under data keys, the data-key cache, and tenant configuration.
//! Everything here is covered by plain `cargo test`.
//!
//! Unsafe code is denied crate-wide and allowed only in the modules listed
//! below with `#[allow(unsafe_code)]`: the tables that live in PostgreSQL
//! shared memory (interior mutability across processes), the two system
//! calls (`clock_gettime`, `mmap`), the allocator of [`secret_mem`], and
//! aws-lc ([`aws_lc`], [`aws_lc_gcm`]). A new
//! unsafe block elsewhere is a compile error, so adding one is a deliberate
//! change to this list; in the allowed modules every unsafe block and impl
//! must carry a `// SAFETY:` comment (`clippy::undocumented_unsafe_blocks`).

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(clippy::missing_safety_doc)]

// Shared memory: slots handed between processes by atomic state changes.
#[allow(unsafe_code)]
pub mod audit_ring;
// The aws-lc build (standard or FIPS module) and its primitives, through its C interface.
#[allow(unsafe_code)]
pub mod aws_lc;
// aws-lc's AES-GCM context through its C interface, placed in secret memory.
#[allow(unsafe_code)]
pub mod aws_lc_gcm;
pub mod cache;
// `clock_gettime` on a local timespec.
#[allow(unsafe_code)]
pub mod clock;
pub mod config;
// Shared memory: labels published once under an atomic state.
#[allow(unsafe_code)]
pub mod counters;
pub mod crypto;
pub mod envelope;
pub mod histogram;
// Shared memory: a zeroed table of atomics.
#[allow(unsafe_code)]
pub mod key_usage;
pub mod monitors;
pub mod prometheus;
pub mod search;
// `mmap`/`madvise`/`munmap` and a `Box`-like owner of raw chunks.
#[allow(unsafe_code)]
pub mod secret_mem;
// Shared memory: request slots handed between backends and the broker.
#[allow(unsafe_code)]
pub mod slots;
