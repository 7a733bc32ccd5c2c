//! The latency histogram behind `dek_generation_p99_ms`: fixed buckets, so
//! counters can live in shared memory as plain atomics.

/// Upper bounds (µs) of the buckets; one more bucket holds everything slower.
pub const BOUNDS_US: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
];
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// The bucket of a latency.
pub fn bucket(micros: u64) -> usize {
    BOUNDS_US
        .iter()
        .position(|&bound| micros <= bound)
        .unwrap_or(BOUNDS_US.len())
}

/// The 99th percentile, as the upper bound (ms) of the bucket that holds it;
/// infinity when it falls in the open last bucket, `None` without samples.
pub fn p99_ms(buckets: &[u64; BUCKETS]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(
                BOUNDS_US
                    .get(i)
                    .map_or(f64::INFINITY, |&us| us as f64 / 1000.0),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_p99() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100), 0);
        assert_eq!(bucket(101), 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let mut b = [0u64; BUCKETS];
        assert_eq!(p99_ms(&b), None);
        b[0] = 98;
        b[3] = 2;
        assert_eq!(p99_ms(&b), Some(1.0));
        b[0] = 99;
        b[3] = 1;
        assert_eq!(p99_ms(&b), Some(0.1));
        b[BUCKETS - 1] = 50;
        assert_eq!(p99_ms(&b), Some(f64::INFINITY));
    }
}
