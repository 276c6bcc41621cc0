//! Tasks whose process died under them. The supervisor records each death
//! in the shared lost ring; a live task process settles it the way Celery
//! does: FAILURE `WorkerLostError` (or `TimeLimitExceeded`) for a task that
//! was acknowledged early, the same or a rerun for a redelivered acks-late
//! message, and a quarantine for a message that keeps killing processes.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::job::Job;
use super::outcome::{RevokeReason, TaskHappening};
use super::Child;
use crate::protocol::{ExceptionInfo, TaskMessage, TaskState};
use crate::shm::{Lost, LostReason, TaskFlags};
use crate::task::End;

impl Child {
    /// Settles the deaths nobody has reported yet (early-acked tasks: the
    /// broker will not bring them back). Runs every tick.
    pub(super) async fn report_lost(&mut self) {
        let shm = self.link.shm;
        while let Some(lost) = shm.claim_report(self.link.index) {
            self.report_one(&lost).await;
            shm.reported(lost.index, self.link.index);
        }
    }

    /// Stores and announces one lost early-acked task's end.
    async fn report_one(&self, lost: &Lost) {
        let shm = self.link.shm;
        let msg = lost_message(lost);
        let store_result = lost.task.flags & TaskFlags::IGNORE_RESULT == 0;
        if let Some(revoke) = shm.revoked(&msg.id).filter(|r| r.signal != 0) {
            TaskHappening::Terminated {
                msg: &msg,
                signal: revoke.signal as i32,
            }
            .emit(&self.shared, &lost.task.routing_key);
            let end = End::Revoked {
                reason: RevokeReason::Terminated.as_str(),
                signal: Some(revoke.signal as i32),
            };
            let msg = Arc::new(msg);
            if self
                .shared
                .settle_elsewhere(&msg, None, store_result, end)
                .await
            {
                return;
            }
            if store_result {
                let exc = ExceptionInfo::revoked("terminated");
                let doc = self.shared.document(
                    &msg,
                    TaskState::Revoked,
                    serde_json::to_value(&exc).unwrap_or_default(),
                );
                self.shared.store(&msg, doc).await;
            }
            return;
        }
        let exc = lost_exception(lost);
        TaskHappening::Lost {
            msg: &msg,
            exc: &exc,
        }
        .emit(&self.shared, &lost.task.routing_key);
        let msg = Arc::new(msg);
        let end = End::Failed(exc.clone());
        if store_result && !self.shared.settle_elsewhere(&msg, None, true, end).await {
            self.store_failure(&msg, &exc).await;
        }
    }

    async fn store_failure(&self, msg: &TaskMessage, exc: &ExceptionInfo) {
        let mut doc = self.shared.document(
            msg,
            TaskState::Failure,
            serde_json::to_value(exc).unwrap_or_default(),
        );
        doc.traceback = Some(exc.traceback());
        self.shared.store(msg, doc).await;
    }

    /// For a redelivered message: the record of its process dying, if that is
    /// why it came back. The broker can redeliver before the supervisor has
    /// reaped the process and counted the death (the dead process's slot
    /// still lists the task), so that is waited for briefly: an older record
    /// of the same task would otherwise show one death too few.
    pub(super) async fn lost_record(&self, id: &str) -> Option<Lost> {
        let link = self.link;
        for _ in 0..40 {
            if link.shm.running_elsewhere(id, link.index).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        link.shm.find_lost(id)
    }

    /// A redelivered copy of an early-acknowledged task whose process died
    /// before the acknowledgement reached the broker. Celery acknowledges
    /// such a message before the pool runs it, so it never comes back there:
    /// the task's failure is reported once (here, if no process has yet),
    /// and the copy is acknowledged without running.
    pub(super) async fn settle_early_copy(&mut self, job: &Job) {
        self.report_lost().await;
        let msg = &job.msg;
        info!(
            task_id = %msg.id,
            queue = %job.queue,
            "Task {}[{}] came back from the broker after its process died: its acknowledgement had not reached \
             the broker. Its loss is reported; acknowledged the copy without running it",
            msg.display_name(),
            msg.id
        );
        self.link.slot().count_copy_settled();
        // The record stays (the ring reuses it): this acknowledgement can be
        // lost the same way if this process dies next, and the broker would
        // deliver the copy once more.
        job.settler.ack(&msg.id).await;
    }

    /// Celery's WorkerLostError semantics for an acks-late message whose
    /// process died, plus a quarantine for messages that keep killing it.
    /// Returns true when the message was settled (not to be run).
    pub(super) async fn settle_lost(&self, job: &Job, lost: &Lost) -> bool {
        let msg = &job.msg;
        let store_result = !msg
            .ignore_result
            .unwrap_or(lost.task.flags & TaskFlags::IGNORE_RESULT != 0);
        let exc = lost_exception(lost);
        if lost.deaths >= self.shared.config.max_task_deaths {
            TaskHappening::Quarantined {
                msg,
                exc: &exc,
                deaths: lost.deaths,
            }
            .emit(&self.shared, &job.queue);
            let end = End::Failed(exc.clone());
            if store_result
                && !self
                    .shared
                    .settle_elsewhere(msg, Some(job), true, end)
                    .await
            {
                self.store_failure(msg, &exc).await;
            }
            job.settler.reject(&msg.id, false).await;
            self.link.shm.settle_lost(lost.index);
            return true;
        }
        if lost.reason == LostReason::WorkerLost
            && lost.task.flags & TaskFlags::REJECT_ON_WORKER_LOST != 0
        {
            warn!(task_id = %msg.id, "Task {}[{}] was requeued after its process died; running it again", msg.display_name(), msg.id);
            return false;
        }
        TaskHappening::Lost { msg, exc: &exc }.emit(&self.shared, &job.queue);
        let end = End::Failed(exc.clone());
        if store_result
            && !self
                .shared
                .settle_elsewhere(msg, Some(job), true, end)
                .await
        {
            self.store_failure(msg, &exc).await;
        }
        job.settler.ack(&msg.id).await;
        self.link.shm.settle_lost(lost.index);
        true
    }
}

/// A message standing in for a lost task when only its record is left.
fn lost_message(lost: &Lost) -> TaskMessage {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    TaskMessage {
        id: lost.task.id.clone(),
        task: lost.task.name.clone(),
        reply_to: non_empty(&lost.task.reply_to),
        correlation_id: non_empty(&lost.task.correlation_id),
        ..Default::default()
    }
}

/// The exception Celery stores for a lost task.
fn lost_exception(lost: &Lost) -> ExceptionInfo {
    match lost.reason {
        LostReason::TimeLimit => {
            ExceptionInfo::time_limit_exceeded(lost.task.hard_limit_ms as f64 / 1000.0)
        }
        LostReason::WorkerLost => {
            let how = match nix::sys::signal::Signal::try_from(lost.signal as i32) {
                Ok(sig) if lost.signal != 0 => format!("signal {} ({sig:?})", lost.signal),
                _ => format!("exitcode {}", lost.exit_code.max(1)),
            };
            ExceptionInfo::worker_lost(format!(
                "Worker exited prematurely: {how} Job: {}.",
                lost.deaths
            ))
        }
    }
}
