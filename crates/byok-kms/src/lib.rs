//! Key providers for byok_pg: the interface every key manager implements, and
//! one module per key manager. Nothing here depends on PostgreSQL.
//!
//! A provider only ever wraps, unwraps or generates data keys under a master key
//! (CMK) that it names; the master key itself never leaves the key manager.
//!
//! No unsafe code, but for one system call (`geteuid`, in [`policy`]), allowed
//! where it is made and justified there.

#![deny(unsafe_code)]

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod error;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(any(feature = "azure", feature = "gcp"))]
pub mod jwt;
pub mod local;
pub mod policy;
pub mod protocol;
pub mod provider;
pub mod replicas;
#[cfg(any(feature = "azure", feature = "gcp"))]
mod retry;
pub mod service;
#[cfg(feature = "vault")]
pub mod vault;

pub use error::{ErrorKind, ProviderError};
pub use policy::{AccessPolicy, PolicyError};
pub use provider::{KeyContext, KeyProvider, MasterKeyInfo, WrappedDek};
pub use service::{KeyService, KmsCallAudit, MetricEvent, MetricsSink, Outcome, ServiceSettings};
