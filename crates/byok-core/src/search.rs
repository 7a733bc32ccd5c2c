//! Blind index terms: what makes an encrypted column searchable by equality.
//!
//! A term is HMAC-SHA-256 under the tenant's *index key* (256 bits, wrapped
//! by the tenant's master key like a data key) of the tenant, the context and
//! the normalized plaintext, each length-prefixed, truncated to the column's
//! term length. The same plaintext gives unrelated terms in another tenant
//! (another key, another tenant id) or another context. Never a plain hash: a
//! term reveals nothing without the index key, only equality within one
//! tenant, context and index key.
//!
//! Normalization is declared per column and applied identically when a value
//! is sealed and when a probe is computed: a Unicode form (NFC or NFKC), then
//! Unicode lowercase (not full case folding), then trimming of white space.

#[cfg(not(feature = "fips"))]
use std::cell::RefCell;

#[cfg(not(feature = "fips"))]
use hmac::{HmacReset, KeyInit, Mac};
#[cfg(not(feature = "fips"))]
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

#[cfg(not(feature = "fips"))]
use crate::secret_mem::SecretBox;

pub use crate::envelope::{MAX_TERM_LEN, MIN_TERM_LEN};

/// The default: a lookup among n values meets about n / 2^64 false candidates.
pub const DEFAULT_TERM_LEN: usize = 8;

/// Whether stored term settings (a length and a normalization spec) are the
/// defaults, which a node without the column's registration applies.
pub fn is_default_spec(term_len: usize, normalization: &str) -> bool {
    term_len == DEFAULT_TERM_LEN
        && Normalization::parse(normalization).is_ok_and(|n| n == Normalization::default())
}

/// The first byte of every term's message: the format, so a later one can
/// never produce the same message (index keys are used for nothing else).
const TERM_FORMAT: u8 = 1;

/// How a column's terms are made: its normalization and term length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchSpec {
    pub normalization: Normalization,
    pub term_len: usize,
}

impl SearchSpec {
    /// The same settings with terms of `term_len` bytes (a stored value keeps
    /// the length it was sealed with until a job rewrites it).
    pub fn with_term_len(self, term_len: usize) -> Self {
        SearchSpec {
            term_len: term_len.clamp(MIN_TERM_LEN, MAX_TERM_LEN),
            ..self
        }
    }
}

impl Default for SearchSpec {
    fn default() -> Self {
        SearchSpec {
            normalization: Normalization::default(),
            term_len: DEFAULT_TERM_LEN,
        }
    }
}

/// Why a value cannot be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("the value is not valid UTF-8, which this column's normalization needs")]
    NotUtf8,
}

/// A Unicode normalization form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnicodeForm {
    Nfc,
    Nfkc,
}

/// How a column's values are normalized before their term is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Normalization {
    pub unicode: Option<UnicodeForm>,
    pub lowercase: bool,
    pub trim: bool,
}

impl Normalization {
    /// `exact`, or a comma-separated list of `nfc`/`nfkc`, `lowercase`, `trim`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut n = Normalization::default();
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("exact") || spec.is_empty() {
            return Ok(n);
        }
        for part in spec.split(',').map(str::trim) {
            match part.to_ascii_lowercase().as_str() {
                "nfc" | "nfkc" if n.unicode.is_some() => {
                    return Err("give one Unicode form (nfc or nfkc)".into());
                }
                "nfc" => n.unicode = Some(UnicodeForm::Nfc),
                "nfkc" => n.unicode = Some(UnicodeForm::Nfkc),
                "lowercase" => n.lowercase = true,
                "trim" => n.trim = true,
                other => {
                    return Err(format!(
                        "unknown normalization \"{}\"; expected exact, or any of nfc|nfkc, lowercase, trim",
                        other.chars().take(32).collect::<String>()
                    ));
                }
            }
        }
        Ok(n)
    }

    /// The spec that parses back to this normalization (stored with a column).
    pub fn spec(&self) -> String {
        let mut parts = Vec::new();
        match self.unicode {
            Some(UnicodeForm::Nfc) => parts.push("nfc"),
            Some(UnicodeForm::Nfkc) => parts.push("nfkc"),
            None => {}
        }
        if self.lowercase {
            parts.push("lowercase");
        }
        if self.trim {
            parts.push("trim");
        }
        if parts.is_empty() {
            "exact".into()
        } else {
            parts.join(",")
        }
    }

    /// Whether values are used exactly as given.
    pub fn is_exact(&self) -> bool {
        *self == Normalization::default()
    }

    /// `text` normalized (plaintext: every buffer it passes through is wiped;
    /// the first is sized so that it rarely grows, which would leave a copy
    /// behind in freed memory).
    pub fn apply(&self, text: &str) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(text.len() * 3 + 16));
        match self.unicode {
            Some(UnicodeForm::Nfc) => out.extend(text.nfc()),
            Some(UnicodeForm::Nfkc) => out.extend(text.nfkc()),
            None => out.push_str(text),
        }
        if self.lowercase {
            // Unicode lowercase (char::to_lowercase), not full case folding:
            // "STRASSE" and "straße" stay different values.
            let mut lowered = Zeroizing::new(String::with_capacity(out.len() + 16));
            lowered.extend(out.chars().flat_map(char::to_lowercase));
            out = lowered;
        }
        if self.trim {
            let trimmed = out.trim();
            if trimmed.len() != out.len() {
                out = Zeroizing::new(trimmed.to_string());
            }
        }
        out
    }

    /// `value` normalized: borrowed as it is when the normalization is exact
    /// (no allocation on the per-row path), else a wiped-on-drop copy (an
    /// allocation or two per value).
    pub fn apply_bytes<'a>(&self, value: &'a [u8]) -> Result<Normalized<'a>, NormalizeError> {
        if self.is_exact() {
            return Ok(Normalized::Exact(value));
        }
        let text = std::str::from_utf8(value).map_err(|_| NormalizeError::NotUtf8)?;
        Ok(Normalized::Changed(self.apply(text)))
    }
}

/// A normalized value.
pub enum Normalized<'a> {
    Exact(&'a [u8]),
    Changed(Zeroizing<String>),
}

impl Normalized<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Normalized::Exact(b) => b,
            Normalized::Changed(s) => s.as_bytes(),
        }
    }
}

/// A tenant's index key, ready: an HMAC-SHA-256 instance keyed with it (in
/// memory excluded from core dumps and wiped on drop), which each term resets
/// to its keyed state: a term costs the hashing of its message only, with no
/// copy of the key state to make and wipe per value.
/// In a FIPS build, the module's HMAC-SHA-256, kept the same way.
pub struct IndexKey {
    #[cfg(not(feature = "fips"))]
    keyed: SecretBox<RefCell<HmacReset<Sha256>>>,
    #[cfg(feature = "fips")]
    keyed: crate::aws_lc::HmacSha256,
}

impl IndexKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        IndexKey {
            #[cfg(not(feature = "fips"))]
            keyed: SecretBox::new(RefCell::new(
                <HmacReset<Sha256> as KeyInit>::new_from_slice(bytes)
                    .expect("HMAC takes a key of any length"),
            )),
            #[cfg(feature = "fips")]
            keyed: crate::aws_lc::HmacSha256::new(bytes),
        }
    }

    /// Writes the term of `normalized` (already normalized plaintext) for
    /// `tenant` and `context` into `out`, whose length (MIN_TERM_LEN..=MAX_TERM_LEN)
    /// is the term's. The message is `TERM_FORMAT | u8 tenant length | tenant |
    /// u32 context length | context | value`: unambiguous (the value comes
    /// last), and short, so a 100-byte value takes three SHA-256 blocks.
    pub fn term_into(&self, tenant: &str, context: &[u8], normalized: &[u8], out: &mut [u8]) {
        debug_assert!((MIN_TERM_LEN..=MAX_TERM_LEN).contains(&out.len()));
        debug_assert!(tenant.len() <= crate::crypto::MAX_TENANT_ID_LEN);
        let prefix = [TERM_FORMAT, tenant.len() as u8];
        let context_len = (context.len() as u32).to_be_bytes();
        #[cfg(not(feature = "fips"))]
        let full = {
            let mut mac = self.keyed.borrow_mut();
            // (finalize_reset leaves it keyed; this covers an unwind midway)
            Mac::reset(&mut *mac);
            mac.update(&prefix);
            mac.update(tenant.as_bytes());
            mac.update(&context_len);
            mac.update(context);
            mac.update(normalized);
            mac.finalize_reset().into_bytes()
        };
        #[cfg(feature = "fips")]
        let full = self.keyed.mac(&[
            &prefix,
            tenant.as_bytes(),
            &context_len,
            context,
            normalized,
        ]);
        let len = out.len().min(MAX_TERM_LEN);
        out[..len].copy_from_slice(&full[..len]);
    }

    /// As [`term_into`](Self::term_into), into a new vector of `len` bytes
    /// (clamped to MIN_TERM_LEN..=MAX_TERM_LEN).
    pub fn term(&self, tenant: &str, context: &[u8], normalized: &[u8], len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len.clamp(MIN_TERM_LEN, MAX_TERM_LEN)];
        self.term_into(tenant, context, normalized, &mut out);
        out
    }
}

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(<redacted>)")
    }
}

/// What `byok.term` returns for a searchable value, and so what a probe must
/// be: the index key id, the term's length and the term (the envelope header's
/// bytes after the data key id, [`crate::envelope::Envelope::keyed_term`]).
pub fn keyed_term(index_key_id: u64, term: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; crate::envelope::KEYED_TERM_FIXED + term.len()];
    crate::envelope::write_keyed_term(index_key_id, term, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_eight_bytes_exact() {
        assert!(is_default_spec(8, "exact"));
        assert!(is_default_spec(8, ""));
        assert!(!is_default_spec(12, "exact"));
        assert!(!is_default_spec(8, "lowercase"));
        assert!(!is_default_spec(8, "no such normalization"));
    }

    fn key(b: u8) -> IndexKey {
        IndexKey::from_bytes(&[b; 32])
    }

    #[test]
    fn terms_are_bound_to_key_tenant_context_and_value() {
        let k = key(1);
        let t = k.term("acme", b"users.email", b"alice@example.com", 16);
        assert_eq!(t.len(), 16);
        assert_eq!(t, k.term("acme", b"users.email", b"alice@example.com", 16));
        for other in [
            key(2).term("acme", b"users.email", b"alice@example.com", 16),
            k.term("globex", b"users.email", b"alice@example.com", 16),
            k.term("acme", b"users.name", b"alice@example.com", 16),
            k.term("acme", b"users.email", b"bob@example.com", 16),
            // length prefixes: moving bytes between fields changes the term
            k.term("acmeu", b"sers.email", b"alice@example.com", 16),
        ] {
            assert_ne!(t, other);
        }
        // A shorter term is a prefix of the longer one.
        assert_eq!(
            k.term("acme", b"c", b"v", 4),
            k.term("acme", b"c", b"v", 32)[..4].to_vec()
        );
        assert_eq!(k.term("acme", b"c", b"v", 1).len(), MIN_TERM_LEN);
        assert_eq!(k.term("acme", b"c", b"v", 99).len(), MAX_TERM_LEN);
    }

    #[test]
    fn normalization_parses_and_applies_in_a_fixed_order() {
        assert_eq!(
            Normalization::parse("exact").unwrap(),
            Normalization::default()
        );
        let n = Normalization::parse("trim, lowercase,NFKC").unwrap();
        assert_eq!(n.spec(), "nfkc,lowercase,trim");
        assert_eq!(Normalization::parse(&n.spec()).unwrap(), n);
        // NFKC folds the ligature and the full-width letters; then lowercase; then trim.
        assert_eq!(&*n.apply("  \u{FB01}LE \u{FF21}  "), "file a");
        // NFC composes, NFKC also folds compatibility characters.
        let nfc = Normalization::parse("nfc").unwrap();
        assert_eq!(&*nfc.apply("e\u{301}"), "\u{e9}");
        assert_eq!(&*nfc.apply("\u{FB01}"), "\u{FB01}");
        assert_eq!(&*Normalization::default().apply(" A "), " A ");
        assert!(Normalization::parse("nfc,nfkc").is_err());
        assert!(Normalization::parse("soundex").is_err());
        assert!(Normalization::parse("casefold").is_err());
        assert_eq!(&*Normalization::parse("trim").unwrap().apply(""), "");
        // Exact borrows; others need UTF-8.
        assert!(matches!(
            Normalization::default().apply_bytes(b"\xff").unwrap(),
            Normalized::Exact(_)
        ));
        assert_eq!(n.apply_bytes(b"\xff").err(), Some(NormalizeError::NotUtf8));
        assert_eq!(n.apply_bytes(b" A ").unwrap().as_bytes(), b"a");
    }
}
