//! Task messages: protocol v2 (headers + `[args, kwargs, embed]`) and v1
//! (everything in a JSON object body), decoded without any I/O.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use thiserror::Error;

use super::time::parse_iso;

/// The only serializer the worker deserializes.
pub const ACCEPTED_CONTENT_TYPE: &str = "application/json";

/// Content types that are refused without ever being deserialized.
pub const REJECTED_CONTENT_TYPES: &[&str] = &[
    "application/x-python-serialize",
    "application/x-yaml",
    "application/x-msgpack",
];

/// A message as it came off the broker, before decoding.
#[derive(Debug, Clone, Default)]
pub struct RawMessage<'a> {
    /// The `content_type` property.
    pub content_type: Option<&'a str>,
    /// The `content_encoding` property.
    pub content_encoding: Option<&'a str>,
    /// The application headers, already converted to JSON values.
    pub headers: Map<String, Value>,
    /// The `correlation_id` property.
    pub correlation_id: Option<&'a str>,
    /// The `reply_to` property.
    pub reply_to: Option<&'a str>,
    /// The `priority` property.
    pub priority: Option<u8>,
    /// The other AMQP properties the message came with, by the names
    /// py-amqp gives them (`delivery_mode`, `app_id`, `message_id`,
    /// `timestamp`, `type`, `user_id`, `expiration`, `cluster_id`): a
    /// Python task's `request.properties`.
    pub properties: Map<String, Value>,
    /// The message body.
    pub body: &'a [u8],
}

impl RawMessage<'_> {
    /// The best id to name this message by in logs, even when it cannot be decoded.
    pub fn message_id(&self) -> String {
        self.headers
            .get("id")
            .and_then(Value::as_str)
            .or(self.correlation_id)
            .map(str::to_owned)
            .or_else(|| {
                serde_json::from_slice::<Value>(self.body)
                    .ok()
                    .and_then(|b| b.get("id").and_then(Value::as_str).map(str::to_owned))
            })
            .unwrap_or_else(|| "<no id>".to_owned())
    }
}

/// Why a message could not become a [`TaskMessage`].
///
/// Every variant leads to `basic.reject(requeue=false)`: the message is
/// dead-lettered when its queue has a dead-letter exchange and is never
/// redelivered in a loop.
#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    /// A serializer the worker refuses to run (pickle, YAML, msgpack, ...).
    #[error("refusing to deserialize untrusted content of type {0}")]
    ContentDisallowed(String),
    /// Compressed bodies are not supported.
    #[error("compressed task bodies ({0}) are not supported")]
    Compressed(String),
    /// The body is not valid JSON (or not UTF-8).
    #[error("can't decode message body: {0}")]
    Body(String),
    /// Neither a `task` header nor a v1 body with a `task` key.
    #[error("unknown message: no task header and no task in the body")]
    Unknown,
    /// A Celery message whose fields have the wrong shape.
    #[error("invalid task message: {0}")]
    Invalid(String),
}

/// The signatures carried in a v2 body's third element.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embed {
    /// Signatures applied with the result after success (`link`).
    pub callbacks: Vec<Value>,
    /// Signatures applied with the task id after failure (`link_error`).
    pub errbacks: Vec<Value>,
    /// Remaining chain steps, stored reversed: the next one is last.
    pub chain: Vec<Value>,
    /// The chord body signature, when this task is a chord header member.
    pub chord: Option<Value>,
}

/// A decoded Celery task request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskMessage {
    /// 1 or 2.
    pub protocol: u8,
    /// The task id.
    pub id: String,
    /// The registered task name.
    pub task: String,
    /// An alias for logs and events.
    pub shadow: Option<String>,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Canvas signatures (callbacks, errbacks, chain, chord).
    pub embed: Embed,
    /// Do not run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Revoke (expired) if not started by this time.
    pub expires: Option<DateTime<Utc>>,
    /// How many times this task was retried already.
    pub retries: u32,
    /// `[hard, soft]` time limits in seconds.
    pub time_limit: Option<f64>,
    /// The soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// The id of the first task in the workflow.
    pub root_id: Option<String>,
    /// The id of the task that sent this one.
    pub parent_id: Option<String>,
    /// The group id, for group members.
    pub group: Option<String>,
    /// The index within the group.
    pub group_index: Option<i64>,
    /// The sender's node name.
    pub origin: Option<String>,
    /// `ignore_result` as sent; `None` means "use the task's setting".
    pub ignore_result: Option<bool>,
    /// The sender's repr of the positional arguments.
    pub argsrepr: Option<String>,
    /// The sender's repr of the keyword arguments.
    pub kwargsrepr: Option<String>,
    /// The rpc reply queue.
    pub reply_to: Option<String>,
    /// The correlation id (the task id for Celery clients).
    pub correlation_id: Option<String>,
    /// The message priority.
    pub priority: Option<u8>,
    /// The original v2 headers (empty for v1), kept for re-publishing.
    pub headers: Map<String, Value>,
    /// The other AMQP properties it came with ([`RawMessage::properties`]).
    pub properties: Map<String, Value>,
}

impl TaskMessage {
    /// Decodes a raw broker message.
    pub fn decode(raw: RawMessage<'_>) -> Result<Self, DecodeError> {
        let content_type = raw.content_type.unwrap_or("").trim().to_ascii_lowercase();
        if content_type != ACCEPTED_CONTENT_TYPE {
            let shown = if content_type.is_empty() {
                "<none>".to_owned()
            } else {
                content_type
            };
            return Err(DecodeError::ContentDisallowed(shown));
        }
        if let Some(codec) = raw.headers.get("compression").and_then(Value::as_str) {
            return Err(DecodeError::Compressed(codec.to_owned()));
        }
        if let Some(enc) = raw.content_encoding {
            let enc = enc.to_ascii_lowercase();
            if !matches!(enc.as_str(), "utf-8" | "utf8" | "") {
                return Err(DecodeError::Body(format!(
                    "unsupported content encoding {enc}"
                )));
            }
        }
        let body: Value =
            serde_json::from_slice(raw.body).map_err(|e| DecodeError::Body(e.to_string()))?;
        if raw.headers.contains_key("task") {
            if body.is_object() && body.get("args").is_some() {
                // A v2 task header over a v1 body (`hybrid_to_proto2`).
                return decode_v1(&raw, &body);
            }
            decode_v2(raw, body)
        } else if body.get("task").is_some() {
            decode_v1(&raw, &body)
        } else {
            Err(DecodeError::Unknown)
        }
    }

    /// The name shown in logs and events: the shadow name when set.
    pub fn display_name(&self) -> &str {
        self.shadow.as_deref().unwrap_or(&self.task)
    }
}

fn opt_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>, DecodeError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(DecodeError::Invalid(format!(
            "{key} must be a string, got {other}"
        ))),
    }
}

fn opt_time(map: &Map<String, Value>, key: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    match opt_str(map, key)? {
        None => Ok(None),
        Some(text) => parse_iso(&text)
            .map(Some)
            .ok_or_else(|| DecodeError::Invalid(format!("invalid {key} value {text:?}"))),
    }
}

fn retries(map: &Map<String, Value>) -> Result<u32, DecodeError> {
    match map.get("retries") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                DecodeError::Invalid(format!("retries must be a non-negative integer, got {v}"))
            }),
    }
}

fn time_limits(map: &Map<String, Value>) -> Result<(Option<f64>, Option<f64>), DecodeError> {
    let limit = |v: &Value| -> Result<Option<f64>, DecodeError> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64().filter(|f| *f > 0.0)),
            other => Err(DecodeError::Invalid(format!(
                "time limit must be a number, got {other}"
            ))),
        }
    };
    match map.get("timelimit") {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(pair)) if pair.len() == 2 => Ok((limit(&pair[0])?, limit(&pair[1])?)),
        Some(other) => Err(DecodeError::Invalid(format!(
            "timelimit must be [hard, soft], got {other}"
        ))),
    }
}

fn signatures(value: Option<&Value>, what: &str) -> Result<Vec<Value>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(one @ Value::Object(_)) => Ok(vec![one.clone()]),
        Some(other) => Err(DecodeError::Invalid(format!(
            "{what} must be a list of signatures, got {other}"
        ))),
    }
}

fn args_kwargs(
    args: Option<&Value>,
    kwargs: Option<&Value>,
) -> Result<(Vec<Value>, Map<String, Value>), DecodeError> {
    let args = match args {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => {
            return Err(DecodeError::Invalid(format!(
                "task args must be a list, got {other}"
            )))
        }
    };
    let kwargs = match kwargs {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(k)) => k.clone(),
        Some(other) => {
            return Err(DecodeError::Invalid(format!(
                "task keyword arguments must be a mapping, got {other}"
            )))
        }
    };
    Ok((args, kwargs))
}

fn decode_v2(raw: RawMessage<'_>, body: Value) -> Result<TaskMessage, DecodeError> {
    let h = &raw.headers;
    let task =
        opt_str(h, "task")?.ok_or_else(|| DecodeError::Invalid("task header is empty".into()))?;
    let id = opt_str(h, "id")?.ok_or_else(|| DecodeError::Invalid("missing id header".into()))?;
    let Value::Array(parts) = body else {
        return Err(DecodeError::Invalid(
            "body must be [args, kwargs, embed]".into(),
        ));
    };
    if parts.len() != 3 {
        return Err(DecodeError::Invalid(format!(
            "body must be [args, kwargs, embed], got {} elements",
            parts.len()
        )));
    }
    let (args, kwargs) = args_kwargs(parts.first(), parts.get(1))?;
    let embed = match &parts[2] {
        Value::Null => Embed::default(),
        Value::Object(e) => Embed {
            callbacks: signatures(e.get("callbacks"), "callbacks")?,
            errbacks: signatures(e.get("errbacks"), "errbacks")?,
            chain: signatures(e.get("chain"), "chain")?,
            chord: e.get("chord").filter(|c| !c.is_null()).cloned(),
        },
        other => {
            return Err(DecodeError::Invalid(format!(
                "embed must be a mapping, got {other}"
            )))
        }
    };
    let (time_limit, soft_time_limit) = time_limits(h)?;
    Ok(TaskMessage {
        protocol: 2,
        id,
        task,
        shadow: opt_str(h, "shadow")?,
        args,
        kwargs,
        embed,
        eta: opt_time(h, "eta")?,
        expires: opt_time(h, "expires")?,
        retries: retries(h)?,
        time_limit,
        soft_time_limit,
        root_id: opt_str(h, "root_id")?,
        parent_id: opt_str(h, "parent_id")?,
        group: opt_str(h, "group")?,
        group_index: h.get("group_index").and_then(Value::as_i64),
        origin: opt_str(h, "origin")?,
        ignore_result: h.get("ignore_result").and_then(Value::as_bool),
        argsrepr: opt_str(h, "argsrepr")?,
        kwargsrepr: opt_str(h, "kwargsrepr")?,
        reply_to: raw.reply_to.filter(|s| !s.is_empty()).map(str::to_owned),
        correlation_id: raw.correlation_id.map(str::to_owned),
        priority: raw.priority,
        headers: raw.headers,
        properties: raw.properties,
    })
}

fn decode_v1(raw: &RawMessage<'_>, body: &Value) -> Result<TaskMessage, DecodeError> {
    let Value::Object(b) = body else {
        return Err(DecodeError::Unknown);
    };
    let task = opt_str(b, "task")?
        .or(opt_str(&raw.headers, "task")?)
        .ok_or_else(|| DecodeError::Invalid("task name is empty".into()))?;
    let id = opt_str(b, "id")?
        .or(opt_str(&raw.headers, "id")?)
        .ok_or_else(|| DecodeError::Invalid("missing task id".into()))?;
    let (args, kwargs) = args_kwargs(b.get("args"), b.get("kwargs"))?;
    let (time_limit, soft_time_limit) = time_limits(b)?;
    Ok(TaskMessage {
        protocol: 1,
        id,
        task,
        shadow: None,
        args,
        kwargs,
        embed: Embed {
            callbacks: signatures(b.get("callbacks"), "callbacks")?,
            errbacks: signatures(b.get("errbacks"), "errbacks")?,
            chain: Vec::new(),
            chord: b.get("chord").filter(|c| !c.is_null()).cloned(),
        },
        eta: opt_time(b, "eta")?,
        expires: opt_time(b, "expires")?,
        retries: retries(b)?,
        time_limit,
        soft_time_limit,
        root_id: None,
        parent_id: None,
        group: opt_str(b, "taskset")?.or(opt_str(b, "group")?),
        group_index: b.get("group_index").and_then(Value::as_i64),
        origin: None,
        ignore_result: None,
        argsrepr: None,
        kwargsrepr: None,
        reply_to: raw.reply_to.filter(|s| !s.is_empty()).map(str::to_owned),
        correlation_id: raw.correlation_id.map(str::to_owned),
        priority: raw.priority,
        headers: Map::new(),
        properties: raw.properties.clone(),
    })
}
