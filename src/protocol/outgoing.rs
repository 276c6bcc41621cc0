//! Task messages the worker publishes itself: retries, re-publishes on
//! shutdown, and canvas continuations (chain steps, link and link_error).

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::{json, Map, Value};

use super::message::{Embed, TaskMessage};
use super::time::format_iso;
use crate::repr::{args_repr, python_repr};

/// A v2 task message ready to publish (the broker layer adds AMQP framing).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingTask {
    /// The task id (also the correlation id).
    pub id: String,
    /// v2 headers.
    pub headers: Map<String, Value>,
    /// `[args, kwargs, embed]` as JSON bytes.
    pub body: Vec<u8>,
    /// The rpc reply queue, if any.
    pub reply_to: Option<String>,
    /// Message priority.
    pub priority: u8,
    /// Where to publish: an explicit route, or `None` for "where the parent came from".
    pub route: Option<(String, String)>,
}

/// Headers RabbitMQ adds when it dead-letters a message or delivers it
/// again (a quorum queue's counts of returns and of deliveries).
pub const BROKER_HEADERS: &[&str] = &[
    "x-delivery-count",
    "x-acquired-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

fn embed_json(embed: &Embed) -> Value {
    let list = |v: &Vec<Value>| {
        if v.is_empty() {
            Value::Null
        } else {
            Value::Array(v.clone())
        }
    };
    json!({
        "callbacks": list(&embed.callbacks),
        "errbacks": list(&embed.errbacks),
        "chain": list(&embed.chain),
        "chord": embed.chord.clone().unwrap_or(Value::Null),
    })
}

fn body(args: &[Value], kwargs: &Map<String, Value>, embed: &Embed) -> Vec<u8> {
    serde_json::to_vec(&json!([args, kwargs, embed_json(embed)])).expect("JSON values serialize")
}

impl TaskMessage {
    /// The message's headers in v2 form (synthesized for a v1 message).
    pub fn v2_headers(&self) -> Map<String, Value> {
        if self.protocol == 2 {
            return self.headers.clone();
        }
        let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
        let time =
            |t: Option<DateTime<Utc>>| t.map_or(Value::Null, |t| Value::String(format_iso(t)));
        let mut h = Map::new();
        h.insert("lang".into(), "py".into());
        h.insert("task".into(), self.task.clone().into());
        h.insert("id".into(), self.id.clone().into());
        h.insert("shadow".into(), Value::Null);
        h.insert("eta".into(), time(self.eta));
        h.insert("expires".into(), time(self.expires));
        h.insert("group".into(), opt(&self.group));
        h.insert(
            "group_index".into(),
            self.group_index.map_or(Value::Null, Value::from),
        );
        h.insert("retries".into(), self.retries.into());
        h.insert(
            "timelimit".into(),
            json!([self.time_limit, self.soft_time_limit]),
        );
        h.insert(
            "root_id".into(),
            self.root_id
                .clone()
                .unwrap_or_else(|| self.id.clone())
                .into(),
        );
        h.insert("parent_id".into(), opt(&self.parent_id));
        h.insert("argsrepr".into(), args_repr(&self.args).into());
        h.insert(
            "kwargsrepr".into(),
            python_repr(&Value::Object(self.kwargs.clone())).into(),
        );
        h.insert("origin".into(), opt(&self.origin));
        h.insert(
            "ignore_result".into(),
            self.ignore_result.map_or(Value::Null, Value::Bool),
        );
        h.insert("replaced_task_nesting".into(), 0.into());
        h.insert("stamped_headers".into(), Value::Null);
        h.insert("stamps".into(), Value::Object(Map::new()));
        h
    }

    fn resend(&self, mut headers: Map<String, Value>) -> OutgoingTask {
        // What the broker wrote when it dead-lettered the message (through
        // the delayed-delivery levels, say) or delivered it again describes
        // that copy, not the new one: carried on, a death could make RabbitMQ
        // see a dead-letter cycle and drop the message, and a count would
        // carry the old copy's returns. Celery's retries leave these out too.
        for key in BROKER_HEADERS {
            headers.remove(*key);
        }
        OutgoingTask {
            id: self.id.clone(),
            headers,
            body: body(&self.args, &self.kwargs, &self.embed),
            reply_to: self.reply_to.clone(),
            priority: self.priority.unwrap_or(0),
            route: None,
        }
    }

    /// The re-publish for `self.retry()`: same id and arguments, `retries + 1`,
    /// the new `eta`, and `parent_id` = own id, as Celery's `Task.retry`.
    pub fn retry_message(&self, eta: DateTime<Utc>) -> OutgoingTask {
        let mut h = self.v2_headers();
        h.insert("retries".into(), (self.retries + 1).into());
        h.insert("eta".into(), format_iso(eta).into());
        h.insert("parent_id".into(), self.id.clone().into());
        self.resend(h)
    }

    /// The same request again, unchanged: used to hand an early-acked task
    /// back to the broker when a shutdown deadline stops it.
    pub fn republish_message(&self) -> OutgoingTask {
        self.resend(self.v2_headers())
    }
}

/// A Celery signature as found in `embed` (`{"task", "args", "kwargs", "options", "immutable", ...}`).
fn sig_field<'a>(sig: &'a Value, key: &str) -> Option<&'a Value> {
    sig.get(key).filter(|v| !v.is_null())
}

/// Builds the message that applies signature `sig` as a follow-up of
/// `parent`. `first_arg` is prepended to its args unless it is immutable
/// (the return value for chains and links, the task id for link_error).
/// `chain` becomes the new message's remaining chain. `origin` is this worker.
pub fn signature_message(
    sig: &Value,
    first_arg: Option<Value>,
    chain: Vec<Value>,
    parent: &TaskMessage,
    origin: &str,
    now: DateTime<Utc>,
) -> Result<OutgoingTask, String> {
    let task = sig_field(sig, "task")
        .and_then(Value::as_str)
        .ok_or("signature has no task name")?;
    if sig_field(sig, "subtask_type").is_some() {
        return Err(format!(
            "{task}: group and chord signatures are not supported"
        ));
    }
    let empty = Map::new();
    let options = sig_field(sig, "options")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let immutable = sig_field(sig, "immutable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut args: Vec<Value> = match sig_field(sig, "args") {
        Some(Value::Array(a)) => a.clone(),
        None => Vec::new(),
        Some(other) => return Err(format!("{task}: args must be a list, got {other}")),
    };
    if let (Some(arg), false) = (first_arg, immutable) {
        args.insert(0, arg);
    }
    let kwargs = match sig_field(sig, "kwargs") {
        Some(Value::Object(k)) => k.clone(),
        None => Map::new(),
        Some(other) => return Err(format!("{task}: kwargs must be a mapping, got {other}")),
    };
    let id = options
        .get("task_id")
        .and_then(Value::as_str)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let opt_str = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_owned);
    let eta = match options.get("countdown").and_then(Value::as_f64) {
        Some(s) => Some(format_iso(
            now + ChronoDuration::milliseconds((s * 1000.0) as i64),
        )),
        None => opt_str("eta"),
    };
    let sig_list = |k: &str| match options.get(k) {
        Some(Value::Array(a)) => a.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let embed = Embed {
        callbacks: sig_list("link"),
        errbacks: sig_list("link_error"),
        chain,
        chord: options.get("chord").cloned().filter(|c| !c.is_null()),
    };
    let root_id = parent.root_id.clone().unwrap_or_else(|| parent.id.clone());
    let headers = json!({
        "lang": "py",
        "task": task,
        "id": id,
        "shadow": opt_str("shadow"),
        "eta": eta,
        "expires": opt_str("expires"),
        "group": opt_str("group_id"),
        "group_index": options.get("group_index").cloned().unwrap_or(Value::Null),
        "retries": 0,
        "timelimit": [options.get("time_limit").cloned().unwrap_or(Value::Null), options.get("soft_time_limit").cloned().unwrap_or(Value::Null)],
        "root_id": root_id,
        "parent_id": parent.id,
        "argsrepr": args_repr(&args),
        "kwargsrepr": python_repr(&Value::Object(kwargs.clone())),
        "origin": origin,
        "ignore_result": options.get("ignore_result").and_then(Value::as_bool).unwrap_or(false),
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {},
    });
    let route = match (
        opt_str("queue"),
        opt_str("exchange"),
        opt_str("routing_key"),
    ) {
        (Some(queue), _, _) => Some((String::new(), queue)),
        (None, Some(exchange), Some(key)) => Some((exchange, key)),
        (None, None, Some(key)) => Some((String::new(), key)),
        _ => None,
    };
    Ok(OutgoingTask {
        id,
        headers: headers.as_object().cloned().expect("object literal"),
        body: body(&args, &kwargs, &embed),
        reply_to: opt_str("reply_to").or_else(|| parent.reply_to.clone()),
        priority: options
            .get("priority")
            .and_then(Value::as_u64)
            .map_or(0, |p| p.min(255) as u8),
        route,
    })
}
