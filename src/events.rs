//! Publishing Celery events. Task events are buffered and sent as JSON
//! arrays on `task.multi` (as Celery's prefork pool does): the buffer is
//! flushed as soon as the publishing loop is free, so a lone event goes out
//! at once and a burst shares messages. Worker events go out one by one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use lapin::options::ExchangeDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::debug;

use crate::broker::{json_properties, publish, BrokerError, Outgoing};
use crate::protocol::events::{
    routing_key, EventSource, BATCH_LIMIT, EVENT_EXCHANGE, TASK_BATCH_KEY,
};
use crate::protocol::unix_seconds;
use crate::shm::SharedState;

/// Declares the `celeryev` topic exchange exactly as Celery does.
pub async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            ShortString::from(EVENT_EXCHANGE),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("declare exchange celeryev"))
}

/// An event publisher for one process.
pub struct Events {
    source: EventSource,
    shm: Option<SharedState>,
    local_clock: AtomicU64,
    local_enabled: bool,
    channel: RwLock<Option<Channel>>,
    buffer: Mutex<Vec<String>>,
    pending: Notify,
}

impl Events {
    /// A publisher for node `source`. Clock and the on/off switch live in
    /// `shm` when the process is part of a worker.
    pub fn new(source: EventSource, shm: Option<SharedState>, enabled: bool) -> Self {
        Self {
            source,
            shm,
            local_clock: AtomicU64::new(0),
            local_enabled: enabled,
            channel: RwLock::new(None),
            buffer: Mutex::new(Vec::new()),
            pending: Notify::new(),
        }
    }

    /// Publishes on `channel` from now on.
    pub fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = Some(channel);
    }

    /// Whether task events are on.
    pub fn enabled(&self) -> bool {
        self.shm.map_or(self.local_enabled, |s| s.task_events())
    }

    fn clock(&self) -> u64 {
        match self.shm {
            Some(s) => s.tick_clock(),
            None => self.local_clock.fetch_add(1, Ordering::AcqRel) + 1,
        }
    }

    fn build(&self, kind: &str, fields: Vec<(&str, Value)>) -> String {
        self.source.encode(
            kind,
            self.clock(),
            unix_seconds(chrono::Utc::now()),
            &fields,
        )
    }

    /// Queues a task event (dropped when task events are off).
    pub fn task(&self, kind: &str, fields: Vec<(&str, Value)>) {
        if !self.enabled() {
            return;
        }
        let event = self.build(kind, fields);
        self.buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        self.pending.notify_one();
    }

    /// Task events waiting to be flushed.
    pub fn buffered(&self) -> usize {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Resolves when task events wait to be flushed.
    pub async fn pending(&self) {
        self.pending.notified().await;
    }

    /// Publishes every buffered task event, at most [`BATCH_LIMIT`] per message.
    pub async fn flush(&self) {
        let batch = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|e| e.into_inner()));
        for chunk in batch.chunks(BATCH_LIMIT) {
            let body = format!("[{}]", chunk.join(",")).into_bytes();
            self.send(TASK_BATCH_KEY, body).await;
        }
    }

    /// Publishes a worker event at once.
    pub async fn worker(&self, kind: &str, fields: Vec<(&str, Value)>) {
        let body = self.build(kind, fields).into_bytes();
        self.send(&routing_key(kind), body).await;
    }

    async fn send(&self, key: &str, body: Vec<u8>) {
        let Some(channel) = self
            .channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("hostname"),
            AMQPValue::LongString(LongString::from(self.source.hostname.as_str())),
        );
        let properties = json_properties(headers, 1, 0);
        let out = Outgoing {
            exchange: EVENT_EXCHANGE.into(),
            routing_key: key.into(),
            properties,
            body,
        };
        match publish(&channel, &out).await {
            Ok(()) => {
                if let Some(s) = self.shm {
                    s.count_events(1);
                }
            }
            // Events are best effort, as in Celery: a lost connection is
            // reported by the consumer, not once per event.
            Err(e) => debug!("event not sent: {e}"),
        }
    }
}
