//! From delivery to a held task, and from held to running.

use std::sync::Arc;

use chrono::Utc;
use lapin::types::ShortString;

use super::execute::{discard_revoked, execute, revoke_reason, RunState};
use super::job::{decode, Decoded};
use super::outcome::TaskHappening;
use super::{Child, Running, SLOTS};
use crate::protocol::{ExceptionInfo, TaskState};

impl Child {
    /// Rejects (dead-letters) a message that cannot be decoded, with its one
    /// `Invalid` line and count.
    pub(super) async fn refuse(
        &self,
        id: &str,
        error: &crate::protocol::DecodeError,
        settler: &super::job::Settler,
        queue: &str,
    ) {
        TaskHappening::Invalid { id, error }.emit(&self.shared, queue);
        settler.reject(id, false).await;
    }

    /// Decodes a delivery and decides: reject it (bad or unknown), settle
    /// it (its process died, it was revoked or expired), or hold it.
    pub(super) async fn receive(&mut self, delivery: lapin::message::Delivery, tag: &ShortString) {
        let queue = self.consumers.queue_of(tag);
        let job = match decode(delivery, std::sync::Arc::clone(&queue), &self.channel) {
            Decoded::Job(job) => *job,
            Decoded::Bad { id, error, settler } => {
                return self.refuse(&id, &error, &settler, &queue).await;
            }
        };
        let shared = Arc::clone(&self.shared);
        let Some(task) = shared.registry.get(&job.msg.task) else {
            let exc = ExceptionInfo::not_registered(&job.msg.task);
            TaskHappening::Unregistered { msg: &job.msg }.emit(&shared, &job.queue);
            // A Python app stores the FAILURE with its own backend, as
            // Celery's consumer does (its key prefix, expiry, any backend).
            let stored_by_app = match shared.registry.host() {
                Some(host) => {
                    host.settle_elsewhere(crate::task::Elsewhere {
                        msg: Arc::clone(&job.msg),
                        delivery: job.delivery.clone(),
                        store_result: true,
                        end: crate::task::End::Failed(exc.clone()),
                    })
                    .await
                }
                None => false,
            };
            if !stored_by_app {
                let mut doc = shared.document(
                    &job.msg,
                    TaskState::Failure,
                    serde_json::to_value(&exc).unwrap_or_default(),
                );
                doc.traceback = None;
                shared.store(&job.msg, doc).await;
            }
            job.settler.reject(&job.msg.id, false).await;
            return;
        };
        if job.delivery.redelivered && self.settle_overdue_copy(&job).await {
            return;
        }
        let lost = if job.delivery.redelivered {
            self.lost_record(&job.msg.id).await
        } else {
            None
        };
        if lost.as_ref().is_some_and(|l| l.early) {
            self.settle_early_copy(&job).await;
            return;
        }
        self.received += 1;
        TaskHappening::Received { msg: &job.msg }.emit(&shared, &job.queue);
        if let Some(lost) = lost {
            if self.settle_lost(&job, &lost).await {
                return;
            }
        }
        if let Some(reason) = revoke_reason(&shared, &job.msg) {
            let ignore = job.msg.ignore_result.unwrap_or(task.options.ignore_result);
            discard_revoked(&shared, &job, reason, ignore).await;
            return;
        }
        let eta = job.msg.eta;
        if self.held.hold(job, eta, Utc::now()) {
            self.consumers.held_eta(tag);
        }
    }

    /// Starts ready tasks while a slot is free; a task over its rate limit
    /// waits like an ETA task.
    pub(super) fn dispatch(&mut self) {
        while self.running.len() < SLOTS {
            let Some(job) = self.held.pop_ready() else {
                break;
            };
            if let Some(wait) = self.shared.rate_turn(&job.msg.task) {
                let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                self.held.schedule(job, at);
                continue;
            }
            let acks_late = self
                .shared
                .registry
                .get(&job.msg.task)
                .and_then(|t| t.options.acks_late)
                .unwrap_or(self.shared.config.acks_late);
            let state = Arc::new(RunState::default());
            let delivery = job.delivery.clone();
            let queue = Arc::clone(&job.queue);
            let job_msg = Arc::clone(&job.msg);
            let settler = job.settler.clone();
            // Boxed: the future is large, and tokio moves a task's future
            // (and its output stage) by value when it spawns and completes it.
            let run = Box::pin(execute(Arc::clone(&self.shared), job, Arc::clone(&state)));
            let abort = self.running.spawn(run);
            self.running_info.insert(
                abort.id(),
                Running {
                    job_msg,
                    settler,
                    acks_late,
                    state,
                    abort,
                    delivery,
                    queue,
                },
            );
        }
    }
}
