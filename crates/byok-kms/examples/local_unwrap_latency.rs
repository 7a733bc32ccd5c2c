//! The local provider's own unwrap latency (read the key file, derive, open),
//! the part of a cold key fetch that is not the broker's.
//! `cargo run --release -p byok-kms --example local_unwrap_latency [key-file] [iterations]`
use std::time::Instant;

use byok_kms::KeyContext;
use byok_kms::local::LocalProvider;

fn main() {
    let dir = std::env::temp_dir().join(format!("byok-unwrap-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| dir.join("master.key"));
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let provider = LocalProvider::open(&path, true).unwrap();
    let context = KeyContext::new("bench", 1);
    let (_, wrapped) = provider.generate_now("bench-cmk", &context).unwrap();
    let mut micros: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            provider.unwrap_now(&wrapped, &context).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let pct = |p: f64| micros[((micros.len() as f64 * p) as usize).min(micros.len() - 1)];
    println!(
        "local provider unwrap: p50 {:.1} us, p99 {:.1} us ({n} runs)",
        pct(0.50),
        pct(0.99)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
