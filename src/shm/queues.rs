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
                queues.push(QueueSpec {
                    name,
                    exchange,
                    routing_key,
                    queue_type: None,
                    max_priority: None,
                });
            }
        }
        queues
    }
}
