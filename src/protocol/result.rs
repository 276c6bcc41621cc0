//! Result state documents, as the rpc and Redis backends store them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::time::format_iso;

/// Celery task states that a worker stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskState {
    /// The task started (only with `track_started`).
    Started,
    /// The task returned a value.
    Success,
    /// The task raised.
    Failure,
    /// The task asked to be retried.
    Retry,
    /// The task was revoked or expired.
    Revoked,
}

impl TaskState {
    /// Whether `AsyncResult.get()` stops waiting on this state.
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Revoked)
    }

    /// The upper-case name (`SUCCESS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Retry => "RETRY",
            Self::Revoked => "REVOKED",
        }
    }
}

/// The JSON document stored for a task: identical keys and order to Celery 5.7's
/// `{status, result, traceback, children, date_done, [group_id], [parent_id], task_id}`.
#[derive(Debug, Clone, Serialize)]
pub struct ResultDocument {
    /// The state.
    pub status: TaskState,
    /// The return value, the encoded exception, or the STARTED info.
    pub result: Value,
    /// A traceback text for failures.
    pub traceback: Option<String>,
    /// Result tuples of tasks this task spawned.
    pub children: Vec<Value>,
    /// When a ready state was reached (null for STARTED and RETRY).
    pub date_done: Option<String>,
    /// The group this task belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The parent task id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The task id.
    pub task_id: String,
}

impl ResultDocument {
    /// A document for `task_id` in `status` carrying `result`, dated `now` when ready.
    pub fn new(task_id: &str, status: TaskState, result: Value, now: DateTime<Utc>) -> Self {
        Self {
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done: status.is_ready().then(|| format_iso(now)),
            group_id: None,
            parent_id: None,
            task_id: task_id.to_owned(),
        }
    }

    /// Serializes the document to JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a result document always serializes")
    }
}
