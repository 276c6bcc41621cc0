//! The control process: forked beside the task processes, it owns the
//! worker-level duties that need an async runtime and never runs tasks —
//! worker events (online, heartbeat every 2 s, offline), remote control
//! (pidbox) and the Prometheus endpoint.

mod pidbox;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Consumer, ExchangeKind};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, info, warn};

use crate::backoff::BROKER_RECONNECT;
use crate::broker::{
    declare_exchange, json_properties, publish, table_to_json, BrokerError, ExchangeType, Outgoing,
};
use crate::config::WorkerConfig;
use crate::events::Events;
use crate::protocol::events::{self as ev, EventSource, HEARTBEAT_FREQ};
use crate::shm::{ChildState, SharedState};
use crate::signals::{Doorbell, ProcessSignals};
use crate::task::Registry;
use crate::token::{ConnectError, TokenKeeper};
pub use pidbox::{addressed_to, Effect, Pidbox};

/// The fanout exchange remote-control requests are broadcast on.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
/// The direct exchange replies go to.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// The body of the forked control process; returns its exit code.
pub fn main(
    shm: SharedState,
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    host: Option<Arc<dyn crate::host::TaskHost>>,
) -> i32 {
    crate::logging::set_process_name("ControlProcess".to_owned());
    shm.control_slot().set_state(ChildState::Booting);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    // A hosted app's worker-level signals: ready once the worker consumes,
    // shutting down when it starts to drain, shutdown when it has stopped.
    let announced = Arc::new(std::sync::atomic::AtomicU8::new(0));
    if let Some(host) = &host {
        let (host, announced) = (Arc::clone(host), Arc::clone(&announced));
        runtime.spawn(async move {
            // A task process that starts consuming, and the supervisor
            // when the drain begins, ring the doorbell; listening before
            // looking, no ring is missed.
            let mut doorbell = Doorbell::install();
            let consuming = || {
                shm.task_slots()
                    .iter()
                    .any(|s| s.state() == ChildState::Consuming)
            };
            while !consuming() {
                doorbell.rung().await;
            }
            host.worker_ready();
            announced.store(1, Ordering::Release);
            while !shm.draining() {
                doorbell.rung().await;
            }
            if announced.swap(2, Ordering::AcqRel) == 1 {
                host.worker_shutting_down();
            }
        });
    }
    let code = runtime.block_on(run(shm, config, registry));
    if let Some(host) = host {
        // The drain may have been quicker than the watcher's next look.
        if announced.swap(2, Ordering::AcqRel) == 1 {
            host.worker_shutting_down();
        }
        host.worker_stopped();
    }
    code
}

struct Session {
    /// Shared with the token keeper (weakly), which pushes fresh tokens to it.
    conn: Arc<Connection>,
    events: Channel,
    replies: Channel,
    requests: Consumer,
    /// The connection's events: a channel the broker closes is an error
    /// there, which starts [`repair_channels`] at once.
    happenings: std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send>>,
    /// The token generation awaited before reopening closed channels.
    renewal: Option<u64>,
}

impl Session {
    /// Whether a publishing channel of the live connection is closed: the
    /// loop then looks every second until it is open again.
    fn channels_closed(&self) -> bool {
        self.conn.status().connected()
            && !(self.events.status().connected() && self.replies.status().connected())
    }
}

/// What woke the loop on the broker's side.
enum FromBroker {
    Request(Option<lapin::Result<Box<lapin::message::Delivery>>>),
    Happening(lapin::Event),
}

/// How often the loop looks while a channel is closed.
const REPAIR_EVERY: Duration = Duration::from_secs(1);

/// When the broker closed the events or replies channel on a live
/// connection (with OAuth 2 tokens: 403 once the token expired), gets a
/// fresh token pushed, then reopens them; the pidbox consumer is untouched.
async fn repair_channels(s: &mut Session, tokens: Option<&TokenKeeper>, events: &Events) {
    if !s.conn.status().connected()
        || (s.events.status().connected() && s.replies.status().connected())
    {
        s.renewal = None;
        return;
    }
    if let Some(tokens) = tokens {
        match s.renewal {
            None => {
                warn!("the broker closed a publishing channel (with OAuth 2 tokens: the token may have expired); getting a fresh token before reopening it");
                s.renewal = Some(tokens.generation());
                tokens.request_renewal();
                return;
            }
            Some(asked) if tokens.generation() == asked => return,
            Some(_) => {}
        }
    }
    let reopened = async {
        if !s.events.status().connected() {
            let channel = s
                .conn
                .create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?;
            crate::events::declare_exchange(&channel).await?;
            events.use_channel(channel.clone());
            s.events = channel;
        }
        if !s.replies.status().connected() {
            s.replies = s
                .conn
                .create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?;
        }
        Ok::<_, BrokerError>(())
    };
    match reopened.await {
        Ok(()) => {
            s.renewal = None;
            warn!("reopened the control channels the broker had closed");
        }
        Err(e) => debug!("cannot reopen the closed control channels yet: {e}"),
    }
}

/// With quorum queues, native delayed delivery as Celery's worker declares
/// it (see [`crate::broker::delayed`]), on channels of its own: the delay
/// levels, and every consumed queue whose exchange is not direct *on the
/// broker* (an existing exchange of another type than configured is
/// adopted) bound to the delivery exchange, so a countdown/ETA task a
/// producer routes through the levels reaches it. A
/// broker that refuses it (permissions) is reported once: ETA tasks are
/// then held in memory, as on classic queues.
async fn delayed_delivery(
    conn: &Connection,
    config: &WorkerConfig,
    shm: SharedState,
    reported: &mut bool,
) {
    let Some(queue_type) = config.queues.iter().find_map(|q| q.queue_type.clone()) else {
        return;
    };
    // Which exchanges are not direct on the broker: the queues are declared
    // here too (as the task processes do; so the binding cannot come first).
    let mut routed = Vec::new();
    let mut direct = Vec::new();
    for spec in &config.queues {
        let kind = if spec.declared.exclusive {
            crate::broker::exchange_type_in_force(conn, spec).await
        } else {
            crate::broker::declare_queue(conn, spec).await
        };
        match kind {
            Ok(ExchangeType::Direct) => direct.push(spec.name.clone()),
            Ok(_) => routed.push(spec),
            Err(e) => {
                debug!(queue = %spec.name, "cannot declare the queue for delayed delivery yet: {e}")
            }
        }
    }
    let declared = async {
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("open channel"))?;
        let result = async {
            crate::broker::delayed::declare_levels(&channel, &queue_type).await?;
            for spec in &routed {
                crate::broker::delayed::bind(&channel, spec).await?;
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        let _ = channel.close(200, ShortString::from("done")).await;
        result
    }
    .await;
    shm.set_delayed_delivery(declared.is_ok());
    match declared {
        Ok(()) => {
            info!("native delayed delivery declared for {queue_type} queues");
            if !direct.is_empty() && !*reported {
                warn!(
                    "queues {direct:?} use a direct exchange: Python producers send their countdown/ETA tasks straight to them (held in memory here); use --exchange-type topic for native delayed delivery"
                );
            }
        }
        Err(e) if !*reported => warn!(
            "native delayed delivery is not available ({e}); countdown/ETA tasks are held in memory by the task processes"
        ),
        Err(e) => debug!("native delayed delivery still not available: {e}"),
    }
    *reported = true;
}

/// Connects and declares the event exchange, the pidbox exchanges and this
/// node's pidbox queue (non-durable, exclusive, auto-delete, with kombu's
/// TTL and expiry), then consumes it without acknowledgements.
async fn open_session(
    config: &WorkerConfig,
    tokens: Option<&TokenKeeper>,
) -> Result<Session, ConnectError> {
    let name = format!(
        "celeriac {} control pid {}",
        config.hostname,
        std::process::id()
    );
    let conn = crate::token::connect(&config.broker_url, &name, tokens).await?;
    let happenings = Box::pin(conn.events_listener());
    let events = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    crate::events::declare_exchange(&events).await?;
    let replies = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    declare_exchange(&replies, REPLY_EXCHANGE, ExchangeKind::Direct, false).await?;
    let requests = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    declare_exchange(&requests, PIDBOX_EXCHANGE, ExchangeKind::Fanout, false).await?;
    let queue = format!("{}.celery.pidbox", config.hostname);
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongInt(300_000),
    );
    args.insert(ShortString::from("x-expires"), AMQPValue::LongInt(10_000));
    requests
        .queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(BrokerError::amqp("declare the pidbox queue"))?;
    requests
        .queue_bind(
            ShortString::from(queue.as_str()),
            ShortString::from(PIDBOX_EXCHANGE),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("bind the pidbox queue"))?;
    let requests = requests
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("celeriac-pidbox"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("consume the pidbox queue"))?;
    Ok(Session {
        conn,
        events,
        replies,
        requests,
        happenings,
        renewal: None,
    })
}

fn status(shm: &SharedState, freq: f64) -> Vec<(&'static str, Value)> {
    let slots = shm.task_slots();
    let active = slots.iter().filter(|s| s.running_task().is_some()).count() as u64;
    let processed = slots.iter().map(|s| s.processed()).sum();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut l = load
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    ev::worker_status(
        freq,
        active,
        processed,
        [
            l.next().unwrap_or(0.0),
            l.next().unwrap_or(0.0),
            l.next().unwrap_or(0.0),
        ],
    )
}

async fn run(shm: SharedState, config: Arc<WorkerConfig>, registry: Arc<Registry>) -> i32 {
    let Ok(mut signals) = ProcessSignals::install() else {
        error!("cannot install signal handlers");
        return crate::exit::FAILED;
    };
    let listener = match config.metrics_bind {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => {
                let local = l
                    .local_addr()
                    .map_or_else(|_| addr.to_string(), |a| a.to_string());
                info!("metrics on http://{local}/metrics");
                Some(l)
            }
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!("; another process (a second worker on this host?) holds port {}: give each worker its own with --metrics-bind HOST:PORT (CELERIAC_METRICS_BIND), or --metrics-bind none", addr.port())
                } else {
                    String::new()
                };
                error!("metrics endpoint disabled: cannot listen on {addr}: {e}{hint}");
                None
            }
        },
        None => None,
    };
    let supervisor = nix::unistd::getppid().as_raw();
    let source = EventSource {
        hostname: config.hostname.clone(),
        pid: supervisor as u32,
        utcoffset: ev::local_utcoffset(),
    };
    let events = Events::new(source, Some(shm), config.task_events);
    let tokens = match TokenKeeper::new(&config.broker_auth, shm.control_slot()) {
        Ok(tokens) => tokens,
        Err(e) => {
            error!("cannot start: {e}");
            return crate::exit::FAILED;
        }
    };
    // The refresh loop starts with the first connection's token.
    let mut refreshing = false;
    let pidbox = Pidbox::new(shm, Arc::clone(&config), registry, supervisor);
    let slot = shm.control_slot();
    let mut session: Option<Session> = None;
    // Whether a connection was lost: the next one is then a reconnect.
    let mut lost = false;
    let mut attempt: u32 = 0;
    let mut next_connect = tokio::time::Instant::now();
    // The heartbeat the supervisor watches (as a task process's), and the
    // safety nets: a drain or the supervisor's death whose signal was lost.
    let beat_every = crate::shm::beat_period(config.child_heartbeat_timeout);
    let mut next_beat = tokio::time::Instant::now();
    // --heartbeat-interval, or none at all with --without-heartbeat.
    let send_heartbeats = config.heartbeat_interval.is_some();
    let period = config
        .heartbeat_interval
        .unwrap_or(Duration::from_secs_f64(HEARTBEAT_FREQ));
    let freq = period.as_secs_f64();
    let mut heartbeat = tokio::time::interval(period);
    let beat_with_heartbeats = send_heartbeats && period <= beat_every;
    let mut delayed_reported = false;
    loop {
        if session.is_none() && tokio::time::Instant::now() >= next_connect {
            match open_session(&config, tokens.as_ref()).await {
                Ok(s) => {
                    if let (Some(tokens), false) = (&tokens, refreshing) {
                        refreshing = true;
                        tokio::spawn(tokens.clone().run());
                    }
                    events.use_channel(s.events.clone());
                    delayed_delivery(&s.conn, &config, shm, &mut delayed_reported).await;
                    if lost {
                        slot.count_reconnect();
                    }
                    if lost {
                        warn!("control connection re-established");
                    } else if attempt > 0 {
                        info!("control process connected after {attempt} attempt(s)");
                    }
                    lost = false;
                    attempt = 0;
                    events.worker("worker-online", status(&shm, freq)).await;
                    slot.set_state(ChildState::Consuming);
                    session = Some(s);
                }
                Err(e) => {
                    // At startup the supervisor reports an unreachable or
                    // refusing broker for the whole worker; this process
                    // speaks up only for a problem of its own (task
                    // processes consume) or a loss.
                    let own_problem = lost
                        || shm
                            .task_slots()
                            .iter()
                            .any(|s| s.state() == ChildState::Consuming);
                    if attempt == 0 && own_problem {
                        warn!("control process cannot reach the broker: {e}; retrying");
                    } else {
                        debug!("control process cannot reach the broker: {e}; retrying");
                    }
                    attempt += 1;
                    slot.set_state(ChildState::Reconnecting);
                    next_connect = tokio::time::Instant::now() + BROKER_RECONNECT.delay(attempt);
                }
            }
        }
        let connected = session.is_some();
        // While worker-heartbeats go out at least as often, the beat rides
        // on them: one wake-up instead of two timers.
        let riding = connected
            && beat_with_heartbeats
            && !session.as_ref().is_some_and(Session::channels_closed);
        let from_broker = async {
            match session.as_mut() {
                Some(s) => tokio::select! {
                    item = s.requests.next() => FromBroker::Request(item.map(|r| r.map(Box::new))),
                    Some(happening) = s.happenings.next() => FromBroker::Happening(happening),
                },
                None => std::future::pending().await,
            }
        };
        let mut beat_now = false;
        tokio::select! {
            _ = signals.recv() => break,
            () = tokio::time::sleep_until(next_beat), if !riding => beat_now = true,
            _ = heartbeat.tick(), if connected && send_heartbeats => {
                events.worker("worker-heartbeat", status(&shm, freq)).await;
                beat_now = riding;
            }
            () = tokio::time::sleep_until(next_connect), if !connected => {}
            from_broker = from_broker => match from_broker {
                FromBroker::Happening(happening) => {
                    if let (lapin::Event::Error(e), Some(s)) = (happening, session.as_mut()) {
                        debug!("control connection event: {e}");
                        repair_channels(s, tokens.as_ref(), &events).await;
                        if s.channels_closed() {
                            next_beat = next_beat.min(tokio::time::Instant::now() + REPAIR_EVERY);
                        }
                    }
                }
                FromBroker::Request(Some(Ok(delivery))) => {
                    let replies = session.as_ref().map(|s| s.replies.clone());
                    if let Some(replies) = replies {
                        if handle_request(&delivery, &pidbox, &events, &shm, &config.hostname, &replies).await == Effect::Shutdown {
                            debug!("shutdown requested; the supervisor will stop this process");
                        }
                    }
                }
                FromBroker::Request(other) => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "the pidbox consumer was cancelled".to_owned(),
                    };
                    warn!("control connection lost: {why}; reconnecting");
                    session = None;
                    lost = true;
                    slot.set_state(ChildState::Reconnecting);
                    next_connect = tokio::time::Instant::now() + BROKER_RECONNECT.delay(0);
                }
            },
            accepted = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                match accepted {
                    Ok((stream, _)) => {
                        let config = Arc::clone(&config);
                        tokio::spawn(async move {
                            if let Err(e) = serve_metrics(stream, shm, &config).await {
                                debug!("metrics request failed: {e}");
                            }
                        });
                    }
                    Err(e) => debug!("accept failed: {e}"),
                }
            }
        }
        if beat_now {
            slot.beat();
            // The supervisor stops the control process last; a drain whose
            // signal arrived before our handlers still ends here.
            if shm.draining() && shm.task_slots().iter().all(|s| s.pid() == 0) {
                break;
            }
            // A supervisor killed before our handlers existed: its SIGTERM
            // (pdeathsig) was lost, so look.
            if nix::unistd::getppid().as_raw() != supervisor {
                warn!("the supervisor is gone: stopping");
                break;
            }
            if let Some(s) = session.as_mut() {
                repair_channels(s, tokens.as_ref(), &events).await;
            }
            let closed = session.as_ref().is_some_and(Session::channels_closed);
            next_beat = tokio::time::Instant::now()
                + if closed {
                    REPAIR_EVERY.min(beat_every)
                } else {
                    beat_every
                };
        }
    }
    if let Some(s) = session {
        events.worker("worker-offline", status(&shm, freq)).await;
        let _ = s.conn.close(200, ShortString::from("bye")).await;
    }
    0
}

/// Answers one pidbox request if it is addressed to this node.
async fn handle_request(
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

/// Answers one HTTP/1.x request: `GET /metrics` gets the exposition.
async fn serve_metrics(
    mut stream: TcpStream,
    shm: SharedState,
    config: &WorkerConfig,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
        })??;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::render(&shm, config),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "celeriac worker: see /metrics\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
