//! Queue and exchange declarations identical to kombu's, so a Python worker
//! or client sharing the broker never hits PRECONDITION_FAILED.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use serde_json::{Map, Value};
use tracing::warn;

use super::{json_to_table, BrokerError};

/// A task queue as kombu declares it: Celery's `-Q name` gives a durable
/// queue bound to a durable direct exchange of the same name with the queue
/// name as key; an app's `task_queues` may say more (arguments, other
/// exchanges, extra bindings, consumer arguments), and all of it is declared
/// as kombu would, so the app's producers find the queue as they expect it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Exchange name (the queue name by default; `celery` for `celery`;
    /// empty: the default exchange, no binding).
    pub exchange: String,
    /// Exchange type (kombu's default is direct).
    pub exchange_kind: ExchangeType,
    /// Routing key.
    pub routing_key: String,
    /// `x-queue-type` (`quorum`), when set.
    pub queue_type: Option<String>,
    /// `x-max-priority`, when set.
    pub max_priority: Option<u8>,
    /// The rest of what is declared, as kombu's entities hold it.
    pub declared: Declared,
}

/// What a queue's declaration holds beyond its name, exchange and key.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    /// Every other queue argument (`x-dead-letter-exchange`,
    /// `x-message-ttl`, `x-overflow`, `x-single-active-consumer`, …).
    pub queue_arguments: Map<String, Value>,
    /// The queue survives a broker restart.
    pub durable: bool,
    /// The queue is deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The queue belongs to the declaring connection.
    pub exclusive: bool,
    /// Not declared at all (kombu's `no_declare`): it must exist.
    pub no_declare: bool,
    /// The exchange survives a broker restart.
    pub exchange_durable: bool,
    /// The exchange is deleted when its last binding goes.
    pub exchange_auto_delete: bool,
    /// The exchange's arguments (`alternate-exchange`, …).
    pub exchange_arguments: Map<String, Value>,
    /// The exchange is not declared (kombu's `no_declare`).
    pub exchange_no_declare: bool,
    /// The binding's arguments (a headers exchange's match).
    pub binding_arguments: Map<String, Value>,
    /// Bindings beyond the queue's own exchange (kombu's `bindings=`).
    pub bindings: Vec<Binding>,
    /// `basic.consume` arguments (`x-priority`, …).
    pub consumer_arguments: Map<String, Value>,
}

impl Default for Declared {
    fn default() -> Self {
        Self {
            queue_arguments: Map::new(),
            durable: true,
            auto_delete: false,
            exclusive: false,
            no_declare: false,
            exchange_durable: true,
            exchange_auto_delete: false,
            exchange_arguments: Map::new(),
            exchange_no_declare: false,
            binding_arguments: Map::new(),
            bindings: Vec::new(),
            consumer_arguments: Map::new(),
        }
    }
}

/// One extra binding of a queue, with its exchange as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// Exchange name.
    pub exchange: String,
    /// Exchange type.
    pub exchange_kind: ExchangeType,
    /// The exchange survives a broker restart.
    pub exchange_durable: bool,
    /// The exchange is deleted when its last binding goes.
    pub exchange_auto_delete: bool,
    /// The exchange's arguments.
    pub exchange_arguments: Map<String, Value>,
    /// The exchange is not declared (kombu's `no_declare`, `amq.*`).
    pub exchange_no_declare: bool,
    /// Routing key.
    pub routing_key: String,
    /// The binding's arguments.
    pub arguments: Map<String, Value>,
}

/// An exchange's type. AMQP cannot read an existing exchange's type: it is
/// configured (`--exchange-type`, the app's `task_queues`) and, when the
/// broker already holds the exchange as another type, found by declaring
/// (see [`declare_queue`]). Native delayed delivery works only through a
/// non-direct exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExchangeType {
    /// kombu's default.
    #[default]
    Direct,
    /// Needed for RabbitMQ's native delayed delivery with quorum queues.
    Topic,
    /// Every bound queue gets every message.
    Fanout,
    /// Routed by header values.
    Headers,
}

impl ExchangeType {
    /// All four, in the order an existing exchange's type is tried.
    pub const ALL: [ExchangeType; 4] = [
        ExchangeType::Topic,
        ExchangeType::Direct,
        ExchangeType::Fanout,
        ExchangeType::Headers,
    ];

    /// The type from its AMQP name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => Self::Direct,
            "topic" => Self::Topic,
            "fanout" => Self::Fanout,
            "headers" => Self::Headers,
            _ => return None,
        })
    }

    /// Its AMQP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Headers => "headers",
        }
    }

    fn kind(self) -> ExchangeKind {
        match self {
            Self::Direct => ExchangeKind::Direct,
            Self::Topic => ExchangeKind::Topic,
            Self::Fanout => ExchangeKind::Fanout,
            Self::Headers => ExchangeKind::Headers,
        }
    }
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
            declared: Declared::default(),
        }
    }

    /// The queue arguments kombu would send.
    pub fn arguments(&self) -> FieldTable {
        let mut args = json_to_table(&self.declared.queue_arguments);
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

    /// Every queue argument as JSON, as `inspect active_queues` reports them.
    pub fn arguments_json(&self) -> Map<String, Value> {
        let mut args = self.declared.queue_arguments.clone();
        if let Some(kind) = &self.queue_type {
            args.insert("x-queue-type".into(), kind.as_str().into());
        }
        if let Some(p) = self.max_priority {
            args.insert("x-max-priority".into(), p.into());
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

/// An exchange to declare.
struct ExchangeDecl<'a> {
    name: &'a str,
    kind: ExchangeType,
    durable: bool,
    auto_delete: bool,
    arguments: &'a Map<String, Value>,
}

impl<'a> ExchangeDecl<'a> {
    /// The queue's own exchange as configured.
    fn of(spec: &'a QueueSpec) -> Self {
        let d = &spec.declared;
        Self {
            name: &spec.exchange,
            kind: spec.exchange_kind,
            durable: d.exchange_durable,
            auto_delete: d.exchange_auto_delete,
            arguments: &d.exchange_arguments,
        }
    }
}

async fn try_exchange(channel: &Channel, e: &ExchangeDecl<'_>) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            ShortString::from(e.name),
            e.kind.kind(),
            ExchangeDeclareOptions {
                durable: e.durable,
                auto_delete: e.auto_delete,
                ..Default::default()
            },
            json_to_table(e.arguments),
        )
        .await
}

async fn open(conn: &Connection) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))
}

/// Declares the exchange as configured. When the broker holds it with
/// other settings (406), finds the type it really has by declaring it with
/// each type in turn (a declaration equal to the existing one changes
/// nothing) and adopts that type, with one warning: routing through the
/// exchange — native delayed delivery above all — depends on it. Returns
/// the type in force and a usable channel.
async fn declare_exchange_adopting(
    conn: &Connection,
    channel: Channel,
    e: &ExchangeDecl<'_>,
) -> Result<(ExchangeType, Channel), BrokerError> {
    let refused = match try_exchange(&channel, e).await {
        Ok(()) => return Ok((e.kind, channel)),
        Err(err) if is_precondition_failed(&err) => err,
        Err(source) => {
            return Err(BrokerError::Amqp {
                what: format!("declare exchange {}", e.name),
                source,
            })
        }
    };
    for durable in [e.durable, !e.durable] {
        for kind in ExchangeType::ALL {
            if kind == e.kind && durable == e.durable {
                continue;
            }
            let probe = open(conn).await?;
            let candidate = ExchangeDecl {
                kind,
                durable,
                ..*e
            };
            if try_exchange(&probe, &candidate).await.is_ok() {
                if kind != e.kind {
                    warn!(exchange = %e.name, configured = e.kind.as_str(), found = kind.as_str(),
                        "exchange {} exists as a {} exchange, not {}: using it as {} (routing, native delayed delivery included, follows the type it has)",
                        e.name, kind.as_str(), e.kind.as_str(), kind.as_str());
                } else {
                    warn!(exchange = %e.name, "exchange {} exists with other settings (durable={durable}); using it as it is", e.name);
                }
                return Ok((kind, probe));
            }
        }
    }
    warn!(exchange = %e.name, "exchange exists with other settings; using it as it is: {refused}");
    Ok((e.kind, open(conn).await?))
}

/// Declares the queue's exchange, the queue and its bindings as kombu
/// does. When the broker already holds the queue with other arguments (for
/// example a quorum queue Python declared), it falls back to a passive
/// declare and uses the queue as it is. An existing exchange of another
/// type is adopted (found by declaring it with each type in turn). Uses channels of
/// its own so a refused declare cannot close a consuming channel. Returns
/// the type the queue's exchange really has.
pub async fn declare_queue(
    conn: &Connection,
    spec: &QueueSpec,
) -> Result<ExchangeType, BrokerError> {
    let d = &spec.declared;
    let mut channel = open(conn).await?;
    let mut kind = spec.exchange_kind;
    if !spec.exchange.is_empty() && !d.exchange_no_declare {
        (kind, channel) = declare_exchange_adopting(conn, channel, &ExchangeDecl::of(spec)).await?;
    }
    for b in d.bindings.iter().filter(|b| !b.exchange_no_declare) {
        let exchange = ExchangeDecl {
            name: &b.exchange,
            kind: b.exchange_kind,
            durable: b.exchange_durable,
            auto_delete: b.exchange_auto_delete,
            arguments: &b.exchange_arguments,
        };
        (_, channel) = declare_exchange_adopting(conn, channel, &exchange).await?;
    }
    let declared = if d.no_declare {
        Ok(())
    } else {
        channel
            .queue_declare(
                ShortString::from(spec.name.as_str()),
                QueueDeclareOptions {
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    exclusive: d.exclusive,
                    ..Default::default()
                },
                spec.arguments(),
            )
            .await
            .map(drop)
    };
    let channel = match declared {
        Ok(()) => channel,
        Err(e) if is_precondition_failed(&e) => {
            warn!(queue = %spec.name, "queue exists with other arguments; consuming it as declared: {e}");
            let passive = open(conn).await?;
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
    let own = (!spec.exchange.is_empty()).then_some((
        spec.exchange.as_str(),
        spec.routing_key.as_str(),
        &d.binding_arguments,
    ));
    let extra = d
        .bindings
        .iter()
        .map(|b| (b.exchange.as_str(), b.routing_key.as_str(), &b.arguments));
    for (exchange, key, arguments) in own.into_iter().chain(extra) {
        channel
            .queue_bind(
                ShortString::from(spec.name.as_str()),
                ShortString::from(exchange),
                ShortString::from(key),
                QueueBindOptions::default(),
                json_to_table(arguments),
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "bind queue {} to {exchange}",
                spec.name
            )))?;
    }
    close_quietly(&channel).await;
    Ok(kind)
}

/// The type the broker's exchange `spec.exchange` really has: the
/// configured one when it exists as configured (or not at all), else the
/// one that declares without a 406. Used where the queue was declared
/// elsewhere (the control process binds queues for delayed delivery).
pub async fn exchange_type_in_force(
    conn: &Connection,
    spec: &QueueSpec,
) -> Result<ExchangeType, BrokerError> {
    if spec.exchange.is_empty() {
        return Ok(ExchangeType::Direct);
    }
    let channel = open(conn).await?;
    let (kind, channel) = declare_exchange_adopting(conn, channel, &ExchangeDecl::of(spec)).await?;
    close_quietly(&channel).await;
    Ok(kind)
}

async fn close_quietly(channel: &Channel) {
    let _ = channel.close(200, ShortString::from("declared")).await;
}

/// Whether the broker closed the channel with one of `codes` (soft errors:
/// 404 NOT_FOUND, 405 RESOURCE_LOCKED, ...).
pub fn refused_with(error: &lapin::Error, codes: &[lapin::protocol::AMQPSoftError]) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(s) if codes.contains(s))
        }
        _ => false,
    }
}

/// Whether an error is a 406 PRECONDITION_FAILED from the broker.
pub fn is_precondition_failed(error: &lapin::Error) -> bool {
    error.to_string().contains("PRECONDITION_FAILED") || error.to_string().contains("406")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    fn closed(kind: AMQPErrorKind) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "closed".into())).into()
    }

    #[test]
    fn refused_with_matches_the_brokers_soft_error_codes_only() {
        let not_found = closed(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND));
        let codes = [AMQPSoftError::NOTFOUND, AMQPSoftError::RESOURCELOCKED];
        assert!(refused_with(&not_found, &codes));
        let denied = closed(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED));
        assert!(!refused_with(&denied, &codes));
        let hard = closed(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED));
        assert!(!refused_with(&hard, &codes));
        let io: lapin::Error =
            lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::other("reset"))).into();
        assert!(!refused_with(&io, &codes));
    }
}
