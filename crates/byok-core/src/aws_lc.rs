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
///
/// The FIPS module runs its power-on self-tests (known answers for every
/// approved algorithm, and its integrity check) when it starts, and aborts the
/// process if one fails: a running server has a module that passed them.
/// They are not run again here, where a failure would abort a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// aws-lc's version string (for the FIPS module, its validated version).
    pub version: String,
    /// `FIPS_mode()`: the module runs in FIPS mode (never in a standard build).
    pub fips_mode: bool,
}

/// Asks the linked aws-lc for its version and mode.
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
    // SAFETY: no arguments; reads the module's state (starting it, and so
    // running its power-on self-tests, on first use).
    let fips_mode = unsafe { sys::FIPS_mode() } == 1;
    ModuleInfo { version, fips_mode }
}

/// Which of aws-lc's AES-GCM code paths this CPU gets. They differ enough in
/// speed that the length from which aws-lc beats RustCrypto differs too
/// ([`crate::crypto::aws_lc_from_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcmCodePath {
    /// x86-64 with AVX-512 (F, DQ, BW, VL), VAES and VPCLMULQDQ: aws-lc's
    /// AVX-512 AES-GCM, the fastest it has.
    Avx512,
    /// Anything else (on x86-64, the AVX/AES-NI code even where VAES runs with
    /// AVX2 only, as on AMD Zen 3).
    Other,
}

/// The AES-GCM code path aws-lc takes on this CPU: the test aws-lc itself
/// makes (`crypto_gcm_avx512_enabled` in its `modes/gcm.c`: x86-64, not
/// Windows, not macOS, and the CPU features), asked of the standard library's
/// CPU detection, which like aws-lc's also checks that the OS saves the
/// AVX-512 registers. Not seen here: aws-lc's `OPENSSL_ia32cap` variable,
/// which masks CPU features for testing, and a "small" aws-lc-sys build
/// (`AWS_LC_SYS_SMALL`, not used by byok_pg), which leaves the AVX-512 code
/// out. The unit test `the_gcm_code_path_is_the_one_aws_lc_takes` asks aws-lc.
pub fn gcm_code_path() -> GcmCodePath {
    #[cfg(all(target_arch = "x86_64", not(windows), not(target_vendor = "apple")))]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
    {
        return GcmCodePath::Avx512;
    }
    GcmCodePath::Other
}

/// How much of the stack below the caller's frame [`wipe_stack`] overwrites:
/// more than aws-lc's calls' frames take. Measured by the test
/// `aws_lc_leaves_nothing_below_the_callers_frame` on x86-64 (release build):
/// the AVX-512/VAES code path writes 2.5 KiB deep for GCM values from 1000
/// bytes (0.9 KiB below), the AVX path 1.1 KiB, the one without AES-NI 1.7 KiB.
const STACK_WIPE_LEN: usize = 3072;

/// Overwrites the stack just below the caller's frame, where the aws-lc call
/// that returned had its frames (aws-lc leaves key-derived state there: GCM's
/// GHASH key and tag mask, SHA-256 states of an HMAC key). Not inlined, so its
/// frame starts where aws-lc's did; the array is handed to `black_box`, so
/// its zeroes are written rather than optimized away.
#[inline(never)]
pub(crate) fn wipe_stack() {
    #[cfg(test)]
    if tests::WIPE_OFF.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let scratch = [0u8; STACK_WIPE_LEN];
    std::hint::black_box(&scratch);
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
    wipe_stack();
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
    wipe_stack();
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
            wipe_stack();
            if ok != 1 {
                // (only on allocation failure inside the module) The context
                // is left cleaned up: every later use fails (see `mac`).
                // SAFETY: initialized above; cleanup zeroes it.
                unsafe { sys::HMAC_CTX_cleanup(&mut *inner) };
                clear_errors();
                panic!("the FIPS module refused an HMAC-SHA-256 key");
            }
        }
        HmacSha256(ctx)
    }

    /// The MAC of the concatenation of `parts`.
    ///
    /// Restarting a context with a NULL key reuses its key only between
    /// messages; one left midway would be re-keyed with the empty key. So any
    /// failure cleans the context up (zeroed, no digest): from then on every
    /// restart fails and every term panics, rather than being computed under
    /// no key.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = self.0.borrow_mut();
        let mut out = [0u8; 32];
        let mut out_len: std::os::raw::c_uint = 0;
        // SAFETY: the context was keyed in `new` (or cleaned up, when the
        // restart fails and nothing else is called); a NULL key and digest
        // restart it from its key; each part is read for its length; `out`
        // holds SHA-256's 32 bytes.
        let ok = unsafe {
            sys::HMAC_Init_ex(
                &mut *ctx,
                std::ptr::null(),
                0,
                std::ptr::null(),
                std::ptr::null_mut(),
            ) == 1
                && parts
                    .iter()
                    .all(|part| sys::HMAC_Update(&mut *ctx, part.as_ptr(), part.len()) == 1)
                && sys::HMAC_Final(&mut *ctx, out.as_mut_ptr(), &mut out_len) == 1
                && out_len == 32
        };
        wipe_stack();
        if !ok {
            // SAFETY: as in `new`; cleanup zeroes the context.
            unsafe { sys::HMAC_CTX_cleanup(&mut *ctx) };
            clear_errors();
            panic!("the FIPS module's HMAC-SHA-256 failed");
        }
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
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The code path is the one aws-lc takes: its own (internal, exported)
    /// `crypto_gcm_avx512_enabled`, named with aws-lc-sys's symbol prefix, so
    /// this stops linking when aws-lc-sys is upgraded and must be looked at
    /// again. (Run with `OPENSSL_ia32cap` masking AVX-512, aws-lc takes its
    /// other path and this test fails: the override is not seen by
    /// `gcm_code_path`.)
    #[cfg(all(target_arch = "x86_64", target_os = "linux", not(feature = "fips")))]
    #[test]
    fn the_gcm_code_path_is_the_one_aws_lc_takes() {
        unsafe extern "C" {
            #[link_name = "aws_lc_0_47_0_crypto_gcm_avx512_enabled"]
            fn aws_lc_gcm_avx512_enabled() -> std::ffi::c_int;
        }
        // (Setting up a context makes aws-lc read the CPU's features first.)
        crate::aws_lc_gcm::AwsLcGcm::new(&[1u8; 32]).expect("a context");
        // SAFETY: no arguments; reads aws-lc's CPU capability words.
        let aws_lc_says = unsafe { aws_lc_gcm_avx512_enabled() } == 1;
        let expected = if aws_lc_says {
            GcmCodePath::Avx512
        } else {
            GcmCodePath::Other
        };
        assert_eq!(gcm_code_path(), expected);
    }

    /// Set only by [`aws_lc_leaves_nothing_below_the_callers_frame`], to see
    /// what aws-lc's calls write without the wipe.
    pub(super) static WIPE_OFF: AtomicBool = AtomicBool::new(false);

    /// The stack bytes `f` writes below this function's frame: how deep the
    /// deepest write reaches, and how deep the deepest byte left neither
    /// untouched nor zero (what a core dump would show) sits within `within`
    /// bytes, both counted from this frame's stack pointer.
    ///
    /// It paints the dead stack below its frame, calls `f` (whose frames, and
    /// aws-lc's under them, take that space), then reads it back. Reading
    /// and writing below the stack pointer is outside what Rust describes,
    /// and done on purpose: nothing live is there, and nothing here calls a
    /// function between the painting and the reading except `f`.
    #[inline(never)]
    fn stack_marks(f: impl FnOnce(), within: usize) -> (usize, usize) {
        const SPAN: usize = 16 * 1024;
        const PAINT: u8 = 0xA5;
        let top: usize;
        // SAFETY: reads the stack pointer into a register; touches no memory.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            std::arch::asm!("mov {}, rsp", out(reg) top, options(nomem, nostack));
            #[cfg(target_arch = "aarch64")]
            std::arch::asm!("mov {}, sp", out(reg) top, options(nomem, nostack));
        }
        let bottom = top - SPAN;
        for address in bottom..top {
            // SAFETY: this thread's stack below its stack pointer (test
            // threads have 2 MiB): no live object is there.
            unsafe { (address as *mut u8).write_volatile(PAINT) };
        }
        f();
        let (mut written, mut residue) = (0, 0);
        for address in bottom..top {
            // SAFETY: as above, read back after `f` returned.
            let byte = unsafe { (address as *const u8).read_volatile() };
            if byte != PAINT && written == 0 {
                written = top - address;
            }
            if byte != PAINT && byte != 0 && residue == 0 && top - address <= within {
                residue = top - address;
            }
        }
        (written, residue)
    }

    /// What aws-lc's calls write below the frame calling them is overwritten
    /// by [`wipe_stack`] before they return: for opening and sealing at every
    /// size class (both implementations' sides of the threshold), a value
    /// that does not authenticate, and in a FIPS build the module's HMAC,
    /// HKDF and DRBG. Run with `OPENSSL_ia32cap` masking CPU features to
    /// check aws-lc's other code paths (docs/performance.md).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn aws_lc_leaves_nothing_below_the_callers_frame() {
        use crate::aws_lc_gcm::AwsLcGcm;
        // (This frame and the wrappers' own sit between the probe and aws-lc:
        // their few hundred bytes hold no key material and are not counted.)
        const WRAPPERS: usize = 512;
        let gcm = AwsLcGcm::new(&[7u8; 32]).expect("a context");
        let aad = [3u8; 60];
        let mut calls: Vec<(String, Box<dyn Fn()>)> = Vec::new();
        for len in [0usize, 1, 100, 383, 384, 1000, 4000, 65536] {
            // (Every buffer is allocated here: an allocation inside a call
            // would leave the allocator's frames in the probed stack.)
            let plaintext = vec![0x5Au8; len];
            #[cfg_attr(not(feature = "fips"), allow(unused_mut))]
            let mut nonce = [9u8; 12];
            let mut body = vec![0u8; len];
            let mut tag = [0u8; 16];
            #[cfg(not(feature = "fips"))]
            assert!(gcm.seal(&nonce, &aad, &plaintext, &mut body, &mut tag));
            #[cfg(feature = "fips")]
            assert!(gcm.seal_drawing_nonce(&mut nonce, &aad, &plaintext, &mut body, &mut tag));
            let gcm = &gcm;
            let sealed = std::cell::RefCell::new((vec![0u8; len], [0u8; 16], nonce));
            calls.push((
                format!("seal {len} B"),
                Box::new(move || {
                    let (body, tag, nonce) = &mut *sealed.borrow_mut();
                    #[cfg(not(feature = "fips"))]
                    assert!(gcm.seal(nonce, &aad, &plaintext, body, tag));
                    #[cfg(feature = "fips")]
                    assert!(gcm.seal_drawing_nonce(nonce, &aad, &plaintext, body, tag));
                }),
            ));
            let mut bad_tag = tag;
            bad_tag[0] ^= 1;
            for (what, tag, opens) in [("open", tag, true), ("refused open", bad_tag, false)] {
                let body = body.clone();
                let out = std::cell::RefCell::new(vec![0u8; len]);
                calls.push((
                    format!("{what} {len} B"),
                    Box::new(move || {
                        let out = &mut *out.borrow_mut();
                        assert_eq!(gcm.open(&nonce, &aad, &body, &tag, out), opens);
                    }),
                ));
            }
        }
        #[cfg(feature = "fips")]
        {
            let hmac = HmacSha256::new(&[0x0bu8; 32]);
            calls.push((
                "HMAC-SHA-256".into(),
                Box::new(move || {
                    std::hint::black_box(hmac.mac(&[b"term", &[1u8; 200]]));
                }),
            ));
            calls.push((
                "HKDF-SHA-256".into(),
                Box::new(|| {
                    let mut okm = [0u8; 32];
                    assert!(hkdf_sha256(b"salt", &[1u8; 32], &[b"info"], &mut okm));
                }),
            ));
            calls.push((
                "DRBG".into(),
                Box::new(|| assert!(random_bytes(&mut [0u8; 32]))),
            ));
        }
        let mut deepest = 0;
        for (name, call) in &calls {
            WIPE_OFF.store(true, Ordering::Relaxed);
            let (written, residue_unwiped) = stack_marks(call, usize::MAX);
            WIPE_OFF.store(false, Ordering::Relaxed);
            // (Below what aws-lc reaches, the wipe's own frame leaves a return address.)
            let (_, residue) = stack_marks(call, written);
            deepest = deepest.max(written);
            assert!(
                residue_unwiped > WRAPPERS,
                "{name}: the probe saw nothing of aws-lc's below the wrappers \
                 ({residue_unwiped} B deep without the wipe): it measures nothing"
            );
            assert!(
                written <= STACK_WIPE_LEN,
                "{name}: aws-lc wrote {written} B below the caller, the wipe covers {STACK_WIPE_LEN}"
            );
            assert!(
                residue <= WRAPPERS,
                "{name}: aws-lc's bytes left {residue} B below the caller after the wipe"
            );
        }
        println!("deepest aws-lc write: {deepest} B below the caller (wipe: {STACK_WIPE_LEN} B)");
    }

    #[test]
    fn the_module_reports_its_version_and_mode() {
        let info = module_info();
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
