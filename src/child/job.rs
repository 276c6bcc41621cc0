//! A received task message, from delivery to decision.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::BasicProperties;
use serde_json::{Map, Value};
use std::sync::Arc;

use futures_lite::future::poll_once;
use lapin::Acker;
use tracing::warn;

use crate::broker::table_to_json;
use crate::protocol::{DecodeError, RawMessage, TaskMessage};
use crate::task::DeliveryInfo;

/// A decoded task and the handle that settles its message.
pub struct Job {
    /// The decoded request.
    pub msg: Arc<TaskMessage>,
    /// Settles the broker message.
    pub acker: Acker,
    /// Where it came from.
    pub delivery: DeliveryInfo,
    /// The queue it was consumed from.
    pub queue: Arc<str>,
}

/// The outcome of decoding one delivery.
pub enum Decoded {
    /// A task to run (now or at its ETA).
    Job(Box<Job>),
    /// A message that cannot be run: reject it, naming it by this id.
    Bad {
        id: String,
        error: DecodeError,
        acker: Acker,
    },
}

/// The AMQP properties a message carries besides those decoded on their own
/// (content type and encoding, headers, correlation id, reply-to, priority),
/// by the names py-amqp gives them, for a Python task's `request.properties`.
pub fn other_properties(p: &BasicProperties) -> Map<String, Value> {
    let mut out = Map::new();
    let mut text = |name: &str, v: &Option<lapin::types::ShortString>| {
        if let Some(v) = v {
            out.insert(name.to_owned(), v.as_str().into());
        }
    };
    text("expiration", p.expiration());
    text("message_id", p.message_id());
    text("type", p.kind());
    text("user_id", p.user_id());
    text("app_id", p.app_id());
    text("cluster_id", p.cluster_id());
    if let Some(mode) = p.delivery_mode() {
        out.insert("delivery_mode".into(), (*mode).into());
    }
    if let Some(at) = p.timestamp() {
        out.insert("timestamp".into(), (*at).into());
    }
    out
}

/// Decodes a delivery consumed from `queue` into a [`Job`].
pub fn decode(d: Delivery, queue: Arc<str>) -> Decoded {
    let headers = d
        .properties
        .headers()
        .as_ref()
        .map(table_to_json)
        .unwrap_or_default();
    let raw = RawMessage {
        content_type: d.properties.content_type().as_ref().map(|s| s.as_str()),
        content_encoding: d.properties.content_encoding().as_ref().map(|s| s.as_str()),
        headers,
        correlation_id: d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: d.properties.reply_to().as_ref().map(|s| s.as_str()),
        priority: *d.properties.priority(),
        properties: other_properties(&d.properties),
        body: &d.data,
    };
    let delivery = DeliveryInfo {
        exchange: d.exchange.as_str().to_owned(),
        routing_key: d.routing_key.as_str().to_owned(),
        priority: d.properties.priority().unwrap_or(0),
        redelivered: d.redelivered,
    };
    let id = raw.message_id();
    match TaskMessage::decode(raw) {
        Ok(msg) => Decoded::Job(Box::new(Job {
            msg: Arc::new(msg),
            acker: d.acker,
            delivery,
            queue,
        })),
        Err(error) => Decoded::Bad {
            id,
            error,
            acker: d.acker,
        },
    }
}

/// Acknowledges the message.
///
/// The ack frame is handed to the connection before this returns, but the
/// write itself is not awaited: a task never waits on a round trip to the
/// connection's I/O thread. If the channel is gone the ack is lost with it,
/// and the broker redelivers the message (the connection loss is logged by
/// the consumer).
pub async fn ack(acker: &Acker, id: &str) {
    let send = acker.ack(BasicAckOptions::default());
    if let Some(Err(e)) = poll_once(send).await {
        warn!(task_id = %id, "couldn't ack {id}: {e}");
    }
}

/// Rejects, requeued or not.
pub async fn reject(acker: &Acker, id: &str, requeue: bool) {
    if let Err(e) = acker.reject(BasicRejectOptions { requeue }).await {
        warn!(task_id = %id, "couldn't reject {id}: {e}");
    }
}

/// Hands a message back to the queue.
pub async fn requeue(acker: &Acker, id: &str) {
    if let Err(e) = acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
    {
        warn!(task_id = %id, "couldn't requeue {id}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    #[test]
    fn other_properties_are_named_as_py_amqp_names_them() {
        let p = BasicProperties::default()
            .with_app_id(ShortString::from("billing"))
            .with_delivery_mode(2)
            .with_timestamp(1_700_000_000)
            .with_type(ShortString::from("invoice"))
            .with_correlation_id(ShortString::from("not-here"));
        let props = other_properties(&p);
        assert_eq!(
            Value::Object(props),
            serde_json::json!({"app_id": "billing", "type": "invoice", "delivery_mode": 2, "timestamp": 1_700_000_000})
        );
        assert!(other_properties(&BasicProperties::default()).is_empty());
    }
}
