//! What the process holds but has not started, written to its slot for
//! `inspect reserved` and `inspect scheduled` (read by the control process).

use std::time::Duration;

use tokio::time::Instant;

use super::job::Job;
use super::Child;

/// When the lines were last written, and what they showed.
pub(super) struct QueuedLines {
    /// (ready, scheduled, received) at the last write.
    signature: (usize, usize, u64),
    at: Instant,
}

impl Default for QueuedLines {
    fn default() -> Self {
        Self {
            signature: (0, 0, 0),
            at: Instant::now(),
        }
    }
}

/// Lines of each list written at most.
const LINES: usize = 16;

/// Under load, the lines are rewritten at most this often.
const EVERY: Duration = Duration::from_millis(100);

impl Child {
    fn queued_signature(&self) -> (usize, usize, u64) {
        (
            self.held.ready_len(),
            self.held.scheduled_len(),
            self.received,
        )
    }

    /// When the lines held back by [`EVERY`] are due, if some are.
    pub(super) fn queued_due(&self) -> Option<Instant> {
        (self.queued_signature() != self.queued.signature).then(|| self.queued.at + EVERY)
    }

    /// Writes the held tasks to the slot when they changed. Under load this
    /// runs at most every 100 ms (the loop wakes for what was held back,
    /// see [`Child::queued_due`]), to keep it off the per-task path.
    pub(super) fn publish_queued(&mut self, force: bool) {
        let signature = self.queued_signature();
        if signature == self.queued.signature || (!force && self.queued.at.elapsed() < EVERY) {
            return;
        }
        self.queued.signature = signature;
        self.queued.at = Instant::now();
        let slot = self.link.slot();
        slot.set_reserved(self.held.len() as u64);
        let line = |job: &Job, eta: Option<String>| {
            crate::inspect::Queued {
                eta,
                id: job.msg.id.clone(),
                name: job.msg.display_name().to_owned(),
                exchange: job.delivery.exchange.clone(),
                routing_key: job.delivery.routing_key.clone(),
                args: crate::inspect::ArgsText::of(&job.msg),
            }
            .line()
                + "\n"
        };
        // Reserved and scheduled alternate, so that when the slot's space
        // runs out both lists are cut, not one of them.
        let reserved = self.held.ready().take(LINES).map(|job| line(job, None));
        let scheduled = self
            .held
            .scheduled()
            .take(LINES)
            .map(|(eta, job)| line(job, Some(crate::protocol::format_iso(eta))));
        let mut lines = String::new();
        let (mut reserved, mut scheduled) = (reserved.fuse(), scheduled.fuse());
        loop {
            let (r, s) = (reserved.next(), scheduled.next());
            if r.is_none() && s.is_none() {
                break;
            }
            lines.extend(r.into_iter().chain(s));
        }
        slot.set_queued(&lines);
    }
}
