//! The protocol module against messages captured from real Celery 5.7
//! (tests/fixtures/celery-5.7): decoding every task message, and producing
//! result documents and re-publishes with Celery's exact shape.

use std::path::PathBuf;

use celeriac::protocol::{
    DecodeError, ExceptionInfo, RawMessage, ResultDocument, TaskMessage, TaskState,
};
use chrono::{TimeZone, Utc};
use serde_json::{json, Map, Value};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/celery-5.7")
        .join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

struct Captured {
    fixture: Value,
    headers: Map<String, Value>,
    body: String,
}

impl Captured {
    fn load(name: &str) -> Self {
        let fixture = fixture(name);
        let headers = fixture["properties"]["headers"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let body = fixture["body_text"].as_str().unwrap().to_owned();
        Self {
            fixture,
            headers,
            body,
        }
    }

    fn raw(&self) -> RawMessage<'_> {
        let p = &self.fixture["properties"];
        RawMessage {
            content_type: p["content_type"].as_str(),
            content_encoding: p["content_encoding"].as_str(),
            headers: self.headers.clone(),
            correlation_id: p["correlation_id"].as_str(),
            reply_to: p["reply_to"].as_str(),
            priority: p["priority"].as_u64().map(|p| p as u8),
            properties: ["delivery_mode", "app_id"]
                .iter()
                .filter_map(|k| p.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                .collect(),
            body: self.body.as_bytes(),
        }
    }

    fn decode(&self) -> TaskMessage {
        TaskMessage::decode(self.raw())
            .unwrap_or_else(|e| panic!("{}: {e}", self.fixture["description"]))
    }
}

#[test]
fn every_captured_task_message_decodes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/celery-5.7");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("task-") {
            continue;
        }
        let c = Captured::load(&name);
        let msg = c.decode();
        assert_eq!(
            Some(msg.id.as_str()),
            c.fixture["properties"]["correlation_id"].as_str(),
            "{name}"
        );
        assert!(!msg.task.is_empty(), "{name}");
        count += 1;
    }
    assert!(count >= 20, "only {count} task fixtures");
}

#[test]
fn v2_positional_args() {
    let msg = Captured::load("task-v2-args.json").decode();
    assert_eq!(msg.protocol, 2);
    assert_eq!(msg.task, "tasks.add");
    assert_eq!(msg.args, vec![json!(2), json!(3)]);
    assert!(msg.kwargs.is_empty());
    assert_eq!(
        msg.ignore_result, None,
        "send_task sends ignore_result as null"
    );
    assert_eq!(
        msg.reply_to.as_deref(),
        Some("efbac2a6-8ac3-3b60-8864-01f556cbfe9c")
    );
    assert_eq!((msg.time_limit, msg.soft_time_limit), (None, None));
    assert_eq!(msg.retries, 0);
}

#[test]
fn v2_unicode_and_nested() {
    let msg = Captured::load("task-v2-args-kwargs-unicode-nested.json").decode();
    let text =
        serde_json::to_string(&msg.kwargs).unwrap() + &serde_json::to_string(&msg.args).unwrap();
    assert!(
        text.contains('🚀') || text.contains('é'),
        "surrogate pairs decoded: {text}"
    );
    assert!(
        msg.args
            .iter()
            .chain(msg.kwargs.values())
            .any(|v| v.to_string().contains("1099511627776")),
        "2^40 kept: {text}"
    );
}

#[test]
fn v2_eta_forms() {
    let msg = Captured::load("task-v2-eta-aware-plus0200.json").decode();
    assert_eq!(
        msg.eta,
        Some(Utc.with_ymd_and_hms(2031, 1, 2, 3, 4, 5).unwrap())
    );
    let msg = Captured::load("task-v2-eta-aware-utc.json").decode();
    assert_eq!(
        msg.eta.unwrap().timestamp(),
        Utc.with_ymd_and_hms(2031, 1, 2, 3, 4, 5)
            .unwrap()
            .timestamp()
    );
    let msg = Captured::load("task-v2-countdown-10.json").decode();
    assert!(msg.eta.is_some());
    let msg = Captured::load("task-v2-expires-60.json").decode();
    assert!(msg.expires.is_some() && msg.eta.is_none());
}

#[test]
fn timelimit_is_hard_then_soft() {
    let msg = Captured::load("task-v2-timelimit.json").decode();
    assert_eq!(
        (msg.time_limit, msg.soft_time_limit),
        (Some(2.0), Some(1.0))
    );
}

#[test]
fn ignore_result_shadow_priority() {
    assert_eq!(
        Captured::load("task-v2-ignore-result.json")
            .decode()
            .ignore_result,
        Some(true)
    );
    let shadow = Captured::load("task-v2-shadow.json").decode();
    assert!(shadow.shadow.is_some());
    assert_eq!(shadow.display_name(), shadow.shadow.as_deref().unwrap());
    assert_eq!(
        Captured::load("task-v2-priority-5.json").decode().priority,
        Some(5)
    );
}

#[test]
fn canvas_embeds() {
    let chain = Captured::load("task-v2-chain-first.json").decode();
    assert_eq!(chain.embed.chain.len(), 2, "remaining steps, reversed");
    let links = Captured::load("task-v2-link-link-error.json").decode();
    assert_eq!(links.embed.callbacks.len(), 1);
    assert_eq!(links.embed.errbacks.len(), 1);
    let member = Captured::load("task-v2-group-member-1.json").decode();
    assert!(member.group.is_some());
    assert_eq!(member.group_index, Some(1));
}

#[test]
fn protocol_v1_bodies() {
    let msg = Captured::load("task-v1-args.json").decode();
    assert_eq!(msg.protocol, 1);
    assert_eq!(msg.task, "tasks.add");
    assert_eq!(msg.args, vec![json!(2), json!(3)]);
    let msg = Captured::load("task-v1-countdown-expires.json").decode();
    assert!(msg.eta.is_some() && msg.expires.is_some());
}

#[test]
fn retry_republish_matches_celery() {
    let original = Captured::load("task-v2-retry-original.json").decode();
    let captured = Captured::load("task-v2-retry-republish.json");
    let eta = celeriac::protocol::parse_iso(captured.headers["eta"].as_str().unwrap()).unwrap();
    let ours = original.retry_message(eta);
    assert_eq!(
        Value::Object(ours.headers.clone()),
        Value::Object(captured.headers.clone()),
        "headers differ only where Celery's do"
    );
    let our_body: Value = serde_json::from_slice(&ours.body).unwrap();
    assert_eq!(our_body, captured.fixture["body_json"]);
    assert_eq!(
        ours.reply_to.as_deref(),
        captured.fixture["properties"]["reply_to"].as_str()
    );
}

#[test]
fn a_retry_after_dead_lettering_drops_the_brokers_death_headers() {
    // The same original as Celery's captured retry, as it arrives after
    // passing through the delayed-delivery levels (dead-lettered on the way),
    // from a quorum queue that counted two returns.
    let mut original = Captured::load("task-v2-retry-original.json");
    let captured = Captured::load("task-v2-retry-republish.json");
    original.headers.insert(
        "x-death".into(),
        json!([{"count": 1, "reason": "expired", "queue": "celery_delayed_0",
                "exchange": "celery_delayed_0", "routing-keys": ["0.0.1.celery"]}]),
    );
    for key in ["x-first-death-queue", "x-last-death-queue"] {
        original
            .headers
            .insert(key.into(), json!("celery_delayed_0"));
    }
    for key in ["x-first-death-reason", "x-last-death-reason"] {
        original.headers.insert(key.into(), json!("expired"));
    }
    original.headers.insert("x-delivery-count".into(), json!(2));
    original.headers.insert("x-acquired-count".into(), json!(3));
    let msg = original.decode();
    let eta = celeriac::protocol::parse_iso(captured.headers["eta"].as_str().unwrap()).unwrap();
    let retry = msg.retry_message(eta);
    assert_eq!(
        Value::Object(retry.headers.clone()),
        Value::Object(captured.headers.clone()),
        "the retry carries Celery's headers and none of the broker's"
    );
    let again = msg.republish_message();
    for key in celeriac::protocol::BROKER_HEADERS {
        assert!(!again.headers.contains_key(*key), "{key} re-published");
    }
    assert_eq!(
        again.headers["id"], captured.headers["id"],
        "the re-published copy is the same request"
    );
}

#[test]
fn bad_input_is_refused_without_deserializing() {
    let c = Captured::load("task-v2-args.json");
    let mut raw = c.raw();
    raw.content_type = Some("application/x-python-serialize");
    raw.body = b"\x80\x04\x95 not json";
    assert_eq!(
        TaskMessage::decode(raw),
        Err(DecodeError::ContentDisallowed(
            "application/x-python-serialize".into()
        ))
    );
    let mut raw = c.raw();
    raw.body = b"[[1, 2], {}";
    assert_eq!(raw.message_id(), "094c4737-f8c0-4f74-b73c-92f3e787f65e");
    assert!(matches!(
        TaskMessage::decode(raw),
        Err(DecodeError::Body(_))
    ));
    let mut raw = c.raw();
    raw.body = b"[[1, 2], {}]";
    assert!(matches!(
        TaskMessage::decode(raw),
        Err(DecodeError::Invalid(_))
    ));
    let mut raw = c.raw();
    raw.body = b"[[1, 2], [3], {}]";
    assert!(
        matches!(TaskMessage::decode(raw), Err(DecodeError::Invalid(m)) if m.contains("mapping"))
    );
    let mut raw = c.raw();
    raw.headers.insert("eta".into(), json!("next tuesday"));
    assert!(matches!(TaskMessage::decode(raw), Err(DecodeError::Invalid(m)) if m.contains("eta")));
    let mut raw = c.raw();
    raw.headers.remove("task");
    assert_eq!(TaskMessage::decode(raw), Err(DecodeError::Unknown));
}

#[test]
fn result_documents_have_celerys_keys_in_order() {
    for (name, state) in [
        ("rpc-result-success-int.json", TaskState::Success),
        ("rpc-result-failure.json", TaskState::Failure),
        ("rpc-result-started.json", TaskState::Started),
    ] {
        let captured: Value =
            serde_json::from_str(fixture(name)["body_text"].as_str().unwrap()).unwrap();
        let mut doc = ResultDocument::new(
            captured["task_id"].as_str().unwrap(),
            state,
            captured["result"].clone(),
            Utc::now(),
        );
        doc.traceback = captured["traceback"].as_str().map(str::to_owned);
        let ours: Value = serde_json::from_slice(&doc.to_json()).unwrap();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours), keys(&captured), "{name}");
        assert_eq!(ours["status"], captured["status"]);
        assert_eq!(ours["result"], captured["result"]);
        assert_eq!(
            ours["date_done"].is_null(),
            captured["date_done"].is_null(),
            "{name}"
        );
    }
}

#[test]
fn exceptions_match_captured_failures() {
    let failure: Value = serde_json::from_str(
        fixture("rpc-result-failure.json")["body_text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let ours = serde_json::to_value(ExceptionInfo::builtin("ValueError", "bad")).unwrap();
    assert_eq!(ours, failure["result"]);
    let revoked: Value = serde_json::from_str(
        fixture("rpc-result-revoked-expired.json")["body_text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(ExceptionInfo::revoked("expired")).unwrap(),
        revoked["result"]
    );
    let redis = fixture("redis-result-success.json");
    assert!(redis["redis_key"]
        .as_str()
        .unwrap()
        .starts_with("celery-task-meta-"));
}

fn captured_event(name: &str) -> Value {
    let body: Value = serde_json::from_str(fixture(name)["body_text"].as_str().unwrap()).unwrap();
    match body {
        Value::Array(mut batch) => batch.remove(0),
        one => one,
    }
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn task_events_match_celerys_shape() {
    use celeriac::protocol::events::{self, EventSource};
    let src = EventSource {
        hostname: "worker@example".into(),
        pid: 24498,
        utcoffset: 0.0,
    };
    let msg = Captured::load("task-v2-args.json").decode();
    let ours = src.event("task-received", 5, 1.5, events::task_received(&msg));
    let theirs = captured_event("event-task-received.json");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(ours["args"], "(2, 3)");
    assert_eq!(ours["kwargs"], "{}");
    assert_eq!(ours["utcoffset"], theirs["utcoffset"]);
    let ours = src.event(
        "task-succeeded",
        6,
        1.5,
        events::task_succeeded("x", &json!(5), 0.01),
    );
    let theirs = captured_event("event-task-succeeded.json");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(ours["result"], theirs["result"], "the repr string \"5\"");
    let ours = src.event(
        "task-failed",
        7,
        1.5,
        events::task_failed("x", "ValueError('bad')", "tb"),
    );
    assert_eq!(keys(&ours), keys(&captured_event("event-task-failed.json")));
    let ours = src.event(
        "task-revoked",
        8,
        1.5,
        events::task_revoked("x", true, Some(15), false),
    );
    let theirs = captured_event("event-task-revoked-terminated.json");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(ours["signum"], theirs["signum"]);
    let ours = src.event("task-started", 9, 1.5, events::task_started("x"));
    assert_eq!(
        keys(&ours),
        keys(&captured_event("event-task-started.json"))
    );
    let ours = src.event("task-rejected", 9, 1.5, events::task_rejected("x", false));
    let batch: Value = serde_json::from_str(
        fixture("event-task-rejected.json")["body_text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let theirs = batch
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "task-rejected")
        .unwrap()
        .clone();
    assert_eq!(keys(&ours), keys(&theirs));
}

#[test]
fn worker_events_match_celerys_shape() {
    use celeriac::protocol::events::{self, EventSource};
    let src = EventSource {
        hostname: "worker@example".into(),
        pid: 1,
        utcoffset: 0.0,
    };
    let ours = src.event(
        "worker-heartbeat",
        3,
        1.5,
        events::worker_status(events::HEARTBEAT_FREQ, 0, 10, [0.821, 0.28, 0.24]),
    );
    let theirs = captured_event("event-worker-heartbeat.json");
    assert_eq!(keys(&ours), keys(&theirs));
    assert_eq!(ours["freq"], json!(2.0));
    assert_eq!(
        ours["loadavg"],
        json!([0.83, 0.28, 0.24]),
        "ceil to 2 decimals"
    );
    assert_eq!(
        events::routing_key("worker-heartbeat"),
        fixture("event-worker-heartbeat.json")["routing_key"]
    );
    let wakeup = src.event("worker-heartbeat", 4, 1.5, events::worker_wakeup());
    let theirs = captured_event("event-worker-heartbeat-wakeup.json");
    assert_eq!(keys(&wakeup), keys(&theirs));
    assert_eq!(wakeup["freq"], json!(5), "an int, as Celery sends it");
}

#[test]
fn encoded_events_equal_the_built_ones() {
    use celeriac::protocol::events::{self, EventSource};
    let src = EventSource {
        hostname: "w\"1@host".into(),
        pid: 7,
        utcoffset: -2.0,
    };
    let msg = Captured::load("task-v2-args-kwargs-unicode-nested.json").decode();
    for fields in [
        events::task_received(&msg),
        events::task_succeeded("id", &json!({"é": [1, 2.5, null]}), 0.25),
        events::task_revoked("id", true, Some(9), false),
        events::worker_status(events::HEARTBEAT_FREQ, 1, 2, [0.1, 0.2, 0.3]),
    ] {
        let built = src.event("task-x", 42, 1795627878.2327826, fields.clone());
        let text = src.encode("task-x", 42, 1795627878.2327826, &fields);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, built);
        assert_eq!(keys(&parsed), keys(&built), "same field order");
    }
}
