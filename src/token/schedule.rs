//! When to refresh a token and how to retry a failed refresh (pure).

use std::time::Duration;

use crate::backoff::Backoff;

/// Retries of a failed refresh: 1 s doubling to 30 s, each shortened by up
/// to half at random, so the processes of a fleet do not ask in step.
pub const RETRY: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).with_jitter(0.5);

/// How long after its issue a token valid for `lifetime` is refreshed: at
/// two thirds of its lifetime (as the RabbitMQ .NET client's credential
/// refresher), moved by up to 5 % of the lifetime either way with `unit`
/// (a random draw in 0.0–1.0), so that the processes of a worker, which
/// each hold a token, do not all ask at once. At least one second.
pub fn refresh_after(lifetime: Duration, unit: f64) -> Duration {
    let fraction = 2.0 / 3.0 + (unit.clamp(0.0, 1.0) - 0.5) * 0.1;
    lifetime.mul_f64(fraction).max(Duration::from_secs(1))
}

/// A random draw in 0.0..1.0 (from the operating system's generator, by
/// way of a v4 UUID).
pub(super) fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_refreshed_at_about_two_thirds_of_its_life() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_after(hour, 0.5), Duration::from_secs(2400));
        assert_eq!(refresh_after(hour, 0.0), Duration::from_secs(2220));
        assert_eq!(refresh_after(hour, 1.0), Duration::from_secs(2580));
        let twenty = Duration::from_secs(20);
        let early = refresh_after(twenty, 0.0).as_secs_f64();
        let late = refresh_after(twenty, 1.0).as_secs_f64();
        assert!(
            (12.3..12.4).contains(&early) && (14.3..14.4).contains(&late),
            "{early} {late}"
        );
        assert_eq!(
            refresh_after(Duration::from_millis(900), 0.5),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn draws_spread() {
        let draws: Vec<f64> = (0..50).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        assert!(draws.iter().any(|d| *d < 0.5) && draws.iter().any(|d| *d >= 0.5));
    }

    #[test]
    fn retries_back_off_to_half_a_minute() {
        assert_eq!(RETRY.ceiling(0), Duration::from_secs(1));
        assert_eq!(RETRY.ceiling(3), Duration::from_secs(8));
        assert_eq!(RETRY.ceiling(10), Duration::from_secs(30));
    }
}
