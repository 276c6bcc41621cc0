//! Writer: the control process (`add_consumer`, `cancel_consumer`).
//! Readers: task processes (which queues to consume, re-read when the
//! generation moves), the supervisor (the probe state file) and the control
//! process (`active_queues`).
//!
//! One entry per queue name changed at run time; a later change of the same
//! name overwrites its entry. Entries are never freed.

use std::sync::atomic::{AtomicU32, Ordering};

use super::seqtext::SeqText;
use super::SharedState;
use crate::broker::QueueSpec;

/// Queues added or cancelled at run time remembered.
pub const QUEUE_CHANGES: usize = 32;

/// States of a queue change.
struct QueueState;

impl QueueState {
    /// Not used yet.
    const UNUSED: u32 = 0;
    /// The queue is consumed (`add_consumer`).
    const ADDED: u32 = 1;
    /// The queue is not consumed (`cancel_consumer`).
    const CANCELLED: u32 = 2;
}

shm_record! {
    /// One `add_consumer` / `cancel_consumer` change.
    pub struct QueueChange {
        state: AtomicU32,
        text: SeqText<48>,
    }
}

impl SharedState {
    /// Control process only: records `add_consumer` (`add`) or
    /// `cancel_consumer` for `spec`. Returns false when the table is full.
    pub fn change_queue(&self, spec: &QueueSpec, add: bool) -> bool {
        let slot = self
            .queue_changes
            .iter()
            .find(|c| {
                c.state.load(Ordering::Acquire) != QueueState::UNUSED
                    && c.text.read().first() == Some(&spec.name)
            })
            .or_else(|| {
                self.queue_changes
                    .iter()
                    .find(|c| c.state.load(Ordering::Acquire) == QueueState::UNUSED)
            });
        let Some(c) = slot else { return false };
        c.text
            .write(&[&spec.name, &spec.exchange, &spec.routing_key]);
        let state = if add {
            QueueState::ADDED
        } else {
            QueueState::CANCELLED
        };
        c.state.store(state, Ordering::Release);
        self.header.queues_gen.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Changes to the consumed queues since start (bumped by every change).
    pub fn queues_generation(&self) -> u64 {
        self.header.queues_gen.load(Ordering::Acquire)
    }

    /// The queues to consume now: `base` (the command line) with run-time
    /// additions and cancellations applied.
    pub fn desired_queues(&self, base: &[QueueSpec]) -> Vec<QueueSpec> {
        let mut queues = base.to_vec();
        for c in self.queue_changes {
            let state = c.state.load(Ordering::Acquire);
            if state == QueueState::UNUSED {
                continue;
            }
            let mut parts = c.text.read().into_iter();
            let mut next = || parts.next().unwrap_or_default();
            let (name, exchange, routing_key) = (next(), next(), next());
            queues.retain(|q| q.name != name);
            if state == QueueState::ADDED {
                // add_consumer declares as Celery's control command does:
                // a direct exchange.
                queues.push(QueueSpec {
                    exchange,
                    routing_key,
                    ..QueueSpec::celery_default(&name)
                });
            }
        }
        queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> QueueSpec {
        QueueSpec::celery_default(name)
    }

    fn names(queues: Vec<QueueSpec>) -> Vec<String> {
        queues.into_iter().map(|q| q.name).collect()
    }

    #[test]
    fn a_queue_is_added_then_cancelled() {
        let shm = SharedState::map(1).unwrap();
        let base = [spec("celery")];
        assert_eq!(shm.queues_generation(), 0);
        assert!(shm.change_queue(&spec("extra"), true));
        assert_eq!(shm.queues_generation(), 1);
        assert_eq!(names(shm.desired_queues(&base)), ["celery", "extra"]);
        assert!(shm.change_queue(&spec("extra"), false));
        assert_eq!(shm.queues_generation(), 2);
        assert_eq!(names(shm.desired_queues(&base)), ["celery"]);
        assert!(shm.change_queue(&spec("celery"), false));
        assert!(shm.desired_queues(&base).is_empty());
        let used = shm.queue_changes.iter();
        let used = used.filter(|c| c.state.load(Ordering::Relaxed) != QueueState::UNUSED);
        assert_eq!(used.count(), 2, "a name keeps its entry");
    }

    #[test]
    fn a_full_table_refuses_new_names_but_not_known_ones() {
        let shm = SharedState::map(1).unwrap();
        for i in 0..QUEUE_CHANGES {
            assert!(shm.change_queue(&spec(&format!("q{i}")), true));
        }
        assert!(!shm.change_queue(&spec("one-more"), true));
        assert!(shm.change_queue(&spec("q0"), false));
        assert_eq!(shm.desired_queues(&[]).len(), QUEUE_CHANGES - 1);
    }
}
