//! Exceptions as Celery's JSON result backends carry them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"exc_type", "exc_message", "exc_module"}`: what Python's
/// `AsyncResult.get()` turns back into an exception instance.
///
/// Python imports `exc_module`, looks up `exc_type` and raises
/// `cls(*exc_message)`; a module or class it cannot find is synthesized as a
/// plain `Exception` subclass of that name, so any name is safe to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// The class name (`__qualname__`), e.g. `ValueError`.
    pub exc_type: String,
    /// The exception's `args`, as a JSON list.
    pub exc_message: Vec<Value>,
    /// The module the class lives in, e.g. `builtins`.
    pub exc_module: String,
    /// How the raising code showed it (a hosted task's real `repr()` and
    /// traceback), for events and logs; never stored.
    #[serde(skip)]
    pub shown: Option<Box<Shown>>,
}

/// An exception as the code that raised it shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shown {
    /// `repr(exc)`.
    pub repr: String,
    /// The formatted traceback.
    pub traceback: String,
}

impl ExceptionInfo {
    /// An exception of class `module.kind` raised with `args`.
    pub fn new(kind: &str, module: &str, args: Vec<Value>) -> Self {
        Self {
            exc_type: kind.to_owned(),
            exc_message: args,
            exc_module: module.to_owned(),
            shown: None,
        }
    }

    /// A `builtins` exception (ValueError, TypeError, RuntimeError, ...) with one message.
    pub fn builtin(kind: &str, message: impl Into<String>) -> Self {
        Self::new(kind, "builtins", vec![Value::String(message.into())])
    }

    /// `celery.exceptions.NotRegistered(name)`.
    pub fn not_registered(task: &str) -> Self {
        Self::new("NotRegistered", "celery.exceptions", vec![task.into()])
    }

    /// `celery.exceptions.TaskRevokedError(reason)` with `revoked`, `expired` or `terminated`.
    pub fn revoked(reason: &str) -> Self {
        Self::new("TaskRevokedError", "celery.exceptions", vec![reason.into()])
    }

    /// `celery.exceptions.MaxRetriesExceededError(message)`.
    pub fn max_retries_exceeded(message: String) -> Self {
        Self::new(
            "MaxRetriesExceededError",
            "celery.exceptions",
            vec![message.into()],
        )
    }

    /// `billiard.exceptions.TimeLimitExceeded(seconds)`.
    pub fn time_limit_exceeded(seconds: f64) -> Self {
        Self::new(
            "TimeLimitExceeded",
            "billiard.exceptions",
            vec![seconds.into()],
        )
    }

    /// `billiard.exceptions.SoftTimeLimitExceeded()`.
    pub fn soft_time_limit_exceeded() -> Self {
        Self::new("SoftTimeLimitExceeded", "billiard.exceptions", Vec::new())
    }

    /// `billiard.exceptions.WorkerLostError(message)`.
    pub fn worker_lost(message: String) -> Self {
        Self::new(
            "WorkerLostError",
            "billiard.exceptions",
            vec![message.into()],
        )
    }

    /// Python's `repr()` of the exception, e.g. `ValueError('bad', 42)`, as
    /// events carry it.
    pub fn repr(&self) -> String {
        if let Some(shown) = &self.shown {
            return shown.repr.clone();
        }
        let args: Vec<String> = self
            .exc_message
            .iter()
            .map(crate::repr::python_repr)
            .collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }

    /// A short traceback-like text for logs and the `traceback` field.
    pub fn traceback(&self) -> String {
        if let Some(shown) = &self.shown {
            return shown.traceback.clone();
        }
        let message = match self.exc_message.as_slice() {
            [] => String::new(),
            [Value::String(s)] => s.clone(),
            [one] => crate::repr::python_repr(one),
            many => format!(
                "({})",
                many.iter()
                    .map(crate::repr::python_repr)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "Traceback (most recent call last):\n  (raised in celeriac)\n{}: {}\n",
            self.qualified_name(),
            message
        )
    }

    fn qualified_name(&self) -> String {
        if self.exc_module == "builtins" {
            self.exc_type.clone()
        } else {
            format!("{}.{}", self.exc_module, self.exc_type)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_like_celery() {
        let e = ExceptionInfo::new(
            "ValueError",
            "builtins",
            vec![json!("bad value"), json!(42)],
        );
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"exc_type": "ValueError", "exc_message": ["bad value", 42], "exc_module": "builtins"})
        );
        assert_eq!(e.repr(), "ValueError('bad value', 42)");
    }

    #[test]
    fn celery_specific_classes() {
        assert_eq!(
            serde_json::to_value(ExceptionInfo::not_registered("proj.tasks.missing")).unwrap(),
            json!({"exc_type": "NotRegistered", "exc_message": ["proj.tasks.missing"], "exc_module": "celery.exceptions"})
        );
        assert_eq!(
            serde_json::to_value(ExceptionInfo::time_limit_exceeded(30.0)).unwrap(),
            json!({"exc_type": "TimeLimitExceeded", "exc_message": [30.0], "exc_module": "billiard.exceptions"})
        );
        assert_eq!(
            ExceptionInfo::soft_time_limit_exceeded().repr(),
            "SoftTimeLimitExceeded()"
        );
    }
}
