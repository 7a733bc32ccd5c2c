//! Time of sealing and opening one value, without PostgreSQL: the floor under the SQL functions.
//! `cargo run --release -p byok-core --example seal_open_speed [value_bytes]`
use std::hint::black_box;
use std::time::Instant;

use byok_core::crypto::{DataKey, DekCipher, NoncePool};
use byok_core::envelope::{self, Envelope};

fn main() {
    let len: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let key = DataKey::generate().unwrap();
    let cipher = DekCipher::new(1, "bench", &key).unwrap();
    let plaintext = vec![7u8; len];
    let mut sealed = vec![0u8; envelope::sealed_len(len)];
    let mut opened = vec![0u8; len];
    let n: u32 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    cipher.seal_into(&plaintext, b"", &mut sealed).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        cipher
            .seal_into(black_box(&plaintext), b"", &mut sealed)
            .unwrap();
    }
    let seal_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    let mut pool = NoncePool::default();
    let t = Instant::now();
    for _ in 0..n {
        cipher
            .seal_into_with(black_box(&plaintext), b"", &mut sealed, &mut |nonce| {
                pool.fill(1, nonce)
            })
            .unwrap();
    }
    let pooled_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    let t = Instant::now();
    for _ in 0..n {
        let env = Envelope::parse(black_box(&sealed)).unwrap();
        cipher.open_into(&env, b"", &mut opened).unwrap();
    }
    let open_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    let t = Instant::now();
    let mut nonce = [0u8; 12];
    for _ in 0..n {
        getrandom::fill(black_box(&mut nonce)).unwrap();
    }
    let rng_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    println!(
        "{len}-byte values: seal {seal_ns:.0} ns (pooled nonces {pooled_ns:.0} ns), open {open_ns:.0} ns, one OS random call {rng_ns:.0} ns"
    );
}
