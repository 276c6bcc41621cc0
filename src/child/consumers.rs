//! The process's consumers: one per consumed queue, each forwarding its
//! deliveries to the loop; started, changed by `add_consumer` /
//! `cancel_consumer`, and replaced when they hold ETA tasks.

use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::ShortString;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{Child, ChildError};
use crate::broker::{declare_queue, BrokerError, QueueSpec};
use crate::shm::ChildState;

/// What a consumer forwards to the loop.
pub(super) enum Incoming {
    /// A message, the tag of the consumer that got it, and the session
    /// (connection) that consumer belonged to ([`Consumers::session`]).
    Delivery(Box<lapin::message::Delivery>, ShortString, u64),
    /// The consumer failed (its channel or connection is gone).
    Failed(lapin::Error, ShortString),
    /// The consumer ended (cancelled).
    Ended(ShortString),
}

/// One consumer.
struct Consumer {
    queue: std::sync::Arc<str>,
    tag: ShortString,
    /// ETA messages it delivered since it was started.
    eta_since_rotation: usize,
}

/// The consumers of the current connection.
pub(super) struct Consumers {
    list: Vec<Consumer>,
    /// Numbers consumer tags, unique within the process.
    seq: u64,
    /// The shared queue-change generation last applied.
    generation: u64,
    /// Counts the consumer channels given up (a lost or closed connection,
    /// a consumer timeout): a delivery forwarded from an earlier one is
    /// never settled on the current channel.
    session: u64,
    tx: mpsc::UnboundedSender<Incoming>,
}

impl Consumers {
    /// No consumers yet; deliveries will go to `tx`.
    pub(super) fn new(tx: mpsc::UnboundedSender<Incoming>) -> Self {
        Self {
            list: Vec::new(),
            seq: 0,
            generation: 0,
            session: 0,
            tx,
        }
    }

    /// Forgets every consumer (their channel is gone); deliveries still
    /// forwarded from them belong to a past session from now on.
    pub(super) fn clear(&mut self) {
        self.list.clear();
        self.session += 1;
    }

    /// The session whose consumers are current.
    pub(super) fn session(&self) -> u64 {
        self.session
    }

    /// Each live consumer's queue and tag.
    pub(super) fn consumed(&self) -> Vec<(std::sync::Arc<str>, ShortString)> {
        self.list
            .iter()
            .map(|c| (std::sync::Arc::clone(&c.queue), c.tag.clone()))
            .collect()
    }

    /// Whether `tag` is one of the current consumers.
    pub(super) fn current(&self, tag: &ShortString) -> bool {
        self.list.iter().any(|c| &c.tag == tag)
    }

    /// The queue the consumer `tag` consumes (empty if it is gone).
    pub(super) fn queue_of(&self, tag: &ShortString) -> std::sync::Arc<str> {
        self.list.iter().find(|c| &c.tag == tag).map_or_else(
            || std::sync::Arc::from(""),
            |c| std::sync::Arc::clone(&c.queue),
        )
    }

    /// Counts an ETA message against the consumer that delivered it.
    pub(super) fn held_eta(&mut self, tag: &ShortString) {
        if let Some(c) = self.list.iter_mut().find(|c| &c.tag == tag) {
            c.eta_since_rotation += 1;
        }
    }

    /// Whether a consumer delivered ETA tasks since it was started (it is
    /// then replaced, see [`Child::rotate_consumers`]).
    pub(super) fn hold_eta(&self) -> bool {
        self.list.iter().any(|c| c.eta_since_rotation > 0)
    }

    /// Takes every consumer's tag, leaving none.
    pub(super) fn take_tags(&mut self) -> Vec<ShortString> {
        self.list.drain(..).map(|c| c.tag).collect()
    }
}

impl Child {
    /// The queues to consume now (the command line plus `add_consumer`, minus `cancel_consumer`).
    fn desired_queues(&self) -> Vec<QueueSpec> {
        self.link.shm.desired_queues(&self.shared.config.queues)
    }

    /// Applies `add_consumer` / `cancel_consumer` changes.
    pub(super) async fn sync_queues(&mut self) -> Result<(), ChildError> {
        let generation = self.link.shm.queues_generation();
        if generation == self.consumers.generation || self.session.is_none() || self.timed_out {
            return Ok(());
        }
        self.consumers.generation = generation;
        let desired = self.desired_queues();
        for c in std::mem::take(&mut self.consumers.list) {
            if desired.iter().any(|q| *q.name == *c.queue) {
                self.consumers.list.push(c);
            } else {
                info!(queue = %c.queue, "no longer consuming from {}", c.queue);
                self.channel
                    .basic_cancel(c.tag.clone(), BasicCancelOptions::default())
                    .await
                    .map_err(BrokerError::amqp("basic.cancel"))?;
            }
        }
        for spec in desired {
            if !self.consumers.list.iter().any(|c| *c.queue == *spec.name) {
                if let Some(session) = &self.session {
                    declare_queue(&session.conn, &spec).await?;
                }
                info!(queue = %spec.name, "consuming from {}", spec.name);
                self.consume(&spec).await?;
            }
        }
        Ok(())
    }

    /// Starts a consumer on every queue and tells the supervisor.
    pub(super) async fn start_consuming(&mut self) -> Result<(), ChildError> {
        self.consumers.generation = self.link.shm.queues_generation();
        for spec in self.desired_queues() {
            if let (Some(session), false) =
                (&self.session, self.shared.config.queues.contains(&spec))
            {
                declare_queue(&session.conn, &spec).await?;
            }
            self.consume(&spec).await?;
        }
        self.link.set_state(ChildState::Consuming);
        info!(queues = ?self.shared.config.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), prefetch = self.prefetch, "consuming");
        Ok(())
    }

    async fn consume(&mut self, spec: &QueueSpec) -> Result<(), ChildError> {
        let queue = spec.name.as_str();
        self.consumers.seq += 1;
        let tag = ShortString::from(format!(
            "celeriac-{}-{}",
            self.shared.pid, self.consumers.seq
        ));
        let mut consumer = self
            .channel
            .basic_consume(
                ShortString::from(queue),
                tag.clone(),
                BasicConsumeOptions::default(),
                crate::broker::json_to_table(&spec.declared.consumer_arguments),
            )
            .await
            .map_err(BrokerError::amqp(format!("basic.consume {queue}")))?;
        let tx = self.consumers.tx.clone();
        let forward_tag = tag.clone();
        let session = self.consumers.session;
        tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                let sent = match item {
                    Ok(d) => tx.send(Incoming::Delivery(
                        Box::new(d),
                        forward_tag.clone(),
                        session,
                    )),
                    Err(e) => {
                        let _ = tx.send(Incoming::Failed(e, forward_tag.clone()));
                        break;
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            let _ = tx.send(Incoming::Ended(forward_tag));
        });
        self.consumers.list.push(Consumer {
            queue: std::sync::Arc::from(queue),
            tag,
            eta_since_rotation: 0,
        });
        Ok(())
    }

    /// Held ETA messages still count against the consumer that delivered
    /// them. With per-consumer QoS the prefetch of a live consumer cannot be
    /// raised, so a consumer holding ETA messages is replaced by a fresh one
    /// (the held messages stay unacked on the channel), up to `--eta-limit`.
    pub(super) async fn rotate_consumers(&mut self) -> Result<(), ChildError> {
        if self.held.scheduled_len() >= self.shared.config.eta_limit {
            return Ok(());
        }
        let list = &mut self.consumers.list;
        let stale: Vec<usize> = (0..list.len())
            .filter(|&i| list[i].eta_since_rotation > 0)
            .collect();
        for i in stale.into_iter().rev() {
            let old = self.consumers.list.remove(i);
            debug!(queue = %old.queue, "replacing consumer {} holding {} ETA task(s)", old.tag, old.eta_since_rotation);
            self.channel
                .basic_cancel(old.tag.clone(), BasicCancelOptions::default())
                .await
                .map_err(BrokerError::amqp("basic.cancel"))?;
            let spec = self
                .desired_queues()
                .into_iter()
                .find(|q| *q.name == *old.queue)
                .unwrap_or_else(|| QueueSpec::celery_default(&old.queue));
            self.consume(&spec).await?;
        }
        Ok(())
    }
}
