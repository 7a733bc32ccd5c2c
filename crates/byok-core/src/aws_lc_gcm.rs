//! aws-lc's AES-256-GCM for one key, its state kept in secret memory.
//!
//! aws-lc keeps an AES-GCM key schedule inside the `EVP_AEAD_CTX` itself (no
//! allocation of its own), so this module places the context in a
//! [`SecretBox`] (excluded from core dumps, wiped when freed) and initializes
//! it there. aws-lc-rs's `LessSafeKey` would keep it in aws-lc's ordinary heap
//! instead.
//!
//! Each seal and open copies the GHASH key (and the message's tag mask) into
//! a local of aws-lc's own, on the backend's stack, and leaves it there; the
//! AES round keys are not copied. So after every call the stack aws-lc used is
//! overwritten ([`wipe_stack`]): a core dump must not let anyone forge values.
//! aws-lc also queues an error on a failed call, in a per-thread queue other
//! aws-lc users (the key-manager clients) read: cleared here.
//!
//! In a FIPS build ([`crate::aws_lc`]) the context is the FIPS module's
//! AES-256-GCM with internal nonces (`EVP_aead_aes_256_gcm_randnonce`): the
//! module draws each nonce from its own DRBG ([`AwsLcGcm::seal_drawing_nonce`]),
//! the only GCM sealing FIPS 140-3 approves; opening takes the stored nonce
//! back. The bytes are the same as a standard build's.

use crate::aws_lc::sys::{
    EVP_AEAD_CTX, EVP_AEAD_CTX_cleanup, EVP_AEAD_CTX_init, EVP_AEAD_CTX_open_gather,
    EVP_AEAD_CTX_seal_scatter, EVP_AEAD_CTX_zero,
};
use crate::aws_lc::{clear_errors, wipe_stack};

use crate::secret_mem::SecretBox;

/// Key, nonce and tag lengths of AES-256-GCM as byok_pg uses it.
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The AEAD and the tag length its context is set up with: the FIPS module's
/// internal-nonce variant counts the nonce it appends as part of the tag.
#[cfg(not(feature = "fips"))]
use crate::aws_lc::sys::EVP_aead_aes_256_gcm as AEAD;
#[cfg(not(feature = "fips"))]
const AEAD_TAG_LEN: usize = TAG_LEN;
#[cfg(feature = "fips")]
use crate::aws_lc::sys::EVP_aead_aes_256_gcm_randnonce as AEAD;
#[cfg(feature = "fips")]
const AEAD_TAG_LEN: usize = TAG_LEN + NONCE_LEN;

/// An initialized aws-lc AES-256-GCM context.
pub struct AwsLcGcm(SecretBox<EVP_AEAD_CTX>);

// SAFETY: the context is owned by this value alone, and aws-lc documents
// seal and open on one context as safe to call from several threads at once
// for the AEADs it lists (aead.h, "thread-safety"), AES-256-GCM among them:
// they read the key schedule and write only their arguments.
unsafe impl Send for AwsLcGcm {}
// SAFETY: as above: through `&AwsLcGcm` only seal and open are reachable,
// which take the context as `const`.
unsafe impl Sync for AwsLcGcm {}

impl AwsLcGcm {
    /// The context for `key`, or `None` if aws-lc refuses to set it up (it
    /// does not for a 32-byte key, short of running out of memory).
    pub fn new(key: &[u8; KEY_LEN]) -> Option<Self> {
        // SAFETY: EVP_AEAD_CTX is a plain C struct (pointers and bytes) for
        // which all zeroes is a valid, empty value; EVP_AEAD_CTX_zero makes
        // that official below.
        let mut ctx = SecretBox::new(unsafe { std::mem::zeroed::<EVP_AEAD_CTX>() });
        // SAFETY: `ctx` points to a live context in its final place (the box
        // never moves its value); the key is KEY_LEN readable bytes; aws-lc
        // copies what it needs and keeps no pointer to the key.
        let ok = unsafe {
            EVP_AEAD_CTX_zero(&mut *ctx);
            EVP_AEAD_CTX_init(
                &mut *ctx,
                AEAD(),
                key.as_ptr(),
                KEY_LEN,
                AEAD_TAG_LEN,
                std::ptr::null_mut(),
            )
        };
        if ok != 1 {
            clear_errors();
            return None;
        }
        Some(AwsLcGcm(ctx))
    }

    /// Encrypts `plaintext` into `body` (as long) and the tag into `tag`.
    /// False on failure (a length mismatch, or beyond GCM's 64 GiB limit).
    #[cfg(not(feature = "fips"))]
    pub fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        body: &mut [u8],
        tag: &mut [u8; TAG_LEN],
    ) -> bool {
        if body.len() != plaintext.len() {
            return false;
        }
        let mut tag_len = 0usize;
        // SAFETY: every pointer comes with the length of the slice it points
        // into (aws-lc reads or writes no more); `body` and `plaintext` do not
        // overlap (one is borrowed mutably); the context was initialized in
        // `new` and is only read.
        let ok = unsafe {
            EVP_AEAD_CTX_seal_scatter(
                &*self.0,
                body.as_mut_ptr(),
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                nonce.as_ptr(),
                NONCE_LEN,
                plaintext.as_ptr(),
                plaintext.len(),
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        wipe_stack();
        if ok != 1 {
            clear_errors();
        }
        ok == 1 && tag_len == TAG_LEN
    }

    /// Encrypts `plaintext` into `body` (as long) under a nonce the FIPS
    /// module draws, written to `nonce`, and the tag into `tag`. False on
    /// failure (a length mismatch, the module's DRBG failing, or beyond GCM's
    /// 64 GiB limit).
    #[cfg(feature = "fips")]
    pub fn seal_drawing_nonce(
        &self,
        nonce: &mut [u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
        body: &mut [u8],
        tag: &mut [u8; TAG_LEN],
    ) -> bool {
        if body.len() != plaintext.len() {
            return false;
        }
        // The module writes the tag, then the nonce it drew.
        let mut tag_and_nonce = [0u8; TAG_LEN + NONCE_LEN];
        let mut written = 0usize;
        // SAFETY: as in the standard build's `seal`; no external nonce (the
        // module draws it), and `tag_and_nonce` holds the 28 bytes it writes.
        let ok = unsafe {
            EVP_AEAD_CTX_seal_scatter(
                &*self.0,
                body.as_mut_ptr(),
                tag_and_nonce.as_mut_ptr(),
                &mut written,
                tag_and_nonce.len(),
                std::ptr::null(),
                0,
                plaintext.as_ptr(),
                plaintext.len(),
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        wipe_stack();
        if ok != 1 || written != tag_and_nonce.len() {
            clear_errors();
            return false;
        }
        tag.copy_from_slice(&tag_and_nonce[..TAG_LEN]);
        nonce.copy_from_slice(&tag_and_nonce[TAG_LEN..]);
        true
    }

    /// Decrypts and authenticates `ciphertext` with `tag` into `out` (as
    /// long). False if it does not authenticate; `out` may then hold anything.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> bool {
        if out.len() != ciphertext.len() {
            return false;
        }
        // The standard AEAD takes the nonce apart; the FIPS module's
        // internal-nonce AEAD takes it after the tag, as its seal wrote it.
        #[cfg(not(feature = "fips"))]
        let (nonce_arg, tag_arg): (&[u8], &[u8]) = (nonce, tag);
        #[cfg(feature = "fips")]
        let tag_and_nonce = {
            let mut joined = [0u8; TAG_LEN + NONCE_LEN];
            joined[..TAG_LEN].copy_from_slice(tag);
            joined[TAG_LEN..].copy_from_slice(nonce);
            joined
        };
        #[cfg(feature = "fips")]
        let (nonce_arg, tag_arg): (&[u8], &[u8]) = (&[], &tag_and_nonce);
        // SAFETY: as in `seal`: each pointer with its slice's length, `out`
        // distinct from the inputs, the context initialized and only read.
        let ok = unsafe {
            EVP_AEAD_CTX_open_gather(
                &*self.0,
                out.as_mut_ptr(),
                nonce_arg.as_ptr(),
                nonce_arg.len(),
                ciphertext.as_ptr(),
                ciphertext.len(),
                tag_arg.as_ptr(),
                tag_arg.len(),
                aad.as_ptr(),
                aad.len(),
            )
        };
        wipe_stack();
        if ok != 1 {
            clear_errors();
        }
        ok == 1
    }
}

impl Drop for AwsLcGcm {
    fn drop(&mut self) {
        // SAFETY: the context was initialized in `new` and is cleaned up once;
        // the box then wipes and frees its memory.
        unsafe { EVP_AEAD_CTX_cleanup(&mut *self.0) };
    }
}
