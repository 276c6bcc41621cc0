//! A received task message, from delivery to decision.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
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
