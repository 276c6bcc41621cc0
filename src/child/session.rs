//! The connection of a task process: opening it (declare, QoS, channels),
//! losing it, and getting it back with backoff.

use std::time::Duration;

use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Child, ChildError, Exit};
use crate::backoff::BROKER_RECONNECT;
use crate::broker::{connect, declare_queue, mask_url, BrokerError};
use crate::config::WorkerConfig;
use crate::shm::ChildState;
use crate::signals::Stop;

/// Everything tied to one AMQP connection.
pub(super) struct Session {
    pub(super) conn: Connection,
    /// Consumers and their acknowledgements.
    pub(super) channel: Channel,
    /// Publisher confirms: retries, follow-ups, re-published tasks.
    pub(super) confirmed: Channel,
    /// rpc:// results.
    pub(super) results: Channel,
    /// Task events.
    pub(super) events: Channel,
}

/// Connects, declares the queues and sets the per-consumer QoS.
pub(super) async fn open(config: &WorkerConfig, prefetch: u16) -> Result<Session, ChildError> {
    let name = format!("celeriac {} pid {}", config.hostname, std::process::id());
    let conn = connect(&config.broker_url, &name).await?;
    for spec in &config.queues {
        declare_queue(&conn, spec).await?;
    }
    let channel = open_channel(&conn).await?;
    // Per-consumer QoS (global=false): works on quorum queues and RabbitMQ 4.
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(BrokerError::amqp("basic.qos"))?;
    let confirmed = crate::broker::confirm_channel(&conn).await?;
    let results = open_channel(&conn).await?;
    let events = open_channel(&conn).await?;
    crate::events::declare_exchange(&events).await?;
    Ok(Session {
        conn,
        channel,
        confirmed,
        results,
        events,
    })
}

async fn open_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))
}

impl Child {
    /// Forgets a dead connection. Messages received on it but not started
    /// are dropped here: the broker requeues them itself. Running tasks go
    /// on; acknowledging them on the dead channel fails (logged), and the
    /// broker redelivers acks-late ones.
    pub(super) fn lose_session(&mut self) {
        self.link.slot().set_state(ChildState::Reconnecting);
        self.consumers.clear();
        // A new connection consumes at once (its channel is new too).
        self.timed_out = false;
        let dropped = self.held.clear();
        if dropped > 0 {
            info!("{dropped} received message(s) will be redelivered by the broker");
        }
        self.session = None;
    }

    /// Re-establishes the connection with backoff and jitter, re-declares,
    /// re-applies QoS and resumes consuming. Returns `Some` if a shutdown
    /// signal arrived first. Logs once per state change, not per try.
    pub(super) async fn reconnect(&mut self) -> Result<Option<Exit>, ChildError> {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut attempt: u32 = 0;
        loop {
            let wait = tokio::time::sleep(BROKER_RECONNECT.delay(attempt));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    stop = self.signals.recv() => {
                        info!("shutdown requested while reconnecting");
                        let timeout = match stop {
                            Stop::Cold => Duration::ZERO,
                            Stop::Warm => self.shared.config.shutdown_timeout,
                        };
                        self.wait_running(timeout).await;
                        return Ok(Some(Exit::Shutdown));
                    }
                    _ = heartbeat.tick() => {
                        self.tick().await;
                        if self.link.orphaned() || self.link.shm.draining() {
                            info!("the worker is stopping while this process reconnects");
                            self.wait_running(self.shared.config.shutdown_timeout).await;
                            return Ok(Some(Exit::Shutdown));
                        }
                    }
                    Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => self.finished(done),
                }
            }
            attempt += 1;
            match open(&self.shared.config, self.prefetch).await {
                Ok(session) => {
                    self.shared.use_channels(
                        session.confirmed.clone(),
                        session.results.clone(),
                        session.events.clone(),
                    );
                    self.channel = session.channel.clone();
                    self.session = Some(session);
                    self.start_consuming().await?;
                    self.link.slot().count_reconnect();
                    warn!(
                        "Reconnected to {} after {attempt} attempt(s)",
                        mask_url(&self.shared.config.broker_url)
                    );
                    return Ok(None);
                }
                Err(e) if attempt == 1 => {
                    warn!("Cannot reach the broker yet: {e}; retrying with backoff")
                }
                Err(e) => debug!("reconnect attempt {attempt} failed: {e}"),
            }
        }
    }

    /// Lets running tasks finish, up to `timeout` (no broker to hand them back to).
    pub(super) async fn wait_running(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.finished(done),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.running.abort_all();
    }
}
