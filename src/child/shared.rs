//! What every running task of a child shares: channels, backend, registry.

use std::sync::{Arc, RwLock};

use chrono::Utc;
use lapin::Channel;
use tracing::warn;

use crate::backend::Backend;
use crate::broker::{json_properties, json_to_table, publish_confirmed, BrokerError, Outgoing};
use crate::config::WorkerConfig;
use crate::protocol::{OutgoingTask, ResultDocument, TaskMessage};
use crate::shm::Outcome;
use crate::task::Registry;

/// State shared by the child's loop and its running tasks.
pub struct Shared {
    /// The validated configuration.
    pub config: Arc<WorkerConfig>,
    /// Registered tasks.
    pub registry: Arc<Registry>,
    /// Confirm-mode channel for messages that must not be lost (replaced on reconnect).
    pub confirmed: RwLock<Channel>,
    /// Result backend, if configured.
    pub backend: Option<Backend>,
    /// This child's pid.
    pub pid: u32,
    /// The node name, shared with every task context.
    pub hostname: Arc<str>,
    /// This process's place in the supervisor's shared memory.
    pub link: super::Link,
    /// Task events.
    pub events: crate::events::Events,
    /// Task name -> index in the shared stats table, cached per process.
    pub stat_indexes: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Shared {
    fn stat_index(&self, link: super::Link, task: &str) -> usize {
        let mut cache = self.stat_indexes.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(task) {
            Some(i) => *i,
            None => {
                let i = link.shm.task_stat_index(task);
                if cache.len() < crate::shm::TASK_STATS {
                    cache.insert(task.to_owned(), i);
                }
                i
            }
        }
    }

    /// Counts a task outcome (and its runtime) in the shared metrics.
    pub fn record(&self, task: &str, outcome: Outcome, runtime: Option<f64>) {
        let index = self.stat_index(self.link, task);
        self.link.shm.record_task(index, outcome, runtime);
    }

    /// Limits set at run time by `time_limit` / `rate_limit` for `task`.
    pub fn runtime_limits(&self, task: &str) -> crate::shm::RuntimeLimits {
        self.link
            .shm
            .runtime_limits(self.stat_index(self.link, task))
    }

    /// Points publishing at a new connection's channels after a reconnect.
    pub fn use_channels(&self, confirmed: Channel, results: Channel, events: Channel) {
        self.events.use_channel(events);
        *self.confirmed.write().unwrap_or_else(|e| e.into_inner()) = confirmed;
        if let Some(Backend::Rpc(rpc)) = &self.backend {
            rpc.use_channel(results);
        }
    }

    /// Stores a result, logging (not failing) when the backend is unreachable.
    pub async fn store(&self, msg: &TaskMessage, doc: ResultDocument) {
        if let Some(backend) = &self.backend {
            if let Err(e) = backend.store(msg, &doc).await {
                warn!(task_id = %msg.id, "could not store {} for {}[{}]: {e}", doc.status.as_str(), msg.display_name(), msg.id);
            }
        }
    }

    /// A fresh result document for `msg`.
    pub fn document(
        &self,
        msg: &TaskMessage,
        status: crate::protocol::TaskState,
        result: serde_json::Value,
    ) -> ResultDocument {
        let mut doc = ResultDocument::new(&msg.id, status, result, Utc::now());
        doc.group_id = msg.group.clone();
        doc.parent_id = msg.parent_id.clone();
        doc
    }

    /// Publishes a task message under publisher confirms. `default_route`
    /// is used when the message names none.
    pub async fn publish_task(
        &self,
        task: &OutgoingTask,
        default_route: (&str, &str),
    ) -> Result<(), BrokerError> {
        let (exchange, routing_key) = match &task.route {
            Some((e, k)) => (e.as_str(), k.as_str()),
            None => default_route,
        };
        let mut props = json_properties(json_to_table(&task.headers), 2, task.priority)
            .with_correlation_id(task.id.as_str().into());
        if let Some(reply_to) = &task.reply_to {
            props = props.with_reply_to(reply_to.as_str().into());
        }
        let out = Outgoing {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties: props,
            body: task.body.clone(),
        };
        let channel = self
            .confirmed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        publish_confirmed(&channel, &out).await
    }
}
