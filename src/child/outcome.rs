//! What happens to a task, as one typed value. Emitting a [`TaskHappening`]
//! writes its log line, counts it in the shared metrics and queues its
//! Celery event(s) together, so the three cannot drift apart. Event fields
//! are built only when task events are on.

use serde_json::Value;
use tracing::{error, info, warn};

use super::shared::{CountKey, Shared};
use crate::protocol::events::{self, TaskEventKind};
use crate::protocol::{DecodeError, ExceptionInfo, TaskMessage};
use crate::repr::{short_repr, MAX_REPR};
use crate::shm::Outcome;

/// Why a task was discarded without running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RevokeReason {
    /// Its `expires` time had passed.
    Expired,
    /// `revoke` named it.
    Revoked,
    /// `revoke(terminate=True)` named it.
    Terminated,
}

impl RevokeReason {
    /// As Celery names it in logs and results.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Terminated => "terminated",
        }
    }
}

/// One thing that happened to one task message.
pub(crate) enum TaskHappening<'a> {
    /// Accepted for running (now or at its ETA).
    Received { msg: &'a TaskMessage },
    /// Its code starts.
    Started { msg: &'a TaskMessage },
    /// Returned `value` (shown as `repr` when its own code made one).
    Succeeded {
        msg: &'a TaskMessage,
        value: &'a Value,
        repr: Option<&'a str>,
        runtime: f64,
    },
    /// Raised `exc` (time limits included).
    Failed {
        msg: &'a TaskMessage,
        exc: &'a ExceptionInfo,
        runtime: f64,
    },
    /// Its process died under it (`WorkerLostError`, `TimeLimitExceeded`).
    Lost {
        msg: &'a TaskMessage,
        exc: &'a ExceptionInfo,
    },
    /// Asked to run again in `countdown` seconds (its new message is sent).
    Retried {
        msg: &'a TaskMessage,
        exc: Option<&'a ExceptionInfo>,
        countdown: f64,
        runtime: f64,
    },
    /// Raised `Reject`; `acked`: its message was acknowledged before it
    /// ran, so there is nothing left to reject (and no `task-rejected`).
    Rejected {
        msg: &'a TaskMessage,
        requeue: bool,
        acked: bool,
        reason: &'a str,
        runtime: f64,
    },
    /// Killed its process `deaths` times: rejected for good.
    Quarantined {
        msg: &'a TaskMessage,
        exc: &'a ExceptionInfo,
        deaths: u32,
    },
    /// Raised `Ignore`: acknowledged, nothing stored, no event (as Celery).
    Ignored { msg: &'a TaskMessage, runtime: f64 },
    /// Discarded before it ran.
    Revoked {
        msg: &'a TaskMessage,
        reason: RevokeReason,
        signal: Option<i32>,
    },
    /// Its process was killed by `revoke(terminate=True)` while it ran.
    Terminated { msg: &'a TaskMessage, signal: i32 },
    /// No task of that name is registered here.
    Unregistered { msg: &'a TaskMessage },
    /// The message could not be decoded.
    Invalid { id: &'a str, error: &'a DecodeError },
}

impl TaskHappening<'_> {
    /// Logs, counts and sends the events of this happening, about a
    /// message consumed from `queue`.
    pub(crate) fn emit(self, shared: &Shared, queue: &str) {
        self.log(queue);
        let key = |task, exception| CountKey {
            task,
            queue,
            exception,
        };
        match self {
            Self::Received { msg } => shared.count_received(key(&msg.task, "")),
            Self::Started { msg } => shared.count_started(key(&msg.task, "")),
            _ => {}
        }
        if let Some((task, outcome, runtime)) = self.counted() {
            shared.record(key(task, self.exception()), outcome, runtime);
        }
        for kind in self.event_kinds() {
            shared
                .events
                .task(kind.as_str(), || self.event_fields(*kind));
        }
    }

    fn log(&self, queue: &str) {
        match *self {
            Self::Received { msg } => {
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "RECEIVED", "Task {}[{}] received", msg.display_name(), msg.id)
            }
            Self::Started { .. } => {}
            Self::Succeeded {
                msg,
                value,
                repr,
                runtime,
            } => {
                let shown = repr.map_or_else(|| short_repr(value, MAX_REPR), str::to_owned);
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "SUCCESS", runtime, "Task {}[{}] succeeded in {:.6}s: {}", msg.display_name(), msg.id, runtime, shown)
            }
            Self::Failed { msg, exc, runtime } => {
                // A hosted task's failure comes with its real traceback, logged as Celery does.
                let traceback = exc
                    .shown
                    .as_ref()
                    .filter(|s| !s.traceback.is_empty())
                    .map_or_else(String::new, |s| format!("\n{}", s.traceback.trim_end()));
                error!(task_id = %msg.id, queue, task_name = %msg.task, state = "FAILURE", runtime, exception = %exc.exc_type, "Task {}[{}] raised unexpected: {}{traceback}", msg.display_name(), msg.id, exc.repr())
            }
            Self::Lost { msg, exc } => {
                error!(task_id = %msg.id, queue, task_name = %msg.task, state = "FAILURE", exception = %exc.exc_type, "Task {}[{}] failed: {}", msg.display_name(), msg.id, exc.repr())
            }
            Self::Retried {
                msg,
                exc,
                countdown,
                runtime,
            } => {
                // Celery's Retry reads "Retry in 5s", or "Retry in 5s: ValueError('x')".
                let why = exc
                    .map(ExceptionInfo::repr)
                    .filter(|r| r != "None")
                    .map_or_else(String::new, |r| format!(": {r}"));
                let exception = exc.map_or("Retry", |e| e.exc_type.as_str());
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "RETRY", runtime, exception, "Task {}[{}] retry: Retry in {countdown}s{why}", msg.display_name(), msg.id)
            }
            Self::Rejected {
                msg,
                requeue,
                reason,
                runtime,
                ..
            } => {
                warn!(task_id = %msg.id, queue, task_name = %msg.task, state = "REJECTED", runtime, exception = "Reject", "Task {}[{}] reject requeue={}: {reason}", msg.display_name(), msg.id, if requeue { "True" } else { "False" })
            }
            Self::Quarantined { msg, exc, deaths } => {
                error!(task_id = %msg.id, queue, task_name = %msg.task, state = "REJECTED", exception = %exc.exc_type, "Task {}[{}] killed its task process {} times; rejecting it without requeue (dead-lettered if the queue has a dead-letter exchange)", msg.display_name(), msg.id, deaths)
            }
            Self::Ignored { msg, runtime } => {
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "IGNORED", runtime, "Task {}[{}] ignored", msg.display_name(), msg.id)
            }
            Self::Revoked { msg, reason, .. } => {
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "REVOKED", "Discarding revoked task: {}[{}] ({})", msg.display_name(), msg.id, reason.as_str())
            }
            Self::Terminated { msg, .. } => {
                info!(task_id = %msg.id, queue, task_name = %msg.task, state = "REVOKED", "Task {}[{}] terminated by revoke", msg.display_name(), msg.id)
            }
            Self::Unregistered { msg } => {
                error!(task_id = %msg.id, queue, task_name = %msg.task, state = "REJECTED", exception = "NotRegistered", "Received unregistered task of type '{}' (id {}); rejecting it", msg.task, msg.id)
            }
            Self::Invalid { id, error } => {
                error!(task_id = %id, queue, state = "REJECTED", exception = "InvalidTaskError", "Received invalid task message {id}, rejecting it (requeue=false): {error}")
            }
        }
    }

    /// The task name, outcome and runtime this counts as, if it counts.
    fn counted(&self) -> Option<(&str, Outcome, Option<f64>)> {
        Some(match *self {
            Self::Received { .. } | Self::Started { .. } => return None,
            Self::Succeeded { msg, runtime, .. } => (&msg.task, Outcome::Succeeded, Some(runtime)),
            Self::Failed { msg, runtime, .. } => (&msg.task, Outcome::Failed, Some(runtime)),
            Self::Lost { msg, .. } => (&msg.task, Outcome::Failed, None),
            Self::Retried { msg, runtime, .. } => (&msg.task, Outcome::Retried, Some(runtime)),
            Self::Rejected { msg, runtime, .. } => (&msg.task, Outcome::Rejected, Some(runtime)),
            Self::Quarantined { msg, .. } | Self::Unregistered { msg } => {
                (&msg.task, Outcome::Rejected, None)
            }
            Self::Ignored { msg, runtime } => (&msg.task, Outcome::Ignored, Some(runtime)),
            Self::Revoked { msg, .. } | Self::Terminated { msg, .. } => {
                (&msg.task, Outcome::Revoked, None)
            }
            Self::Invalid { .. } => ("<invalid message>", Outcome::Rejected, None),
        })
    }

    /// The exception class a failure is counted under (empty otherwise).
    fn exception(&self) -> &str {
        match self {
            Self::Failed { exc, .. } | Self::Lost { exc, .. } => &exc.exc_type,
            _ => "",
        }
    }

    /// The Celery events this sends, in order.
    fn event_kinds(&self) -> &'static [TaskEventKind] {
        use TaskEventKind as K;
        match self {
            Self::Received { .. } => &[K::Received],
            Self::Started { .. } => &[K::Started],
            Self::Succeeded { .. } => &[K::Succeeded],
            Self::Failed { .. } | Self::Lost { .. } | Self::Unregistered { .. } => &[K::Failed],
            Self::Retried { .. } => &[K::Retried],
            // Celery sends task-failed only when the message is not requeued.
            // As Celery: task-failed unless requeued, task-rejected only for
            // a message not acknowledged yet.
            Self::Rejected {
                requeue: true,
                acked: true,
                ..
            } => &[],
            Self::Rejected { requeue: true, .. } => &[K::Rejected],
            Self::Rejected { acked: true, .. } => &[K::Failed],
            Self::Rejected { .. } | Self::Quarantined { .. } => &[K::Failed, K::Rejected],
            Self::Revoked { .. } | Self::Terminated { .. } => &[K::Revoked],
            Self::Ignored { .. } | Self::Invalid { .. } => &[],
        }
    }

    fn event_fields(&self, kind: TaskEventKind) -> Vec<(&'static str, Value)> {
        use TaskEventKind as K;
        match (self, kind) {
            (Self::Received { msg }, _) => events::task_received(msg),
            (Self::Started { msg }, _) => events::task_started(&msg.id),
            (
                Self::Succeeded {
                    msg,
                    value,
                    repr,
                    runtime,
                },
                _,
            ) => match repr {
                Some(repr) => events::task_succeeded_shown(&msg.id, repr, *runtime),
                None => events::task_succeeded(&msg.id, value, *runtime),
            },
            (Self::Failed { msg, exc, .. }, _)
            | (Self::Lost { msg, exc }, _)
            | (Self::Quarantined { msg, exc, .. }, K::Failed) => {
                events::task_failed(&msg.id, &exc.repr(), &exc.traceback())
            }
            (Self::Quarantined { msg, .. }, _) => events::task_rejected(&msg.id, false),
            (Self::Retried { msg, exc, .. }, _) => events::task_retried(
                &msg.id,
                &exc.map_or_else(|| "None".to_owned(), ExceptionInfo::repr),
                &exc.map(ExceptionInfo::traceback).unwrap_or_default(),
            ),
            (
                Self::Rejected {
                    msg,
                    requeue,
                    reason,
                    ..
                },
                K::Failed,
            ) => {
                let why = format!(
                    "reject requeue={}: {reason}",
                    if *requeue { "True" } else { "False" }
                );
                events::task_failed(&msg.id, &why, "")
            }
            (Self::Rejected { msg, requeue, .. }, _) => events::task_rejected(&msg.id, *requeue),
            (
                Self::Revoked {
                    msg,
                    reason,
                    signal,
                },
                _,
            ) => events::task_revoked(
                &msg.id,
                *reason == RevokeReason::Terminated,
                *signal,
                *reason == RevokeReason::Expired,
            ),
            (Self::Terminated { msg, signal }, _) => {
                events::task_revoked(&msg.id, true, Some(*signal), false)
            }
            (Self::Unregistered { msg }, _) => events::task_not_registered(&msg.id, &msg.task),
            (Self::Ignored { .. } | Self::Invalid { .. }, _) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskEventKind as K;

    fn msg() -> TaskMessage {
        TaskMessage {
            id: "id-1".into(),
            task: "proj.add".into(),
            ..Default::default()
        }
    }

    fn types(h: &TaskHappening<'_>) -> Vec<&'static str> {
        h.event_kinds().iter().map(|k| k.as_str()).collect()
    }

    #[test]
    fn a_retry_sends_task_retried_with_its_own_fields() {
        let m = msg();
        let h = TaskHappening::Retried {
            msg: &m,
            exc: None,
            countdown: 1.0,
            runtime: 0.1,
        };
        assert_eq!(types(&h), ["task-retried"]);
        let fields = h.event_fields(K::Retried);
        assert_eq!(fields[1], ("exception", Value::from("None")));
        assert_eq!(h.counted().unwrap().1, Outcome::Retried);
    }

    #[test]
    fn reject_sends_task_failed_only_without_requeue() {
        let m = msg();
        let gone = TaskHappening::Rejected {
            msg: &m,
            requeue: false,
            acked: false,
            reason: "bad",
            runtime: 0.0,
        };
        assert_eq!(types(&gone), ["task-failed", "task-rejected"]);
        assert_eq!(
            gone.event_fields(K::Failed)[1],
            ("exception", Value::from("reject requeue=False: bad"))
        );
        let back = TaskHappening::Rejected {
            msg: &m,
            requeue: true,
            acked: false,
            reason: "later",
            runtime: 0.0,
        };
        assert_eq!(types(&back), ["task-rejected"]);
        assert_eq!(
            back.event_fields(K::Rejected)[1],
            ("requeue", Value::from(true))
        );
        // Acknowledged early: nothing to reject, so no task-rejected.
        let early = |requeue| TaskHappening::Rejected {
            msg: &m,
            requeue,
            acked: true,
            reason: "x",
            runtime: 0.0,
        };
        assert_eq!(types(&early(false)), ["task-failed"]);
        assert!(types(&early(true)).is_empty());
    }

    #[test]
    fn ignore_is_counted_but_sends_no_event() {
        let m = msg();
        let h = TaskHappening::Ignored {
            msg: &m,
            runtime: 0.2,
        };
        assert!(types(&h).is_empty());
        assert_eq!(h.counted(), Some(("proj.add", Outcome::Ignored, Some(0.2))));
    }

    #[test]
    fn not_registered_has_celerys_exception_and_no_traceback() {
        let m = msg();
        let h = TaskHappening::Unregistered { msg: &m };
        assert_eq!(types(&h), ["task-failed"]);
        let fields = h.event_fields(K::Failed);
        assert_eq!(
            fields,
            vec![
                ("uuid", Value::from("id-1")),
                ("exception", Value::from("NotRegistered('proj.add')"))
            ]
        );
        assert_eq!(h.counted().unwrap().1, Outcome::Rejected);
    }

    #[test]
    fn quarantine_fails_and_rejects_without_requeue() {
        let m = msg();
        let exc = ExceptionInfo::worker_lost(
            "Worker exited prematurely: signal 9 (SIGKILL) Job: 3.".into(),
        );
        let h = TaskHappening::Quarantined {
            msg: &m,
            exc: &exc,
            deaths: 3,
        };
        assert_eq!(types(&h), ["task-failed", "task-rejected"]);
        assert_eq!(
            h.event_fields(K::Rejected)[1],
            ("requeue", Value::from(false))
        );
    }

    #[test]
    fn revocations_say_why() {
        let m = msg();
        let expired = TaskHappening::Revoked {
            msg: &m,
            reason: RevokeReason::Expired,
            signal: None,
        };
        let f = expired.event_fields(K::Revoked);
        assert!(f.contains(&("expired", Value::from(true))));
        assert!(f.contains(&("terminated", Value::from(false))));
        let killed = TaskHappening::Terminated { msg: &m, signal: 9 };
        let f = killed.event_fields(K::Revoked);
        assert!(f.contains(&("terminated", Value::from(true))));
        assert!(f.contains(&("signum", Value::from(9))));
    }

    #[test]
    fn invalid_messages_are_counted_under_one_name() {
        let err = DecodeError::ContentDisallowed("application/x-python-serialize".into());
        let h = TaskHappening::Invalid {
            id: "x",
            error: &err,
        };
        assert_eq!(
            h.counted(),
            Some(("<invalid message>", Outcome::Rejected, None))
        );
        assert!(types(&h).is_empty());
    }

    #[test]
    fn every_outcome_but_received_and_started_is_counted() {
        let m = msg();
        let exc = ExceptionInfo::revoked("x");
        let v = Value::Null;
        let all = [
            TaskHappening::Succeeded {
                msg: &m,
                value: &v,
                repr: None,
                runtime: 0.0,
            },
            TaskHappening::Failed {
                msg: &m,
                exc: &exc,
                runtime: 0.0,
            },
            TaskHappening::Lost { msg: &m, exc: &exc },
            TaskHappening::Terminated {
                msg: &m,
                signal: 15,
            },
        ];
        assert!(all.iter().all(|h| h.counted().is_some()));
        assert!(TaskHappening::Received { msg: &m }.counted().is_none());
        assert!(TaskHappening::Started { msg: &m }.counted().is_none());
    }
}
