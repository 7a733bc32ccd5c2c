//! SQL-facing functions, one file per concern.

pub mod crypt;
pub mod rotation;
pub mod tenants;
