//! RabbitMQ native delayed delivery, as Celery ≥ 5.5's worker sets it up
//! for quorum queues (which cannot hold ETA tasks behind a raised prefetch).
//!
//! A Python producer sends a countdown/ETA task for a quorum queue behind a
//! non-direct exchange to exchange `celery_delayed_27`, with the delay in
//! whole seconds written as 28 binary digits in front of the routing key
//! (`0.0.….1.0.1.0.<key>`). Level L holds a message 2^L s when its bit is 1
//! (a queue with that TTL, dead-lettering to level L−1) and passes it on at
//! once when it is 0 (an exchange-to-exchange binding); after level 0 it
//! reaches `celery_delayed_delivery`, which forwards it to the app's
//! exchange and queue. Only the worker declares this topology, so a worker
//! for quorum queues must. The message arrives up to a second early (whole
//! seconds): the worker holds it until its `eta` as any ETA task.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::{BrokerError, QueueSpec};

/// Bits of the delay: up to 2^28 − 1 seconds (about 8.5 years).
pub const LEVELS: u32 = 28;
/// The exchange a delayed message leaves the levels through.
pub const DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// The exchange and queue of level `level`.
pub fn level_name(level: u32) -> String {
    format!("celery_delayed_{level}")
}

/// The routing key binding level `level`'s queue to its exchange: this
/// level's bit is 1 (`*.` for every higher level, then `1.#`).
pub fn hold_key(level: u32) -> String {
    format!("{}1.#", "*.".repeat((LEVELS - 1 - level) as usize))
}

/// The routing key passing a message from level `level` on to the next
/// one: this level's bit is 0.
pub fn pass_key(level: u32) -> String {
    format!("{}0.#", "*.".repeat((LEVELS - 1 - level) as usize))
}

/// The routing key binding an app exchange to the delivery exchange for a
/// queue bound with `routing_key`.
pub fn delivery_key(routing_key: &str) -> String {
    if routing_key.starts_with('#') {
        routing_key.to_owned()
    } else {
        format!("#.{routing_key}")
    }
}

/// `routing_key` without a delay prefix (28 binary digits, each followed
/// by a dot), so a message republished from a delayed delivery does not
/// grow its key with every retry.
pub fn strip_delay(routing_key: &str) -> &str {
    let bytes = routing_key.as_bytes();
    let prefixed = bytes.len() >= 2 * LEVELS as usize
        && bytes[..2 * LEVELS as usize]
            .chunks(2)
            .all(|pair| matches!(pair, [b'0' | b'1', b'.']));
    if prefixed {
        &routing_key[2 * LEVELS as usize..]
    } else {
        routing_key
    }
}

/// The routing key that sends a message with `routing_key` through the
/// levels for `seconds` (whole seconds, as Celery's producers compute it).
pub fn routing_key(seconds: u64, routing_key: &str) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize + routing_key.len());
    for bit in (0..LEVELS).rev() {
        key.push(if seconds >> bit & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(strip_delay(routing_key));
    key
}

fn level_arguments(level: u32, queue_type: &str) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert(ShortString::from("x-queue-type"), text(queue_type));
    args.insert(ShortString::from("x-overflow"), text("reject-publish"));
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt((1i64 << level) * 1000),
    );
    let next = if level > 0 {
        level_name(level - 1)
    } else {
        DELIVERY_EXCHANGE.to_owned()
    };
    args.insert(ShortString::from("x-dead-letter-exchange"), text(&next));
    if queue_type == "quorum" {
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            text("at-least-once"),
        );
    }
    args
}

async fn topic_exchange(channel: &Channel, name: &str) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            ShortString::from(name),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("declare exchange {name}")))
}

async fn exchange_bind(
    channel: &Channel,
    destination: &str,
    source: &str,
    key: &str,
) -> Result<(), BrokerError> {
    channel
        .exchange_bind(
            ShortString::from(destination),
            ShortString::from(source),
            ShortString::from(key),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!(
            "bind exchange {destination} to {source}"
        )))
}

/// Declares the levels, their queues (of `queue_type`) and bindings, and
/// the delivery exchange, as Celery's worker does for quorum queues.
pub async fn declare_levels(channel: &Channel, queue_type: &str) -> Result<(), BrokerError> {
    for level in (0..LEVELS).rev() {
        let name = level_name(level);
        topic_exchange(channel, &name).await?;
        channel
            .queue_declare(
                ShortString::from(name.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                level_arguments(level, queue_type),
            )
            .await
            .map_err(BrokerError::amqp(format!("declare queue {name}")))?;
        channel
            .queue_bind(
                ShortString::from(name.as_str()),
                ShortString::from(name.as_str()),
                ShortString::from(hold_key(level)),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("bind queue {name}")))?;
    }
    for level in (1..LEVELS).rev() {
        exchange_bind(
            channel,
            &level_name(level - 1),
            &level_name(level),
            &pass_key(level),
        )
        .await?;
    }
    topic_exchange(channel, DELIVERY_EXCHANGE).await?;
    exchange_bind(channel, DELIVERY_EXCHANGE, &level_name(0), &pass_key(0)).await
}

/// Binds a consumed queue behind a non-direct exchange to the delivery
/// exchange (its exchange to the delivery exchange, the queue to its
/// exchange, with the key that matches any delay prefix), as Celery's
/// worker does: a delayed message then reaches it.
pub async fn bind(channel: &Channel, spec: &QueueSpec) -> Result<(), BrokerError> {
    let key = delivery_key(&spec.routing_key);
    exchange_bind(channel, &spec.exchange, DELIVERY_EXCHANGE, &key).await?;
    channel
        .queue_bind(
            ShortString::from(spec.name.as_str()),
            ShortString::from(spec.exchange.as_str()),
            ShortString::from(key.as_str()),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("bind queue {}", spec.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_select_one_bit_per_level() {
        assert_eq!(hold_key(27), "1.#");
        assert_eq!(hold_key(26), "*.1.#");
        assert_eq!(pass_key(27), "0.#");
        assert_eq!(pass_key(0), format!("{}0.#", "*.".repeat(27)));
        assert_eq!(hold_key(0).matches("*.").count(), 27);
    }

    #[test]
    fn delivery_keys_match_any_delay_prefix() {
        assert_eq!(delivery_key("requests"), "#.requests");
        assert_eq!(delivery_key("#"), "#");
    }

    #[test]
    fn level_queues_hold_for_their_power_of_two_and_dead_letter_down() {
        let args = level_arguments(3, "quorum");
        let get = |k: &str| args.inner().get(&ShortString::from(k)).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(8_000)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("celery_delayed_2".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        let last = level_arguments(0, "classic");
        assert_eq!(
            last.inner()
                .get(&ShortString::from("x-dead-letter-exchange")),
            Some(&AMQPValue::LongString(DELIVERY_EXCHANGE.into()))
        );
        assert!(last
            .inner()
            .get(&ShortString::from("x-dead-letter-strategy"))
            .is_none());
    }

    #[test]
    fn delays_are_28_binary_digits_in_front_of_the_key() {
        let key = routing_key(10, "requests");
        assert_eq!(key, format!("{}1.0.1.0.requests", "0.".repeat(24)));
        assert_eq!(
            routing_key(10, &key),
            key,
            "an old prefix is replaced, not stacked"
        );
        assert_eq!(strip_delay(&routing_key(3, "q")), "q");
    }

    #[test]
    fn a_delay_prefix_is_stripped_once() {
        let ten = format!("{}1.0.1.0.requests", "0.".repeat(24));
        assert_eq!(strip_delay(&ten), "requests");
        let twice = format!("{}{ten}", "0.".repeat(27) + "1.");
        assert_eq!(strip_delay(&twice), ten, "one prefix at a time");
        assert_eq!(strip_delay("requests"), "requests");
        assert_eq!(strip_delay("0.1.short"), "0.1.short");
    }
}
