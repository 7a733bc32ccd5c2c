//! Reading catalog rows through SPI.
//!
//! A column the catalog declares `NOT NULL` (or a query cannot make NULL) is
//! read with [`Required::required`]: a NULL there means the catalog was
//! edited by hand or the query is wrong, and is reported as such instead of
//! turning into an empty tenant id or a zero.

use pgrx::spi::{SpiHeapTupleData, SpiResult, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum};

use crate::errors::ByokError;

pub trait Required {
    fn optional<T: IntoDatum + FromDatum>(&self, ordinal: usize) -> SpiResult<Option<T>>;

    /// Column `ordinal` (1-based), which must not be NULL.
    fn required<T: IntoDatum + FromDatum>(&self, ordinal: usize) -> Result<T, ByokError> {
        self.optional(ordinal)?.ok_or_else(|| {
            ByokError::Catalog(format!(
                "column {ordinal} of a catalog row is NULL where a value is required"
            ))
        })
    }
}

impl Required for SpiTupleTable<'_> {
    fn optional<T: IntoDatum + FromDatum>(&self, ordinal: usize) -> SpiResult<Option<T>> {
        self.get(ordinal)
    }
}

impl Required for SpiHeapTupleData<'_> {
    fn optional<T: IntoDatum + FromDatum>(&self, ordinal: usize) -> SpiResult<Option<T>> {
        self.get(ordinal)
    }
}

/// A single value a query always produces (a count, a coalesced aggregate).
pub trait NotNull<T> {
    /// The value, or a catalog error naming `what` when the query gave NULL.
    fn not_null(self, what: &str) -> Result<T, ByokError>;
}

impl<T> NotNull<T> for Option<T> {
    fn not_null(self, what: &str) -> Result<T, ByokError> {
        self.ok_or_else(|| ByokError::Catalog(format!("{what}: the query returned NULL")))
    }
}
