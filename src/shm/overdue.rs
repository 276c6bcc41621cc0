//! Writers: task processes. The process whose consumer channel the broker
//! closed for a consumer timeout records each acks-late task it was running
//! (`record_overdue`) and marks it finished when the run ends
//! (`finish_overdue`); the process the broker redelivers the message to
//! settles the copy (`claim_overdue_copy`). Readers: task processes, the
//! supervisor (`record_lost` asks whether the copy was settled) and the
//! control process (the event count, for `/metrics`).
//!
//! A delivery the broker timed out is requeued while its first run goes on:
//! without this table the copy would run a second time, time out again, and
//! loop. Each record goes through these states:
//!
//! ```text
//!                record_overdue (the running process)
//!   FREE ───────────────▶ RUNNING ──finish_overdue──▶ FINISHED
//!                            │                           │
//!                            │ claim_overdue_copy (CAS)  │ claim_overdue_copy (CAS)
//!                            ▼                           ▼
//!                       COPY_SETTLED                   DONE
//! ```
//!
//! * RUNNING: the first run goes on in slot `slot` (process `pid`); a copy
//!   that arrives now is acknowledged without running.
//! * FINISHED: the first run ended (its acknowledgement went to a closed
//!   channel); a copy that arrives now is acknowledged without running.
//! * COPY_SETTLED: the copy was acknowledged while the first run went on: the
//!   broker holds no copy any more, so if that run's process dies the task is
//!   reported like an early-acknowledged one (see `record_lost`).
//! * A new record for a task id with a live record carries its count of
//!   timeouts on (and supersedes it). The ring reuses its oldest index.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::seqtext::SeqText;
use super::{now_ms, SharedState};

/// Timed-out deliveries kept.
pub const OVERDUE_RING: usize = 64;

/// Words of a record's task id.
const ID_WORDS: usize = 32;

/// States of a record (see the module doc).
struct OverdueState;

impl OverdueState {
    const FREE: u32 = 0;
    const RUNNING: u32 = 1;
    const FINISHED: u32 = 2;
    const COPY_SETTLED: u32 = 3;
    const DONE: u32 = 4;
}

shm_record! {
    /// One acks-late task whose delivery the broker timed out.
    pub struct OverdueRecord {
        state: AtomicU32,
        slot: AtomicU32,
        pid: AtomicU32,
        timeouts: AtomicU32,
        at_ms: AtomicU64,
        id: SeqText<ID_WORDS>,
    }
}

shm_record! {
    /// The ring and the worker-wide count of consumer timeouts.
    pub struct OverdueTable {
        next: AtomicU64,
        events: AtomicU64,
        records: [OverdueRecord; OVERDUE_RING],
    }
}

/// What a redelivered copy finds about its first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRun {
    /// It goes on in task slot `slot`.
    Running {
        /// The slot index of the process running it.
        slot: usize,
    },
    /// It has ended.
    Finished,
}

/// A live record, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overdue {
    /// Index in the ring.
    pub index: usize,
    /// The task id.
    pub id: String,
    /// Where the first run is.
    pub first_run: FirstRun,
    /// The slot and pid of the process that ran it.
    pub owner: (usize, u32),
    /// How many times a delivery of this task id timed out.
    pub timeouts: u32,
}

impl SharedState {
    fn overdue_live(&self, id: &str) -> Option<(usize, u32)> {
        self.overdue
            .records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let state = r.state.load(Ordering::Acquire);
                let live = !matches!(state, OverdueState::FREE | OverdueState::DONE);
                live.then_some((i, state))
            })
            .find(|(i, _)| {
                self.overdue.records[*i]
                    .id
                    .read()
                    .first()
                    .is_some_and(|t| t == id)
            })
    }

    /// Task process whose consumer channel timed out: counts the event (once
    /// per channel closed, whatever it held).
    pub fn count_consumer_timeout(&self) {
        self.overdue.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Consumer timeouts since the worker started.
    pub fn consumer_timeouts(&self) -> u64 {
        self.overdue.events.load(Ordering::Relaxed)
    }

    /// Task process in slot `slot` (pid `pid`): the delivery of the
    /// acks-late task `id`, which it runs, timed out. Returns how many times
    /// a delivery of this task id has timed out now.
    pub fn record_overdue(&self, id: &str, slot: usize, pid: u32) -> u32 {
        let mut previous = 0;
        if let Some((old, _)) = self.overdue_live(id) {
            let r = &self.overdue.records[old];
            previous = r.timeouts.load(Ordering::Relaxed);
            r.state.store(OverdueState::DONE, Ordering::Release);
        }
        let index = (self.overdue.next.fetch_add(1, Ordering::AcqRel) as usize) % OVERDUE_RING;
        let r = &self.overdue.records[index];
        r.state.store(OverdueState::FREE, Ordering::Release);
        r.id.write(&[id]);
        r.slot.store(slot as u32, Ordering::Relaxed);
        r.pid.store(pid, Ordering::Relaxed);
        r.timeouts.store(previous + 1, Ordering::Relaxed);
        r.at_ms.store(now_ms(), Ordering::Relaxed);
        r.state.store(OverdueState::RUNNING, Ordering::Release);
        previous + 1
    }

    /// The running process: the first run of `id` ended.
    pub fn finish_overdue(&self, id: &str) {
        if let Some((i, OverdueState::RUNNING)) = self.overdue_live(id) {
            let _ = self.overdue.records[i].state.compare_exchange(
                OverdueState::RUNNING,
                OverdueState::FINISHED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The live record of `id`, if a delivery of it timed out while it ran.
    pub fn find_overdue(&self, id: &str) -> Option<Overdue> {
        let (index, state) = self.overdue_live(id)?;
        let r = &self.overdue.records[index];
        let slot = r.slot.load(Ordering::Relaxed) as usize;
        let first_run = match state {
            OverdueState::RUNNING => FirstRun::Running { slot },
            OverdueState::FINISHED => FirstRun::Finished,
            _ => return None, // its copy is settled already
        };
        Some(Overdue {
            index,
            id: id.to_owned(),
            first_run,
            owner: (slot, r.pid.load(Ordering::Relaxed)),
            timeouts: r.timeouts.load(Ordering::Relaxed),
        })
    }

    /// The process that received the redelivered copy of `o`: claims it, so
    /// that one process acknowledges it. False if the state changed since
    /// `o` was read (read again and decide again).
    pub fn claim_overdue_copy(&self, o: &Overdue) -> bool {
        let (from, to) = match o.first_run {
            FirstRun::Running { .. } => (OverdueState::RUNNING, OverdueState::COPY_SETTLED),
            FirstRun::Finished => (OverdueState::FINISHED, OverdueState::DONE),
        };
        self.overdue.records[o.index]
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether the broker's copy of task `id` was acknowledged while its first
    /// run went on (so the broker will not bring it back).
    pub fn overdue_copy_settled(&self, id: &str) -> bool {
        matches!(self.overdue_live(id), Some((_, OverdueState::COPY_SETTLED)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_claimed_once_while_the_first_run_goes_on() {
        let shm = SharedState::map(2).unwrap();
        assert_eq!(shm.find_overdue("t1"), None);
        assert_eq!(shm.record_overdue("t1", 1, 42), 1);
        let o = shm.find_overdue("t1").expect("recorded");
        assert_eq!(
            (o.first_run, o.owner),
            (FirstRun::Running { slot: 1 }, (1, 42))
        );
        assert!(!shm.overdue_copy_settled("t1"));
        assert!(shm.claim_overdue_copy(&o));
        assert!(!shm.claim_overdue_copy(&o), "one claim only");
        assert!(shm.overdue_copy_settled("t1"));
        assert_eq!(
            shm.find_overdue("t1"),
            None,
            "nothing left for another copy"
        );
        shm.finish_overdue("t1");
        assert!(
            shm.overdue_copy_settled("t1"),
            "finishing does not undo the claim"
        );
    }

    #[test]
    fn a_copy_after_the_first_run_ended_is_claimed_once() {
        let shm = SharedState::map(1).unwrap();
        shm.record_overdue("t2", 0, 7);
        shm.finish_overdue("t2");
        let o = shm.find_overdue("t2").expect("recorded");
        assert_eq!(o.first_run, FirstRun::Finished);
        assert!(shm.claim_overdue_copy(&o));
        assert_eq!(shm.find_overdue("t2"), None);
        assert!(!shm.overdue_copy_settled("t2"));
    }

    #[test]
    fn a_claim_fails_when_the_run_ended_meanwhile() {
        let shm = SharedState::map(1).unwrap();
        shm.record_overdue("t3", 0, 7);
        let stale = shm.find_overdue("t3").unwrap();
        shm.finish_overdue("t3");
        assert!(!shm.claim_overdue_copy(&stale));
        let fresh = shm.find_overdue("t3").unwrap();
        assert!(shm.claim_overdue_copy(&fresh));
    }

    #[test]
    fn repeated_timeouts_of_one_task_add_up() {
        let shm = SharedState::map(1).unwrap();
        assert_eq!(shm.record_overdue("t4", 0, 7), 1);
        assert_eq!(shm.record_overdue("t4", 0, 8), 2);
        assert_eq!(shm.find_overdue("t4").unwrap().owner, (0, 8));
        shm.count_consumer_timeout();
        assert_eq!(shm.consumer_timeouts(), 1);
    }
}
