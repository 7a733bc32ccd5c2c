//! The aws-lc build byok_pg's cryptography goes through, and what it reports
//! about itself.
//!
//! A standard build links aws-lc (`aws-lc-sys`) for long values' AES-GCM
//! ([`crate::aws_lc_gcm`]) next to RustCrypto's `aes-gcm`, `hmac` and `hkdf`.
//! A FIPS build (cargo feature `fips`) links aws-lc's FIPS 140-3 module
//! (`aws-lc-fips-sys`) instead, and every data-path primitive goes through it:
//! AES-256-GCM with the nonce drawn inside the module (the only GCM sealing the
//! module approves), HMAC-SHA-256 for search terms, HKDF-SHA-256 and
//! AES-256-GCM for the local provider's key wrapping, and its DRBG for data
//! keys. Both builds make and accept the same bytes.

#[cfg(feature = "fips")]
pub(crate) use aws_lc_fips_sys as sys;
#[cfg(not(feature = "fips"))]
pub(crate) use aws_lc_sys as sys;

/// True in a build with the cargo feature `fips`.
pub const FIPS_BUILD: bool = cfg!(feature = "fips");

/// What the linked aws-lc says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// aws-lc's version string (for the FIPS module, its validated version).
    pub version: String,
    /// `FIPS_mode()`: the module runs in FIPS mode (never in a standard build).
    pub fips_mode: bool,
    /// The module's own power-on self-tests (`BORINGSSL_self_test`: its
    /// known-answer tests of every approved algorithm), run again now.
    pub self_test_passed: bool,
}

/// Asks the linked aws-lc for its version and mode, and runs its self-tests.
pub fn module_info() -> ModuleInfo {
    #[cfg(feature = "fips")]
    // SAFETY: the module returns a pointer to a static NUL-terminated string
    // ("AWS-LC FIPS <version>").
    let version = unsafe { std::ffi::CStr::from_ptr(sys::awslc_version_string()) }
        .to_string_lossy()
        .into_owned();
    #[cfg(not(feature = "fips"))]
    let version = format!(
        "AWS-LC {}",
        String::from_utf8_lossy(sys::AWSLC_VERSION_NUMBER_STRING).trim_end_matches('\0')
    );
    // SAFETY: no arguments; reads a build-time constant.
    let fips_mode = unsafe { sys::FIPS_mode() } == 1;
    // SAFETY: no arguments; runs the module's known-answer tests on its own
    // buffers and returns 1 when all pass.
    let self_test_passed = unsafe { sys::BORINGSSL_self_test() } == 1;
    clear_errors();
    ModuleInfo {
        version,
        fips_mode,
        self_test_passed,
    }
}

/// Clears this thread's aws-lc error queue (a failed call leaves an entry
/// other aws-lc users on the thread would read).
pub(crate) fn clear_errors() {
    // SAFETY: no arguments; touches only this thread's error queue.
    unsafe { sys::ERR_clear_error() };
}

/// Fills `buf` from the module's DRBG (seeded from the OS). False if it fails.
#[cfg(feature = "fips")]
pub(crate) fn random_bytes(buf: &mut [u8]) -> bool {
    // SAFETY: `buf` is writable for its length.
    let ok = unsafe { sys::RAND_bytes(buf.as_mut_ptr(), buf.len()) } == 1;
    if !ok {
        clear_errors();
    }
    ok
}

/// HKDF-SHA-256 (RFC 5869) of `ikm` with `salt` and the concatenation of
/// `info` into `out`, through the module.
#[cfg(feature = "fips")]
pub(crate) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8; 32]) -> bool {
    let mut joined =
        zeroize::Zeroizing::new(Vec::with_capacity(info.iter().map(|p| p.len()).sum()));
    for part in info {
        joined.extend_from_slice(part);
    }
    // SAFETY: every pointer comes with its slice's length; `out` is 32
    // writable bytes; EVP_sha256 returns a static digest.
    let ok = unsafe {
        sys::HKDF(
            out.as_mut_ptr(),
            out.len(),
            sys::EVP_sha256(),
            ikm.as_ptr(),
            ikm.len(),
            salt.as_ptr(),
            salt.len(),
            joined.as_ptr(),
            joined.len(),
        )
    } == 1;
    if !ok {
        clear_errors();
    }
    ok
}

/// HMAC-SHA-256 keyed once, in memory excluded from core dumps
/// ([`SecretBox`](crate::secret_mem::SecretBox)) and wiped when dropped; each
/// message starts again from the keyed state.
#[cfg(feature = "fips")]
pub(crate) struct HmacSha256(crate::secret_mem::SecretBox<std::cell::RefCell<sys::HMAC_CTX>>);

#[cfg(feature = "fips")]
impl HmacSha256 {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        // SAFETY: HMAC_CTX is a plain C struct for which all zeroes is the
        // state HMAC_CTX_init makes; it is initialized in place below.
        let ctx = crate::secret_mem::SecretBox::new(std::cell::RefCell::new(unsafe {
            std::mem::zeroed::<sys::HMAC_CTX>()
        }));
        {
            let mut inner = ctx.borrow_mut();
            // SAFETY: the context is live in its final place (the box never
            // moves its value); the key is 32 readable bytes the module copies.
            let ok = unsafe {
                sys::HMAC_CTX_init(&mut *inner);
                sys::HMAC_Init_ex(
                    &mut *inner,
                    key.as_ptr().cast(),
                    key.len(),
                    sys::EVP_sha256(),
                    std::ptr::null_mut(),
                )
            };
            // Setting up HMAC-SHA-256 with a 32-byte key fails only on
            // allocation failure inside the module, which aborts anyway.
            assert_eq!(ok, 1, "the FIPS module refused an HMAC-SHA-256 key");
        }
        HmacSha256(ctx)
    }

    /// The MAC of the concatenation of `parts`.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = self.0.borrow_mut();
        let mut out = [0u8; 32];
        let mut out_len: std::os::raw::c_uint = 0;
        // SAFETY: the context was keyed in `new`; a NULL key and digest
        // restart it from that key; each part is read for its length; `out`
        // holds SHA-256's 32 bytes.
        let ok = unsafe {
            let mut ok = sys::HMAC_Init_ex(
                &mut *ctx,
                std::ptr::null(),
                0,
                std::ptr::null(),
                std::ptr::null_mut(),
            );
            for part in parts {
                ok &= sys::HMAC_Update(&mut *ctx, part.as_ptr(), part.len());
            }
            ok & sys::HMAC_Final(&mut *ctx, out.as_mut_ptr(), &mut out_len)
        };
        assert!(
            ok == 1 && out_len == 32,
            "the FIPS module's HMAC-SHA-256 failed"
        );
        out
    }
}

#[cfg(feature = "fips")]
impl Drop for HmacSha256 {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, cleaned up once; the box then wipes it.
        unsafe { sys::HMAC_CTX_cleanup(&mut *self.0.borrow_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_reports_its_mode_and_passes_its_self_tests() {
        let info = module_info();
        assert!(info.self_test_passed, "{info:?}");
        assert!(info.version.contains("AWS-LC"), "{info:?}");
        assert_eq!(info.fips_mode, FIPS_BUILD, "{info:?}");
    }

    #[cfg(feature = "fips")]
    #[test]
    fn module_hmac_and_hkdf_match_the_rfc_vectors() {
        // RFC 4231 test case 2 is keyed with "Jefe" (4 bytes); HmacSha256 takes
        // 32-byte keys, so the check is against RustCrypto's hmac instead.
        use hmac::{KeyInit, Mac};
        let key = [0x0bu8; 32];
        let ours = HmacSha256::new(&key);
        let mut theirs = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        theirs.update(b"Hi There");
        let expected: [u8; 32] = theirs.finalize().into_bytes().into();
        assert_eq!(ours.mac(&[b"Hi ", b"There"]), expected);
        assert_eq!(ours.mac(&[b"Hi There"]), expected, "restarts from the key");
        // RFC 5869 test case 1, first 32 bytes of its 42.
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let mut okm = [0u8; 32];
        assert!(hkdf_sha256(
            &salt,
            &ikm,
            &[&info[..4], &info[4..]],
            &mut okm
        ));
        assert_eq!(
            okm[..],
            [
                0x3c, 0xb2, 0x5f, 0x25, 0xfa, 0xac, 0xd5, 0x7a, 0x90, 0x43, 0x4f, 0x64, 0xd0, 0x36,
                0x2f, 0x2a, 0x2d, 0x2d, 0x0a, 0x90, 0xcf, 0x1a, 0x5a, 0x4c, 0x5d, 0xb0, 0x2d, 0x56,
                0xec, 0xc4, 0xc5, 0xbf
            ]
        );
    }
}
