//! Writer: the supervisor records a lost task when a task process dies
//! running it; task processes move records to done (`claim_report`,
//! `settle_lost`). Readers: task processes.
//!
//! Each record of the ring goes through these states:
//!
//! ```text
//!                 record_lost (supervisor)
//!   FREE ───────────────┬──────────────────────────┐
//!                       │ early ack                │ acks_late
//!                       ▼                          ▼
//!    release_reports ┌▶ REPORT                 WAIT_REDELIVERY
//!    (claimer died)  │    │ claim_report (CAS)    │
//!                    │    ▼                       │
//!                    └─ REPORTING                 │
//!                         │ reported              │
//!                         ▼                       │
//!                    REPORTED                      │
//!                       │ ring reuse               │ settle_lost
//!                       ▼                          ▼
//!                     DONE ◀───────────────────────┘
//! ```
//!
//! * REPORT: the message was acknowledged before the task ran and will not
//!   come back; whichever task process swaps first stores the failure.
//! * REPORTING: a task process claimed it and is storing the failure. If that
//!   process dies first (its next task may exit it before the store is
//!   done), the supervisor puts the record back to REPORT.
//! * REPORTED: that failure is stored. The record stays findable until the
//!   ring reuses it, because the acknowledgement may not have left the dead
//!   process: the broker then redelivers the message, and the process that
//!   receives the copy acknowledges it without running it (`early` in
//!   [`Lost`]) — as often as the copy comes back.
//! * WAIT_REDELIVERY: the process the broker redelivers the message to finds
//!   the record (`find_lost`) and fails, quarantines or reruns the task; a
//!   rerun (`reject_on_worker_lost`) leaves the record live, so that the next
//!   death counts one more.
//! * A new record for a task id with a live record sets the old one DONE
//!   and carries its death count on. The ring reuses its oldest index
//!   whatever its state, passing through FREE while it is written.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::seqtext::SeqText;
use super::slot::{RunningTask, TaskFlags};
use super::{now_ms, SharedState, TEXT_WORDS};

/// Lost-task records kept.
pub const LOST_RING: usize = 64;

/// States of a lost-task record (see the module doc).
struct LostState;

impl LostState {
    /// Never used, or being rewritten by the supervisor.
    const FREE: u32 = 0;
    /// An early-acked task: a task process must store its failure.
    const REPORT: u32 = 1;
    /// An acks-late task: waiting for the broker to redeliver it.
    const WAIT_REDELIVERY: u32 = 2;
    /// Handled, or superseded by a newer record of the same task.
    const DONE: u32 = 3;
    /// An early-acked task whose failure is stored; a redelivered copy (its
    /// acknowledgement never reached the broker) is not to be run.
    const REPORTED: u32 = 4;
    /// An early-acked task whose failure a task process is storing: this
    /// plus the process's task slot.
    const REPORTING: u32 = 0x100;

    fn reporting(slot: usize) -> u32 {
        Self::REPORTING + slot as u32
    }
}

/// Why a task's child went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LostReason {
    /// The child died (signal or crash): `WorkerLostError`.
    WorkerLost = 1,
    /// The supervisor killed it at the hard time limit: `TimeLimitExceeded`.
    TimeLimit = 2,
}

shm_record! {
    /// A task whose child died while running it.
    pub struct LostRecord {
        state: AtomicU32,
        reason: AtomicU32,
        deaths: AtomicU32,
        signal: AtomicU32,
        exit_code: AtomicU32,
        hard_limit_ms: AtomicU64,
        flags: AtomicU64,
        at_ms: AtomicU64,
        task: SeqText<TEXT_WORDS>,
    }
}

/// A lost task, as read from the ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Lost {
    /// Index in the ring (to mark it done).
    pub index: usize,
    /// The task.
    pub task: RunningTask,
    /// Why.
    pub reason: LostReason,
    /// How many times a child died running it.
    pub deaths: u32,
    /// The signal that killed the child (0 if it exited).
    pub signal: u32,
    /// Its exit code, when it exited (0 if killed by a signal).
    pub exit_code: u32,
    /// The message was acknowledged before the task ran: its failure is
    /// reported from the record, and a redelivered copy is not run.
    pub early: bool,
}

impl SharedState {
    /// Supervisor only: records that `task` was lost. Returns how many times
    /// a child has now died running this task id.
    pub(crate) fn record_lost(
        &self,
        task: &RunningTask,
        reason: LostReason,
        (signal, exit_code): (u32, u32),
    ) -> u32 {
        let previous = self.find_lost(&task.id).map_or(0, |l| l.deaths);
        if let Some(old) = self.find_lost(&task.id) {
            self.lost[old.index]
                .state
                .store(LostState::DONE, Ordering::Release);
        }
        let index = (self.header.lost_next.fetch_add(1, Ordering::AcqRel) as usize) % LOST_RING;
        let r = &self.lost[index];
        r.state.store(LostState::FREE, Ordering::Release);
        r.task
            .write(&[&task.id, &task.name, &task.reply_to, &task.correlation_id]);
        r.reason.store(reason as u32, Ordering::Relaxed);
        r.deaths.store(previous + 1, Ordering::Relaxed);
        r.signal.store(signal, Ordering::Relaxed);
        r.exit_code.store(exit_code, Ordering::Relaxed);
        r.hard_limit_ms.store(task.hard_limit_ms, Ordering::Relaxed);
        r.flags.store(task.flags, Ordering::Relaxed);
        r.at_ms.store(now_ms(), Ordering::Relaxed);
        // An early-acked task's message is gone: a child must store its
        // failure. An acks-late message comes back from the broker, and the
        // child that receives it decides, unless its delivery timed out and
        // its copy was acknowledged already (see `overdue.rs`).
        let state =
            if task.flags & TaskFlags::ACKS_LATE != 0 && !self.overdue_copy_settled(&task.id) {
                LostState::WAIT_REDELIVERY
            } else {
                LostState::REPORT
            };
        r.state.store(state, Ordering::Release);
        previous + 1
    }

    fn read_lost(&self, index: usize) -> Option<Lost> {
        let state = self.lost[index].state.load(Ordering::Acquire);
        let live = !matches!(state, LostState::FREE | LostState::DONE);
        live.then(|| self.read_record(index))
    }

    fn read_record(&self, index: usize) -> Lost {
        let r = &self.lost[index];
        let state = r.state.load(Ordering::Acquire);
        let mut parts = r.task.read().into_iter();
        let mut next = || parts.next().unwrap_or_default();
        let (id, name, reply_to, correlation_id) = (next(), next(), next(), next());
        let reason = if r.reason.load(Ordering::Relaxed) == LostReason::TimeLimit as u32 {
            LostReason::TimeLimit
        } else {
            LostReason::WorkerLost
        };
        Lost {
            index,
            task: RunningTask {
                id,
                name,
                reply_to,
                correlation_id,
                started_ms: 0,
                deadline_ms: 0,
                hard_limit_ms: r.hard_limit_ms.load(Ordering::Relaxed),
                flags: r.flags.load(Ordering::Relaxed),
                ..RunningTask::default()
            },
            reason,
            deaths: r.deaths.load(Ordering::Relaxed),
            signal: r.signal.load(Ordering::Relaxed),
            exit_code: r.exit_code.load(Ordering::Relaxed),
            early: matches!(state, LostState::REPORT | LostState::REPORTED)
                || state >= LostState::REPORTING,
        }
    }

    /// The live record for task `id`, if a child died running it.
    pub fn find_lost(&self, id: &str) -> Option<Lost> {
        (0..LOST_RING)
            .filter_map(|i| self.read_lost(i))
            .find(|l| l.task.id == id)
    }

    /// Task slot `slot` claims one lost early-acked task whose failure nobody
    /// stored yet; `reported` ends the claim once it is stored.
    pub fn claim_report(&self, slot: usize) -> Option<Lost> {
        (0..LOST_RING).find_map(|i| {
            self.lost[i]
                .state
                .compare_exchange(
                    LostState::REPORT,
                    LostState::reporting(slot),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
                .then(|| self.read_record(i))
        })
    }

    /// The claimed failure is stored. The record stays findable (REPORTED)
    /// for a redelivered copy.
    pub fn reported(&self, index: usize, slot: usize) {
        let _ = self.lost[index].state.compare_exchange(
            LostState::reporting(slot),
            LostState::REPORTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Supervisor only, after the process of task slot `slot` died: the
    /// reports it claimed and did not finish go back to be claimed again.
    /// Returns how many.
    pub(crate) fn release_reports(&self, slot: usize) -> usize {
        let claimed = |r: &&LostRecord| {
            r.state
                .compare_exchange(
                    LostState::reporting(slot),
                    LostState::REPORT,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        };
        self.lost.iter().filter(claimed).count()
    }

    /// Marks a record handled.
    pub fn settle_lost(&self, index: usize) {
        self.lost[index]
            .state
            .store(LostState::DONE, Ordering::Release);
    }

    /// The running task of a task slot other than `own` whose id is `id`.
    pub fn running_elsewhere(&self, id: &str, own: usize) -> Option<RunningTask> {
        self.task_slots()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != own)
            .filter_map(|(_, s)| s.running_task())
            .find(|t| t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, flags: u64) -> RunningTask {
        RunningTask {
            id: id.into(),
            name: "tasks.add".into(),
            hard_limit_ms: 5000,
            flags,
            ..RunningTask::default()
        }
    }

    #[test]
    fn an_early_acked_task_is_reported_exactly_once() {
        let shm = SharedState::map(2).unwrap();
        assert_eq!(
            shm.record_lost(&task("t1", 0), LostReason::TimeLimit, (9, 0)),
            1
        );
        let lost = shm.claim_report(0).expect("claimable");
        assert_eq!(lost.task, task("t1", 0));
        assert_eq!(lost.reason, LostReason::TimeLimit);
        assert_eq!((lost.deaths, lost.signal), (1, 9));
        assert_eq!(shm.claim_report(1), None);
        shm.reported(lost.index, 0);
        assert_eq!(shm.release_reports(0), 0, "a finished report stays");
        let kept = shm.find_lost("t1").expect("kept for a redelivered copy");
        assert!(kept.early);
    }

    #[test]
    fn racing_claims_have_one_winner() {
        let shm = SharedState::map(1).unwrap();
        shm.record_lost(&task("t1", 0), LostReason::WorkerLost, (0, 3));
        let shm = &shm;
        let won = std::thread::scope(|s| {
            let claims: Vec<_> = (0..4)
                .map(|n| s.spawn(move || shm.claim_report(n)))
                .collect();
            claims.into_iter().filter_map(|c| c.join().unwrap()).count()
        });
        assert_eq!(won, 1);
    }

    #[test]
    fn an_acks_late_task_waits_for_redelivery_and_counts_deaths() {
        let shm = SharedState::map(1).unwrap();
        let t = task("t2", TaskFlags::ACKS_LATE);
        assert_eq!(shm.record_lost(&t, LostReason::WorkerLost, (0, 0)), 1);
        assert_eq!(shm.claim_report(0), None);
        assert_eq!(shm.record_lost(&t, LostReason::WorkerLost, (9, 0)), 2);
        let live: Vec<_> = (0..LOST_RING).filter_map(|i| shm.read_lost(i)).collect();
        assert_eq!(live.len(), 1, "the older record is superseded");
        let lost = shm.find_lost("t2").expect("live");
        assert_eq!((lost.deaths, lost.signal), (2, 9));
        assert!(!lost.early);
        shm.settle_lost(lost.index);
        assert_eq!(shm.find_lost("t2"), None);
    }

    #[test]
    fn an_acks_late_task_whose_copy_was_settled_is_reported() {
        let shm = SharedState::map(1).unwrap();
        let t = task("t5", TaskFlags::ACKS_LATE);
        shm.record_overdue("t5", 0, 42);
        let copy = shm.find_overdue("t5").unwrap();
        assert!(shm.claim_overdue_copy(&copy));
        shm.record_lost(&t, LostReason::WorkerLost, (9, 0));
        assert_eq!(shm.claim_report(0).map(|l| l.task.id), Some("t5".into()));
    }

    #[test]
    fn a_report_whose_claimer_died_is_claimed_again() {
        let shm = SharedState::map(2).unwrap();
        shm.record_lost(&task("t6", 0), LostReason::WorkerLost, (0, 4));
        let first = shm.claim_report(1).expect("claimable");
        assert_eq!(
            shm.release_reports(0),
            0,
            "another slot's claim is not released"
        );
        assert_eq!(shm.claim_report(0), None);
        assert_eq!(shm.release_reports(1), 1);
        let again = shm.claim_report(0).expect("claimable again");
        assert_eq!(again.index, first.index);
        shm.reported(again.index, 0);
        assert!(shm.find_lost("t6").expect("kept").early);
    }

    #[test]
    fn running_elsewhere_skips_the_own_slot() {
        let shm = SharedState::map(2).unwrap();
        shm.task_slots()[0].start_task(&task("t3", 0));
        assert_eq!(shm.running_elsewhere("t3", 0), None);
        assert_eq!(shm.running_elsewhere("t3", 1).unwrap().id, "t3");
    }
}
