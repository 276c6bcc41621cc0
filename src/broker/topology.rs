//! Queue and exchange declarations identical to kombu's, so a Python worker
//! or client sharing the broker never hits PRECONDITION_FAILED.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::warn;

use super::BrokerError;

/// A task queue as Celery's `-Q name` creates it: a durable queue bound to a
/// durable direct exchange of the same name with the queue name as key.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Exchange name (the queue name by default; `celery` for `celery`).
    pub exchange: String,
    /// Exchange type (kombu's default is direct).
    pub exchange_kind: ExchangeType,
    /// Routing key.
    pub routing_key: String,
    /// `x-queue-type` (`quorum`), when set.
    pub queue_type: Option<String>,
    /// `x-max-priority`, when set.
    pub max_priority: Option<u8>,
}

/// The type of a consumed queue's exchange. AMQP cannot read an existing
/// exchange's type, so it is configured (`--exchange-type`): native delayed
/// delivery works only through a non-direct exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExchangeType {
    /// kombu's default.
    #[default]
    Direct,
    /// Needed for RabbitMQ's native delayed delivery with quorum queues.
    Topic,
}

impl QueueSpec {
    /// The spec Celery uses for `-Q name`.
    pub fn celery_default(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            exchange: name.to_owned(),
            exchange_kind: ExchangeType::Direct,
            routing_key: name.to_owned(),
            queue_type: None,
            max_priority: None,
        }
    }

    /// The queue arguments kombu would send.
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(kind) = &self.queue_type {
            args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from(kind.as_str())),
            );
        }
        if let Some(p) = self.max_priority {
            args.insert(
                ShortString::from("x-max-priority"),
                AMQPValue::LongInt(i32::from(p)),
            );
        }
        args
    }
}

/// Declares exchange `name` of `kind` (no arguments, not auto-deleted),
/// as kombu declares Celery's own exchanges.
pub async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            ShortString::from(name),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("declare exchange {name}")))
}

/// Declares the exchange, the queue and the binding. When the broker already
/// holds the queue with other arguments (for example a quorum queue Python
/// declared), it falls back to a passive declare and uses the queue as it is.
/// Uses its own channel so a refused declare cannot close a consuming channel.
pub async fn declare_queue(conn: &Connection, spec: &QueueSpec) -> Result<(), BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    let exchange_ok = channel
        .exchange_declare(
            ShortString::from(spec.exchange.as_str()),
            match spec.exchange_kind {
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Topic => ExchangeKind::Topic,
            },
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let channel = match exchange_ok {
        Ok(()) => channel,
        Err(e) if is_precondition_failed(&e) => {
            warn!(exchange = %spec.exchange, "exchange exists with other settings; using it as it is: {e}");
            conn.create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?
        }
        Err(source) => {
            return Err(BrokerError::Amqp {
                what: format!("declare exchange {}", spec.exchange),
                source,
            })
        }
    };
    let declared = channel
        .queue_declare(
            ShortString::from(spec.name.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            spec.arguments(),
        )
        .await;
    let channel = match declared {
        Ok(_) => channel,
        Err(e) if is_precondition_failed(&e) => {
            warn!(queue = %spec.name, "queue exists with other arguments; consuming it as declared: {e}");
            let passive = conn
                .create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?;
            passive
                .queue_declare(
                    ShortString::from(spec.name.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::amqp(format!(
                    "declare queue {} (passive)",
                    spec.name
                )))?;
            passive
        }
        Err(source) => {
            return Err(BrokerError::Amqp {
                what: format!("declare queue {}", spec.name),
                source,
            })
        }
    };
    if !spec.exchange.is_empty() {
        channel
            .queue_bind(
                ShortString::from(spec.name.as_str()),
                ShortString::from(spec.exchange.as_str()),
                ShortString::from(spec.routing_key.as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("bind queue {}", spec.name)))?;
    }
    close_quietly(&channel).await;
    Ok(())
}

async fn close_quietly(channel: &Channel) {
    let _ = channel.close(200, ShortString::from("declared")).await;
}

/// Whether an error is a 406 PRECONDITION_FAILED from the broker.
pub fn is_precondition_failed(error: &lapin::Error) -> bool {
    error.to_string().contains("PRECONDITION_FAILED") || error.to_string().contains("406")
}
