//! Glue to PostgreSQL's C interfaces that the rest of the extension uses.

pub mod fmgr;
pub mod invalidation;
pub mod varlena;
