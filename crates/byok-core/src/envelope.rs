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
//! The first [`HEADER_LEN`] bytes are also the start of the AAD, so changing the
//! version, algorithm or key id of a value makes it fail authentication rather
//! than decrypt under some other key. The text form is [`TEXT_PREFIX`] followed
//! by standard base64 (with padding) of the same bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The only envelope format this build writes; readers refuse other versions.
pub const FORMAT_V1: u8 = 1;
/// AES-256-GCM with a 96-bit nonce and a 128-bit tag.
pub const ALG_AES256_GCM: u8 = 1;
/// Version, algorithm and DEK id: the part of the envelope that is authenticated as AAD.
pub const HEADER_LEN: usize = 10;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Prefix of the text form, so a sealed value is recognisable in a dump or a log of COPY output.
pub const TEXT_PREFIX: &str = "byok:";

/// Why some bytes are not an envelope. The messages are shown to users, so they
/// say what is wrong without echoing the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("value is {len} bytes long; a sealed value has at least {min} bytes")]
    TooShort { len: usize, min: usize },
    #[error("unsupported envelope format version {0}; this build reads version {FORMAT_V1}")]
    UnsupportedVersion(u8),
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
        if bytes[0] != FORMAT_V1 {
            return Err(FormatError::UnsupportedVersion(bytes[0]));
        }
        if bytes[1] != ALG_AES256_GCM {
            return Err(FormatError::UnsupportedAlgorithm(bytes[1]));
        }
        let envelope = Envelope { bytes };
        if envelope.dek_id() == 0 {
            return Err(FormatError::ZeroKeyId);
        }
        Ok(envelope)
    }

    pub fn dek_id(&self) -> u64 {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.bytes[2..HEADER_LEN]);
        u64::from_be_bytes(id)
    }

    pub fn header(&self) -> &'a [u8; HEADER_LEN] {
        self.bytes[..HEADER_LEN]
            .try_into()
            .expect("length checked in parse")
    }

    pub fn nonce(&self) -> &'a [u8; NONCE_LEN] {
        self.bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN]
            .try_into()
            .expect("length checked in parse")
    }

    pub fn ciphertext(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN + NONCE_LEN..self.bytes.len() - TAG_LEN]
    }

    pub fn tag(&self) -> &'a [u8; TAG_LEN] {
        self.bytes[self.bytes.len() - TAG_LEN..]
            .try_into()
            .expect("length checked in parse")
    }

    pub fn plaintext_len(&self) -> usize {
        self.bytes.len() - OVERHEAD
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

/// Length of the envelope for a plaintext of `plaintext_len` bytes.
pub fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
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
        bytes[0] = 2;
        assert_eq!(
            Envelope::parse(&bytes).unwrap_err(),
            FormatError::UnsupportedVersion(2)
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
