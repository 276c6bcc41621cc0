//! What a running task knows about its request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

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
    id: String,
    task: String,
    retries: u32,
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    hostname: String,
    root_id: Option<String>,
    parent_id: Option<String>,
    group: Option<String>,
    headers: Map<String, Value>,
    delivery_info: DeliveryInfo,
    time_limit: Option<f64>,
    soft_time_limit: Option<f64>,
    soft_limit_exceeded: AtomicBool,
}

/// The parts a [`Context`] is built from.
#[derive(Debug, Clone, Default)]
pub struct ContextParts {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Retries so far.
    pub retries: u32,
    /// ETA, if any.
    pub eta: Option<DateTime<Utc>>,
    /// Expiry, if any.
    pub expires: Option<DateTime<Utc>>,
    /// This worker's node name.
    pub hostname: String,
    /// Workflow root id.
    pub root_id: Option<String>,
    /// Parent task id.
    pub parent_id: Option<String>,
    /// Group id.
    pub group: Option<String>,
    /// The raw message headers.
    pub headers: Map<String, Value>,
    /// Delivery details.
    pub delivery_info: DeliveryInfo,
    /// Hard limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft limit in seconds.
    pub soft_time_limit: Option<f64>,
}

impl Context {
    /// Builds a context.
    pub fn new(p: ContextParts) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: p.id,
                task: p.task,
                retries: p.retries,
                eta: p.eta,
                expires: p.expires,
                hostname: p.hostname,
                root_id: p.root_id,
                parent_id: p.parent_id,
                group: p.group,
                headers: p.headers,
                delivery_info: p.delivery_info,
                time_limit: p.time_limit,
                soft_time_limit: p.soft_time_limit,
                soft_limit_exceeded: AtomicBool::new(false),
            }),
        }
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }
    /// The task name.
    pub fn task(&self) -> &str {
        &self.inner.task
    }
    /// How many times this task has been retried.
    pub fn retries(&self) -> u32 {
        self.inner.retries
    }
    /// The ETA it was scheduled for.
    pub fn eta(&self) -> Option<DateTime<Utc>> {
        self.inner.eta
    }
    /// When it expires.
    pub fn expires(&self) -> Option<DateTime<Utc>> {
        self.inner.expires
    }
    /// The worker's node name (`celery@host`).
    pub fn hostname(&self) -> &str {
        &self.inner.hostname
    }
    /// The workflow's root task id.
    pub fn root_id(&self) -> Option<&str> {
        self.inner.root_id.as_deref()
    }
    /// The id of the task that sent this one.
    pub fn parent_id(&self) -> Option<&str> {
        self.inner.parent_id.as_deref()
    }
    /// The group id.
    pub fn group(&self) -> Option<&str> {
        self.inner.group.as_deref()
    }
    /// All message headers.
    pub fn headers(&self) -> &Map<String, Value> {
        &self.inner.headers
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
    /// True once the soft time limit has passed: a long-running sync task
    /// should check it and return `Err(TaskError::from(ExceptionInfo::soft_time_limit_exceeded()))`
    /// or clean up.
    pub fn soft_time_limit_exceeded(&self) -> bool {
        self.inner.soft_limit_exceeded.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_soft_time_limit_exceeded(&self) {
        self.inner
            .soft_limit_exceeded
            .store(true, Ordering::Relaxed);
    }
}
