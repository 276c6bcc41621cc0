//! The connection of a task process: opening it (declare, QoS, channels),
//! losing it, getting it back with backoff, and reopening publishing
//! channels the broker closed (an expired token is refused with 403).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Child, ChildError, Exit};
use crate::backoff::BROKER_RECONNECT;
use crate::broker::{declare_queue, mask_url, BrokerError, ExchangeType};
use crate::config::WorkerConfig;
use crate::shm::ChildState;
use crate::signals::Stop;
use crate::token::{ConnectError, TokenKeeper};

/// Everything tied to one AMQP connection.
pub(super) struct Session {
    /// Shared with the token keeper (weakly), which pushes fresh tokens to it.
    pub(super) conn: Arc<Connection>,
    /// Consumers and their acknowledgements.
    pub(super) channel: Channel,
    /// Publisher confirms: retries, follow-ups, re-published tasks.
    pub(super) confirmed: Channel,
    /// rpc:// results.
    pub(super) results: Channel,
    /// Task events.
    pub(super) events: Channel,
    /// The token generation awaited before reopening closed channels.
    renewal: Option<u64>,
    /// The connection's events: a channel the broker closes is an error
    /// there, which starts [`Child::repair_channels`] at once.
    pub(super) happenings: ConnectionEvents,
    /// The configured queues whose exchange the broker holds as a
    /// non-direct one (configured so, or found so when declaring).
    pub(super) routed_exchanges: Vec<String>,
    /// The channel an idle process checks its consumed queues on
    /// ([`Child::check_consumed_queues`]), opened when first needed.
    pub(super) check: Option<Channel>,
}

/// A connection's event stream (`Connection::events_listener`).
pub(super) type ConnectionEvents =
    std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send + Sync>>;

/// The next event of the session's connection (never, without a session).
pub(super) async fn next_happening(session: &mut Option<Session>) -> Option<lapin::Event> {
    use futures_lite::StreamExt;
    match session {
        Some(s) => s.happenings.next().await,
        None => std::future::pending().await,
    }
}

/// Connects (with a fresh token when the broker takes OAuth 2 tokens),
/// declares the queues and sets the per-consumer QoS.
pub(super) async fn open(
    config: &WorkerConfig,
    prefetch: u16,
    tokens: Option<&TokenKeeper>,
) -> Result<Session, ChildError> {
    let name = format!("celeriac {} pid {}", config.hostname, std::process::id());
    let conn = crate::token::connect(&config.broker_url, &name, tokens)
        .await
        .map_err(|e| match e {
            ConnectError::Broker(e) => ChildError::Broker(e),
            token => ChildError::Boot {
                transient: token.is_transient(),
                message: token.to_string(),
            },
        })?;
    let happenings: ConnectionEvents = Box::pin(conn.events_listener());
    let mut routed_exchanges = Vec::new();
    for spec in &config.queues {
        if declare_queue(&conn, spec).await? != ExchangeType::Direct {
            routed_exchanges.push(spec.name.clone());
        }
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
        check: None,
        channel,
        confirmed,
        results,
        events,
        renewal: None,
        happenings,
        routed_exchanges,
    })
}

/// Reopens the session's closed publishing channels; returns how many.
async fn reopen(session: &mut Session) -> Result<usize, BrokerError> {
    let mut reopened = 0;
    if !session.confirmed.status().connected() {
        session.confirmed = crate::broker::confirm_channel(&session.conn).await?;
        reopened += 1;
    }
    if !session.results.status().connected() {
        session.results = open_channel(&session.conn).await?;
        reopened += 1;
    }
    if !session.events.status().connected() {
        let events = open_channel(&session.conn).await?;
        crate::events::declare_exchange(&events).await?;
        session.events = events;
        reopened += 1;
    }
    Ok(reopened)
}

async fn open_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))
}

impl Child {
    /// Gives up the session's connection. Messages received on it but not
    /// started are dropped here: the broker requeues them itself. Running
    /// tasks go on; acknowledging them on the closed channel fails (logged),
    /// and the broker redelivers acks-late ones.
    ///
    /// A connection that is still up (the broker cancelled one consumer,
    /// or a consumed queue is gone) is closed, as Celery does: its other
    /// consumers would otherwise go on receiving messages that nothing here
    /// settles, and the connection would outlive the session.
    pub(super) fn lose_session(&mut self) {
        self.link.set_state(ChildState::Reconnecting);
        self.consumers.clear();
        // A new connection consumes at once (its channel is new too).
        self.timed_out = false;
        let dropped = self.held.clear();
        if dropped > 0 {
            info!("{dropped} received message(s) will be redelivered by the broker");
        }
        if let Some(old) = self.session.take() {
            if old.conn.status().connected() {
                tokio::spawn(async move {
                    if let Err(e) = old
                        .conn
                        .close(200, lapin::types::ShortString::from("session given up"))
                        .await
                    {
                        debug!("closing the given-up connection: {e}");
                    }
                });
            }
        }
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
            match open(&self.shared.config, self.prefetch, self.tokens.as_ref()).await {
                Ok(session) => {
                    self.shared.use_channels(
                        session.confirmed.clone(),
                        session.results.clone(),
                        session.events.clone(),
                    );
                    self.channel = session.channel.clone();
                    self.shared.set_routed_exchanges(&session.routed_exchanges);
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

    /// Whether a publishing channel of a live connection is closed: the
    /// loop then looks every second until it is open again.
    pub(super) fn channels_closed(&self) -> bool {
        let Some(session) = self.session.as_ref() else {
            return false;
        };
        let open = |c: &Channel| c.status().connected();
        session.conn.status().connected()
            && !(open(&session.confirmed) && open(&session.results) && open(&session.events))
    }

    /// When the connection reports an error, then every second while a
    /// channel stays closed (and at every heartbeat): when the broker
    /// closed a publishing channel (results, confirms, events) on a live
    /// connection — with OAuth 2 tokens, 403 ACCESS_REFUSED once the token
    /// has expired — gets a fresh token pushed first, then reopens the
    /// closed channels, without reconnecting and without touching the
    /// consumers. A closed consumer channel takes the reconnect path instead.
    pub(super) async fn repair_channels(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let open = |c: &Channel| c.status().connected();
        if !session.conn.status().connected()
            || (open(&session.confirmed) && open(&session.results) && open(&session.events))
        {
            session.renewal = None;
            return;
        }
        if let Some(tokens) = &self.tokens {
            match session.renewal {
                None => {
                    warn!("the broker closed a publishing channel (with OAuth 2 tokens: the token may have expired); getting a fresh token before reopening it");
                    session.renewal = Some(tokens.generation());
                    tokens.request_renewal();
                    return;
                }
                Some(asked) if tokens.generation() == asked => return,
                Some(_) => {}
            }
        }
        match reopen(session).await {
            Ok(n) => {
                session.renewal = None;
                self.shared.use_channels(
                    session.confirmed.clone(),
                    session.results.clone(),
                    session.events.clone(),
                );
                warn!("reopened {n} publishing channel(s) the broker had closed");
            }
            Err(e) => debug!("cannot reopen the closed channels yet: {e}"),
        }
    }

    /// Lets running tasks finish, up to `timeout`, then hands back the rest
    /// as a drain does. Without a broker that mostly fails: an acks_late
    /// message is requeued by the broker anyway, and an early-acked task
    /// that cannot be re-published gets its ERROR line and is counted
    /// (`celeriac_task_messages_unpublished_total{kind="hand_back"}`).
    pub(super) async fn wait_running(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.finished(done),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.hand_back_running().await;
    }
}

/// A message forwarded from a consumer given up (its connection lost or
/// closed, or its channel closed by a consumer timeout), read after that:
/// never run here, and never settled on the current channel (its delivery
/// tag means another message there). It goes back through its own channel;
/// that channel is closed or closing, so the broker has requeued it or does
/// so now.
pub(super) fn hand_back_stale(d: lapin::message::Delivery) {
    let id = d
        .properties
        .correlation_id()
        .as_ref()
        .map_or_else(|| "?".to_owned(), |c| c.as_str().to_owned());
    info!(task_id = %id, "{id} arrived on a channel this process has given up: the broker redelivers it");
    tokio::spawn(async move {
        let requeue = lapin::options::BasicRejectOptions { requeue: true };
        if let Err(e) = d.acker.reject(requeue).await {
            debug!(task_id = %id, "returning {id} on its closed channel: {e}");
        }
    });
}
