//! One remote-control (pidbox) request: decoded, answered when addressed to
//! this node, the reply published.

use super::*;

/// Answers one pidbox request if it is addressed to this node.
pub(super) async fn handle_request(
    delivery: &lapin::message::Delivery,
    pidbox: &Pidbox,
    events: &Events,
    shm: &SharedState,
    hostname: &str,
    replies: &Channel,
) -> Effect {
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_owned());
    if content_type
        .as_deref()
        .is_some_and(|c| c != "application/json")
    {
        error!("refusing remote control message of content type {content_type:?}");
        return Effect::None;
    }
    let request: Value = match serde_json::from_slice(&delivery.data) {
        Ok(v) => v,
        Err(e) => {
            error!("undecodable remote control message: {e}");
            return Effect::None;
        }
    };
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(table_to_json)
        .unwrap_or_default();
    if let Some(clock) = headers.get("clock").and_then(Value::as_u64) {
        shm.adjust_clock(clock);
    }
    if !addressed_to(&request, hostname) {
        return Effect::None;
    }
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let empty = Map::new();
    let args = request
        .get("arguments")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    debug!(method, "remote control");
    let (value, effect) = pidbox.handle(method, args);
    if effect == Effect::Heartbeat {
        events.worker("worker-heartbeat", ev::worker_wakeup()).await;
    }
    if effect == Effect::Shutdown {
        return effect;
    }
    let (Some(ticket), Some(reply_to)) = (
        request.get("ticket").and_then(Value::as_str),
        request.get("reply_to"),
    ) else {
        return effect;
    };
    let exchange = reply_to
        .get("exchange")
        .and_then(Value::as_str)
        .unwrap_or(REPLY_EXCHANGE);
    let key = reply_to
        .get("routing_key")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut body = Map::new();
    body.insert(hostname.to_owned(), value);
    let mut table = FieldTable::default();
    table.insert(
        ShortString::from("ticket"),
        AMQPValue::LongString(LongString::from(ticket)),
    );
    table.insert(
        ShortString::from("clock"),
        AMQPValue::LongInt(shm.tick_clock().min(i32::MAX as u64) as i32),
    );
    let properties = json_properties(table, 1, 0);
    let out = Outgoing {
        exchange: exchange.to_owned(),
        routing_key: key.to_owned(),
        properties,
        body: serde_json::to_vec(&Value::Object(body)).expect("JSON values serialize"),
    };
    if let Err(e) = publish(replies, &out).await {
        warn!("could not reply to {method}: {e}");
    }
    effect
}
