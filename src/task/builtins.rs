//! Diagnostic tasks shipped with the `celeriac` binary (switch them off with
//! `--without-builtin-tasks`). Python can call them by name:
//!
//! | task | does |
//! |---|---|
//! | `celeriac.noop()` | returns `None` |
//! | `celeriac.echo(value)` | returns `value` |
//! | `celeriac.add(x, y)` | returns `x + y` (ints stay ints) |
//! | `celeriac.sleep(seconds)` | waits, then returns `seconds` |
//! | `celeriac.fail(message, kind="RuntimeError")` | raises `builtins.<kind>(message)` |
//! | `celeriac.retry(times, countdown=0.1)` | retries itself until it has been retried `times` times, then returns `times` |

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Number, Value};

use super::{Context, Registry, TaskError};

/// The prefix every built-in task name starts with.
pub const PREFIX: &str = "celeriac.";

#[derive(Deserialize)]
struct Echo {
    value: Value,
}

#[derive(Deserialize)]
struct Add {
    x: Number,
    y: Number,
}

#[derive(Deserialize)]
struct Sleep {
    seconds: f64,
}

#[derive(Deserialize)]
struct Fail {
    message: String,
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RetryArgs {
    times: u32,
    countdown: Option<f64>,
}

const BUILTIN_EXCEPTIONS: &[&str] = &[
    "RuntimeError",
    "ValueError",
    "TypeError",
    "KeyError",
    "IndexError",
    "ZeroDivisionError",
    "ArithmeticError",
    "LookupError",
    "OSError",
    "TimeoutError",
    "PermissionError",
    "NotImplementedError",
    "Exception",
];

/// Adds the built-in tasks to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_async("celeriac.noop", &[], |_ctx: Context, (): ()| async {
        Ok::<_, TaskError>(Value::Null)
    });
    registry.register_async(
        "celeriac.echo",
        &["value"],
        |_ctx: Context, a: Echo| async move { Ok::<_, TaskError>(a.value) },
    );
    registry.register_async(
        "celeriac.add",
        &["x", "y"],
        |_ctx: Context, a: Add| async move { add(&a.x, &a.y) },
    );
    registry.register_async(
        "celeriac.sleep",
        &["seconds"],
        |_ctx: Context, a: Sleep| async move {
            if !(0.0..=86_400.0).contains(&a.seconds) {
                return Err(TaskError::value_error(format!(
                    "seconds must be between 0 and 86400, got {}",
                    a.seconds
                )));
            }
            tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
            Ok(a.seconds)
        },
    );
    registry.register_async(
        "celeriac.fail",
        &["message", "kind"],
        |_ctx: Context, a: Fail| async move {
            let kind = a.kind.unwrap_or_else(|| "RuntimeError".into());
            if !BUILTIN_EXCEPTIONS.contains(&kind.as_str()) {
                return Err(TaskError::value_error(format!(
                    "unknown exception kind {kind:?}"
                )));
            }
            Err::<Value, _>(TaskError::exception(
                &kind,
                "builtins",
                vec![a.message.into()],
            ))
        },
    );
    registry.register_async(
        "celeriac.retry",
        &["times", "countdown"],
        |ctx: Context, a: RetryArgs| async move {
            if ctx.retries() < a.times {
                let retry = TaskError::retry()
                    .countdown(a.countdown.unwrap_or(0.1))
                    .exc(crate::protocol::ExceptionInfo::builtin(
                        "RuntimeError",
                        format!("attempt {}", ctx.retries()),
                    ));
                return Err(retry.into());
            }
            Ok(ctx.retries())
        },
    );
}

fn add(x: &Number, y: &Number) -> Result<Value, TaskError> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return a.checked_add(b).map(Value::from).ok_or_else(|| {
            TaskError::exception("OverflowError", "builtins", vec!["integer overflow".into()])
        });
    }
    let sum = x.as_f64().unwrap_or(f64::NAN) + y.as_f64().unwrap_or(f64::NAN);
    Number::from_f64(sum)
        .map(Value::Number)
        .ok_or_else(|| TaskError::value_error("result is not a finite number"))
}
