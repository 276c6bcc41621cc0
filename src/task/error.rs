//! How a task ends other than by returning a value.

use std::fmt;

use serde_json::Value;

use crate::protocol::ExceptionInfo;

/// A task's non-success outcome, mirroring what a Python task can raise.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// An exception: stored as FAILURE and re-raised by `AsyncResult.get()`.
    Exception(ExceptionInfo),
    /// `self.retry(...)`: re-published with `retries + 1`.
    Retry(Retry),
    /// `Reject(requeue=...)`: the message is rejected.
    Reject {
        /// Whether the broker should requeue it.
        requeue: bool,
        /// Why.
        reason: String,
        /// The traceback the raising code formatted (a hosted task's), for
        /// the `task-failed` event.
        traceback: Option<String>,
    },
    /// `Ignore()`: acknowledged, no state stored.
    Ignore,
}

impl TaskError {
    /// An exception of any class: `exception("DatabaseError", "myapp.errors", ["down"])`.
    pub fn exception(kind: &str, module: &str, args: Vec<Value>) -> Self {
        Self::Exception(ExceptionInfo::new(kind, module, args))
    }

    /// `ValueError(message)`.
    pub fn value_error(message: impl Into<String>) -> Self {
        Self::Exception(ExceptionInfo::builtin("ValueError", message))
    }

    /// `TypeError(message)`.
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::Exception(ExceptionInfo::builtin("TypeError", message))
    }

    /// `RuntimeError(message)`.
    pub fn runtime_error(message: impl Into<String>) -> Self {
        Self::Exception(ExceptionInfo::builtin("RuntimeError", message))
    }

    /// A retry with the task's default delay; refine it with [`Retry`]'s methods.
    pub fn retry() -> Retry {
        Retry::default()
    }

    /// Reject the message, requeued or not.
    pub fn reject(requeue: bool, reason: impl Into<String>) -> Self {
        Self::Reject {
            requeue,
            reason: reason.into(),
            traceback: None,
        }
    }
}

impl From<ExceptionInfo> for TaskError {
    fn from(e: ExceptionInfo) -> Self {
        Self::Exception(e)
    }
}

impl From<Retry> for TaskError {
    fn from(r: Retry) -> Self {
        Self::Retry(r)
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exception(e) => f.write_str(&e.repr()),
            Self::Retry(r) => match &r.exc {
                Some(e) => write!(f, "Retry({})", e.repr()),
                None => f.write_str("Retry()"),
            },
            Self::Reject {
                requeue, reason, ..
            } => write!(
                f,
                "reject requeue={}: {reason}",
                if *requeue { "True" } else { "False" }
            ),
            Self::Ignore => f.write_str("Ignore()"),
        }
    }
}

impl std::error::Error for TaskError {}

/// A retry request: `TaskError::retry().countdown(5.0).exc(err)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retry {
    /// Seconds until the retry runs; the task's `default_retry_delay` when unset.
    pub countdown: Option<f64>,
    /// The exception that caused the retry (stored with RETRY; raised once retries run out).
    pub exc: Option<ExceptionInfo>,
    /// Overrides the task's `max_retries` for this call (`Some(None)` = unlimited).
    pub max_retries: Option<Option<u32>>,
}

impl Retry {
    /// Run again after `seconds`.
    pub fn countdown(mut self, seconds: f64) -> Self {
        self.countdown = Some(seconds);
        self
    }

    /// The exception behind the retry.
    pub fn exc(mut self, exc: impl Into<ExceptionInfo>) -> Self {
        self.exc = Some(exc.into());
        self
    }

    /// Overrides `max_retries` for this call (`None` = unlimited).
    pub fn max_retries(mut self, max: Option<u32>) -> Self {
        self.max_retries = Some(max);
        self
    }
}
