//! A cheap monotonic clock for cache expiry on the per-row path.
//!
//! `Instant::now()` reads `CLOCK_MONOTONIC`, which costs ~25 ns on this kind of VM
//! (a tenth of all the work of decrypting a 100-byte value). Expiry is counted in
//! seconds, so the per-row path reads `CLOCK_MONOTONIC_COARSE` instead: the time
//! of the last timer tick (a few milliseconds stale at most), ~4 ns, no TSC read.

use std::ops::Add;
use std::time::Duration;

/// A point in time on a monotonic clock with timer-tick resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(Duration);

impl Tick {
    /// Now, to the last timer tick.
    #[inline]
    pub fn now() -> Tick {
        Tick(coarse_monotonic())
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn duration_since(self, earlier: Tick) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Tick {
    type Output = Tick;

    /// Saturates instead of overflowing: a TTL of "forever" stays forever.
    fn add(self, rhs: Duration) -> Tick {
        Tick(self.0.saturating_add(rhs))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
fn coarse_monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through its pointer and
    // keeps no reference to it; `ts` is a live, initialized, exclusively
    // borrowed local of exactly that type. Failure is reported by the return
    // value (checked), not by leaving `ts` half-written.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        precise_monotonic()
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
fn coarse_monotonic() -> Duration {
    precise_monotonic()
}

/// Time since the first call in this process, from `Instant` (where the coarse
/// clock is not available; Linux's coarse clock cannot fail, but is not assumed).
fn precise_monotonic() -> Duration {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // Start one hour in, so that subtracting a TTL from an early Tick stays positive.
    ORIGIN.get_or_init(Instant::now).elapsed() + Duration::from_secs(3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_with_real_time() {
        let start = Tick::now();
        std::thread::sleep(Duration::from_millis(60));
        let later = Tick::now();
        assert!(later > start);
        // Timer-tick resolution: within 20 ms of the real 60 ms.
        let elapsed = later.duration_since(start);
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        assert_eq!(start.duration_since(later), Duration::ZERO);
    }

    #[test]
    fn adding_saturates() {
        let now = Tick::now();
        assert!(now + Duration::from_secs(1) > now);
        assert_eq!(now + Duration::MAX, Tick(Duration::MAX));
    }

    #[test]
    fn the_fallback_clock_is_monotonic() {
        let a = precise_monotonic();
        let b = precise_monotonic();
        assert!(b >= a);
    }
}
