//! Stopping a task process without losing anything: a shutdown (warm or
//! cold) or a recycle hands back what waits, lets what runs finish until
//! the deadline, then requeues or re-publishes what still runs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::consumers::Incoming;
use super::hand_back::{HandBack, Handed};
use super::job::{decode, Decoded};
use super::{Child, ChildError, Exit};
use crate::shm::ChildState;
use crate::signals::Stop;

impl Child {
    /// Drains: cancels the consumers, returns every received but unstarted
    /// message, waits for running tasks up to the deadline (none for a cold
    /// stop), then hands back what still runs.
    pub(super) async fn shutdown(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Incoming>,
        stop: Stop,
    ) -> Result<Exit, ChildError> {
        self.link.set_state(ChildState::Draining);
        let timeout = match stop {
            Stop::Cold => Duration::ZERO,
            Stop::Warm => self.shared.config.shutdown_timeout,
        };
        info!(
            "{} shutdown: stopping consumers, {} task(s) running, deadline {:?}",
            if stop == Stop::Cold { "Cold" } else { "Warm" },
            self.running.len(),
            timeout
        );
        // Each consumer's queue, for the messages handed back below.
        let consumed = self.consumers.consumed();
        let session = self.consumers.session();
        for tag in self.consumers.take_tags() {
            if let Err(e) = self
                .channel
                .basic_cancel(tag.clone(), Default::default())
                .await
            {
                warn!("could not cancel consumer {tag}: {e}");
            }
        }
        // Another process may receive what goes back: this one's events
        // about those tasks go out first (see `Events::send_pending`).
        self.shared.events.send_pending().await;
        // Everything received but not started goes back to the queue.
        let mut returned = 0usize;
        while let Ok(incoming) = rx.try_recv() {
            let Incoming::Delivery(d, tag, from) = incoming else {
                continue;
            };
            // An earlier session's delivery is settled through its own
            // channel only (that fails harmlessly: its broker requeued it
            // already), never re-published.
            if from != session {
                let (id, settler) = match decode(*d, std::sync::Arc::from(""), &self.channel) {
                    Decoded::Job(job) => (job.msg.id.clone(), job.settler),
                    Decoded::Bad { id, settler, .. } => (id, *settler),
                };
                settler.requeue(&id).await;
                debug!(task_id = %id, "returned {id} to the queue (an earlier connection's delivery)");
                returned += 1;
                continue;
            }
            let queue = consumed.iter().find(|(_, t)| *t == tag).map_or_else(
                || std::sync::Arc::from(""),
                |(q, _)| std::sync::Arc::clone(q),
            );
            let id = match decode(*d, std::sync::Arc::clone(&queue), &self.channel) {
                Decoded::Job(job) => {
                    self.hand_back(HandBack::of(&job)).await;
                    job.msg.id.clone()
                }
                // Refused as `receive` would have refused it a moment
                // earlier: a requeue would only hand it to the next consumer
                // to refuse, and at a delivery limit the broker could drop
                // it unseen.
                Decoded::Bad { id, error, settler } => {
                    self.refuse(&id, &error, &settler, &queue).await;
                    continue;
                }
            };
            debug!(task_id = %id, "returned {id} to the queue");
            returned += 1;
        }
        for job in self.held.take_all() {
            self.hand_back(HandBack::of(&job)).await;
            returned += 1;
        }
        if returned > 0 {
            info!("Returned {returned} unstarted message(s) to the broker");
        }
        let deadline = Instant::now() + timeout;
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.finished(done),
                () = tokio::time::sleep_until(deadline) => break,
                _ = self.signals.recv() => {
                    warn!("second shutdown signal: stopping running tasks now");
                    break;
                }
            }
        }
        self.hand_back_running().await;
        self.shared.events.flush().await;
        Ok(Exit::Shutdown)
    }

    /// At the drain deadline: acks_late messages are requeued; early-acked
    /// tasks are re-published under their own id (confirmed) before they are
    /// stopped, so nothing is lost either way. A task handed back is no
    /// longer this process's running task: the supervisor must not take it
    /// for lost when the process exits (a sibling would then fail the copy
    /// it receives with WorkerLostError). One that could not be re-published
    /// stays, and is reported lost as when a process dies.
    pub(super) async fn hand_back_running(&mut self) {
        let mut all_handed_back = true;
        let running: Vec<_> = self.running_info.drain().map(|(_, run)| run).collect();
        for run in running {
            run.abort.abort();
            let id = &run.job_msg.id;
            if run.acks_late || !run.state.acked.load(Ordering::Acquire) {
                let back = HandBack {
                    msg: &run.job_msg,
                    settler: &run.settler,
                    delivery: &run.delivery,
                    queue: &run.queue,
                };
                match self.hand_back(back).await {
                    Handed::Requeued => {
                        warn!(task_id = %id, "Task {}[{}] did not finish before the deadline; requeued", run.job_msg.display_name(), id)
                    }
                    Handed::Republished => {
                        warn!(task_id = %id, "Task {}[{}] did not finish before the deadline; re-published", run.job_msg.display_name(), id)
                    }
                    Handed::Failed => all_handed_back = false,
                }
            } else {
                let route = self.shared.home_route(&run.delivery, &run.queue);
                match self
                    .shared
                    .publish_task(&run.job_msg.republish_message(), route)
                    .await
                {
                    Ok(()) => {
                        warn!(task_id = %id, "Task {}[{}] did not finish before the deadline; re-published", run.job_msg.display_name(), id)
                    }
                    Err(e) => {
                        all_handed_back = false;
                        self.shared
                            .link
                            .slot()
                            .count_unpublished(crate::shm::Unpublished::HandBack);
                        error!(task_id = %id, "Task {}[{}] could not be re-published at shutdown: {e}", run.job_msg.display_name(), id)
                    }
                }
            }
        }
        self.running.abort_all();
        while self.running.join_next().await.is_some() {}
        if all_handed_back {
            self.shared.link.slot().finish_task();
        }
    }

    /// `--max-tasks-per-child` and `--max-memory-per-child` (checked after
    /// each task, as Celery does): finish cleanly and let the supervisor
    /// start a fresh process.
    pub(super) fn after_task(&mut self) {
        self.tasks_run += 1;
        let cfg = &self.shared.config;
        if cfg
            .max_tasks_per_child
            .is_some_and(|max| self.tasks_run >= max)
        {
            info!("recycling this process after {} task(s)", self.tasks_run);
            self.recycle = true;
        }
        if let Some(limit) = cfg.max_memory_per_child {
            let rss = resident_kib();
            if rss > limit {
                info!("recycling this process: resident memory {rss} KiB is above {limit} KiB");
                self.recycle = true;
            }
        }
    }
}

/// This process's resident memory in KiB (`VmRSS`).
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
