//! A task process: one AMQP connection consuming the worker's queues,
//! running tasks, settling messages and storing results. The supervisor
//! forks it; it creates its tokio runtime and connection itself.
//!
//! The life of one message, file by file:
//! - `consumers.rs`: a consumer forwards each delivery to the loop;
//! - `serve.rs`: the loop takes it, with signals, heartbeats and timers;
//! - `receive.rs`: decoded, checked (unknown task, lost process, revoked,
//!   expired) and held;
//! - `held.rs`: ready, ETA and rate-limited tasks wait here (pure, no I/O);
//! - `receive.rs` again: dispatched to `execute.rs` when a slot is free;
//! - `execute.rs`: acknowledged early or late, limits set, the task's code
//!   run through `runner.rs` (the seam where a kind of task plugs in), then
//!   settled in `settle.rs`: result stored, follow-ups sent, message settled;
//! - `outcome.rs`: every step above is reported as one `TaskHappening`
//!   (log line, metric and Celery event together).
//!
//! Around it: `session.rs` (connect, lose, reconnect), `lost.rs` (tasks whose
//! process died), `overdue.rs` (tasks longer than the broker's consumer
//! timeout), `drain.rs` (shutdown and recycling), `queued.rs` (what
//! `inspect reserved/scheduled` shows), `job.rs` (decode and settle one
//! delivery), `shared.rs` (what running tasks share).

mod consumers;
mod drain;
mod execute;
mod hand_back;
mod held;
mod job;
mod lost;
mod outcome;
mod overdue;
mod queued;
mod receive;
mod runner;
mod serve;
mod session;
mod settle;
mod shared;

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::broker::{mask_url, BrokerError};
use crate::config::WorkerConfig;
use crate::exit;
use crate::host::TaskHost;
use crate::shm::{ChildState, SharedState, Slot};
use crate::signals::{Doorbell, ProcessSignals};
use crate::task::Registry;
use consumers::Consumers;
use execute::{Finished, RunState};
use held::Held;
use job::Job;
use queued::QueuedLines;
use session::Session;
use shared::Shared;

/// Tasks a process runs at once. A prefork process runs one; the loop is
/// written for any number.
const SLOTS: usize = 1;

/// Why a task process could not run.
#[derive(Debug, Error)]
pub enum ChildError {
    /// The broker refused or dropped us.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend is unreachable.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The connection was lost while consuming.
    #[error("connection to broker lost: {0}")]
    ConnectionLost(String),
    /// The process could not connect, declare or start consuming.
    #[error("{message}")]
    Boot {
        /// What failed.
        message: String,
        /// Whether trying again later may work (the broker is unreachable),
        /// as opposed to a refusal (credentials, vhost, arguments).
        transient: bool,
    },
}

/// How a task process's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained after a shutdown signal.
    Shutdown,
    /// Drained to be replaced (`--max-tasks-per-child`, `--max-memory-per-child`).
    Recycled,
}

/// A task process's place in the supervisor's shared memory.
#[derive(Clone, Copy)]
pub struct Link {
    /// The process's slot index.
    pub index: usize,
    /// The shared region.
    pub shm: SharedState,
    /// The supervisor's pid.
    pub supervisor: i32,
}

impl Link {
    /// This process's slot.
    pub fn slot(&self) -> &'static Slot {
        &self.shm.slots()[self.index]
    }

    /// Publishes the process's state and rings the supervisor (probe file,
    /// readiness) and the control process (a hosted app's `worker_ready`).
    pub fn set_state(&self, state: ChildState) {
        self.slot().set_state(state);
        crate::signals::ring(self.supervisor as u32);
        crate::signals::ring(self.shm.control_slot().pid());
    }

    /// Whether the supervisor is gone. Its death is signalled (SIGTERM by
    /// pdeathsig), but a signal that arrives before the process's handlers
    /// exist is lost, so the process looks once it listens, and then at
    /// every heartbeat.
    pub fn orphaned(&self) -> bool {
        nix::unistd::getppid().as_raw() != self.supervisor
    }
}

/// The body of task process number `index` (in a freshly forked process):
/// runs it on its own single-threaded runtime and returns the exit code.
///
/// With a `host` (tasks of a hosted app), the host starts its side of the
/// process first, and the main thread runs both the runtime and, in place,
/// the hosted tasks ([`crate::task::main_thread`]; a watch thread drives the
/// runtime while a task runs long).
pub fn main(
    index: usize,
    shm: SharedState,
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    host: Option<Arc<dyn TaskHost>>,
) -> i32 {
    let link = Link {
        index,
        shm,
        supervisor: nix::unistd::getppid().as_raw(),
    };
    crate::logging::set_process_name(format!("ForkPoolWorker-{}", index + 1));
    link.set_state(ChildState::Booting);
    let Some(host) = host else {
        return run_process(link, config, registry);
    };
    if let Err(message) = host.task_process_started(index) {
        error!("cannot start: {message}");
        link.slot().set_error(&message);
        return exit::BOOT_REFUSED;
    }
    let code = match runtime() {
        Ok(runtime) => crate::task::main_thread::serve(runtime, async move {
            exit_code(&link, run(config, registry, link).await)
        }),
        Err(e) => exit_code(&link, Err(ChildError::Runtime(e))),
    };
    host.task_process_ending(code);
    code
}

/// The process's current-thread runtime.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(SLOTS + 2)
        .build()
}

/// Runs the process's loop on a current-thread runtime; the exit code.
fn run_process(link: Link, config: Arc<WorkerConfig>, registry: Arc<Registry>) -> i32 {
    let result = match runtime() {
        Ok(runtime) => runtime.block_on(run(config, registry, link)),
        Err(e) => Err(ChildError::Runtime(e)),
    };
    exit_code(&link, result)
}

/// The exit code for how the process's loop ended.
fn exit_code(link: &Link, result: Result<Exit, ChildError>) -> i32 {
    match result {
        Ok(Exit::Shutdown) => exit::DRAINED,
        Ok(Exit::Recycled) => exit::RECYCLED,
        Err(ChildError::Boot { message, transient }) => {
            // The supervisor reports it, once for the whole worker.
            debug!("cannot start: {message}");
            link.slot().set_error(&message);
            if transient {
                exit::UNREACHABLE
            } else {
                exit::BOOT_REFUSED
            }
        }
        Err(e) => {
            error!("stopped: {e}");
            exit::FAILED
        }
    }
}

/// A task being run, as the loop tracks it.
struct Running {
    job_msg: Arc<crate::protocol::TaskMessage>,
    settler: job::Settler,
    acks_late: bool,
    state: Arc<RunState>,
    abort: AbortHandle,
    /// Where its message came from, to hand it back.
    delivery: crate::task::DeliveryInfo,
    /// The queue it was consumed from.
    queue: Arc<str>,
}

/// The task process's loop state.
struct Child {
    shared: Arc<Shared>,
    link: Link,
    channel: lapin::Channel,
    session: Option<Session>,
    prefetch: u16,
    consumers: Consumers,
    held: Held<Job>,
    running: JoinSet<Finished>,
    running_info: HashMap<tokio::task::Id, Running>,
    tasks_run: u64,
    recycle: bool,
    signals: ProcessSignals,
    /// Rung when the shared memory holds news for this process (lost tasks
    /// to settle, queue changes).
    doorbell: Doorbell,
    /// How often the idle loop beats ([`crate::shm::beat_period`]).
    beat_every: std::time::Duration,
    /// The loop's next look ([`Child::tick`]), one wake-up when due.
    tick_timer: crate::deadline::Deadline,
    received: u64,
    /// [`Child::received`] at the last idle check of the consumed queues.
    received_at_check: u64,
    queued: QueuedLines,
    /// This process's broker token, with OAuth 2 (`--broker-auth`).
    tokens: Option<crate::token::TokenKeeper>,
    /// The broker closed the consumer channel for a consumer timeout: no
    /// consuming until the running task is done (see `overdue.rs`).
    timed_out: bool,
}

/// Connects, declares, consumes and runs tasks until a shutdown signal
/// has been handled. A lost connection is re-established with backoff.
async fn run(
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    link: Link,
) -> Result<Exit, ChildError> {
    let pid = std::process::id();
    if link.shm.draining() {
        return Ok(Exit::Shutdown);
    }
    let boot = |e: ChildError| {
        if let ChildError::Boot { .. } = e {
            return e;
        }
        let transient = matches!(
            &e,
            ChildError::Broker(BrokerError::Connect { source, .. }) if matches!(source.kind(), lapin::ErrorKind::IOError(_))
        ) || matches!(&e, ChildError::Backend(_));
        ChildError::Boot {
            message: e.to_string(),
            transient,
        }
    };
    let prefetch = u16::try_from(SLOTS * usize::from(config.prefetch_multiplier)).unwrap_or(0);
    let tokens = crate::token::TokenKeeper::new(&config.broker_auth, link.slot()).map_err(|e| {
        ChildError::Boot {
            message: e.to_string(),
            transient: false,
        }
    })?;
    let session = session::open(&config, prefetch, tokens.as_ref())
        .await
        .map_err(boot)?;
    if let Some(tokens) = &tokens {
        info!("broker tokens from {}", tokens.describe());
        tokio::spawn(tokens.clone().run());
    }
    info!("Connected to {}", mask_url(&config.broker_url));
    let backend = match &config.result_backend {
        Some(url) => Some(
            Backend::connect(url, session.results.clone())
                .await
                .map_err(|e| boot(e.into()))?,
        ),
        None => None,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config: Arc::clone(&config),
        registry,
        confirmed: std::sync::RwLock::new(session.confirmed.clone()),
        backend,
        pid,
        hostname: Arc::from(config.hostname.as_str()),
        link,
        stat_indexes: Default::default(),
        backend_down: Default::default(),
        routed_exchanges: std::sync::RwLock::new(session.routed_exchanges.clone()),
        events: crate::events::Events::new(
            crate::protocol::events::EventSource {
                hostname: config.hostname.clone(),
                pid: link.supervisor as u32,
                utcoffset: crate::protocol::events::local_utcoffset(),
            },
            Some(link.shm),
            config.task_events,
        ),
    });
    shared.events.use_channel(session.events.clone());
    let flusher = Arc::clone(&shared);
    tokio::spawn(async move { flusher.events.run_flusher().await });
    let mut child = Child {
        shared,
        link,
        channel: session.channel.clone(),
        session: Some(session),
        prefetch,
        consumers: Consumers::new(tx),
        held: Held::default(),
        running: JoinSet::new(),
        running_info: HashMap::new(),
        tasks_run: 0,
        recycle: false,
        signals: ProcessSignals::install().map_err(ChildError::Runtime)?,
        doorbell: Doorbell::install(),
        beat_every: crate::shm::beat_period(config.child_heartbeat_timeout),
        tick_timer: crate::deadline::Deadline::new(),
        received: 0,
        received_at_check: 0,
        queued: QueuedLines::default(),
        tokens,
        timed_out: false,
    };
    child.start_consuming().await.map_err(boot)?;
    let result = loop {
        match child.serve(&mut rx).await {
            Err(ChildError::ConnectionLost(why)) => {
                warn!("Connection to broker lost: {why}. Trying to re-establish the connection...");
                child.lose_session();
                match child.reconnect().await {
                    Ok(None) => continue,
                    Ok(Some(exit)) => break Ok(exit),
                    Err(e) => break Err(e),
                }
            }
            other => break other,
        }
    };
    if let Some(session) = child.session.take() {
        crate::broker::close_on_exit(&session.conn, Some(&session.channel)).await;
    }
    result
}
