//! Sealing and opening values with AES-256-GCM under a data key.
//!
//! The AAD of every value is
//! `envelope header (version, algorithm, DEK id; for a searchable value also
//! its index key id and term) || u16 tenant length || tenant id || context`,
//! so a value copied to another tenant, another key id, or used with another
//! caller context (column name, primary key...) fails to open. The context comes
//! last, which makes the encoding unambiguous without a second length prefix.

#[cfg(not(feature = "fips"))]
use aes_gcm::aead::inout::InOutBuf;
#[cfg(not(feature = "fips"))]
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

use crate::aws_lc::{GcmCodePath, gcm_code_path};
use crate::aws_lc_gcm::AwsLcGcm;
use crate::secret_mem::SecretBox;

use crate::envelope::{self, Envelope, HEADER_LEN, NONCE_LEN, TAG_LEN};

/// Length of a data key: AES-256.
pub const DEK_LEN: usize = 32;

/// Longest tenant id the AAD encoding (and the catalog) accepts.
pub const MAX_TENANT_ID_LEN: usize = 128;

/// AADs up to this size are built on the stack, so sealing with an ordinary
/// context does not allocate. Small, because the buffer is zeroed on every call.
const STACK_AAD_LEN: usize = 160;

/// A plaintext data key, in memory excluded from core dumps
/// ([`SecretBox`]) and wiped when dropped; never printed.
#[derive(Clone)]
pub struct DataKey(SecretBox<[u8; DEK_LEN]>);

impl PartialEq for DataKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant time: keys are compared in tests and checks, never to decide
        // anything an attacker can time, but there is no reason to leak either.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for DataKey {}

impl DataKey {
    /// A new random key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = DataKey(SecretBox::new([0u8; DEK_LEN]));
        os_random(&mut key.0[..])?;
        Ok(key)
    }

    /// Takes the bytes of an unwrapped key; `bytes` should be zeroized by the caller.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let bytes: &[u8; DEK_LEN] = bytes
            .try_into()
            .map_err(|_| CryptoError::BadKeyLength(bytes.len()))?;
        Ok(DataKey::from_bytes(bytes))
    }

    /// As [`from_slice`](Self::from_slice), for bytes whose length is already
    /// right (so it cannot fail); `bytes` should be zeroized by the caller.
    pub fn from_bytes(bytes: &[u8; DEK_LEN]) -> Self {
        let mut key = DataKey(SecretBox::new([0u8; DEK_LEN]));
        key.0.copy_from_slice(bytes);
        key
    }

    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Wrong key, wrong tenant, wrong context, or a modified value: GCM cannot tell
    /// which, and saying more would help an attacker.
    #[error("the value or its context does not match: authentication failed")]
    AuthenticationFailed,
    #[error("the value was sealed under data key {found}, not {expected}")]
    WrongKey { expected: u64, found: u64 },
    #[error("the operating system's random number generator is unavailable")]
    RandomUnavailable,
    #[error("a data key must be {DEK_LEN} bytes, got {0}")]
    BadKeyLength(usize),
    #[error("tenant id is longer than {MAX_TENANT_ID_LEN} bytes")]
    TenantIdTooLong,
    #[error("output buffer has the wrong length")]
    BadOutputLength,
    /// aws-lc refused to set up an AES-256-GCM key (it does not for a 32-byte
    /// key, short of running out of memory).
    #[error("the AES-256-GCM key could not be set up")]
    KeySetupFailed,
}

/// The two AES-256-GCM implementations a value may go through. Both make and
/// accept the same bytes (same nonce, AAD and tag), so a value sealed by one
/// opens with the other; which one runs is a matter of speed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcmImpl {
    /// RustCrypto's `aes-gcm`: the faster on short values (no call into C,
    /// a cheaper set-up per message).
    RustCrypto,
    /// aws-lc's stitched AES-GCM: the faster on long values.
    AwsLc,
}

/// Where aws-lc runs its AVX-512 AES-GCM ([`GcmCodePath::Avx512`]),
/// plaintexts of at least this many bytes go through aws-lc, shorter ones
/// through `aes-gcm`. Both thresholds are taken from `cargo run --release -p
/// byok-core --example gcm_crossover`, which times both implementations per
/// size on the machine it runs on (the figures and the CPUs measured:
/// docs/performance.md).
pub const AWS_LC_FROM_BYTES_AVX512: usize = 384;

/// The same, on every other CPU: there aws-lc's AVX code overtakes
/// RustCrypto's AES-NI code only from about here (measured on AMD Zen 3, which
/// has VAES but not AVX-512; aws-lc's AVX-512 code needs both).
pub const AWS_LC_FROM_BYTES_ELSEWHERE: usize = 768;

/// The length from which plaintexts go through aws-lc on this CPU (in a FIPS
/// build every one does: 0). Read once per data key, when its cipher is set
/// up, so the per-value path compares against a field of the cipher.
pub fn aws_lc_from_bytes() -> usize {
    if crate::aws_lc::FIPS_BUILD {
        return 0;
    }
    match gcm_code_path() {
        GcmCodePath::Avx512 => AWS_LC_FROM_BYTES_AVX512,
        GcmCodePath::Other => AWS_LC_FROM_BYTES_ELSEWHERE,
    }
}

/// Fills `buf` with random bytes for keys and secrets: the OS CSPRNG, or in a
/// FIPS build the module's DRBG (see [`os_random`]).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    os_random(buf)
}

/// Fills `buf` from the OS CSPRNG.
///
/// The cause `getrandom` gives (an OS error code) is deliberately not kept:
/// [`CryptoError`] is a closed set of fixed messages that reach SQL users, and
/// on the platforms byok_pg runs on the only failures are the kernel refusing
/// `getrandom(2)` (a seccomp policy, a kernel too old) or `/dev/urandom` being
/// unreadable, which all mean the same thing to the caller: no key or nonce can
/// be made, so nothing is sealed.
///
/// In a FIPS build the bytes come from the module's DRBG (itself seeded from
/// the OS), as FIPS 140-3 requires of keys.
fn os_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    #[cfg(feature = "fips")]
    return crate::aws_lc::random_bytes(buf)
        .then_some(())
        .ok_or(CryptoError::RandomUnavailable);
    #[cfg(not(feature = "fips"))]
    getrandom::fill(buf).map_err(|_| CryptoError::RandomUnavailable)
}

/// A ready AES-256-GCM key schedule for one DEK, bound to its tenant. This is
/// what the backend caches, so a cache hit costs no key expansion.
pub struct DekCipher {
    /// The key schedule, in memory excluded from core dumps (none in a FIPS
    /// build, where every value goes through the module).
    #[cfg(not(feature = "fips"))]
    cipher: SecretBox<Aes256Gcm>,
    /// aws-lc's context for the same key, expanded once with the first, also
    /// in memory excluded from core dumps.
    large: AwsLcGcm,
    /// Plaintexts from this length go through `large` ([`aws_lc_from_bytes`]).
    aws_lc_from: usize,
    dek_id: u64,
    header: [u8; HEADER_LEN],
    tenant_id: Box<str>,
}

impl DekCipher {
    pub fn new(dek_id: u64, tenant_id: &str, key: &DataKey) -> Result<Self, CryptoError> {
        if tenant_id.len() > MAX_TENANT_ID_LEN {
            return Err(CryptoError::TenantIdTooLong);
        }
        let large = AwsLcGcm::new(key.expose()).ok_or(CryptoError::KeySetupFailed)?;
        Ok(DekCipher {
            #[cfg(not(feature = "fips"))]
            cipher: SecretBox::new(Aes256Gcm::new(key.expose().into())),
            large,
            aws_lc_from: aws_lc_from_bytes(),
            dek_id,
            header: envelope::header_for(dek_id),
            tenant_id: tenant_id.into(),
        })
    }

    pub fn dek_id(&self) -> u64 {
        self.dek_id
    }

    /// The implementation a plaintext of `len` bytes goes through by default:
    /// the faster one on this CPU, in a FIPS build always the module.
    #[inline]
    pub fn implementation_for(&self, len: usize) -> GcmImpl {
        if len >= self.aws_lc_from {
            GcmImpl::AwsLc
        } else {
            GcmImpl::RustCrypto
        }
    }

    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// Seals `plaintext` into `out`, which must be exactly
    /// `envelope::sealed_len(plaintext.len())` bytes. The nonce is fresh from the OS CSPRNG.
    pub fn seal_into(
        &self,
        plaintext: &[u8],
        context: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.seal_into_with(plaintext, context, out, &mut os_random)
    }

    /// As [`seal_into`](Self::seal_into), with the nonce drawn by `fill_nonce`
    /// (for example from a [`NoncePool`]). It must never repeat under one key.
    ///
    /// `fill_nonce` is a trait object on purpose: a generic parameter would make
    /// every caller instantiate (and, in a debug build, leave unoptimized) the
    /// whole AES-GCM path; this way it is compiled here once.
    pub fn seal_into_with(
        &self,
        plaintext: &[u8],
        context: &[u8],
        out: &mut [u8],
        fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        let using = self.implementation_for(plaintext.len());
        self.seal_into_using(using, plaintext, context, out, fill_nonce)
    }

    /// As [`seal_into_with`](Self::seal_into_with), through the implementation
    /// named (the backends pass the one `byok.aes_gcm_implementation` picks).
    pub fn seal_into_using(
        &self,
        using: GcmImpl,
        plaintext: &[u8],
        context: &[u8],
        out: &mut [u8],
        fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        if out.len() != envelope::sealed_len(plaintext.len()) {
            return Err(CryptoError::BadOutputLength);
        }
        out[..HEADER_LEN].copy_from_slice(&self.header);
        self.seal_after_header(using, HEADER_LEN, plaintext, context, out, fill_nonce)
    }

    /// As [`seal_into_with`](Self::seal_into_with), for a searchable value: the
    /// envelope (version 2) carries `term`, computed under index key
    /// `index_key_id`, in its authenticated header. `out` must be exactly
    /// `envelope::searchable_sealed_len(plaintext.len(), term.len())` bytes;
    /// `using`: the implementation (`self.implementation_for(plaintext.len())` unless
    /// the server pins one).
    pub fn seal_searchable_into_with(
        &self,
        using: GcmImpl,
        plaintext: &[u8],
        context: &[u8],
        (index_key_id, term): (u64, &[u8]),
        out: &mut [u8],
        fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        if !(envelope::MIN_TERM_LEN..=envelope::MAX_TERM_LEN).contains(&term.len())
            || index_key_id == 0
            || out.len() != envelope::searchable_sealed_len(plaintext.len(), term.len())
        {
            return Err(CryptoError::BadOutputLength);
        }
        let header_len = envelope::write_searchable_header(self.dek_id, index_key_id, term, out);
        self.seal_after_header(using, header_len, plaintext, context, out, fill_nonce)
    }

    /// Seals into `out`, whose first `header_len` bytes hold the header already.
    #[inline]
    fn seal_after_header(
        &self,
        using: GcmImpl,
        header_len: usize,
        plaintext: &[u8],
        context: &[u8],
        out: &mut [u8],
        fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    ) -> Result<(), CryptoError> {
        let (header, rest) = out.split_at_mut(header_len);
        let (nonce, rest) = rest.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(plaintext.len());
        let nonce: &mut [u8; NONCE_LEN] = nonce.try_into().expect("NONCE_LEN is 12");
        let tag_out: &mut [u8; TAG_LEN] = tag_out.try_into().expect("TAG_LEN is 16");
        self.with_aad(header, context, |aad| {
            self.gcm_seal(using, nonce, fill_nonce, aad, plaintext, body, tag_out)
        })
    }

    /// AES-256-GCM of `plaintext` into `body` (as long) and `tag_out`,
    /// through `using`, under a fresh nonce written to `nonce`: drawn by
    /// `fill_nonce`, or in a FIPS build by the module itself. On failure
    /// `body` holds no plaintext.
    #[allow(clippy::too_many_arguments)]
    fn gcm_seal(
        &self,
        using: GcmImpl,
        nonce: &mut [u8; NONCE_LEN],
        fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
        aad: &[u8],
        plaintext: &[u8],
        body: &mut [u8],
        tag_out: &mut [u8; TAG_LEN],
    ) -> Result<(), CryptoError> {
        #[cfg(not(feature = "fips"))]
        if using == GcmImpl::RustCrypto {
            fill_nonce(nonce)?;
            let buffer =
                InOutBuf::new(plaintext, body).map_err(|_| CryptoError::BadOutputLength)?;
            // (fails only beyond GCM's 64 GiB limit)
            let tag = self
                .cipher
                .encrypt_inout_detached(&Nonce::from(*nonce), aad, buffer)
                .map_err(|_| CryptoError::BadOutputLength)?;
            tag_out.copy_from_slice(&tag);
            return Ok(());
        }
        #[cfg(feature = "fips")]
        let _ = using; // (the module is the only implementation)
        seal_fresh(
            &self.large,
            nonce,
            fill_nonce,
            aad,
            plaintext,
            body,
            tag_out,
        )
        .inspect_err(|_| body.zeroize())
    }

    /// Opens `envelope` into `out`, which must be exactly `envelope.plaintext_len()`
    /// bytes. On failure `out` is zeroed, so no unauthenticated plaintext escapes.
    pub fn open_into(
        &self,
        envelope: &Envelope<'_>,
        context: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.open_into_using(
            self.implementation_for(envelope.plaintext_len()),
            envelope,
            context,
            out,
        )
    }

    /// As [`open_into`](Self::open_into), through the implementation named
    /// (the backends pass the one `byok.aes_gcm_implementation` picks).
    pub fn open_into_using(
        &self,
        using: GcmImpl,
        envelope: &Envelope<'_>,
        context: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        if envelope.dek_id() != self.dek_id {
            return Err(CryptoError::WrongKey {
                expected: self.dek_id,
                found: envelope.dek_id(),
            });
        }
        if out.len() != envelope.plaintext_len() {
            return Err(CryptoError::BadOutputLength);
        }
        let result = self.with_aad(envelope.header(), context, |aad| {
            self.gcm_open(
                using,
                envelope.nonce(),
                aad,
                envelope.ciphertext(),
                envelope.tag(),
                out,
            )
        });
        if result.is_err() {
            out.zeroize();
        }
        result
    }

    /// Opens AES-256-GCM `ciphertext` and `tag` into `out` (as long), through
    /// `using`. `out` may hold anything on failure: the caller wipes it.
    fn gcm_open(
        &self,
        using: GcmImpl,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        #[cfg(not(feature = "fips"))]
        if using == GcmImpl::RustCrypto {
            let buffer =
                InOutBuf::new(ciphertext, out).map_err(|_| CryptoError::BadOutputLength)?;
            return self
                .cipher
                .decrypt_inout_detached(&Nonce::from(*nonce), aad, buffer, &Tag::from(*tag))
                .map_err(|_| CryptoError::AuthenticationFailed);
        }
        #[cfg(feature = "fips")]
        let _ = using; // (the module is the only implementation)
        if out.len() != ciphertext.len() {
            return Err(CryptoError::BadOutputLength);
        }
        if self.large.open(nonce, aad, ciphertext, tag, out) {
            Ok(())
        } else {
            Err(CryptoError::AuthenticationFailed)
        }
    }

    /// Convenience for tests and tools: seal into a new vector.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = vec![0u8; envelope::sealed_len(plaintext.len())];
        self.seal_into(plaintext, context, &mut out)?;
        Ok(out)
    }

    /// Convenience for tests and tools: open into a new vector.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let envelope = Envelope::parse(sealed)?;
        let mut out = vec![0u8; envelope.plaintext_len()];
        self.open_into(&envelope, context, &mut out)?;
        Ok(out)
    }

    /// Calls `f` with the AAD of a value with `header` under this key for
    /// `context`, built on the stack when it fits.
    #[inline]
    fn with_aad<R>(&self, header: &[u8], context: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
        let tenant = self.tenant_id.as_bytes();
        let h = header.len();
        let len = h + 2 + tenant.len() + context.len();
        let fill = |buf: &mut [u8]| {
            buf[..h].copy_from_slice(header);
            // tenant ids are at most MAX_TENANT_ID_LEN bytes (checked in new), so u16 holds it
            buf[h..h + 2].copy_from_slice(&(tenant.len() as u16).to_be_bytes());
            buf[h + 2..h + 2 + tenant.len()].copy_from_slice(tenant);
            buf[h + 2 + tenant.len()..].copy_from_slice(context);
        };
        if len <= STACK_AAD_LEN {
            let mut stack = [0u8; STACK_AAD_LEN];
            fill(&mut stack[..len]);
            f(&stack[..len])
        } else {
            let mut heap = vec![0u8; len];
            fill(&mut heap);
            f(&heap)
        }
    }
}

/// aws-lc's AES-256-GCM of `plaintext` into `body` and `tag_out` under a fresh
/// nonce written to `nonce`: drawn by `fill_nonce` in a standard build, by
/// the module in a FIPS build (where `fill_nonce` is not called).
fn seal_fresh(
    gcm: &AwsLcGcm,
    nonce: &mut [u8; NONCE_LEN],
    fill_nonce: &mut dyn FnMut(&mut [u8]) -> Result<(), CryptoError>,
    aad: &[u8],
    plaintext: &[u8],
    body: &mut [u8],
    tag_out: &mut [u8; TAG_LEN],
) -> Result<(), CryptoError> {
    #[cfg(not(feature = "fips"))]
    let sealed = {
        fill_nonce(nonce)?;
        gcm.seal(nonce, aad, plaintext, body, tag_out)
    };
    #[cfg(feature = "fips")]
    let sealed = {
        let _ = fill_nonce;
        gcm.seal_drawing_nonce(nonce, aad, plaintext, body, tag_out)
    };
    // (fails only on a length mismatch, beyond GCM's 64 GiB limit, or, in a
    // FIPS build, when the module's DRBG fails)
    sealed.then_some(()).ok_or(CryptoError::BadOutputLength)
}

/// A key sealed under a key-encryption key: the local provider's wrapped
/// data keys (`nonce || body || tag`).
pub struct SealedKey {
    pub nonce: [u8; NONCE_LEN],
    pub body: [u8; DEK_LEN],
    pub tag: [u8; TAG_LEN],
}

/// Seals `key` under `kek` with AES-256-GCM, a fresh random nonce and `aad`
/// (through aws-lc, in a FIPS build its module).
pub fn seal_key(kek: &[u8; DEK_LEN], aad: &[u8], key: &DataKey) -> Result<SealedKey, CryptoError> {
    let gcm = AwsLcGcm::new(kek).ok_or(CryptoError::KeySetupFailed)?;
    let mut sealed = SealedKey {
        nonce: [0u8; NONCE_LEN],
        body: [0u8; DEK_LEN],
        tag: [0u8; TAG_LEN],
    };
    seal_fresh(
        &gcm,
        &mut sealed.nonce,
        &mut os_random,
        aad,
        key.expose(),
        &mut sealed.body,
        &mut sealed.tag,
    )?;
    Ok(sealed)
}

/// Opens a key [`seal_key`] sealed; `AuthenticationFailed` under another
/// `kek` or `aad`, or if a byte changed.
pub fn open_key(
    kek: &[u8; DEK_LEN],
    aad: &[u8],
    sealed: &SealedKey,
) -> Result<DataKey, CryptoError> {
    let gcm = AwsLcGcm::new(kek).ok_or(CryptoError::KeySetupFailed)?;
    let mut plain = zeroize::Zeroizing::new([0u8; DEK_LEN]);
    if !gcm.open(
        &sealed.nonce,
        aad,
        &sealed.body,
        &sealed.tag,
        &mut plain[..],
    ) {
        return Err(CryptoError::AuthenticationFailed);
    }
    Ok(DataKey::from_bytes(&plain))
}

/// HKDF-SHA-256 (RFC 5869) of `ikm` with `salt` and the concatenation of
/// `info`, 32 bytes (through the FIPS module in a FIPS build).
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> zeroize::Zeroizing<[u8; 32]> {
    let mut okm = zeroize::Zeroizing::new([0u8; 32]);
    #[cfg(feature = "fips")]
    assert!(
        crate::aws_lc::hkdf_sha256(salt, ikm, info, &mut okm),
        "the FIPS module's HKDF-SHA-256 failed"
    );
    #[cfg(not(feature = "fips"))]
    hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm)
        .expand_multi_info(info, &mut okm[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// What byok_pg's cryptography runs on, and whether it passed its checks:
/// reported by `byok.crypto_info()`, required by `CREATE EXTENSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoStatus {
    pub module: crate::aws_lc::ModuleInfo,
    /// A NIST AES-256-GCM vector opened through every implementation in use.
    pub known_answer_passed: bool,
}

impl CryptoStatus {
    /// Reads the module's mode and runs byok_pg's own known-answer test now.
    pub fn check() -> Self {
        CryptoStatus {
            module: crate::aws_lc::module_info(),
            known_answer_passed: gcm_known_answer(),
        }
    }

    /// Why the cryptography must not be used, or `None`.
    pub fn problem(&self) -> Option<&'static str> {
        if crate::aws_lc::FIPS_BUILD && !self.module.fips_mode {
            Some("this is a FIPS build, but its cryptographic module is not in FIPS mode")
        } else if !self.known_answer_passed {
            Some("AES-256-GCM failed its known-answer test")
        } else {
            None
        }
    }

    /// The AES-256-GCM implementations values go through.
    pub fn aes_gcm(&self) -> String {
        if crate::aws_lc::FIPS_BUILD {
            format!(
                "{} (every value; nonces drawn inside the module)",
                self.module.version
            )
        } else {
            let from = aws_lc_from_bytes();
            let here = match gcm_code_path() {
                GcmCodePath::Avx512 => "on this CPU",
                GcmCodePath::Other => "not on this CPU",
            };
            format!(
                "RustCrypto aes-gcm below {from} bytes, {} from {from} (aws-lc's AVX-512 \
                 AES-GCM: {here}; from {AWS_LC_FROM_BYTES_AVX512} where it runs, \
                 {AWS_LC_FROM_BYTES_ELSEWHERE} elsewhere)",
                self.module.version
            )
        }
    }
}

/// NIST CAVS gcmEncryptExtIV256.rsp, the longest plaintext and AAD of the
/// file: key, nonce, plaintext, AAD, ciphertext, tag.
const NIST_GCM_VECTOR: [&str; 6] = [
    "6be7f4d18ff0fbdd9b3b3cacaba4629a0c617387079add62f6ce1584b33faad1",
    "fda568c9cb13d9c176bcef03",
    "4df668e99d5068604a48bcca5baa8245435928558a83d68d7b0b081861224e9bd39ea8f2d55a635949e66c6f6a7ff5cc34dd94",
    "11ebeb97dd4a9925c1fbe2b9af77392058d2d971e42db15da39f090d7bc132573c34bf7d92a2d72dc66ee6840c3ff07985b8976ee8d8f36bf47ae330b899fdc60652dd5a23c45f3680f11951f019e0697c8acfcaa95f01b9c7dd",
    "488b40ad594e1845ccdd9e9467fc5e1afbbfde34e57d45bfcd30b61cc326d57fe8e3f31a39cdebf00f60bbd2c3cdf69f756eff",
    "3bf3fbab9b48486fd08a5552604df639",
];

/// Opens [`NIST_GCM_VECTOR`] through each implementation (the one a FIPS
/// build has), and refuses it with one tag bit flipped.
fn gcm_known_answer() -> bool {
    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
            .collect()
    }
    let [key, nonce, plaintext, aad, ciphertext, tag] = NIST_GCM_VECTOR.map(unhex);
    let (Ok(key), Ok(nonce), Ok(mut tag)) = (
        DataKey::from_slice(&key),
        <[u8; NONCE_LEN]>::try_from(nonce),
        <[u8; TAG_LEN]>::try_from(tag),
    ) else {
        return false;
    };
    let Ok(cipher) = DekCipher::new(1, "", &key) else {
        return false;
    };
    let mut out = vec![0u8; ciphertext.len()];
    [GcmImpl::RustCrypto, GcmImpl::AwsLc]
        .into_iter()
        .all(|using| {
            let opens = cipher
                .gcm_open(using, &nonce, &aad, &ciphertext, &tag, &mut out)
                .is_ok()
                && out == plaintext;
            tag[0] ^= 1;
            let refuses = cipher
                .gcm_open(using, &nonce, &aad, &ciphertext, &tag, &mut out)
                .is_err();
            tag[0] ^= 1;
            opens && refuses
        })
}

/// Nonces from the OS CSPRNG, read 4 KiB at a time instead of one system call
/// per value. GCM needs nonces that never repeat under a key, not secret ones;
/// what could repeat them is a process fork copying the buffer, so the buffer
/// belongs to one process (`owner`, e.g. its pid) and is discarded when asked
/// for by another.
pub struct NoncePool {
    buf: [u8; NONCE_POOL_LEN],
    pos: usize,
    owner: u64,
}

const NONCE_POOL_LEN: usize = NONCE_LEN * 341;

impl Default for NoncePool {
    fn default() -> Self {
        NoncePool {
            buf: [0u8; NONCE_POOL_LEN],
            pos: NONCE_POOL_LEN,
            owner: 0,
        }
    }
}

impl NoncePool {
    /// Fills `nonce` (12 bytes) with unused CSPRNG output owned by `owner`.
    #[inline]
    pub fn fill(&mut self, owner: u64, nonce: &mut [u8]) -> Result<(), CryptoError> {
        if self.owner != owner || self.pos + NONCE_LEN > NONCE_POOL_LEN {
            os_random(&mut self.buf)?;
            self.pos = 0;
            self.owner = owner;
        }
        nonce.copy_from_slice(&self.buf[self.pos..self.pos + NONCE_LEN]);
        // Each nonce is handed out once: wipe it from the pool.
        self.buf[self.pos..self.pos + NONCE_LEN].fill(0);
        self.pos += NONCE_LEN;
        Ok(())
    }
}

/// Either the bytes were not an envelope, or the envelope did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Format(#[from] envelope::FormatError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cipher(dek_id: u64, tenant: &str) -> DekCipher {
        let key = DataKey::from_slice(&[9u8; DEK_LEN]).unwrap();
        DekCipher::new(dek_id, tenant, &key).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const BOTH: [GcmImpl; 2] = [GcmImpl::RustCrypto, GcmImpl::AwsLc];

    /// NIST CAVS vectors (gcmEncryptExtIV256.rsp: the longest plaintext and
    /// AAD of the file, and the empty one): key, nonce, plaintext, AAD,
    /// ciphertext, tag, through each implementation's seal and open.
    #[test]
    fn nist_vectors_through_both_implementations() {
        let [k, n, p, a, c, t] = NIST_GCM_VECTOR;
        let vectors: &[(&str, &str, &str, &str, &str, &str)] = &[
            (k, n, p, a, c, t),
            (
                "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
                "516c33929df5a3284ff463d7",
                "",
                "",
                "",
                "bdc1ac884d332457a1d2664f168c76f0",
            ),
        ];
        for (key, nonce, plaintext, aad, ciphertext, tag) in vectors {
            let key = DataKey::from_slice(&hex(key)).unwrap();
            let cipher = DekCipher::new(1, "t", &key).unwrap();
            let nonce: [u8; NONCE_LEN] = hex(nonce).try_into().unwrap();
            let tag: [u8; TAG_LEN] = hex(tag).try_into().unwrap();
            let (plaintext, aad, ciphertext) = (hex(plaintext), hex(aad), hex(ciphertext));
            for using in BOTH {
                // (a FIPS build's module draws its own nonces, so only its
                // open can be held to a vector; its seal is known-answer
                // tested by the module's power-on self-test)
                #[cfg(not(feature = "fips"))]
                {
                    let mut body = vec![0u8; plaintext.len()];
                    let mut tag_out = [0u8; TAG_LEN];
                    let mut nonce_slot = [0u8; NONCE_LEN];
                    cipher
                        .gcm_seal(
                            using,
                            &mut nonce_slot,
                            &mut |slot: &mut [u8]| {
                                slot.copy_from_slice(&nonce);
                                Ok(())
                            },
                            &aad,
                            &plaintext,
                            &mut body,
                            &mut tag_out,
                        )
                        .unwrap();
                    assert_eq!((&body, &tag_out), (&ciphertext, &tag), "{using:?} seal");
                }
                let mut opened = vec![0u8; plaintext.len()];
                cipher
                    .gcm_open(using, &nonce, &aad, &ciphertext, &tag, &mut opened)
                    .unwrap();
                assert_eq!(opened, plaintext, "{using:?} open");
                let mut bad_tag = tag;
                bad_tag[0] ^= 1;
                assert_eq!(
                    cipher.gcm_open(using, &nonce, &aad, &ciphertext, &bad_tag, &mut opened),
                    Err(CryptoError::AuthenticationFailed),
                    "{using:?} open with a modified tag"
                );
            }
        }
    }

    /// Every size class on both sides of the switch: a value sealed by either
    /// implementation opens with either, and the ordinary path opens both.
    #[test]
    fn values_sealed_by_either_implementation_open_with_the_other() {
        let c = cipher(9, "acme");
        for len in [
            0,
            1,
            15,
            16,
            17,
            100,
            AWS_LC_FROM_BYTES_AVX512 - 1,
            AWS_LC_FROM_BYTES_AVX512,
            AWS_LC_FROM_BYTES_ELSEWHERE - 1,
            AWS_LC_FROM_BYTES_ELSEWHERE,
            1000,
            4000,
            65536,
            100_003,
        ] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for sealer in BOTH {
                let mut sealed = vec![0u8; envelope::sealed_len(len)];
                c.seal_into_using(sealer, &plaintext, b"ctx", &mut sealed, &mut os_random)
                    .unwrap();
                let env = Envelope::parse(&sealed).unwrap();
                for opener in BOTH {
                    let mut out = vec![0u8; len];
                    c.open_into_using(opener, &env, b"ctx", &mut out).unwrap();
                    assert_eq!(
                        out, plaintext,
                        "{len} bytes sealed by {sealer:?}, opened by {opener:?}"
                    );
                }
                assert_eq!(c.open(&sealed, b"ctx").unwrap(), plaintext);
            }
        }
    }

    /// A modified byte anywhere (header, nonce, body, tag), another context or
    /// tenant: refused by both implementations, with nothing left in `out`.
    #[test]
    fn tampering_fails_in_both_implementations() {
        let c = cipher(9, "acme");
        let other_tenant = cipher(9, "other");
        for len in [40, 1000] {
            let plaintext = vec![0x5au8; len];
            let sealed = c.seal(&plaintext, b"ctx").unwrap();
            for using in BOTH {
                for at in [
                    0,
                    HEADER_LEN,
                    HEADER_LEN + NONCE_LEN,
                    sealed.len() / 2,
                    sealed.len() - 1,
                ] {
                    let mut bad = sealed.clone();
                    bad[at] ^= 0x80;
                    let Ok(env) = Envelope::parse(&bad) else {
                        continue;
                    };
                    let mut out = vec![0xffu8; len];
                    let result = c.open_into_using(using, &env, b"ctx", &mut out);
                    assert!(result.is_err(), "{using:?}: byte {at} of {len}");
                    assert!(
                        out.iter().all(|&b| b == 0)
                            || matches!(result, Err(CryptoError::WrongKey { .. }))
                    );
                }
                let env = Envelope::parse(&sealed).unwrap();
                let mut out = vec![0u8; len];
                assert_eq!(
                    c.open_into_using(using, &env, b"other", &mut out),
                    Err(CryptoError::AuthenticationFailed)
                );
                assert_eq!(
                    other_tenant.open_into_using(using, &env, b"ctx", &mut out),
                    Err(CryptoError::AuthenticationFailed)
                );
            }
        }
    }

    #[cfg(feature = "fips")]
    #[test]
    fn a_fips_build_seals_every_length_through_the_module() {
        let c = cipher(1, "t");
        for len in [
            0,
            1,
            AWS_LC_FROM_BYTES_AVX512,
            AWS_LC_FROM_BYTES_ELSEWHERE,
            1 << 20,
        ] {
            assert_eq!(c.implementation_for(len), GcmImpl::AwsLc);
        }
        // The module draws the nonce: a NoncePool's would be the same twice.
        let mut same = |n: &mut [u8]| {
            n.fill(7);
            Ok(())
        };
        let mut a = vec![0u8; envelope::sealed_len(10)];
        let mut b = vec![0u8; envelope::sealed_len(10)];
        c.seal_into_with(b"0123456789", b"", &mut a, &mut same)
            .unwrap();
        c.seal_into_with(b"0123456789", b"", &mut b, &mut same)
            .unwrap();
        let nonce = |v: &[u8]| v[HEADER_LEN..HEADER_LEN + NONCE_LEN].to_vec();
        assert_ne!(nonce(&a), nonce(&b));
        assert_ne!(nonce(&a), vec![7u8; NONCE_LEN]);
        assert_eq!(c.open(&a, b"").unwrap(), b"0123456789");
    }

    #[cfg(not(feature = "fips"))]
    #[test]
    fn the_length_and_the_cpu_pick_the_implementation() {
        let from = match gcm_code_path() {
            GcmCodePath::Avx512 => AWS_LC_FROM_BYTES_AVX512,
            GcmCodePath::Other => AWS_LC_FROM_BYTES_ELSEWHERE,
        };
        assert_eq!(aws_lc_from_bytes(), from);
        let c = cipher(1, "t");
        assert_eq!(c.implementation_for(0), GcmImpl::RustCrypto);
        assert_eq!(c.implementation_for(from - 1), GcmImpl::RustCrypto);
        assert_eq!(c.implementation_for(from), GcmImpl::AwsLc);
        assert_eq!(c.implementation_for(1 << 20), GcmImpl::AwsLc);
        let status = CryptoStatus::check();
        assert!(
            status
                .aes_gcm()
                .starts_with(&format!("RustCrypto aes-gcm below {from} bytes, AWS-LC ")),
            "{}",
            status.aes_gcm()
        );
    }

    #[test]
    fn the_checks_pass_and_a_failed_one_is_named() {
        let status = CryptoStatus::check();
        assert_eq!(status.problem(), None, "{status:?}");
        assert!(status.aes_gcm().contains("AWS-LC"));
        let mut broken = status.clone();
        broken.known_answer_passed = false;
        assert_eq!(
            broken.problem(),
            Some("AES-256-GCM failed its known-answer test")
        );
        let mut not_fips = status;
        not_fips.module.fips_mode = false;
        assert_eq!(not_fips.problem().is_some(), crate::aws_lc::FIPS_BUILD);
    }

    #[test]
    fn sealed_keys_open_under_their_kek_and_aad_only() {
        let kek = [3u8; DEK_LEN];
        let key = DataKey::generate().unwrap();
        let sealed = seal_key(&kek, b"aad", &key).unwrap();
        assert_eq!(open_key(&kek, b"aad", &sealed).unwrap(), key);
        assert_ne!(sealed.body, *key.expose());
        let again = seal_key(&kek, b"aad", &key).unwrap();
        assert_ne!(again.nonce, sealed.nonce, "a fresh nonce per seal");
        assert_eq!(
            open_key(&[4u8; DEK_LEN], b"aad", &sealed),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(
            open_key(&kek, b"aaD", &sealed),
            Err(CryptoError::AuthenticationFailed)
        );
        let mut flipped = SealedKey { ..sealed };
        flipped.body[5] ^= 1;
        assert_eq!(
            open_key(&kek, b"aad", &flipped),
            Err(CryptoError::AuthenticationFailed)
        );
    }

    /// RFC 5869 test case 1 (its first 32 bytes), the info split in two.
    #[test]
    fn hkdf_matches_rfc_5869() {
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = hkdf_sha256(&salt, &[0x0bu8; 22], &[&info[..3], &info[3..]]);
        assert_eq!(
            hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"),
            okm.to_vec()
        );
    }

    #[test]
    fn round_trip_various_lengths() {
        let c = cipher(1, "tenant_a");
        for n in [0usize, 1, 15, 16, 17, 100, 1000, 70_000] {
            let plaintext: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = c.seal(&plaintext, b"public.t.c").unwrap();
            assert_eq!(sealed.len(), envelope::sealed_len(n));
            assert_eq!(c.open(&sealed, b"public.t.c").unwrap(), plaintext);
        }
    }

    #[test]
    fn long_context_uses_the_heap_path_and_still_binds() {
        let c = cipher(1, "t");
        let context = vec![b'x'; STACK_AAD_LEN * 2];
        let sealed = c.seal(b"v", &context).unwrap();
        assert_eq!(c.open(&sealed, &context).unwrap(), b"v");
        assert_eq!(
            c.open(&sealed, &context[1..]).unwrap_err(),
            OpenError::Crypto(CryptoError::AuthenticationFailed)
        );
    }

    #[test]
    fn every_single_bit_flip_fails_to_open() {
        let c = cipher(7, "tenant_a");
        let sealed = c.seal(b"secret value 123", b"ctx").unwrap();
        for pos in 0..sealed.len() {
            for bit in 0..8 {
                let mut tampered = sealed.clone();
                tampered[pos] ^= 1 << bit;
                assert!(
                    c.open(&tampered, b"ctx").is_err(),
                    "flip of bit {bit} at byte {pos} was not detected"
                );
            }
        }
    }

    #[test]
    fn every_truncation_fails_to_open() {
        let c = cipher(7, "tenant_a");
        let sealed = c.seal(b"secret value 123", b"").unwrap();
        for len in 0..sealed.len() {
            assert!(c.open(&sealed[..len], b"").is_err(), "truncation to {len}");
        }
    }

    #[test]
    fn wrong_context_tenant_or_key_fails() {
        let a = cipher(7, "tenant_a");
        let sealed = a.seal(b"v", b"public.t.c").unwrap();
        assert_eq!(
            a.open(&sealed, b"public.t.d").unwrap_err(),
            OpenError::Crypto(CryptoError::AuthenticationFailed)
        );
        // Same key bytes and id, other tenant: the AAD differs.
        let b = cipher(7, "tenant_b");
        assert_eq!(
            b.open(&sealed, b"public.t.c").unwrap_err(),
            OpenError::Crypto(CryptoError::AuthenticationFailed)
        );
        // Tenant/context boundary is unambiguous: ("ab", "c") != ("a", "bc").
        let ab = cipher(3, "ab");
        let a2 = cipher(3, "a");
        let sealed = ab.seal(b"v", b"c").unwrap();
        assert!(a2.open(&sealed, b"bc").is_err());
        // Another key id is refused before any crypto.
        let other = cipher(8, "tenant_a");
        assert_eq!(
            other.open(&a.seal(b"v", b"").unwrap(), b"").unwrap_err(),
            OpenError::Crypto(CryptoError::WrongKey {
                expected: 8,
                found: 7
            })
        );
    }

    #[test]
    fn a_different_key_fails() {
        let a = cipher(1, "t");
        let other_key = DataKey::from_slice(&[8u8; DEK_LEN]).unwrap();
        let b = DekCipher::new(1, "t", &other_key).unwrap();
        let sealed = a.seal(b"v", b"").unwrap();
        assert!(b.open(&sealed, b"").is_err());
    }

    #[test]
    fn failed_open_leaves_no_plaintext_in_the_output() {
        let c = cipher(1, "t");
        let mut sealed = c.seal(b"0123456789", b"").unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let env = Envelope::parse(&sealed).unwrap();
        let mut out = [0xAAu8; 10];
        assert!(c.open_into(&env, b"", &mut out).is_err());
        assert_eq!(out, [0u8; 10]);
    }

    #[test]
    fn nonces_are_unique_over_a_million_seals() {
        let c = cipher(1, "t");
        let mut seen = HashSet::with_capacity(1_000_000);
        let mut out = [0u8; envelope::OVERHEAD + 1];
        for _ in 0..1_000_000 {
            c.seal_into(b"x", b"", &mut out).unwrap();
            let env = Envelope::parse(&out).unwrap();
            assert!(seen.insert(*env.nonce()), "nonce repeated");
        }
    }

    #[test]
    fn pooled_nonces_are_unique_and_a_new_owner_gets_fresh_ones() {
        let c = cipher(1, "t");
        let mut pool = NoncePool::default();
        let mut seen = HashSet::new();
        let mut out = [0u8; envelope::OVERHEAD];
        for i in 0..100_000u64 {
            // a change of owner (a forked child) must not replay the parent's pool
            let owner = 1 + i / 50_000;
            c.seal_into_with(b"", b"", &mut out, &mut |n| pool.fill(owner, n))
                .unwrap();
            assert!(
                seen.insert(*Envelope::parse(&out).unwrap().nonce()),
                "nonce repeated at {i}"
            );
            assert_eq!(c.open(&out, b"").unwrap(), b"");
        }
        let mut child = NoncePool {
            buf: pool.buf,
            pos: pool.pos,
            owner: pool.owner,
        };
        let mut a = [0u8; NONCE_LEN];
        let mut b = [0u8; NONCE_LEN];
        pool.fill(2, &mut a).unwrap();
        child.fill(3, &mut b).unwrap();
        assert_ne!(a, b, "a copy of the pool under a new owner must refill");
    }

    #[test]
    fn generated_keys_differ_and_debug_is_redacted() {
        let a = DataKey::generate().unwrap();
        let b = DataKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "DataKey(<redacted>)");
    }

    #[test]
    fn overlong_tenant_is_refused() {
        let key = DataKey::from_slice(&[1u8; DEK_LEN]).unwrap();
        let tenant = "x".repeat(MAX_TENANT_ID_LEN + 1);
        assert_eq!(
            DekCipher::new(1, &tenant, &key).err(),
            Some(CryptoError::TenantIdTooLong)
        );
    }

    #[test]
    fn searchable_values_bind_their_term() {
        let key = DataKey::from_bytes(&[3u8; DEK_LEN]);
        let cipher = DekCipher::new(11, "acme", &key).unwrap();
        let term = [0x5Au8; 8];
        let mut out = vec![0u8; envelope::searchable_sealed_len(5, term.len())];
        cipher
            .seal_searchable_into_with(
                cipher.implementation_for(5),
                b"hello",
                b"ctx",
                (99, &term),
                &mut out,
                &mut os_random,
            )
            .unwrap();
        assert_eq!(cipher.open(&out, b"ctx").unwrap(), b"hello");
        let env = Envelope::parse(&out).unwrap();
        assert_eq!(env.term(), Some(&term[..]));
        assert_eq!(env.index_key_id(), Some(99));
        // Another term, another index key id, or another context: refused.
        for at in [
            envelope::HEADER_LEN + 3,
            envelope::SEARCHABLE_HEADER_FIXED + 2,
        ] {
            let mut tampered = out.clone();
            tampered[at] ^= 1;
            assert_eq!(
                cipher.open(&tampered, b"ctx").unwrap_err(),
                OpenError::Crypto(CryptoError::AuthenticationFailed)
            );
        }
        assert!(cipher.open(&out, b"other").is_err());
        // Bad term lengths and a zero index key id are refused.
        for (len, id) in [(1usize, 99u64), (33, 99), (8, 0)] {
            let mut out = vec![0u8; envelope::searchable_sealed_len(5, len)];
            assert!(
                cipher
                    .seal_searchable_into_with(
                        GcmImpl::RustCrypto,
                        b"hello",
                        b"ctx",
                        (id, &vec![1; len]),
                        &mut out,
                        &mut os_random
                    )
                    .is_err()
            );
        }
    }
}
