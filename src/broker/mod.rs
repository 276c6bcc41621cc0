//! RabbitMQ through lapin: connecting, declaring kombu-compatible topology,
//! per-consumer QoS, consuming and publishing (with confirms where a message
//! must not be lost).

pub mod delayed;
mod fields;
mod topology;

use std::str::FromStr;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use thiserror::Error;

pub use fields::{json_to_table, json_to_value, table_to_json, value_to_json};
pub use topology::{
    declare_exchange, declare_queue, exchange_type_in_force, refused_with, Binding, Declared,
    ExchangeType, QueueSpec,
};

/// How long a publish may wait for the broker before it counts as failed.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// Broker failures. Messages never contain the broker password.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The broker URL could not be parsed.
    #[error("invalid broker URL {url}: {reason}")]
    Url {
        /// The URL with its password masked.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// Connecting or authenticating failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL with its password masked.
        url: String,
        /// The lapin error.
        source: lapin::Error,
    },
    /// An AMQP operation failed.
    #[error("{what}: {source}")]
    Amqp {
        /// What was being done.
        what: String,
        /// The lapin error.
        source: lapin::Error,
    },
    /// The broker did not confirm a publish.
    #[error("broker did not confirm the publish to {exchange:?}/{routing_key:?}: {reason}")]
    NotConfirmed {
        /// Target exchange.
        exchange: String,
        /// Target routing key.
        routing_key: String,
        /// nack, timeout or returned.
        reason: String,
    },
}

impl BrokerError {
    pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let what = what.into();
        move |source| Self::Amqp { what, source }
    }
}

/// Replaces the password in a URL with `********`, as Celery prints URLs.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:********{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Parses a Celery-style AMQP URL (`amqp://user:pass@host:port//`).
pub fn parse_url(url: &str) -> Result<AMQPUri, BrokerError> {
    let refuse = |reason: String| BrokerError::Url {
        url: mask_url(url),
        reason,
    };
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("amqp://")
        || lower.starts_with("amqps://")
        || lower.starts_with("pyamqp://"))
    {
        return Err(refuse("the scheme must be amqp:// or amqps://".into()));
    }
    let normalized = if lower.starts_with("pyamqp://") {
        format!("amqp://{}", &url[9..])
    } else {
        url.to_owned()
    };
    let mut uri = AMQPUri::from_str(&normalized)
        .map_err(|e| refuse(e.to_string().replace(url, &mask_url(url))))?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".into();
    }
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(60);
    }
    if uri.query.frame_max.is_none() {
        // lapin keeps 32 frames of buffer each way: 16 KiB frames keep a
        // connection at ~1 MiB instead of 8 MiB with RabbitMQ's 128 KiB.
        uri.query.frame_max = Some(16_384);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    Ok(uri)
}

/// Whether `url` carries a password (`user:password@`).
pub fn url_has_password(url: &str) -> bool {
    mask_url(url) != url
}

/// Opens a connection named after this worker.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    connect_with_password(url, name, None).await
}

/// Opens a connection named after this worker, with `password` in place of
/// the URL's when given (an OAuth 2 access token: RabbitMQ's OAuth 2 backend
/// takes the token as the password and ignores the user name).
pub async fn connect_with_password(
    url: &str,
    name: &str,
    password: Option<&str>,
) -> Result<Connection, BrokerError> {
    let mut uri = parse_url(url)?;
    if let Some(password) = password {
        uri.authority.userinfo.password = password.to_owned();
    }
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(name))
        .with_client_property(ShortString::from("product"), LongString::from("celeriac"));
    Connection::connect_uri(uri, props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: mask_url(url),
            source,
        })
}

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BrokerError::amqp("confirm.select"))?;
    Ok(channel)
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Target exchange (`""` is the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// AMQP properties.
    pub properties: BasicProperties,
    /// The body.
    pub body: Vec<u8>,
}

/// How long a process leaving waits for the broker to answer its
/// `connection.close`. A connection whose socket died before lapin noticed
/// is never answered: a control process was seen waiting for ever on one
/// after its broker vanished.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `channel` (if given) and then `conn`, on the way out, waiting at
/// most [`CLOSE_TIMEOUT`] in all.
pub async fn close_on_exit(conn: &lapin::Connection, channel: Option<&Channel>) {
    let close = async {
        if let Some(channel) = channel {
            let _ = channel.close(200, ShortString::from("bye")).await;
        }
        let _ = conn.close(200, ShortString::from("bye")).await;
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
        tracing::debug!(
            "the broker did not answer the connection's close within {CLOSE_TIMEOUT:?}"
        );
    }
}

/// Publishes without waiting for a confirm (results, events).
pub async fn publish(channel: &Channel, msg: &Outgoing) -> Result<(), BrokerError> {
    let send = channel.basic_publish(
        ShortString::from(msg.exchange.as_str()),
        ShortString::from(msg.routing_key.as_str()),
        BasicPublishOptions::default(),
        &msg.body,
        msg.properties.clone(),
    );
    match tokio::time::timeout(PUBLISH_TIMEOUT, send).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(BrokerError::Amqp {
            what: "basic.publish".into(),
            source,
        }),
        Err(_) => Err(not_confirmed(msg, "timed out")),
    }
}

/// Publishes on a confirm channel and waits until the broker has taken
/// responsibility for the message (ack), or fails. The message is
/// mandatory: one that no queue takes (its exchange has no matching
/// binding) comes back and is an error here, so the caller keeps or
/// rejects the original with a log line instead of the broker dropping it
/// without a word.
pub async fn publish_confirmed(channel: &Channel, msg: &Outgoing) -> Result<(), BrokerError> {
    let fut = async {
        let confirm = channel
            .basic_publish(
                ShortString::from(msg.exchange.as_str()),
                ShortString::from(msg.routing_key.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &msg.body,
                msg.properties.clone(),
            )
            .await
            .map_err(BrokerError::amqp("basic.publish"))?;
        match confirm
            .await
            .map_err(BrokerError::amqp("publisher confirm"))?
        {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(not_confirmed(
                msg,
                "returned by the broker: no queue is bound for it (unroutable)",
            )),
            Confirmation::Nack(_) => Err(not_confirmed(msg, "nacked")),
        }
    };
    match tokio::time::timeout(PUBLISH_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(not_confirmed(msg, "timed out")),
    }
}

fn not_confirmed(msg: &Outgoing, reason: &str) -> BrokerError {
    BrokerError::NotConfirmed {
        exchange: msg.exchange.clone(),
        routing_key: msg.routing_key.clone(),
        reason: reason.into(),
    }
}

/// Properties of a JSON message as kombu sends them: `application/json`,
/// `utf-8`, the given headers (an empty table is still set), delivery mode
/// (1 transient, 2 persistent) and priority.
pub fn json_properties(headers: FieldTable, delivery_mode: u8, priority: u8) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(delivery_mode)
        .with_priority(priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("amqp://guest:secret@localhost:5672//"),
            "amqp://guest:********@localhost:5672//"
        );
        assert_eq!(
            mask_url("redis://:pw@host:6379/0"),
            "redis://:********@host:6379/0"
        );
        assert_eq!(mask_url("amqp://localhost//"), "amqp://localhost//");
        assert_eq!(mask_url("rpc://"), "rpc://");
    }

    #[test]
    fn tells_whether_a_url_carries_a_password() {
        assert!(url_has_password("amqp://guest:guest@localhost:5672//"));
        assert!(!url_has_password("amqp://celeriac@rabbitmq:5672//"));
        assert!(!url_has_password("amqps://rabbitmq.example/prod"));
    }

    #[test]
    fn parses_celery_default_url() {
        let uri = parse_url("amqp://guest:guest@localhost:5672//").unwrap();
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.authority.port, 5672);
        let uri = parse_url("amqp://guest:guest@localhost:5672/").unwrap();
        assert_eq!(uri.vhost, "/");
        let uri = parse_url("amqp://u:p@h/prod").unwrap();
        assert_eq!(uri.vhost, "prod");
    }

    #[test]
    fn refuses_other_schemes_without_leaking_password() {
        let err = parse_url("http://u:topsecret@h/").unwrap_err().to_string();
        assert!(!err.contains("topsecret"), "{err}");
        assert!(err.contains("amqp://"), "{err}");
    }
}
