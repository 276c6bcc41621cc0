//! One remote-control (pidbox) request: decoded, answered when addressed to
//! this node, the reply published.

use super::*;
use crate::backend::RedisBackend;
use crate::config::BackendUrl;

/// How long the control loop waits for the app's code in one request
/// before it goes on without it (the code keeps running on its thread).
const APP_HANDLER_WAIT: Duration = Duration::from_secs(30);

/// Runs `call` (the app's code) on a blocking thread, so the control loop
/// is not the thread an interpreter runs on; `None` if it panicked or did
/// not end within [`APP_HANDLER_WAIT`].
async fn in_app<T: Send + 'static>(
    method: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::time::timeout(APP_HANDLER_WAIT, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            error!("the app's handler of remote-control command {method} failed: {e}");
            None
        }
        Err(_) => {
            warn!(
                "the app's handler of remote-control command {method} has run for {} s; answering without it",
                APP_HANDLER_WAIT.as_secs()
            );
            None
        }
    }
}

/// Stores REVOKED for the revoked `tasks` no task process runs, in the
/// worker's Redis backend, as Celery's worker does (see
/// [`RedisBackend::revoke_if_waiting`]); a failure is one WARNING per task.
async fn record_revoked(url: &str, tasks: &[(String, Option<String>)]) {
    let backend = match RedisBackend::connect(url).await {
        Ok(b) => b,
        Err(e) => {
            warn!(
                "could not mark {} revoked task(s) in the result backend: {e}",
                tasks.len()
            );
            return;
        }
    };
    for (id, _) in tasks {
        if let Err(e) = backend.revoke_if_waiting(id).await {
            warn!(task_id = %id, "Failed to mark task {id} as revoked in backend: {e}");
        }
    }
}

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
    let (value, mut effect) = match pidbox.answered_by_app(method) {
        Some(host) => {
            let (host, name, arguments) = (Arc::clone(host), method.to_owned(), args.clone());
            let answer = in_app(method, move || host.control(&name, &arguments)).await;
            let answer = answer.unwrap_or_else(
                || serde_json::json!({"error": format!("the app's {method} handler did not answer")}),
            );
            (answer, Effect::None)
        }
        None => pidbox.handle(method, args),
    };
    if let Effect::RevokedElsewhere(tasks) = &effect {
        if let Some(host) = pidbox.host() {
            let (host, tasks) = (Arc::clone(host), tasks.clone());
            in_app(method, move || host.revoked_elsewhere(&tasks)).await;
        } else if let Some(BackendUrl::Redis(url)) = &pidbox.config().result_backend {
            record_revoked(url, tasks).await;
        }
        effect = Effect::None;
    }
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
