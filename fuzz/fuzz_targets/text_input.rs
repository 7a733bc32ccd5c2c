//! Arbitrary text as a `byok.encrypted` literal (COPY, pg_dump, SQL): decoding
//! never panics, and whatever decodes re-encodes to an equivalent literal.
#![no_main]

use byok_core::envelope::{decode_text, encode_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bytes) = decode_text(text) {
        let again = encode_text(&bytes);
        assert_eq!(decode_text(&again).unwrap(), bytes);
    }
    // Any bytes encode to a literal that decodes back to them or is refused cleanly.
    let literal = encode_text(data);
    if let Ok(bytes) = decode_text(&literal) {
        assert_eq!(bytes, data);
    }
});
