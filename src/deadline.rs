//! A deadline the runtime sleeps until with one wake-up.
//!
//! tokio's timer wheel wakes a sleeping runtime on the way to a far
//! deadline: once at the start of the deadline's slot on each coarser level
//! (slots of 4.1 s, then of 64 ms), then at the deadline itself. A 5 s sleep
//! costs about three wake-ups, a 2 s sleep two. An idle worker's periodic
//! duties (its processes' heartbeats, the consumed-queue check,
//! `worker-heartbeat` events) would pay that on every period. A [`Deadline`]
//! is a `timerfd` the runtime's own epoll watches: armed for the instant,
//! it wakes the runtime once, when due, and it is armed again only when the
//! instant changes (a loop that waits for the same instant on every turn
//! makes no system call for it).

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

/// The timer, as tokio's `AsyncFd` takes a descriptor.
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A one-shot timer for the instants one loop waits for, one at a time.
pub struct Deadline {
    /// `None` when no timer could be made: tokio's own sleep is used.
    timer: Option<AsyncFd<Timer>>,
    /// The instant the timer is armed for, until it fires.
    armed: Option<Instant>,
}

impl Deadline {
    /// Makes the timer (inside a tokio runtime with I/O enabled). If the
    /// kernel refuses a timer, waits fall back to `tokio::time::sleep_until`.
    pub fn new() -> Self {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )
        .ok()
        .and_then(|fd| {
            #[allow(unsafe_code)]
            // SAFETY: the descriptor is the `TimerFd`'s own, opened just
            // above; `Timer` owns it and returns that same descriptor for as
            // long as the `AsyncFd` holds it, and closes it only when
            // dropped with it.
            unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) }.ok()
        });
        Self { timer, armed: None }
    }

    /// Waits until `at`: at once when it has passed. Cancel-safe: a wait
    /// dropped before `at` leaves the timer armed, and the next wait (for
    /// the same instant or another) picks up from there.
    pub async fn until(&mut self, at: Instant) {
        let Some(timer) = &self.timer else {
            return tokio::time::sleep_until(at).await;
        };
        loop {
            let now = Instant::now();
            if at <= now {
                return;
            }
            if self.armed != Some(at) {
                let after = TimeSpec::from_duration(at - now);
                if timer
                    .get_ref()
                    .0
                    .set(Expiration::OneShot(after), TimerSetTimeFlags::empty())
                    .is_err()
                {
                    return tokio::time::sleep_until(at).await;
                }
                // Re-arming resets the count of expirations: an expiry of
                // the previous instant that was never read is forgotten.
                self.armed = Some(at);
            }
            let Ok(mut ready) = timer.readable().await else {
                return tokio::time::sleep_until(at).await;
            };
            // Read the expiration (the descriptor is non-blocking): none
            // yet means the readiness was stale, so wait again.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(Ok(())) => {
                    // Read: nothing more until armed again (which resets
                    // the count), so the readiness need not be re-checked.
                    ready.clear_ready();
                    self.armed = None;
                }
                Ok(Err(_)) => return tokio::time::sleep_until(at).await,
                Err(_would_block) => {}
            }
        }
    }
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Times this thread went to sleep (each is one wake-up later).
    fn sleeps_of_this_thread() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_wait_ends_at_its_instant_not_before() {
        runtime().block_on(async {
            let mut deadline = Deadline::new();
            assert!(deadline.timer.is_some(), "a timerfd, not tokio's wheel");
            let at = Instant::now() + Duration::from_millis(150);
            deadline.until(at).await;
            assert!(Instant::now() >= at);
            // A past instant: at once, and again after a fire.
            deadline.until(at).await;
            deadline
                .until(Instant::now() - Duration::from_millis(1))
                .await;
        });
    }

    #[test]
    fn a_five_second_wait_is_one_wake_up() {
        // tokio's sleep_until for the same 5 s: three wake-ups of the thread
        // (its wheel's 4.1 s and 64 ms slots, then the instant).
        runtime().block_on(async {
            let mut deadline = Deadline::new();
            let at = Instant::now() + Duration::from_secs(5);
            let before = sleeps_of_this_thread();
            deadline.until(at).await;
            let slept = sleeps_of_this_thread() - before;
            assert!(Instant::now() >= at);
            assert_eq!(slept, 1, "the thread slept {slept} times for one 5 s wait");
        });
    }

    #[test]
    fn a_dropped_wait_leaves_no_early_wake_for_a_later_instant() {
        runtime().block_on(async {
            let mut deadline = Deadline::new();
            let first = Instant::now() + Duration::from_millis(50);
            // Dropped before its instant: the timer stays armed for it.
            let cut = tokio::time::timeout(Duration::from_millis(10), deadline.until(first)).await;
            assert!(cut.is_err());
            // The first instant fires unread; the wait for a later one must
            // not end then.
            tokio::time::sleep(Duration::from_millis(80)).await;
            let later = Instant::now() + Duration::from_millis(120);
            deadline.until(later).await;
            assert!(Instant::now() >= later);
            // The same instant again while armed: no new arming needed.
            let again = Instant::now() + Duration::from_millis(60);
            let cut = tokio::time::timeout(Duration::from_millis(10), deadline.until(again)).await;
            assert!(cut.is_err());
            deadline.until(again).await;
            assert!(Instant::now() >= again);
        });
    }
}
