//! Arbitrary bytes as a stored `byok.encrypted` value (what binary input and a
//! corrupted page can hand to decrypt): parsing never panics, accepted envelopes
//! (with or without a blind index term) are self-consistent, and opening one
//! that was not sealed under the key fails, through either AES-GCM
//! implementation.
#![no_main]

use byok_core::crypto::{DataKey, DekCipher, GcmImpl};
use byok_core::envelope::{
    Envelope, HEADER_LEN, KEYED_TERM_FIXED, MAX_TERM_LEN, MIN_TERM_LEN, NONCE_LEN, TAG_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else {
        return;
    };
    assert_eq!(
        envelope.header().len() + NONCE_LEN + envelope.plaintext_len() + TAG_LEN,
        data.len()
    );
    assert_eq!(envelope.ciphertext().len(), envelope.plaintext_len());
    assert_ne!(envelope.dek_id(), 0);
    // A searchable value (version 2): its term is in range, its index key
    // named, and what byok.term returns lies within the header.
    match (
        envelope.index_key_id(),
        envelope.term(),
        envelope.keyed_term(),
    ) {
        (None, None, None) => assert_eq!(envelope.header().len(), HEADER_LEN),
        (Some(index_key_id), Some(term), Some(keyed)) => {
            assert_ne!(index_key_id, 0);
            assert!((MIN_TERM_LEN..=MAX_TERM_LEN).contains(&term.len()));
            assert_eq!(keyed.len(), KEYED_TERM_FIXED + term.len());
            assert_eq!(envelope.header().len(), HEADER_LEN + keyed.len());
        }
        other => panic!("a term without its index key, or the reverse: {other:?}"),
    }
    let key = DataKey::from_slice(&[7u8; 32]).unwrap();
    let cipher = DekCipher::new(envelope.dek_id(), "fuzz", &key).unwrap();
    // Forging a GCM tag by chance is not something a fuzzer does: refused by
    // the path the length picks and by both implementations named.
    for using in [None, Some(GcmImpl::RustCrypto), Some(GcmImpl::AwsLc)] {
        let mut out = vec![0xAAu8; envelope.plaintext_len()];
        let result = match using {
            None => cipher.open_into(&envelope, b"", &mut out),
            Some(using) => cipher.open_into_using(using, &envelope, b"", &mut out),
        };
        assert!(result.is_err());
        assert!(
            out.iter().all(|&b| b == 0),
            "a failed open must leave no bytes behind"
        );
    }
});
