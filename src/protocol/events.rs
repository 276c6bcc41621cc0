//! Celery monitoring events (Flower, `celery events`): the JSON objects and
//! their routing, with the field order Celery uses (common fields first,
//! then the event's own, then `timestamp` and `type`).

use serde_json::{Map, Value};

use super::message::TaskMessage;
use super::time::format_iso;
use crate::repr::{args_repr, python_repr, short_repr, MAX_REPR};

/// The topic exchange events are published to.
pub const EVENT_EXCHANGE: &str = "celeryev";
/// Routing key of a batch of task events (a JSON array).
pub const TASK_BATCH_KEY: &str = "task.multi";
/// Task events published in one message at most, as Celery's prefork pool.
pub const BATCH_LIMIT: usize = 24;
/// Seconds between worker heartbeats, unless `--heartbeat-interval` says otherwise.
pub const HEARTBEAT_FREQ: f64 = 2.0;

/// Who sends events: the worker's node name and main pid.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSource {
    /// Node name (`celery@host`).
    pub hostname: String,
    /// The worker's main (supervisor) pid.
    pub pid: u32,
    /// Hours west of UTC (`time.timezone // 3600`).
    pub utcoffset: f64,
}

impl EventSource {
    /// An event of type `kind` with its own `fields`, stamped with `clock` and `timestamp`.
    pub fn event(
        &self,
        kind: &str,
        clock: u64,
        timestamp: f64,
        fields: Vec<(&str, Value)>,
    ) -> Value {
        let mut m = Map::new();
        m.insert("hostname".into(), self.hostname.clone().into());
        m.insert("utcoffset".into(), self.utcoffset.into());
        m.insert("pid".into(), self.pid.into());
        m.insert("clock".into(), clock.into());
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        m.insert("timestamp".into(), timestamp.into());
        m.insert("type".into(), kind.into());
        Value::Object(m)
    }
}

impl EventSource {
    /// The same event as [`EventSource::event`], written straight to JSON
    /// text (no intermediate map: events are on the hot path).
    pub fn encode(
        &self,
        kind: &str,
        clock: u64,
        timestamp: f64,
        fields: &[(&str, Value)],
    ) -> String {
        let mut out = Vec::with_capacity(256);
        write_event(&self.prefix(), &mut out, kind, clock, timestamp, fields);
        String::from_utf8(out).expect("JSON text is UTF-8")
    }

    /// The text every event of this source starts with: its common fields
    /// up to the `clock` value, which [`write_event`] appends.
    pub fn prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(b"{\"hostname\":");
        json_into(&mut out, &self.hostname);
        out.extend_from_slice(b",\"utcoffset\":");
        json_into(&mut out, &self.utcoffset);
        out.extend_from_slice(b",\"pid\":");
        json_into(&mut out, &self.pid);
        out.extend_from_slice(b",\"clock\":");
        out
    }
}

/// Appends one event as JSON text to `out`: `prefix` (from
/// [`EventSource::prefix`]), the clock, the event's own fields, then
/// `timestamp` and `type`.
pub fn write_event(
    prefix: &[u8],
    out: &mut Vec<u8>,
    kind: &str,
    clock: u64,
    timestamp: f64,
    fields: &[(&str, Value)],
) {
    out.extend_from_slice(prefix);
    json_into(out, &clock);
    for (key, value) in fields {
        out.push(b',');
        json_into(out, key);
        out.push(b':');
        json_into(out, value);
    }
    out.extend_from_slice(b",\"timestamp\":");
    json_into(out, &timestamp);
    out.extend_from_slice(b",\"type\":");
    json_into(out, kind);
    out.push(b'}');
}

fn json_into<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("serializing to memory cannot fail");
}

/// The routing key of a single event: `worker-heartbeat` -> `worker.heartbeat`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// This machine's `utcoffset` as Celery computes it (hours west of UTC).
pub fn local_utcoffset() -> f64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    // + 0.0 turns -0.0 (UTC) into 0.0.
    (-f64::from(east) / 3600.0).floor() + 0.0
}

fn opt(v: &Option<String>) -> Value {
    v.clone().map_or(Value::Null, Value::String)
}

/// `task-received` fields.
pub fn task_received(msg: &TaskMessage) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", msg.id.clone().into()),
        ("name", msg.display_name().to_owned().into()),
        (
            "args",
            msg.argsrepr
                .clone()
                .unwrap_or_else(|| args_repr(&msg.args))
                .into(),
        ),
        (
            "kwargs",
            msg.kwargsrepr
                .clone()
                .unwrap_or_else(|| python_repr(&Value::Object(msg.kwargs.clone())))
                .into(),
        ),
        ("root_id", opt(&msg.root_id)),
        ("parent_id", opt(&msg.parent_id)),
        ("retries", msg.retries.into()),
        ("eta", msg.eta.map_or(Value::Null, |t| format_iso(t).into())),
        (
            "expires",
            msg.expires.map_or(Value::Null, |t| format_iso(t).into()),
        ),
    ]
}

/// `task-started` fields.
pub fn task_started(id: &str) -> Vec<(&'static str, Value)> {
    vec![("uuid", id.into())]
}

/// `task-succeeded` fields.
pub fn task_succeeded(id: &str, result: &Value, runtime: f64) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", id.into()),
        ("result", short_repr(result, MAX_REPR).into()),
        ("runtime", runtime.into()),
    ]
}

/// `task-succeeded` for a result its own code has shown (Python's
/// `saferepr`, already short).
pub fn task_succeeded_shown(id: &str, result: &str, runtime: f64) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", id.into()),
        ("result", result.into()),
        ("runtime", runtime.into()),
    ]
}

/// The task event types a worker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEventKind {
    /// `task-received`
    Received,
    /// `task-started`
    Started,
    /// `task-succeeded`
    Succeeded,
    /// `task-failed`
    Failed,
    /// `task-retried`
    Retried,
    /// `task-rejected`
    Rejected,
    /// `task-revoked`
    Revoked,
}

impl TaskEventKind {
    /// The event's `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "task-received",
            Self::Started => "task-started",
            Self::Succeeded => "task-succeeded",
            Self::Failed => "task-failed",
            Self::Retried => "task-retried",
            Self::Rejected => "task-rejected",
            Self::Revoked => "task-revoked",
        }
    }
}

fn exception_fields(id: &str, exception: &str, traceback: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", id.into()),
        ("exception", exception.into()),
        ("traceback", traceback.into()),
    ]
}

/// `task-failed` fields.
pub fn task_failed(id: &str, exception: &str, traceback: &str) -> Vec<(&'static str, Value)> {
    exception_fields(id, exception, traceback)
}

/// `task-failed` fields for a task this worker does not know: Celery sends
/// the exception only, with no traceback.
pub fn task_not_registered(id: &str, name: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", id.into()),
        ("exception", format!("NotRegistered('{name}')").into()),
    ]
}

/// `task-retried` fields: the exception's repr (the string `None` for a
/// retry without one, as Celery sends it) and its traceback.
pub fn task_retried(id: &str, exception: &str, traceback: &str) -> Vec<(&'static str, Value)> {
    exception_fields(id, exception, traceback)
}

/// `task-rejected` fields.
pub fn task_rejected(id: &str, requeue: bool) -> Vec<(&'static str, Value)> {
    vec![("uuid", id.into()), ("requeue", requeue.into())]
}

/// `task-revoked` fields.
pub fn task_revoked(
    id: &str,
    terminated: bool,
    signum: Option<i32>,
    expired: bool,
) -> Vec<(&'static str, Value)> {
    vec![
        ("uuid", id.into()),
        ("terminated", terminated.into()),
        ("signum", signum.map_or(Value::Null, Value::from)),
        ("expired", expired.into()),
    ]
}

/// Fields of `worker-online`, `worker-heartbeat` and `worker-offline`.
pub fn worker_status(
    freq: f64,
    active: u64,
    processed: u64,
    loadavg: [f64; 3],
) -> Vec<(&'static str, Value)> {
    let round_up = |x: f64| (x * 100.0 - 1e-9).ceil() / 100.0;
    vec![
        ("freq", freq.into()),
        ("active", active.into()),
        ("processed", processed.into()),
        (
            "loadavg",
            Value::Array(loadavg.iter().map(|l| round_up(*l).into()).collect()),
        ),
        ("sw_ident", "celeriac".into()),
        ("sw_ver", env!("CARGO_PKG_VERSION").into()),
        ("sw_sys", "Linux".into()),
    ]
}

/// Fields of the heartbeat sent in answer to the `heartbeat` command.
pub fn worker_wakeup() -> Vec<(&'static str, Value)> {
    vec![
        ("freq", 5.into()),
        ("sw_ident", "celeriac".into()),
        ("sw_ver", env!("CARGO_PKG_VERSION").into()),
        ("sw_sys", "Linux".into()),
    ]
}
