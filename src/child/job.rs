//! A received task message, from delivery to decision.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::BasicProperties;
use serde_json::{Map, Value};
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use futures_lite::future::poll_once;
use lapin::types::DeliveryTag;
use lapin::{Acker, Channel};
use tracing::{debug, warn};

use crate::broker::table_to_json;
use crate::protocol::{DecodeError, RawMessage, TaskMessage};
use crate::task::DeliveryInfo;

/// A decoded task and the handle that settles its message.
pub struct Job {
    /// The decoded request.
    pub msg: Arc<TaskMessage>,
    /// Settles the broker message.
    pub settler: Settler,
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
        settler: Box<Settler>,
    },
}

/// Settles one delivery, once: the first of [`ack`](Self::ack),
/// [`reject`](Self::reject) and [`requeue`](Self::requeue) acts, later calls
/// on it or its clones do nothing (as lapin's `Acker`, which it wraps).
///
/// The ack, once per task, goes straight onto the consuming channel: lapin's
/// `Acker` routes it through the connection's internal command queue, which
/// wakes the connection's I/O thread up to three times for one frame (a
/// futex wake-up each, measured: 2.0 switches of that thread per task against
/// 1.5 this way, docs/design/python-task-cost.md). lapin's `Acker` does the
/// same `basic.ack` on the same channel once it is dequeued; nothing recovers
/// a channel under another epoch here (lapin's auto-recovery is off), so the
/// delivery tag is the channel's own. Rejections and requeues, rare, go
/// through the `Acker` and wait for their frame to be written.
#[derive(Clone)]
pub struct Settler {
    acker: Acker,
    channel: Channel,
    tag: DeliveryTag,
    settled: Arc<AtomicBool>,
    returns: Option<u64>,
}

impl Settler {
    /// The settler of a delivery `tag` received on `channel`.
    pub fn new(acker: Acker, channel: Channel, tag: DeliveryTag) -> Self {
        Self {
            acker,
            channel,
            tag,
            settled: Arc::new(AtomicBool::new(false)),
            returns: None,
        }
    }

    /// The returns the broker counted against the queue's delivery limit
    /// before this delivery, where a requeue counts too (see
    /// [`counted_returns`]); `None`: a requeue is not counted.
    pub fn counted_returns(&self) -> Option<u64> {
        self.returns
    }

    /// Whether the channel the delivery came on is still open (an ack would
    /// reach the broker).
    pub fn channel_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// True the first time only.
    fn first(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }

    /// Acknowledges the message.
    ///
    /// The ack frame is handed to the connection before this returns, but
    /// the write itself is not awaited: a task never waits on a round trip to
    /// the connection's I/O thread. If the channel is gone the ack is lost
    /// with it (as an `Acker`'s would be, without a word), and the broker
    /// redelivers the message (the connection loss is logged by the
    /// consumer).
    pub async fn ack(&self, id: &str) {
        if !self.first() {
            return;
        }
        if !self.channel.status().connected() {
            debug!(task_id = %id, "not acking {id}: its channel is closed");
            return;
        }
        let send = self.channel.basic_ack(self.tag, BasicAckOptions::default());
        if let Some(Err(e)) = poll_once(send).await {
            warn!(task_id = %id, "couldn't ack {id}: {e}");
        }
    }

    /// Rejects, requeued or not.
    pub async fn reject(&self, id: &str, requeue: bool) {
        if !self.first() {
            return;
        }
        if let Err(e) = self.acker.reject(BasicRejectOptions { requeue }).await {
            warn!(task_id = %id, "couldn't reject {id}: {e}");
        }
    }

    /// Hands the message back to the queue.
    pub async fn requeue(&self, id: &str) {
        if !self.first() {
            return;
        }
        if let Err(e) = self
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
        {
            warn!(task_id = %id, "couldn't requeue {id}: {e}");
        }
    }
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

/// How many returns of this message a quorum queue counted against its
/// delivery limit, when a requeue would count once more: its
/// `x-delivery-count`, unless the broker also sets `x-acquired-count`
/// (RabbitMQ 4.3 and later, where `basic.nack` with requeue is not counted).
/// `None` on a classic queue and on 4.3.
pub fn counted_returns(headers: &Map<String, Value>) -> Option<u64> {
    if headers.contains_key("x-acquired-count") {
        return None;
    }
    headers.get("x-delivery-count").and_then(Value::as_u64)
}

/// Decodes a delivery consumed from `queue` on `channel` into a [`Job`].
pub fn decode(d: Delivery, queue: Arc<str>, channel: &Channel) -> Decoded {
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
    let returns = counted_returns(&raw.headers);
    let id = raw.message_id();
    let decoded = TaskMessage::decode(raw);
    let mut settler = Settler::new(d.acker, channel.clone(), d.delivery_tag);
    settler.returns = returns;
    match decoded {
        Ok(msg) => Decoded::Job(Box::new(Job {
            msg: Arc::new(msg),
            settler,
            delivery,
            queue,
        })),
        Err(error) => Decoded::Bad {
            id,
            error,
            settler: Box::new(settler),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    #[test]
    fn returns_count_where_a_requeue_counts() {
        let headers = |v: Value| v.as_object().cloned().unwrap();
        // A quorum queue before RabbitMQ 4.3.
        let before = headers(serde_json::json!({"id": "t", "x-delivery-count": 3}));
        assert_eq!(counted_returns(&before), Some(3));
        // 4.3 adds x-acquired-count and stops counting requeues.
        let since = headers(serde_json::json!({"x-delivery-count": 3, "x-acquired-count": 5}));
        assert_eq!(counted_returns(&since), None);
        // A classic queue, or a first delivery where the header is absent.
        assert_eq!(
            counted_returns(&headers(serde_json::json!({"id": "t"}))),
            None
        );
    }

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

    /// A settled delivery is settled once: a requeue after the ack (or an
    /// ack after the requeue) sends nothing. A second settle of one delivery
    /// tag would make the broker close the channel (PRECONDITION_FAILED,
    /// unknown delivery tag) and redeliver everything unacked on it.
    ///
    /// Talks to the RabbitMQ of `tests/run.sh` (`CELERIAC_TEST_AMQP_URL`,
    /// default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    #[tokio::test]
    async fn a_delivery_is_settled_once_on_a_real_broker() {
        use futures_lite::StreamExt;
        use lapin::options::{
            BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
        };
        use lapin::types::FieldTable;
        use std::time::Duration;

        let url = std::env::var("CELERIAC_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let conn = crate::broker::connect(&url, "celeriac settler test")
            .await
            .expect("this test needs RabbitMQ (tests/run.sh starts it)");
        let channel = conn.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let name = queue.name().clone();
        for body in [&b"first"[..], &b"second"[..]] {
            channel
                .basic_publish(
                    ShortString::from(""),
                    name.clone(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default(),
                )
                .await
                .unwrap();
        }
        channel
            .basic_qos(2, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                name.clone(),
                ShortString::from("settler-test"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery within 10 s")
                .expect("the consumer is open")
                .expect("a delivery, not an error")
        };
        let first = next().await;
        let second = next().await;
        assert_eq!(&*first.data, b"first");

        // Acked, then handed back: only the ack goes out.
        let one = Settler::new(first.acker, channel.clone(), first.delivery_tag);
        one.ack("first").await;
        one.clone().requeue("first").await;
        // Handed back, then acked and rejected: only the requeue goes out.
        let two = Settler::new(second.acker, channel.clone(), second.delivery_tag);
        two.requeue("second").await;
        two.ack("second").await;
        two.reject("second", false).await;

        // The second message comes back once, redelivered; nothing else does.
        let again = next().await;
        assert_eq!(&*again.data, b"second");
        assert!(again.redelivered);
        Settler::new(again.acker, channel.clone(), again.delivery_tag)
            .ack("second")
            .await;
        let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        assert!(more.is_err(), "nothing else is delivered: {more:?}");
        // A double settle would have closed the channel by now.
        assert!(channel.status().connected(), "the channel was closed");
        let count = channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the channel is still open")
            .message_count();
        assert_eq!(count, 0, "both messages are acknowledged");
        let _ = conn.close(200, ShortString::from("bye")).await;
    }
}
