//! What a running task knows about its request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::protocol::TaskMessage;

/// Where the message came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryInfo {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its priority.
    pub priority: u8,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

/// The request context of a running task (Celery's `self.request`).
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    msg: Arc<TaskMessage>,
    hostname: Arc<str>,
    delivery_info: DeliveryInfo,
    time_limit: Option<f64>,
    soft_time_limit: Option<f64>,
    soft_limit_exceeded: AtomicBool,
}

impl Context {
    /// The context of `msg` running on node `hostname` within the given limits.
    pub fn new(
        msg: Arc<TaskMessage>,
        hostname: Arc<str>,
        delivery_info: DeliveryInfo,
        time_limit: Option<f64>,
        soft_time_limit: Option<f64>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                msg,
                hostname,
                delivery_info,
                time_limit,
                soft_time_limit,
                soft_limit_exceeded: AtomicBool::new(false),
            }),
        }
    }

    /// The whole decoded message.
    pub fn message(&self) -> &TaskMessage {
        &self.inner.msg
    }
    /// The task id.
    pub fn id(&self) -> &str {
        &self.inner.msg.id
    }
    /// The task name.
    pub fn task(&self) -> &str {
        &self.inner.msg.task
    }
    /// How many times this task has been retried.
    pub fn retries(&self) -> u32 {
        self.inner.msg.retries
    }
    /// The ETA it was scheduled for.
    pub fn eta(&self) -> Option<DateTime<Utc>> {
        self.inner.msg.eta
    }
    /// When it expires.
    pub fn expires(&self) -> Option<DateTime<Utc>> {
        self.inner.msg.expires
    }
    /// The worker's node name (`celery@host`).
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }
    /// The workflow's root task id.
    pub fn root_id(&self) -> Option<&str> {
        self.inner.msg.root_id.as_deref()
    }
    /// The id of the task that sent this one.
    pub fn parent_id(&self) -> Option<&str> {
        self.inner.msg.parent_id.as_deref()
    }
    /// The group id.
    pub fn group(&self) -> Option<&str> {
        self.inner.msg.group.as_deref()
    }
    /// All message headers (empty for protocol v1).
    pub fn headers(&self) -> &Map<String, Value> {
        &self.inner.msg.headers
    }
    /// Delivery details.
    pub fn delivery_info(&self) -> &DeliveryInfo {
        &self.inner.delivery_info
    }
    /// The hard time limit in seconds.
    pub fn time_limit(&self) -> Option<f64> {
        self.inner.time_limit
    }
    /// The soft time limit in seconds.
    pub fn soft_time_limit(&self) -> Option<f64> {
        self.inner.soft_time_limit
    }
    /// True once the soft time limit has passed. Async tasks are cancelled at
    /// the soft limit; a blocking task keeps running and should check this,
    /// then clean up and return
    /// `Err(ExceptionInfo::soft_time_limit_exceeded().into())`.
    pub fn soft_time_limit_exceeded(&self) -> bool {
        self.inner.soft_limit_exceeded.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_soft_time_limit_exceeded(&self) {
        self.inner
            .soft_limit_exceeded
            .store(true, Ordering::Relaxed);
    }
}
