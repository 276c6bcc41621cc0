//! The supervisor's decisions as pure functions: how a process's death is
//! counted, and how long to wait before starting it again. No I/O here, so
//! every rule is unit-tested.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::backoff::Backoff;
use crate::exit;
use crate::shm::DeathCause;

/// How a forked process ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl Ended {
    /// Its exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            Ended::Code(c) => Some(c),
            Ended::Signal(_) => None,
        }
    }

    /// Its killing signal, if one killed it.
    pub fn signal(self) -> Option<Signal> {
        match self {
            Ended::Signal(s) => Some(s),
            Ended::Code(_) => None,
        }
    }

    /// How it ended, for a log line: `exit code 3`, `signal 9 (SIGKILL)`.
    pub fn describe(self) -> String {
        match self {
            Ended::Code(c) => format!("exit code {c}"),
            Ended::Signal(s) => format!("signal {} ({s:?})", s as i32),
        }
    }
}

/// Why a process died, for the `celeriac_process_deaths_total` metric.
///
/// `killed_for` is what the supervisor itself killed it for, if it did.
/// During a worker drain every death is a shutdown.
pub fn classify(ended: Ended, draining: bool, killed_for: Option<DeathCause>) -> DeathCause {
    if draining {
        return DeathCause::Shutdown;
    }
    if let Some(cause) = killed_for {
        return cause;
    }
    match ended {
        Ended::Code(exit::BOOT_REFUSED | exit::UNREACHABLE) => DeathCause::Boot,
        // A process drains itself to be recycled, or when told to retire
        // (`pool_shrink`): either way it was replaced on purpose.
        Ended::Code(exit::RECYCLED | exit::DRAINED) => DeathCause::Recycled,
        Ended::Signal(_) => DeathCause::Crashed,
        Ended::Code(_) => DeathCause::Failed,
    }
}

/// A process that lived less than this and did not exit on purpose counts
/// as a quick exit, which delays its restart.
pub const QUICK_EXIT: Duration = Duration::from_secs(5);

/// Restart delays after consecutive quick exits: 0.2 s doubling, at most
/// 25.6 s (the 8th quick exit in a row and later).
pub const RESPAWN: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_millis(25_600));

/// The count of consecutive quick exits after this one.
pub fn quick_exits(previous: u32, lived: Duration, ended: Ended) -> u32 {
    let on_purpose = matches!(ended, Ended::Code(exit::DRAINED | exit::RECYCLED));
    if lived < QUICK_EXIT && !on_purpose {
        previous + 1
    } else {
        0
    }
}

/// How long to wait before starting the process again.
pub fn respawn_delay(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => RESPAWN.ceiling(n - 1),
    }
}

/// Restart delays of a task process that could not reach the broker:
/// the respawn curve, but never over 2 s, so the worker consumes soon after
/// the broker comes back, and `--boot-timeout` is checked often.
pub fn unreachable_retry_delay(quick_exits: u32) -> Duration {
    respawn_delay(quick_exits).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_makes_every_death_a_shutdown() {
        for ended in [
            Ended::Code(0),
            Ended::Code(1),
            Ended::Code(exit::BOOT_REFUSED),
            Ended::Signal(Signal::SIGKILL),
        ] {
            assert_eq!(
                classify(ended, true, Some(DeathCause::TimeLimit)),
                DeathCause::Shutdown
            );
        }
    }

    #[test]
    fn what_the_supervisor_killed_for_wins() {
        let kill = Ended::Signal(Signal::SIGKILL);
        assert_eq!(
            classify(kill, false, Some(DeathCause::TimeLimit)),
            DeathCause::TimeLimit
        );
        assert_eq!(
            classify(kill, false, Some(DeathCause::Wedged)),
            DeathCause::Wedged
        );
    }

    #[test]
    fn exit_codes_and_signals_are_classified() {
        let c = |ended| classify(ended, false, None);
        assert_eq!(c(Ended::Code(exit::BOOT_REFUSED)), DeathCause::Boot);
        assert_eq!(c(Ended::Code(exit::UNREACHABLE)), DeathCause::Boot);
        assert_eq!(c(Ended::Code(exit::RECYCLED)), DeathCause::Recycled);
        assert_eq!(c(Ended::Code(exit::DRAINED)), DeathCause::Recycled);
        assert_eq!(c(Ended::Code(exit::FAILED)), DeathCause::Failed);
        assert_eq!(c(Ended::Code(101)), DeathCause::Failed);
        assert_eq!(c(Ended::Signal(Signal::SIGSEGV)), DeathCause::Crashed);
        assert_eq!(c(Ended::Signal(Signal::SIGKILL)), DeathCause::Crashed);
    }

    #[test]
    fn every_cause_is_reachable() {
        let reached: std::collections::HashSet<_> = [
            classify(Ended::Code(5), false, None),
            classify(Ended::Signal(Signal::SIGSEGV), false, None),
            classify(Ended::Code(1), false, None),
            classify(Ended::Code(9), false, Some(DeathCause::TimeLimit)),
            classify(Ended::Code(9), false, Some(DeathCause::Wedged)),
            classify(Ended::Code(3), false, None),
            classify(Ended::Code(0), true, None),
        ]
        .into_iter()
        .map(|c| c.label())
        .collect();
        assert_eq!(reached.len(), DeathCause::ALL.len());
    }

    #[test]
    fn quick_exits_count_only_early_unplanned_deaths() {
        let early = Duration::from_millis(300);
        let late = Duration::from_secs(6);
        assert_eq!(quick_exits(2, early, Ended::Code(1)), 3);
        assert_eq!(quick_exits(2, early, Ended::Signal(Signal::SIGSEGV)), 3);
        assert_eq!(quick_exits(2, late, Ended::Code(1)), 0);
        assert_eq!(quick_exits(2, early, Ended::Code(exit::RECYCLED)), 0);
        assert_eq!(quick_exits(2, early, Ended::Code(exit::DRAINED)), 0);
    }

    #[test]
    fn an_unreachable_broker_is_retried_at_least_every_two_seconds() {
        let got: Vec<u64> = (0..12)
            .map(|n| unreachable_retry_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [0, 200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000, 2000, 2000]
        );
    }

    #[test]
    fn respawn_backoff_sequence() {
        let got: Vec<u64> = (0..11)
            .map(|n| respawn_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [0, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 25600, 25600]
        );
    }
}
