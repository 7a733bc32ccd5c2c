//! SQL-facing functions, one file per concern. Each builds what it was asked
//! for and hands it to the layer below (`admin`, `jobs`, `keyring`); only these
//! functions raise errors.

pub mod crypt;
pub mod dr;
pub mod governance;
pub mod jobs;
pub mod monitoring;
pub mod rotation;
pub mod search;
pub mod tenants;
