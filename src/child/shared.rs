//! What every running task of a child shares: channels, backend, registry.

use std::sync::{Arc, RwLock};

use chrono::Utc;
use lapin::Channel;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, info, warn};

use crate::backoff::BROKER_RECONNECT;

use crate::backend::Backend;
use crate::broker::{json_properties, json_to_table, publish_confirmed, BrokerError, Outgoing};
use crate::config::WorkerConfig;
use crate::protocol::{OutgoingTask, ResultDocument, TaskMessage};
use crate::shm::Outcome;
use crate::task::{Elsewhere, End, Registry};

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
    /// Task name -> its indexes in the shared stats table, cached per
    /// process so that counting a task allocates nothing once it is known.
    pub stat_indexes: std::sync::Mutex<std::collections::HashMap<String, StatIndexes>>,
    /// The result backend refused the last store (reported once).
    pub backend_down: AtomicBool,
    /// Consumed queues behind a non-direct exchange, as the broker holds it
    /// (see [`crate::broker::declare_queue`]); set on every connect.
    pub routed_exchanges: std::sync::RwLock<Vec<String>>,
}

impl Shared {
    /// Records which queues' exchanges are not direct on the broker.
    pub fn set_routed_exchanges(&self, queues: &[String]) {
        if let Ok(mut list) = self.routed_exchanges.write() {
            list.clear();
            list.extend_from_slice(queues);
        }
    }

    /// Whether queue `name`'s exchange is not direct on the broker.
    pub fn routed_exchange(&self, name: &str) -> bool {
        self.routed_exchanges
            .read()
            .is_ok_and(|list| list.iter().any(|q| q == name))
    }

    /// The configured queue `name`.
    pub fn queue_spec(&self, name: &str) -> Option<&crate::broker::QueueSpec> {
        self.config.queues.iter().find(|q| q.name == name)
    }

    /// Where a message `delivery` consumed from `queue` goes to reach that
    /// queue again: where it came from, but not back into RabbitMQ's
    /// delayed-delivery levels (a message that waited there arrives from
    /// `celery_delayed_delivery` with a delay prefix on its routing key,
    /// which would delay it again and grow with every send).
    pub fn home_route<'a>(
        &'a self,
        delivery: &'a crate::task::DeliveryInfo,
        queue: &'a str,
    ) -> (&'a str, &'a str) {
        let key = crate::broker::delayed::strip_delay(&delivery.routing_key);
        if !delivery.exchange.starts_with("celery_delayed") {
            return (delivery.exchange.as_str(), key);
        }
        match self.queue_spec(queue) {
            Some(q) => (q.exchange.as_str(), key),
            None => ("", queue),
        }
    }

    /// The delivery limit of the consumed `queue` where a requeue can reach
    /// it: its declared `x-delivery-limit`, else RabbitMQ 4's default of 20
    /// (a limit set by a policy is not visible to a client); `None` for a
    /// negative limit (none).
    pub fn delivery_limit(&self, queue: &str) -> Option<u64> {
        let declared = self
            .queue_spec(queue)
            .and_then(|q| q.declared.queue_arguments.get("x-delivery-limit"))
            .and_then(serde_json::Value::as_i64);
        match declared {
            Some(limit) => u64::try_from(limit).ok(),
            None => Some(DEFAULT_DELIVERY_LIMIT),
        }
    }
}

/// A quorum queue's delivery limit when none is set, since RabbitMQ 4.0.
pub const DEFAULT_DELIVERY_LIMIT: u64 = 20;

/// What one count is about: the task, the queue its message came from, and
/// the exception class of a failure (empty otherwise).
#[derive(Debug, Clone, Copy)]
pub struct CountKey<'a> {
    /// The task name.
    pub task: &'a str,
    /// The queue the message was consumed from.
    pub queue: &'a str,
    /// The exception class of a failure, or empty.
    pub exception: &'a str,
}

/// One task's entries in the shared stats table.
#[derive(Default)]
pub struct StatIndexes {
    /// Its run-time limits entry.
    limits: Option<usize>,
    /// Its counter entries: (queue, exception class, index).
    counters: Vec<(String, String, usize)>,
}

impl Shared {
    /// Looks `task` up in the per-process cache (no allocation when it is
    /// there); `pick` reads an index from its entry, `find` fills a miss.
    fn cached(
        &self,
        task: &str,
        pick: impl Fn(&StatIndexes) -> Option<usize>,
        find: impl FnOnce(&mut StatIndexes) -> usize,
    ) -> usize {
        let mut cache = self.stat_indexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.get(task).and_then(&pick) {
            return i;
        }
        if cache.len() >= crate::shm::TASK_STATS && !cache.contains_key(task) {
            return find(&mut StatIndexes::default());
        }
        find(cache.entry(task.to_owned()).or_default())
    }

    /// Hands an end decided outside a task's run (its process died or hit
    /// the hard limit, or it was revoked) to a task that settles itself (a
    /// Python task: its backend, errbacks and signals); `false` if the
    /// worker must store the document itself.
    pub(super) async fn settle_elsewhere(
        &self,
        msg: &Arc<TaskMessage>,
        job: Option<&super::job::Job>,
        store_result: bool,
        end: End,
    ) -> bool {
        let Some(task) = self.registry.get(&msg.task).filter(|t| t.settles_itself) else {
            return false;
        };
        task.handler
            .settle_elsewhere(Elsewhere {
                msg: Arc::clone(msg),
                delivery: job.map(|j| j.delivery.clone()).unwrap_or_default(),
                store_result,
                end,
            })
            .await
    }

    /// How long a run of `task` must wait for its turn under its rate
    /// limit, or `None` (turn taken) when it may start now.
    pub fn rate_turn(&self, task: &str) -> Option<std::time::Duration> {
        let rate = self.runtime_limits(task).rate?;
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
        let now_us = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000;
        self.link
            .shm
            .take_rate_turn(self.stat_index(task), rate, now_us)
            .map(std::time::Duration::from_micros)
    }

    fn stat_index(&self, task: &str) -> usize {
        self.cached(
            task,
            |e| e.limits,
            |e| *e.limits.insert(self.link.shm.task_stat_index(task)),
        )
    }

    fn counter_index(&self, key: CountKey<'_>) -> usize {
        self.cached(
            key.task,
            |e| {
                e.counters
                    .iter()
                    .find(|(q, x, _)| q == key.queue && x == key.exception)
                    .map(|(_, _, i)| *i)
            },
            |e| {
                let i = self
                    .link
                    .shm
                    .task_counter_index(key.task, key.queue, key.exception);
                e.counters
                    .push((key.queue.to_owned(), key.exception.to_owned(), i));
                i
            },
        )
    }

    /// Counts a task outcome (and its runtime) in the shared metrics.
    pub fn record(&self, key: CountKey<'_>, outcome: Outcome, runtime: Option<f64>) {
        let index = self.counter_index(key);
        self.link.shm.record_task(index, outcome, runtime);
    }

    /// Counts a message accepted for running.
    pub fn count_received(&self, key: CountKey<'_>) {
        self.link.shm.count_received(self.counter_index(key));
    }

    /// Counts a run that starts.
    pub fn count_started(&self, key: CountKey<'_>) {
        self.link.shm.count_started(self.counter_index(key));
    }

    /// Limits set at run time by `time_limit` / `rate_limit` for `task`.
    pub fn runtime_limits(&self, task: &str) -> crate::shm::RuntimeLimits {
        self.link.shm.runtime_limits(self.stat_index(task))
    }

    /// Points publishing at a new connection's channels after a reconnect.
    pub fn use_channels(&self, confirmed: Channel, results: Channel, events: Channel) {
        self.events.use_channel(events);
        *self.confirmed.write().unwrap_or_else(|e| e.into_inner()) = confirmed;
        if let Some(Backend::Rpc(rpc)) = &self.backend {
            rpc.use_channel(results);
        }
    }

    /// Stores a result. While the backend does not take it (Redis down, the
    /// broker connection of rpc:// being replaced) the store is retried
    /// with backoff, so no result is lost; the task's slot stays busy
    /// meanwhile. The first failure is logged once for the process, and
    /// the recovery once.
    pub async fn store(&self, msg: &TaskMessage, doc: ResultDocument) {
        let Some(backend) = &self.backend else { return };
        let mut attempt = 0u32;
        loop {
            match backend.store(msg, &doc).await {
                Ok(()) => {
                    if self.backend_down.swap(false, Ordering::AcqRel) {
                        info!("the result backend takes results again");
                    }
                    return;
                }
                Err(e) => {
                    if !self.backend_down.swap(true, Ordering::AcqRel) {
                        warn!(task_id = %msg.id, "cannot store results, retrying until the backend takes them: {e}");
                    } else {
                        debug!(task_id = %msg.id, "still cannot store {} for {}[{}]: {e}", doc.status.as_str(), msg.display_name(), msg.id);
                    }
                    tokio::time::sleep(BROKER_RECONNECT.delay(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
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
