//! Running one task: ack (early or late), STARTED, the limits that apply,
//! the slot the supervisor watches, then the task's code through
//! [`super::runner`] and the settlement of its outcome in [`super::settle`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde_json::{json, Value};

use super::job::Job;
use super::outcome::{RevokeReason, TaskHappening};
use super::runner::{self, Limits};
use super::settle::Settle;
use super::shared::Shared;
use crate::protocol::{ExceptionInfo, TaskMessage, TaskState};
use crate::shm::{now_ms, RunningTask, TaskFlags};
use crate::task::{Context, End};

/// How a task run ended, for the loop's bookkeeping.
#[derive(Debug)]
pub struct Finished {
    /// The task id.
    pub id: String,
}

/// Per-run flags the loop can read while the task runs.
#[derive(Debug, Default)]
pub struct RunState {
    /// The message was acknowledged (early ack) — a shutdown must re-publish it.
    pub acked: AtomicBool,
}

/// Whether `msg` has expired now.
pub fn is_expired(msg: &TaskMessage) -> bool {
    msg.expires.is_some_and(|e| e <= Utc::now())
}

/// Discards an expired (or revoked) task: REVOKED stored, message acked.
pub(super) async fn discard_revoked(
    shared: &Shared,
    job: &Job,
    reason: RevokeReason,
    ignore_result: bool,
) {
    let signal = shared
        .link
        .shm
        .revoked(&job.msg.id)
        .map(|r| r.signal as i32)
        .filter(|s| *s != 0);
    TaskHappening::Revoked {
        msg: &job.msg,
        reason,
        signal,
    }
    .emit(shared, &job.queue);
    let end = End::Revoked {
        reason: reason.as_str(),
        signal,
    };
    if shared
        .settle_elsewhere(&job.msg, Some(job), !ignore_result, end)
        .await
    {
        job.settler.ack(&job.msg.id).await;
        return;
    }
    if !ignore_result {
        let exc = ExceptionInfo::revoked(reason.as_str());
        let mut doc = shared.document(
            &job.msg,
            TaskState::Revoked,
            serde_json::to_value(&exc).unwrap_or(Value::Null),
        );
        doc.traceback = None;
        shared.store(&job.msg, doc).await;
    }
    job.settler.ack(&job.msg.id).await;
}

/// Why `msg` must not run (revoked, terminated or expired), if so.
pub(super) fn revoke_reason(shared: &Shared, msg: &TaskMessage) -> Option<RevokeReason> {
    let shm = &shared.link.shm;
    if let Some(r) = shm.revoked(&msg.id) {
        return Some(if r.signal != 0 {
            RevokeReason::Terminated
        } else {
            RevokeReason::Revoked
        });
    }
    if let Some((header, value)) = shm.revoked_stamp(&msg.headers) {
        tracing::debug!(task_id = %msg.id, "task {}[{}] is revoked by header {header}={}", msg.task, msg.id, crate::repr::python_repr(&value));
        return Some(RevokeReason::Revoked);
    }
    is_expired(msg).then_some(RevokeReason::Expired)
}

/// Runs `job` to the end: ack (early or late), STARTED, the task itself
/// within its time limits, canvas follow-ups, result storage, retry.
pub(super) async fn execute(shared: Arc<Shared>, job: Job, state: Arc<RunState>) -> Finished {
    let msg = &job.msg;
    let id = msg.id.clone();
    let Some(task) = shared.registry.get(&msg.task) else {
        // Checked at receipt; the registry never changes at run time.
        return Finished { id };
    };
    let cfg = &shared.config;
    let opts = &task.options;
    let acks_late = opts.acks_late.unwrap_or(cfg.acks_late);
    let ignore_result = msg.ignore_result.unwrap_or(opts.ignore_result);

    if let Some(reason) = revoke_reason(&shared, msg) {
        discard_revoked(&shared, &job, reason, ignore_result).await;
        return Finished { id };
    }
    if !acks_late {
        job.settler.ack(&id).await;
        state.acked.store(true, Ordering::Release);
    }
    // A task that settles itself stores its own STARTED.
    if opts.track_started.unwrap_or(cfg.track_started) && !ignore_result && !task.settles_itself {
        let started = json!({"pid": shared.pid, "hostname": cfg.hostname});
        shared
            .store(msg, shared.document(msg, TaskState::Started, started))
            .await;
    }

    let limits = Limits::for_task(msg, shared.runtime_limits(&msg.task), opts, cfg);
    let ctx = Context::new(
        Arc::clone(&job.msg),
        Arc::clone(&shared.hostname),
        job.delivery.clone(),
        limits.hard,
        limits.soft,
    );
    TaskHappening::Started { msg }.emit(&shared, &job.queue);

    let started = Instant::now();
    let now = now_ms();
    let hard_ms = limits.hard.map_or(0, |h| (h * 1000.0) as u64);
    let mut flags = 0;
    if acks_late {
        flags |= TaskFlags::ACKS_LATE;
    }
    if opts
        .reject_on_worker_lost
        .unwrap_or(cfg.reject_on_worker_lost)
    {
        flags |= TaskFlags::REJECT_ON_WORKER_LOST;
    }
    if ignore_result {
        flags |= TaskFlags::IGNORE_RESULT;
    }
    shared.link.slot().start_task(&RunningTask {
        id: id.clone(),
        name: msg.task.clone(),
        reply_to: msg.reply_to.clone().unwrap_or_default(),
        correlation_id: msg.correlation_id.clone().unwrap_or_default(),
        started_ms: now,
        deadline_ms: if hard_ms > 0 { now + hard_ms } else { 0 },
        hard_limit_ms: hard_ms,
        flags,
        args: crate::inspect::ArgsText::of(msg),
        exchange: crate::inspect::plain(&job.delivery.exchange),
        routing_key: crate::inspect::plain(&job.delivery.routing_key),
        stamps: crate::inspect::stamps(msg),
    });
    // The supervisor enforces the hard limit; if it would not look at the
    // slots again before the deadline, tell it about this one now.
    if hard_ms > 0 && shared.link.shm.supervisor_wakes_after(now + hard_ms) {
        crate::signals::ring(shared.link.supervisor as u32);
    }

    let outcome = runner::run(task, ctx, msg, limits).await;

    Settle {
        shared: &shared,
        job: &job,
        options: opts,
        ignore_result,
        acks_late,
        acked: state.acked.load(Ordering::Acquire),
        runtime: started.elapsed().as_secs_f64(),
        settled_by_task: task.settles_itself,
    }
    .outcome(outcome)
    .await;
    shared.link.slot().finish_task();
    Finished { id }
}
