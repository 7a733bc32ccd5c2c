//! When the clients that retry on their own (Azure, GCP) try again: with a
//! backoff from 100 ms doubling up to 2 s, and only while the wait still fits in
//! the provider timeout, less a margin so that their answer, not the broker's
//! timeout, reaches the user.

use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The retry budget of one operation.
pub(crate) struct RetrySchedule {
    deadline: Instant,
    backoff: Duration,
}

impl RetrySchedule {
    /// A budget of 90% of `timeout`, from now.
    pub(crate) fn within(timeout: Duration) -> Self {
        RetrySchedule {
            deadline: Instant::now() + timeout.mul_f64(0.9),
            backoff: FIRST_BACKOFF,
        }
    }

    /// What is left of the budget.
    #[cfg(feature = "gcp")] // Azure's calls are bounded by their HTTP client
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// How long to wait before the next try: what the service `asked` for, or
    /// the backoff; `None` when that wait would reach the deadline (give up).
    pub(crate) fn next_wait(&mut self, asked: Option<Duration>) -> Option<Duration> {
        let wait = asked.unwrap_or(self.backoff);
        if Instant::now() + wait >= self.deadline {
            return None;
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_while_it_fits_and_a_long_ask_ends_it() {
        let mut schedule = RetrySchedule::within(Duration::from_secs(60));
        let waits: Vec<u64> = (0..7)
            .map(|_| schedule.next_wait(None).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(
            schedule.next_wait(Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(schedule.next_wait(Some(Duration::from_secs(54))), None);

        // 900 ms of a 1 s timeout: waits of up to 800 ms fit (each alone), 1600 does not.
        let mut short = RetrySchedule::within(Duration::from_secs(1));
        for expected in [100, 200, 400, 800] {
            assert_eq!(short.next_wait(None), Some(Duration::from_millis(expected)));
        }
        assert_eq!(short.next_wait(None), None);
    }
}
