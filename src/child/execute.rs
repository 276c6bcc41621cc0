//! Running one task and settling its message and result the way Celery does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Duration as ChronoDuration, Utc};
use serde_json::{json, Value};
use tokio::time::sleep_until;
use tracing::{error, info, warn};

use super::job::{ack, reject, Job};
use super::shared::Shared;
use crate::protocol::{events, signature_message, ExceptionInfo, TaskMessage, TaskState};
use crate::repr::{short_repr, MAX_REPR};
use crate::shm::{now_ms, Outcome, RunningTask, TaskFlags};
use crate::task::panic_exception;
use crate::task::{Context, TaskError};

/// How a task run ended, for the child's bookkeeping.
#[derive(Debug)]
pub struct Finished {
    /// The task id.
    pub id: String,
}

/// Per-run flags the child's loop can read while the task runs.
#[derive(Debug, Default)]
pub struct RunState {
    /// The message was acknowledged (early ack) — a shutdown must re-publish it.
    pub acked: AtomicBool,
}

/// Whether `msg` has expired at `now`.
pub fn is_expired(msg: &TaskMessage) -> bool {
    msg.expires.is_some_and(|e| e <= Utc::now())
}

/// Discards an expired (or revoked) task: REVOKED stored, message acked.
pub async fn discard_revoked(shared: &Shared, job: &Job, reason: &str, ignore_result: bool) {
    info!(task_id = %job.msg.id, "Discarding revoked task: {}[{}] ({reason})", job.msg.display_name(), job.msg.id);
    if !ignore_result {
        let exc = ExceptionInfo::revoked(reason);
        let mut doc = shared.document(
            &job.msg,
            TaskState::Revoked,
            serde_json::to_value(&exc).unwrap_or(Value::Null),
        );
        doc.traceback = None;
        shared.store(&job.msg, doc).await;
    }
    ack(&job.acker, &job.msg.id).await;
    shared.record(&job.msg.task, Outcome::Revoked, None);
    let signum = shared
        .link
        .and_then(|l| l.shm.revoked(&job.msg.id))
        .map(|r| r.signal as i32)
        .filter(|s| *s != 0);
    shared.events.task("task-revoked", || {
        events::task_revoked(
            &job.msg.id,
            reason == "terminated",
            signum,
            reason == "expired",
        )
    });
}

/// Why `msg` must not run: `expired`, `revoked` or `terminated`, if so.
pub fn revoke_reason(shared: &Shared, msg: &TaskMessage) -> Option<&'static str> {
    if let Some(r) = shared.link.and_then(|l| l.shm.revoked(&msg.id)) {
        return Some(if r.signal != 0 {
            "terminated"
        } else {
            "revoked"
        });
    }
    is_expired(msg).then_some("expired")
}

/// Runs `job` to the end: ack (early or late), STARTED, the task itself
/// within its time limits, canvas follow-ups, result storage, retry.
pub async fn execute(shared: Arc<Shared>, job: Job, state: Arc<RunState>) -> Finished {
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
        ack(&job.acker, &id).await;
        state.acked.store(true, Ordering::Release);
    }
    if opts.track_started.unwrap_or(cfg.track_started) && !ignore_result {
        let started = json!({"pid": shared.pid, "hostname": cfg.hostname});
        shared
            .store(msg, shared.document(msg, TaskState::Started, started))
            .await;
    }

    // The message's `timelimit` header wins, then a `time_limit` command,
    // then the task's options, then the worker's flags (0 = no limit).
    let runtime_limits = shared.runtime_limits(&msg.task);
    let positive = |v: Option<f64>| v.filter(|s| *s > 0.0);
    let hard = msg.time_limit.or(runtime_limits
        .hard
        .map(Some)
        .unwrap_or(opts.time_limit.or(cfg.time_limit)));
    let hard = positive(hard);
    let soft = msg.soft_time_limit.or(runtime_limits
        .soft
        .map(Some)
        .unwrap_or(opts.soft_time_limit.or(cfg.soft_time_limit)));
    let soft = positive(soft);
    let ctx = Context::new(
        Arc::clone(&job.msg),
        Arc::clone(&shared.hostname),
        job.delivery.clone(),
        hard,
        soft,
    );
    shared
        .events
        .task("task-started", || events::task_started(&id));
    let started = Instant::now();
    if let Some(link) = shared.link {
        let now = now_ms();
        let hard_ms = hard.map_or(0, |h| (h * 1000.0) as u64);
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
        link.slot().start_task(&RunningTask {
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
        });
    }
    let future = task
        .handler
        .call(ctx.clone(), msg.args.clone(), msg.kwargs.clone());
    // Under the supervisor a blocking task is stopped at the hard limit by
    // killing its process; only a task that can be aborted is stopped here.
    let in_process_hard = if task.blocking && shared.link.is_some() {
        None
    } else {
        hard
    };
    let outcome = run_with_limits(future, &ctx, task.blocking, soft, in_process_hard).await;
    let runtime = started.elapsed().as_secs_f64();

    let acked = state.acked.load(Ordering::Acquire);
    let route = (
        job.delivery.exchange.as_str(),
        job.delivery.routing_key.as_str(),
    );
    match outcome {
        Ok(value) => {
            shared.record(&msg.task, Outcome::Succeeded, Some(runtime));
            shared.events.task("task-succeeded", || {
                events::task_succeeded(&id, &value, runtime)
            });
            follow_up_success(&shared, msg, &value, route).await;
            if !ignore_result {
                shared
                    .store(msg, shared.document(msg, TaskState::Success, value.clone()))
                    .await;
            }
            info!(task_id = %id, "Task {}[{}] succeeded in {:.6}s: {}", msg.display_name(), id, runtime, short_repr(&value, MAX_REPR));
            if acks_late {
                ack(&job.acker, &id).await;
            }
        }
        Err(TaskError::Retry(retry)) => {
            let max = retry.max_retries.unwrap_or(opts.max_retries);
            if max.is_some_and(|m| msg.retries >= m) {
                let exc = retry.exc.unwrap_or_else(|| {
                    ExceptionInfo::max_retries_exceeded(format!(
                        "Can't retry {}[{}] args:{:?} kwargs:{:?}",
                        msg.task, id, msg.args, msg.kwargs
                    ))
                });
                fail(&shared, &job, exc, ignore_result, acks_late, runtime, route).await;
            } else {
                let countdown = retry.countdown.unwrap_or(opts.default_retry_delay).max(0.0);
                let eta = Utc::now() + ChronoDuration::milliseconds((countdown * 1000.0) as i64);
                match shared.publish_task(&msg.retry_message(eta), route).await {
                    Ok(()) => {
                        let exc = retry
                            .exc
                            .as_ref()
                            .map(|e| serde_json::to_value(e).unwrap_or(Value::Null));
                        let mut doc =
                            shared.document(msg, TaskState::Retry, exc.unwrap_or(Value::Null));
                        doc.traceback = retry.exc.as_ref().map(ExceptionInfo::traceback);
                        doc.children = vec![json!([[id, null], null])];
                        shared.store(msg, doc).await;
                        let why = retry
                            .exc
                            .as_ref()
                            .map_or_else(|| "Retry".to_owned(), ExceptionInfo::repr);
                        info!(task_id = %id, "Task {}[{}] retry: Retry in {countdown}s: {why}", msg.display_name(), id);
                        shared.record(&msg.task, Outcome::Retried, Some(runtime));
                        let exc_repr = retry
                            .exc
                            .as_ref()
                            .map_or_else(|| "None".to_owned(), ExceptionInfo::repr);
                        let tb = retry
                            .exc
                            .as_ref()
                            .map(ExceptionInfo::traceback)
                            .unwrap_or_default();
                        shared
                            .events
                            .task("task-retried", || events::task_failed(&id, &exc_repr, &tb));
                        if acks_late {
                            ack(&job.acker, &id).await;
                        }
                    }
                    Err(e) => {
                        error!(task_id = %id, "Task {}[{}] could not be re-published for retry, rejecting it: {e}", msg.display_name(), id);
                        if !acked {
                            reject(&job.acker, &id, false).await;
                        }
                    }
                }
            }
        }
        Err(TaskError::Exception(exc)) => {
            fail(&shared, &job, exc, ignore_result, acks_late, runtime, route).await
        }
        Err(TaskError::Reject { requeue, reason }) => {
            warn!(task_id = %id, "Task {}[{}] rejected (requeue={requeue}): {reason}", msg.display_name(), id);
            shared.record(&msg.task, Outcome::Rejected, Some(runtime));
            let why = format!(
                "reject requeue={}: {reason}",
                if requeue { "True" } else { "False" }
            );
            shared
                .events
                .task("task-failed", || events::task_failed(&id, &why, ""));
            shared
                .events
                .task("task-rejected", || events::task_rejected(&id, requeue));
            if !requeue && !ignore_result {
                let exc = ExceptionInfo::new(
                    "Reject",
                    "celery.exceptions",
                    vec![reason.into(), requeue.into()],
                );
                shared
                    .store(
                        msg,
                        shared.document(
                            msg,
                            TaskState::Failure,
                            serde_json::to_value(&exc).unwrap_or(Value::Null),
                        ),
                    )
                    .await;
            }
            if !acked {
                reject(&job.acker, &id, requeue).await;
            }
        }
        Err(TaskError::Ignore) => {
            info!(task_id = %id, "Task {}[{}] ignored", msg.display_name(), id);
            if !acked {
                ack(&job.acker, &id).await;
            }
        }
    }
    if let Some(link) = shared.link {
        link.slot().finish_task();
    }
    Finished { id }
}

async fn fail(
    shared: &Shared,
    job: &Job,
    exc: ExceptionInfo,
    ignore_result: bool,
    acks_late: bool,
    runtime: f64,
    route: (&str, &str),
) {
    let msg = &job.msg;
    for errback in &msg.embed.errbacks {
        publish_signature(
            shared,
            msg,
            errback,
            Some(Value::String(msg.id.clone())),
            Vec::new(),
            route,
        )
        .await;
    }
    if !ignore_result {
        let mut doc = shared.document(
            msg,
            TaskState::Failure,
            serde_json::to_value(&exc).unwrap_or(Value::Null),
        );
        doc.traceback = Some(exc.traceback());
        shared.store(msg, doc).await;
    }
    error!(task_id = %msg.id, "Task {}[{}] raised unexpected: {} (after {:.6}s)", msg.display_name(), msg.id, exc.repr(), runtime);
    shared.record(&msg.task, Outcome::Failed, Some(runtime));
    shared.events.task("task-failed", || {
        events::task_failed(&msg.id, &exc.repr(), &exc.traceback())
    });
    if acks_late {
        ack(&job.acker, &msg.id).await;
    }
}

async fn follow_up_success(shared: &Shared, msg: &TaskMessage, value: &Value, route: (&str, &str)) {
    if let Some((next, rest)) = msg.embed.chain.split_last() {
        publish_signature(shared, msg, next, Some(value.clone()), rest.to_vec(), route).await;
    }
    for callback in &msg.embed.callbacks {
        publish_signature(
            shared,
            msg,
            callback,
            Some(value.clone()),
            Vec::new(),
            route,
        )
        .await;
    }
    if msg.embed.chord.is_some() {
        warn!(task_id = %msg.id, "Task {}[{}] is part of a chord; chord bodies are not run by celeriac", msg.display_name(), msg.id);
    }
}

async fn publish_signature(
    shared: &Shared,
    parent: &TaskMessage,
    sig: &Value,
    arg: Option<Value>,
    chain: Vec<Value>,
    route: (&str, &str),
) {
    match signature_message(sig, arg, chain, parent, &shared.config.hostname, Utc::now()) {
        Ok(out) => {
            if let Err(e) = shared.publish_task(&out, route).await {
                error!(task_id = %parent.id, "could not send follow-up task {} of {}: {e}", out.id, parent.id);
            }
        }
        Err(e) => warn!(task_id = %parent.id, "skipping follow-up of {}: {e}", parent.id),
    }
}

async fn run_with_limits(
    future: crate::task::TaskFuture,
    ctx: &Context,
    blocking: bool,
    soft: Option<f64>,
    hard: Option<f64>,
) -> Result<Value, TaskError> {
    let start = tokio::time::Instant::now();
    let deadline = |s: Option<f64>| s.map(|s| start + Duration::from_secs_f64(s));
    let (mut soft_at, hard_at) = (deadline(soft), deadline(hard));
    let far = start + Duration::from_secs(86_400 * 365);
    if soft.is_none() && hard.is_none() {
        use futures_lite::FutureExt;
        return std::panic::AssertUnwindSafe(future)
            .catch_unwind()
            .await
            .unwrap_or_else(|payload| Err(crate::task::panic_payload_exception(payload)));
    }
    let mut handle = tokio::spawn(future);
    loop {
        tokio::select! {
            joined = &mut handle => return joined.unwrap_or_else(|j| Err(panic_exception(j))),
            () = sleep_until(soft_at.unwrap_or(far)), if soft_at.is_some() => {
                soft_at = None;
                ctx.mark_soft_time_limit_exceeded();
                warn!(task_id = %ctx.id(), "Soft time limit ({}s) exceeded for {}[{}]", soft.unwrap_or_default(), ctx.task(), ctx.id());
                if !blocking {
                    handle.abort();
                    return Err(ExceptionInfo::soft_time_limit_exceeded().into());
                }
            }
            () = sleep_until(hard_at.unwrap_or(far)), if hard_at.is_some() => {
                let h = hard.unwrap_or_default();
                error!(task_id = %ctx.id(), "Hard time limit ({h}s) exceeded for {}[{}]", ctx.task(), ctx.id());
                handle.abort();
                return Err(ExceptionInfo::time_limit_exceeded(h).into());
            }
        }
    }
}
