//! The control process: forked beside the task processes, it owns the
//! worker-level duties that need an async runtime and never runs tasks —
//! worker events (online, heartbeat every 2 s, offline), remote control
//! (pidbox) and the Prometheus endpoint.

mod metrics_http;
mod pidbox;
mod requests;
mod session;

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
    let code = runtime.block_on(run(shm, config, registry, host.clone()));
    if let Some(host) = host {
        // The drain may have been quicker than the watcher's next look.
        if announced.swap(2, Ordering::AcqRel) == 1 {
            host.worker_shutting_down();
        }
        host.worker_stopped();
    }
    // An app's remote-control handler still running on a blocking thread
    // must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

use metrics_http::serve_metrics;
use requests::handle_request;
use session::{delayed_delivery, open_session, repair_channels, FromBroker, Session, REPAIR_EVERY};

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

async fn run(
    shm: SharedState,
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    host: Option<Arc<dyn crate::host::TaskHost>>,
) -> i32 {
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
    let pidbox = Pidbox::new(shm, Arc::clone(&config), registry, supervisor, host);
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
    // The worker-heartbeat events' and the beat's timers: one wake-up each
    // when due (tokio's wheel would take two or three).
    let mut next_heartbeat = tokio::time::Instant::now();
    let mut heartbeat_timer = crate::deadline::Deadline::new();
    let mut beat_timer = crate::deadline::Deadline::new();
    let beat_with_heartbeats = send_heartbeats && period <= beat_every;
    // The last worker-heartbeat, handed to the connection and not waited for.
    let mut heartbeat_sending: Option<crate::events::Sending<'_>> = None;
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
            () = beat_timer.until(next_beat), if !riding => beat_now = true,
            () = heartbeat_timer.until(next_heartbeat), if connected && send_heartbeats => {
                // Every period; after a late one (a long reconnect), a period from now.
                let now = tokio::time::Instant::now();
                next_heartbeat += period;
                if next_heartbeat <= now {
                    next_heartbeat = now + period;
                }
                // The previous one was handed over a period ago: written by
                // now, unless its connection went away (then it is dropped,
                // as Celery drops events it cannot send).
                if let Some(mut previous) = heartbeat_sending.take() {
                    if !Events::done(&mut previous) {
                        debug!("a worker-heartbeat was not written within {period:?}");
                    }
                }
                heartbeat_sending = events.worker_handed_over("worker-heartbeat", status(&shm, freq));
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
        // Written before worker-offline, so finished (and counted) now.
        if let Some(mut previous) = heartbeat_sending.take() {
            Events::done(&mut previous);
        }
        crate::broker::close_on_exit(&s.conn, None).await;
    }
    0
}
