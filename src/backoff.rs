//! One capped exponential backoff, with optional jitter, for every retry
//! loop in the worker: task processes reconnecting to the broker, the
//! control process reconnecting, and the supervisor restarting a process
//! that keeps exiting soon after it starts.

use std::time::Duration;

/// How task processes and the control process retry a lost broker: 0.25 s
/// doubling to a cap of 2 s, each delay shortened by up to half at random.
/// Whatever the outage lasted, a broker that accepts connections again is
/// tried within 2 s; the jitter keeps the processes of many pods from
/// knocking in step (at the cap they try every 1–2 s).
pub const BROKER_RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_secs(2)).with_jitter(0.5);

/// Delays that double from `base` up to `max`, each shortened by up to
/// `jitter` (a fraction, 0.0–1.0) so that a fleet of workers does not retry
/// in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay of attempt 0.
    pub base: Duration,
    /// No delay is longer.
    pub max: Duration,
    /// The largest fraction taken off a delay at random (0 = none).
    pub jitter: f64,
}

impl Backoff {
    /// Doubling from `base` up to `max`, without jitter.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: 0.0,
        }
    }

    /// The same, with up to `fraction` of each delay taken off at random.
    pub const fn with_jitter(self, fraction: f64) -> Self {
        Self {
            jitter: fraction,
            ..self
        }
    }

    /// The delay before retry number `attempt` (0-based), without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt`, with this process's jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, random_unit(attempt))
    }

    /// The delay before retry number `attempt`, with `unit` (0.0–1.0) as the
    /// random draw: `unit` 0 takes nothing off, 1 takes off the full jitter.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let cut = (self.jitter * unit.clamp(0.0, 1.0)).clamp(0.0, 1.0);
        self.ceiling(attempt).mul_f64(1.0 - cut)
    }
}

/// A draw in 0.0..1.0 that differs between processes and calls (pid, the
/// attempt and the clock's nanoseconds through xorshift). Not for secrets.
fn random_unit(attempt: u32) -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mut x = (u64::from(std::process::id())
        ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ nanos)
        | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff::new(MS(500), Duration::from_secs(30));
        let got: Vec<_> = (0..9).map(|a| b.ceiling(a)).collect();
        let want = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000].map(MS);
        assert_eq!(got, want);
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let b = Backoff::new(MS(200), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_only_shortens_and_stays_within_its_fraction() {
        let b = Backoff::new(MS(1000), Duration::from_secs(30)).with_jitter(0.5);
        assert_eq!(b.delay_with(0, 0.0), MS(1000));
        assert_eq!(b.delay_with(0, 1.0), MS(500));
        assert_eq!(b.delay_with(1, 0.5), MS(1500));
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let ceiling = b.ceiling(attempt);
            assert!(d <= ceiling && d >= ceiling / 2, "{d:?} vs {ceiling:?}");
        }
    }

    #[test]
    fn no_jitter_means_exact_delays() {
        let b = Backoff::new(MS(200), Duration::from_secs(10));
        for attempt in 0..10 {
            assert_eq!(b.delay(attempt), b.ceiling(attempt));
        }
    }

    /// When the retries of a process that lost the broker at 0 s happen,
    /// with `draw` as the random draw of each attempt.
    fn retry_times(draw: impl Fn(u32) -> f64, until: Duration) -> Vec<Duration> {
        let mut times = vec![];
        let mut at = Duration::ZERO;
        for attempt in 0.. {
            at += BROKER_RECONNECT.delay_with(attempt, draw(attempt));
            times.push(at);
            if at > until {
                break;
            }
        }
        times
    }

    #[test]
    fn broker_retries_never_wait_longer_than_the_cap() {
        for attempt in 0..100 {
            for unit in [0.0, 0.3, 1.0] {
                assert!(BROKER_RECONNECT.delay_with(attempt, unit) <= Duration::from_secs(2));
            }
            assert!(BROKER_RECONNECT.delay(attempt) <= Duration::from_secs(2));
        }
        assert_eq!(BROKER_RECONNECT.delay_with(0, 0.0), MS(250));
        assert_eq!(BROKER_RECONNECT.delay_with(9, 1.0), MS(1000));
    }

    #[test]
    fn a_broker_back_after_up_to_a_minute_is_tried_within_2_s() {
        let minute = Duration::from_secs(60);
        let slowest = retry_times(|_| 0.0, minute);
        let drawn = retry_times(random_unit, minute);
        for times in [&slowest, &drawn] {
            for back_ms in (0..=60_000).step_by(50) {
                let back = MS(back_ms);
                let next = times
                    .iter()
                    .find(|t| **t >= back)
                    .expect("tried past a minute");
                assert!(
                    *next - back <= Duration::from_secs(2),
                    "back at {back:?}, tried at {next:?}"
                );
            }
        }
        // The price: about one try a second per process, not a storm.
        let tries = slowest.iter().filter(|t| **t <= minute).count();
        assert!(
            (30..=35).contains(&tries),
            "{tries} tries in a minute at the slowest"
        );
    }

    #[test]
    fn draws_vary() {
        let draws: std::collections::BTreeSet<u64> =
            (0..50).map(|a| (random_unit(a) * 1e6) as u64).collect();
        assert!(draws.len() > 40, "{draws:?}");
        assert!(draws.iter().all(|d| *d < 1_000_000));
    }
}
