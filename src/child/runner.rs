//! The task-execution seam: the one place where a decoded task is handed
//! to the code that runs it, and an outcome (a JSON value, or a
//! [`TaskError`]: exception, retry, reject, ignore) comes back.
//!
//! Everything before (consuming, acknowledging, limits, the slot) and after
//! (results, follow-ups, events, settling the message) is the same for
//! every kind of task. A new kind of task — code in another language, run
//! in this process — is a [`crate::task::TaskHandler`] registered under its
//! name: it receives the context and the arguments and returns a
//! [`crate::task::TaskFuture`]; with `blocking` set it runs on a blocking
//! thread and the supervisor enforces its hard limit by killing the process.

use std::time::Duration;

use serde_json::Value;
use tokio::time::sleep_until;
use tracing::{error, warn};

use crate::config::WorkerConfig;
use crate::protocol::{ExceptionInfo, TaskMessage};
use crate::shm::RuntimeLimits;
use crate::task::{panic_exception, Context, Registered, TaskError, TaskFuture, TaskOptions};

/// The time limits of one run, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Limits {
    /// Stop the task (or its process) after this long.
    pub(super) hard: Option<f64>,
    /// Tell the task it is out of time after this long.
    pub(super) soft: Option<f64>,
}

impl Limits {
    /// The message's `timelimit` header wins, then a `time_limit` remote
    /// command, then the task's options, then the worker's flags. Zero or
    /// less means no limit.
    pub(super) fn for_task(
        msg: &TaskMessage,
        runtime: RuntimeLimits,
        opts: &TaskOptions,
        cfg: &WorkerConfig,
    ) -> Self {
        let positive = |v: Option<f64>| v.filter(|s| *s > 0.0);
        let hard = msg.time_limit.or(runtime
            .hard
            .map(Some)
            .unwrap_or(opts.time_limit.or(cfg.time_limit)));
        let soft = msg.soft_time_limit.or(runtime
            .soft
            .map(Some)
            .unwrap_or(opts.soft_time_limit.or(cfg.soft_time_limit)));
        Self {
            hard: positive(hard),
            soft: positive(soft),
        }
    }
}

/// Runs `task`'s code for `msg` within `limits`.
pub(super) async fn run(
    task: &Registered,
    ctx: Context,
    msg: &TaskMessage,
    limits: Limits,
) -> Result<Value, TaskError> {
    let future = task
        .handler
        .call(ctx.clone(), msg.args.clone(), msg.kwargs.clone());
    // A blocking task is stopped at its hard limit by the supervisor, which
    // kills its process; only a task that can be aborted is stopped here.
    let in_process_hard = if task.blocking { None } else { limits.hard };
    run_with_limits(future, &ctx, task, limits.soft, in_process_hard).await
}

async fn run_with_limits(
    future: TaskFuture,
    ctx: &Context,
    task: &Registered,
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
                if !task.blocking {
                    handle.abort();
                    return Err(ExceptionInfo::soft_time_limit_exceeded().into());
                }
                task.handler.interrupt(ctx);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Invocation};

    fn config(args: &[&str]) -> WorkerConfig {
        let mut argv = vec!["celeriac", "worker"];
        argv.extend_from_slice(args);
        match parse(argv, &[]) {
            Ok(Invocation::Worker(c)) => *c,
            _ => panic!("bad test arguments"),
        }
    }

    #[test]
    fn the_message_header_wins_then_remote_control_then_task_then_worker() {
        let cfg = config(&["--time-limit", "40", "--soft-time-limit", "30"]);
        let mut opts = TaskOptions::default();
        let mut msg = TaskMessage::default();
        let none = RuntimeLimits::default();
        let l = Limits::for_task(&msg, none, &opts, &cfg);
        assert_eq!((l.hard, l.soft), (Some(40.0), Some(30.0)));
        opts.time_limits(Some(20.0), Some(10.0));
        let l = Limits::for_task(&msg, none, &opts, &cfg);
        assert_eq!((l.hard, l.soft), (Some(20.0), Some(10.0)));
        let remote = RuntimeLimits {
            hard: Some(8.0),
            soft: Some(6.0),
            ..Default::default()
        };
        let l = Limits::for_task(&msg, remote, &opts, &cfg);
        assert_eq!((l.hard, l.soft), (Some(8.0), Some(6.0)));
        msg.time_limit = Some(4.0);
        msg.soft_time_limit = Some(2.0);
        let l = Limits::for_task(&msg, remote, &opts, &cfg);
        assert_eq!((l.hard, l.soft), (Some(4.0), Some(2.0)));
    }

    #[test]
    fn zero_means_no_limit() {
        let cfg = config(&["--time-limit", "40"]);
        let msg = TaskMessage {
            time_limit: Some(0.0),
            ..Default::default()
        };
        let l = Limits::for_task(
            &msg,
            RuntimeLimits::default(),
            &TaskOptions::default(),
            &cfg,
        );
        assert_eq!(l, Limits::default());
    }
}
