//! Where aws-lc's AES-GCM overtakes RustCrypto's: both implementations timed
//! sealing and opening one value with a ready key, per value size, on this
//! machine. `crypto::AWS_LC_FROM_BYTES_AVX512` and
//! `crypto::AWS_LC_FROM_BYTES_ELSEWHERE` are taken from its output on CPUs
//! with and without aws-lc's AVX-512 code.
//!
//! `cargo run --release -p byok-core --example gcm_crossover [iterations] [rounds]`
//! (each figure: the best of `rounds` runs of `iterations` calls; nonces come
//! from a pool, so the OS random call is not timed).
use std::hint::black_box;
use std::time::Instant;

use byok_core::aws_lc::gcm_code_path;
use byok_core::crypto::{DataKey, DekCipher, GcmImpl, NoncePool, aws_lc_from_bytes};
use byok_core::envelope::{self, Envelope};

const SIZES: &[usize] = &[
    64, 100, 128, 192, 256, 384, 512, 640, 768, 896, 1000, 1024, 2048, 4000, 4096, 16384, 65536,
];

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>().ok());
    let iterations = args.next().flatten().unwrap_or(200_000);
    let rounds = args.next().flatten().unwrap_or(5);
    let key = DataKey::generate().expect("OS random");
    let cipher = DekCipher::new(1, "bench", &key).expect("a 32-byte key");
    let context = b"accounts.secret";
    let mut pool = NoncePool::default();
    println!(
        "ns per value, best of {rounds} x {iterations} (aws-lc's code path here: {:?}; \
         current threshold on this CPU: aws-lc from {} bytes)",
        gcm_code_path(),
        aws_lc_from_bytes()
    );
    println!(
        "{:>7} {:>12} {:>12} {:>12} {:>12}  faster",
        "bytes", "open rc", "open aws-lc", "seal rc", "seal aws-lc"
    );
    for &len in SIZES {
        // Fewer calls for long values: the same time per figure, roughly.
        let n = (u64::from(iterations) * 256 / (len as u64 + 256)).max(1000) as u32;
        let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut sealed = vec![0u8; envelope::sealed_len(len)];
        let mut opened = vec![0u8; len];
        let mut figures = [f64::MAX; 4];
        for _ in 0..rounds {
            for (slot, using) in [GcmImpl::RustCrypto, GcmImpl::AwsLc]
                .into_iter()
                .enumerate()
            {
                cipher
                    .seal_into_using(using, &plaintext, context, &mut sealed, &mut |n| {
                        pool.fill(1, n)
                    })
                    .expect("seal");
                let t = Instant::now();
                for _ in 0..n {
                    let env = Envelope::parse(black_box(&sealed)).expect("parse");
                    cipher
                        .open_into_using(using, &env, context, &mut opened)
                        .expect("open");
                }
                figures[slot] = figures[slot].min(t.elapsed().as_nanos() as f64 / f64::from(n));
                assert_eq!(opened, plaintext);
                let t = Instant::now();
                for _ in 0..n {
                    cipher
                        .seal_into_using(
                            using,
                            black_box(&plaintext),
                            context,
                            &mut sealed,
                            &mut |n| pool.fill(1, n),
                        )
                        .expect("seal");
                }
                figures[2 + slot] =
                    figures[2 + slot].min(t.elapsed().as_nanos() as f64 / f64::from(n));
            }
        }
        let faster = |rc: f64, lc: f64| if lc < rc { "aws-lc" } else { "rc" };
        println!(
            "{len:>7} {:>12.0} {:>12.0} {:>12.0} {:>12.0}  open: {}, seal: {}",
            figures[0],
            figures[1],
            figures[2],
            figures[3],
            faster(figures[0], figures[1]),
            faster(figures[2], figures[3]),
        );
    }
}
