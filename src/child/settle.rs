//! Settling a task's outcome the way Celery does: the result stored, canvas
//! follow-ups and retries sent under publisher confirms, the message
//! acknowledged or rejected, and the happening emitted.

use chrono::{Duration as ChronoDuration, Utc};
use serde_json::{json, Value};
use tracing::{error, warn};

use super::job::Job;
use super::outcome::TaskHappening;
use super::shared::Shared;
use crate::protocol::{signature_message, ExceptionInfo, TaskMessage, TaskState};
use crate::shm::Unpublished;
use crate::task::{Retry, TaskError, TaskOptions};

/// What settling one run needs to know.
pub(super) struct Settle<'a> {
    pub(super) shared: &'a Shared,
    pub(super) job: &'a Job,
    pub(super) options: &'a TaskOptions,
    pub(super) ignore_result: bool,
    pub(super) acks_late: bool,
    /// The message was acknowledged before the task ran.
    pub(super) acked: bool,
    /// Seconds the task's code ran.
    pub(super) runtime: f64,
    /// The task's own code stored its result and sent its follow-ups and
    /// retries (a hosted task): only the message and the report are left.
    pub(super) settled_by_task: bool,
}

impl Settle<'_> {
    fn msg(&self) -> &TaskMessage {
        &self.job.msg
    }

    /// The configured queue the message was consumed from.
    fn queue_spec(&self) -> Option<&crate::broker::QueueSpec> {
        self.shared.queue_spec(&self.job.queue)
    }

    /// Where follow-ups and retries go: where the message came from (see
    /// [`Shared::home_route`]).
    fn route(&self) -> (&str, &str) {
        self.shared.home_route(&self.job.delivery, &self.job.queue)
    }

    /// Settles what the task's code returned.
    pub(super) async fn outcome(self, outcome: Result<Value, TaskError>) {
        match outcome {
            Ok(value) => self.success(value).await,
            Err(TaskError::Retry(retry)) => self.retry(retry).await,
            Err(TaskError::Exception(exc)) => self.failure(exc).await,
            Err(TaskError::Reject {
                requeue,
                reason,
                traceback,
            }) => self.rejected(requeue, &reason, traceback.as_deref()).await,
            Err(TaskError::Ignore) => {
                TaskHappening::Ignored {
                    msg: self.msg(),
                    runtime: self.runtime,
                }
                .emit(self.shared, &self.job.queue);
                if !self.acked {
                    self.job.settler.ack(&self.msg().id).await;
                }
            }
        }
    }

    async fn success(&self, value: Value) {
        let (shared, msg) = (self.shared, self.msg());
        if self.settled_by_task {
            // The value is the task's own `repr` of its result.
            TaskHappening::Succeeded {
                msg,
                value: &Value::Null,
                repr: value.as_str(),
                runtime: self.runtime,
            }
            .emit(shared, &self.job.queue);
            if self.acks_late {
                self.job.settler.ack(&msg.id).await;
            }
            return;
        }
        if let Some((next, rest)) = msg.embed.chain.split_last() {
            self.publish_signature(next, Some(value.clone()), rest.to_vec())
                .await;
        }
        for callback in &msg.embed.callbacks {
            self.publish_signature(callback, Some(value.clone()), Vec::new())
                .await;
        }
        if msg.embed.chord.is_some() {
            shared.link.slot().count_unpublished(Unpublished::FollowUp);
            warn!(task_id = %msg.id, "Task {}[{}] is part of a chord; chord bodies are not run by celeriac", msg.display_name(), msg.id);
        }
        if !self.ignore_result {
            shared
                .store(msg, shared.document(msg, TaskState::Success, value.clone()))
                .await;
        }
        TaskHappening::Succeeded {
            msg,
            value: &value,
            repr: None,
            runtime: self.runtime,
        }
        .emit(shared, &self.job.queue);
        if self.acks_late {
            self.job.settler.ack(&msg.id).await;
        }
    }

    async fn retry(&self, retry: Retry) {
        let (shared, msg) = (self.shared, self.msg());
        if self.settled_by_task {
            // Its own code published the retry and stored RETRY.
            TaskHappening::Retried {
                msg,
                exc: retry.exc.as_ref(),
                countdown: retry.countdown.unwrap_or_default(),
                runtime: self.runtime,
            }
            .emit(shared, &self.job.queue);
            if self.acks_late {
                self.job.settler.ack(&msg.id).await;
            }
            return;
        }
        let max = retry.max_retries.unwrap_or(self.options.max_retries);
        if max.is_some_and(|m| msg.retries >= m) {
            let exc = retry.exc.unwrap_or_else(|| {
                ExceptionInfo::max_retries_exceeded(format!(
                    "Can't retry {}[{}] args:{:?} kwargs:{:?}",
                    msg.task, msg.id, msg.args, msg.kwargs
                ))
            });
            return self.failure(exc).await;
        }
        let countdown = retry
            .countdown
            .unwrap_or(self.options.default_retry_delay)
            .max(0.0);
        let eta = Utc::now() + ChronoDuration::milliseconds((countdown * 1000.0) as i64);
        let exc = retry.exc.as_ref();
        // The retry message may reach another task process at once, which
        // sends its own events about this task: this process's events
        // (received, started, retried) go out first, in that order, or
        // monitors apply them late and show the task as RETRY with 0 retries.
        TaskHappening::Retried {
            msg,
            exc,
            countdown,
            runtime: self.runtime,
        }
        .emit(shared, &self.job.queue);
        shared.events.send_pending().await;
        let mut message = msg.retry_message(eta);
        message.route = self.delayed_route(countdown);
        if let Err(e) = shared.publish_task(&message, self.route()).await {
            shared.link.slot().count_unpublished(Unpublished::Retry);
            error!(task_id = %msg.id, "Task {}[{}] could not be re-published for retry, rejecting it: {e}", msg.display_name(), msg.id);
            if !self.acked {
                self.job.settler.reject(&msg.id, false).await;
            }
            return;
        }
        let stored = exc.map_or(Value::Null, |e| {
            serde_json::to_value(e).unwrap_or(Value::Null)
        });
        let mut doc = shared.document(msg, TaskState::Retry, stored);
        doc.traceback = exc.map(ExceptionInfo::traceback);
        doc.children = vec![json!([[msg.id, null], null])];
        shared.store(msg, doc).await;
        if self.acks_late {
            self.job.settler.ack(&msg.id).await;
        }
    }

    /// For a retry `countdown` seconds away on a quorum queue behind a
    /// topic exchange, with the broker's delay levels declared: wait there,
    /// as a Celery producer would send it (the whole seconds; the rest is
    /// held in memory until the `eta`), instead of in a task process, whose
    /// prefetch a quorum queue cannot raise.
    fn delayed_route(&self, countdown: f64) -> Option<(String, String)> {
        let seconds = countdown as u64;
        if seconds == 0 || !self.shared.link.shm.delayed_delivery() {
            return None;
        }
        let spec = self.queue_spec()?;
        let eligible = spec.queue_type.is_some() && self.shared.routed_exchange(&spec.name);
        eligible.then(|| {
            let (_, key) = self.route();
            (
                crate::broker::delayed::level_name(crate::broker::delayed::LEVELS - 1),
                crate::broker::delayed::routing_key(seconds, key),
            )
        })
    }

    async fn failure(&self, exc: ExceptionInfo) {
        let (shared, msg) = (self.shared, self.msg());
        if !self.settled_by_task {
            for errback in &msg.embed.errbacks {
                self.publish_signature(errback, Some(Value::String(msg.id.clone())), Vec::new())
                    .await;
            }
        }
        if !self.ignore_result && !self.settled_by_task {
            let mut doc = shared.document(
                msg,
                TaskState::Failure,
                serde_json::to_value(&exc).unwrap_or(Value::Null),
            );
            doc.traceback = Some(exc.traceback());
            shared.store(msg, doc).await;
        }
        TaskHappening::Failed {
            msg,
            exc: &exc,
            runtime: self.runtime,
        }
        .emit(shared, &self.job.queue);
        if self.acks_late {
            self.job.settler.ack(&msg.id).await;
        }
    }

    async fn rejected(&self, requeue: bool, reason: &str, traceback: Option<&str>) {
        let (shared, msg) = (self.shared, self.msg());
        TaskHappening::Rejected {
            msg,
            requeue,
            acked: self.acked,
            reason,
            traceback,
            runtime: self.runtime,
        }
        .emit(shared, &self.job.queue);
        if !requeue && !self.ignore_result && !self.settled_by_task {
            let exc = ExceptionInfo::new(
                "Reject",
                "celery.exceptions",
                vec![reason.into(), requeue.into()],
            );
            let doc = shared.document(
                msg,
                TaskState::Failure,
                serde_json::to_value(&exc).unwrap_or(Value::Null),
            );
            shared.store(msg, doc).await;
        }
        if !self.acked {
            self.job.settler.reject(&msg.id, requeue).await;
        }
    }

    async fn publish_signature(&self, sig: &Value, arg: Option<Value>, chain: Vec<Value>) {
        let (shared, parent) = (self.shared, self.msg());
        match signature_message(sig, arg, chain, parent, &shared.config.hostname, Utc::now()) {
            Ok(out) => {
                if let Err(e) = shared.publish_task(&out, self.route()).await {
                    shared.link.slot().count_unpublished(Unpublished::FollowUp);
                    error!(task_id = %parent.id, "could not send follow-up task {} of {}: {e}", out.id, parent.id);
                }
            }
            // A link or chain step that is not a plain task signature (a
            // group, a chord): it never exists, so it is counted as a
            // follow-up that was not sent.
            Err(e) => {
                shared.link.slot().count_unpublished(Unpublished::FollowUp);
                error!(task_id = %parent.id, "could not send a follow-up task of {}: {e}", parent.id);
            }
        }
    }
}
