//! Arbitrary bytes as a stored `byok.encrypted` value (what binary input and a
//! corrupted page can hand to decrypt): parsing never panics, accepted envelopes
//! are self-consistent, and opening one that was not sealed under the key fails.
#![no_main]

use byok_core::crypto::{DataKey, DekCipher};
use byok_core::envelope::{Envelope, OVERHEAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else {
        return;
    };
    assert_eq!(envelope.plaintext_len() + OVERHEAD, data.len());
    assert_eq!(envelope.ciphertext().len(), envelope.plaintext_len());
    assert_ne!(envelope.dek_id(), 0);
    let key = DataKey::from_slice(&[7u8; 32]).unwrap();
    let cipher = DekCipher::new(envelope.dek_id(), "fuzz", &key).unwrap();
    let mut out = vec![0xAAu8; envelope.plaintext_len()];
    // Forging a GCM tag by chance is not something a fuzzer does.
    assert!(cipher.open_into(&envelope, b"", &mut out).is_err());
    assert!(
        out.iter().all(|&b| b == 0),
        "a failed open must leave no bytes behind"
    );
});
