//! The sealed-value envelope: the exact bytes of a `byok.encrypted` value.
//!
//! ```text
//! offset  size  field
//!      0     1  format version (1)
//!      1     1  algorithm (1 = AES-256-GCM)
//!      2     8  data-key (DEK) id, big-endian
//!     10    12  nonce, random per value
//!     22     n  ciphertext (same length as the plaintext)
//!   22+n    16  GCM tag
//! ```
//!
//! A searchable value (version 2) carries its blind index term in the header:
//!
//! ```text
//!      0     1  format version (2)
//!      1     1  algorithm (1 = AES-256-GCM)
//!      2     8  data-key (DEK) id, big-endian
//!     10     8  index-key id, big-endian
//!     18     1  term length t (2..=32)
//!     19     t  term
//!   19+t    12  nonce, then ciphertext and tag as in version 1
//! ```
//!
//! The header (everything before the nonce) is also the start of the AAD, so
//! changing the version, algorithm, key ids or term of a value makes it fail
//! authentication rather than decrypt under some other key. The text form is
//! [`TEXT_PREFIX`] followed by standard base64 (with padding) of the same bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The format of a value without a term.
pub const FORMAT_V1: u8 = 1;
/// The format of a searchable value: version 1 plus an index key id and a term.
pub const FORMAT_V2: u8 = 2;
/// AES-256-GCM with a 96-bit nonce and a 128-bit tag.
pub const ALG_AES256_GCM: u8 = 1;
/// Version, algorithm and DEK id: the header of a version 1 value (authenticated as AAD).
pub const HEADER_LEN: usize = 10;
/// An index key id and a term length: what precedes a term (in a version 2
/// header, and in what `byok.term` returns).
pub const KEYED_TERM_FIXED: usize = 8 + 1;
/// A version 2 header before its term: version 1's, an index key id, a term length.
pub const SEARCHABLE_HEADER_FIXED: usize = HEADER_LEN + KEYED_TERM_FIXED;
/// Shortest and longest term a version 2 value carries.
pub const MIN_TERM_LEN: usize = 2;
pub const MAX_TERM_LEN: usize = 32;
/// The longest header of any version.
pub const MAX_HEADER_LEN: usize = SEARCHABLE_HEADER_FIXED + MAX_TERM_LEN;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a version 1 envelope adds to its plaintext (the least any version adds).
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Prefix of the text form, so a sealed value is recognisable in a dump or a log of COPY output.
pub const TEXT_PREFIX: &str = "byok:";

/// Why some bytes are not an envelope. The messages are shown to users, so they
/// say what is wrong without echoing the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("value is {len} bytes long; a sealed value has at least {min} bytes")]
    TooShort { len: usize, min: usize },
    #[error(
        "unsupported envelope format version {0}; this build reads versions {FORMAT_V1} and {FORMAT_V2}"
    )]
    UnsupportedVersion(u8),
    #[error(
        "a searchable value's term is {0} bytes; terms are {MIN_TERM_LEN} to {MAX_TERM_LEN} bytes"
    )]
    BadTermLength(usize),
    #[error("index key id 0 is not valid")]
    ZeroIndexKeyId,
    #[error("unsupported algorithm {0}; this build reads algorithm {ALG_AES256_GCM} (AES-256-GCM)")]
    UnsupportedAlgorithm(u8),
    #[error("data key id 0 is not valid")]
    ZeroKeyId,
}

/// Why a text literal is not a sealed value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("a byok.encrypted literal must start with \"{TEXT_PREFIX}\"")]
    MissingPrefix,
    #[error("the text after \"{TEXT_PREFIX}\" is not valid base64: {0}")]
    InvalidBase64(String),
    #[error("{0}")]
    Format(#[from] FormatError),
}

/// A parsed view over envelope bytes; no copy is made.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    bytes: &'a [u8],
    header_len: usize,
}

impl<'a> Envelope<'a> {
    /// Checks the structure (length, version, algorithm, key id). Authenticity is
    /// only known after opening with the key.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if bytes.len() < OVERHEAD {
            return Err(FormatError::TooShort {
                len: bytes.len(),
                min: OVERHEAD,
            });
        }
        let header_len = match bytes[0] {
            FORMAT_V1 => HEADER_LEN,
            FORMAT_V2 => {
                let min = SEARCHABLE_HEADER_FIXED + NONCE_LEN + TAG_LEN;
                if bytes.len() < min {
                    return Err(FormatError::TooShort {
                        len: bytes.len(),
                        min,
                    });
                }
                let term_len = bytes[SEARCHABLE_HEADER_FIXED - 1] as usize;
                if !(MIN_TERM_LEN..=MAX_TERM_LEN).contains(&term_len) {
                    return Err(FormatError::BadTermLength(term_len));
                }
                let header_len = SEARCHABLE_HEADER_FIXED + term_len;
                if bytes.len() < header_len + NONCE_LEN + TAG_LEN {
                    return Err(FormatError::TooShort {
                        len: bytes.len(),
                        min: header_len + NONCE_LEN + TAG_LEN,
                    });
                }
                header_len
            }
            other => return Err(FormatError::UnsupportedVersion(other)),
        };
        if bytes[1] != ALG_AES256_GCM {
            return Err(FormatError::UnsupportedAlgorithm(bytes[1]));
        }
        let envelope = Envelope { bytes, header_len };
        if envelope.dek_id() == 0 {
            return Err(FormatError::ZeroKeyId);
        }
        if envelope.index_key_id() == Some(0) {
            return Err(FormatError::ZeroIndexKeyId);
        }
        Ok(envelope)
    }

    pub fn dek_id(&self) -> u64 {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.bytes[2..HEADER_LEN]);
        u64::from_be_bytes(id)
    }

    /// Everything before the nonce (authenticated as the start of the AAD).
    pub fn header(&self) -> &'a [u8] {
        &self.bytes[..self.header_len]
    }

    /// The index key a searchable value's term was computed under.
    pub fn index_key_id(&self) -> Option<u64> {
        (self.bytes[0] == FORMAT_V2).then(|| {
            let mut id = [0u8; 8];
            id.copy_from_slice(&self.bytes[HEADER_LEN..HEADER_LEN + 8]);
            u64::from_be_bytes(id)
        })
    }

    /// A searchable value's term.
    pub fn term(&self) -> Option<&'a [u8]> {
        (self.bytes[0] == FORMAT_V2).then(|| &self.bytes[SEARCHABLE_HEADER_FIXED..self.header_len])
    }

    /// The index key id, the term's length and the term, as `byok.term`
    /// returns them: what an index on a searchable column holds.
    pub fn keyed_term(&self) -> Option<&'a [u8]> {
        (self.bytes[0] == FORMAT_V2).then(|| &self.bytes[HEADER_LEN..self.header_len])
    }

    pub fn nonce(&self) -> &'a [u8; NONCE_LEN] {
        self.bytes[self.header_len..self.header_len + NONCE_LEN]
            .try_into()
            .expect("length checked in parse")
    }

    pub fn ciphertext(&self) -> &'a [u8] {
        &self.bytes[self.header_len + NONCE_LEN..self.bytes.len() - TAG_LEN]
    }

    pub fn tag(&self) -> &'a [u8; TAG_LEN] {
        self.bytes[self.bytes.len() - TAG_LEN..]
            .try_into()
            .expect("length checked in parse")
    }

    pub fn plaintext_len(&self) -> usize {
        self.bytes.len() - self.header_len - NONCE_LEN - TAG_LEN
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// The header every value sealed under `dek_id` starts with.
pub fn header_for(dek_id: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = FORMAT_V1;
    header[1] = ALG_AES256_GCM;
    header[2..].copy_from_slice(&dek_id.to_be_bytes());
    header
}

/// Writes the index key id, the term's length and the term into `out` (at
/// least [`KEYED_TERM_FIXED`] + `term.len()` bytes); returns the length written.
pub fn write_keyed_term(index_key_id: u64, term: &[u8], out: &mut [u8]) -> usize {
    debug_assert!((MIN_TERM_LEN..=MAX_TERM_LEN).contains(&term.len()));
    out[..8].copy_from_slice(&index_key_id.to_be_bytes());
    out[8] = term.len() as u8;
    out[KEYED_TERM_FIXED..KEYED_TERM_FIXED + term.len()].copy_from_slice(term);
    KEYED_TERM_FIXED + term.len()
}

/// Writes the header of a searchable value into `out` (at least
/// [`SEARCHABLE_HEADER_FIXED`] + `term.len()` bytes); returns its length.
pub fn write_searchable_header(
    dek_id: u64,
    index_key_id: u64,
    term: &[u8],
    out: &mut [u8],
) -> usize {
    out[..HEADER_LEN].copy_from_slice(&header_for(dek_id));
    out[0] = FORMAT_V2;
    HEADER_LEN + write_keyed_term(index_key_id, term, &mut out[HEADER_LEN..])
}

/// Length of the envelope for a plaintext of `plaintext_len` bytes.
pub fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// Length of a searchable envelope with a term of `term_len` bytes.
pub fn searchable_sealed_len(plaintext_len: usize, term_len: usize) -> usize {
    plaintext_len + OVERHEAD + KEYED_TERM_FIXED + term_len
}

/// Length of the text form of an envelope of `envelope_len` bytes.
pub fn text_len(envelope_len: usize) -> usize {
    TEXT_PREFIX.len() + envelope_len.div_ceil(3) * 4
}

/// Appends the text form of `envelope` to `out` (which callers size with [`text_len`]).
pub fn encode_text_into(envelope: &[u8], out: &mut String) {
    out.push_str(TEXT_PREFIX);
    BASE64.encode_string(envelope, out);
}

pub fn encode_text(envelope: &[u8]) -> String {
    let mut out = String::with_capacity(text_len(envelope.len()));
    encode_text_into(envelope, &mut out);
    out
}

/// Parses the text form back into envelope bytes, checking the structure.
pub fn decode_text(text: &str) -> Result<Vec<u8>, TextError> {
    let body = text
        .strip_prefix(TEXT_PREFIX)
        .ok_or(TextError::MissingPrefix)?;
    // PostgreSQL's encode(..., 'base64') breaks lines every 76 characters; accept that.
    let bytes = if body.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        BASE64.decode(compact)
    } else {
        BASE64.decode(body.as_bytes())
    }
    .map_err(|e| TextError::InvalidBase64(e.to_string()))?;
    Envelope::parse(&bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(plaintext_len: usize) -> Vec<u8> {
        let mut bytes = header_for(42).to_vec();
        bytes.extend(std::iter::repeat_n(
            7u8,
            NONCE_LEN + plaintext_len + TAG_LEN,
        ));
        bytes
    }

    #[test]
    fn parse_exposes_fields() {
        let bytes = sample(5);
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.dek_id(), 42);
        assert_eq!(env.plaintext_len(), 5);
        assert_eq!(env.ciphertext().len(), 5);
        assert_eq!(env.header(), &header_for(42));
    }

    #[test]
    fn empty_plaintext_is_valid() {
        let bytes = sample(0);
        assert_eq!(Envelope::parse(&bytes).unwrap().plaintext_len(), 0);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample(0);
        for len in 0..bytes.len() {
            assert_eq!(
                Envelope::parse(&bytes[..len]).unwrap_err(),
                FormatError::TooShort { len, min: OVERHEAD }
            );
        }
    }

    #[test]
    fn unknown_version_algorithm_and_zero_key_are_refused() {
        let mut bytes = sample(3);
        bytes[0] = 3;
        assert_eq!(
            Envelope::parse(&bytes).unwrap_err(),
            FormatError::UnsupportedVersion(3)
        );
        bytes[0] = FORMAT_V1;
        bytes[1] = 9;
        assert_eq!(
            Envelope::parse(&bytes).unwrap_err(),
            FormatError::UnsupportedAlgorithm(9)
        );
        bytes[1] = ALG_AES256_GCM;
        bytes[2..10].fill(0);
        assert_eq!(Envelope::parse(&bytes).unwrap_err(), FormatError::ZeroKeyId);
    }

    fn searchable_sample(plaintext_len: usize, term_len: usize) -> Vec<u8> {
        let term = vec![0xAB; term_len];
        let mut bytes = vec![0u8; SEARCHABLE_HEADER_FIXED + term_len];
        write_searchable_header(42, 7, &term, &mut bytes);
        bytes.extend(std::iter::repeat_n(
            9u8,
            NONCE_LEN + plaintext_len + TAG_LEN,
        ));
        bytes
    }

    #[test]
    fn searchable_values_expose_their_term() {
        let bytes = searchable_sample(5, 8);
        assert_eq!(bytes.len(), searchable_sealed_len(5, 8));
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.dek_id(), 42);
        assert_eq!(env.index_key_id(), Some(7));
        assert_eq!(env.term(), Some(&[0xAB; 8][..]));
        let keyed = env.keyed_term().unwrap();
        assert_eq!(&keyed[..8], &7u64.to_be_bytes());
        assert_eq!(&keyed[9..], &[0xAB; 8]);
        assert_eq!(env.plaintext_len(), 5);
        assert_eq!(env.ciphertext(), &[9u8; 5]);
        assert_eq!(env.header().len(), SEARCHABLE_HEADER_FIXED + 8);
        // A value without a term has none.
        let plain = sample(5);
        assert_eq!(Envelope::parse(&plain).unwrap().term(), None);
        assert_eq!(Envelope::parse(&plain).unwrap().index_key_id(), None);
    }

    #[test]
    fn malformed_searchable_values_are_refused() {
        let bytes = searchable_sample(0, 4);
        for len in 0..bytes.len() {
            assert!(matches!(
                Envelope::parse(&bytes[..len]).unwrap_err(),
                FormatError::TooShort { .. }
            ));
        }
        for bad in [0u8, 1, 33, 255] {
            let mut b = searchable_sample(40, 8);
            b[SEARCHABLE_HEADER_FIXED - 1] = bad;
            assert_eq!(
                Envelope::parse(&b).unwrap_err(),
                FormatError::BadTermLength(bad as usize)
            );
        }
        let mut b = searchable_sample(3, 8);
        b[HEADER_LEN..HEADER_LEN + 8].fill(0);
        assert_eq!(
            Envelope::parse(&b).unwrap_err(),
            FormatError::ZeroIndexKeyId
        );
    }

    #[test]
    fn text_round_trip_and_length() {
        for n in 0..40 {
            let bytes = sample(n);
            let text = encode_text(&bytes);
            assert_eq!(text.len(), text_len(bytes.len()));
            assert_eq!(decode_text(&text).unwrap(), bytes);
        }
    }

    #[test]
    fn line_broken_base64_is_accepted() {
        let bytes = sample(100);
        let text = encode_text(&bytes);
        let (head, tail) = text.split_at(40);
        assert_eq!(decode_text(&format!("{head}\n{tail}\n")).unwrap(), bytes);
    }

    #[test]
    fn malformed_text_is_refused_with_a_reason() {
        assert_eq!(decode_text("hello").unwrap_err(), TextError::MissingPrefix);
        assert!(matches!(
            decode_text("byok:@@@@").unwrap_err(),
            TextError::InvalidBase64(_)
        ));
        assert!(matches!(
            decode_text("byok:AAAA").unwrap_err(),
            TextError::Format(FormatError::TooShort { len: 3, .. })
        ));
        assert!(matches!(
            decode_text("").unwrap_err(),
            TextError::MissingPrefix
        ));
    }
}
