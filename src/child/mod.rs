//! A task child: one AMQP connection consuming the worker's queues, running
//! tasks, settling messages and storing results. This is the unit the
//! supervisor forks; it creates its tokio runtime and connection itself.

mod execute;
mod job;
mod shared;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::broker::{connect, declare_queue, mask_url, BrokerError};
use crate::config::WorkerConfig;
use crate::protocol::{events, ExceptionInfo, TaskState};
use crate::shm::{ChildState, Lost, LostReason, Outcome, SharedState, Slot, TaskFlags};
use crate::task::Registry;
use execute::{discard_revoked, execute, revoke_reason, Finished, RunState};
use job::{decode, reject, requeue, Decoded, Job};
use shared::Shared;

/// Why a child could not run.
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
    /// The child could not connect, declare or start consuming.
    #[error("{message}")]
    Boot {
        /// What failed.
        message: String,
        /// Whether trying again later may work (the broker is unreachable),
        /// as opposed to a refusal (credentials, vhost, arguments).
        transient: bool,
    },
}

/// How a child's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained after a shutdown signal.
    Shutdown,
    /// Drained to be replaced (`--max-tasks-per-child`, `--max-memory-per-child`).
    Recycled,
}

/// A child's place in the supervisor's shared memory.
#[derive(Clone, Copy)]
pub struct Link {
    /// The child's slot index.
    pub index: usize,
    /// The shared region.
    pub shm: SharedState,
    /// The supervisor's pid.
    pub supervisor: i32,
}

impl Link {
    /// This child's slot.
    pub fn slot(&self) -> &'static Slot {
        &self.shm.slots()[self.index]
    }

    /// Whether the supervisor is gone. Its death is signalled (SIGTERM by
    /// pdeathsig), but a signal that arrives before the child's handlers
    /// exist is lost, so the child also looks every second.
    pub fn orphaned(&self) -> bool {
        nix::unistd::getppid().as_raw() != self.supervisor
    }
}

/// The body of a forked task child: runs [`run_blocking`] with one task
/// slot and returns the process exit code.
pub fn child_main(
    index: usize,
    shm: SharedState,
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
) -> i32 {
    let link = Link {
        index,
        shm,
        supervisor: nix::unistd::getppid().as_raw(),
    };
    let span = tracing::error_span!("child", n = index + 1);
    let _entered = span.enter();
    link.slot().set_state(ChildState::Booting);
    match run_blocking(config, registry, 1, Some(link)) {
        Ok(Exit::Shutdown) => 0,
        Ok(Exit::Recycled) => 0,
        Err(ChildError::Boot { message, transient }) => {
            error!("cannot start: {message}");
            link.slot().set_error(&message);
            if transient {
                crate::supervisor::EXIT_BROKER_UNREACHABLE
            } else {
                crate::supervisor::EXIT_BOOT_FAILURE
            }
        }
        Err(e) => {
            error!("stopped: {e}");
            1
        }
    }
}

/// Runs a child to completion on a fresh single-threaded tokio runtime.
/// Call it only in a process that has no other runtime (after fork).
pub fn run_blocking(
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    slots: usize,
    link: Option<Link>,
) -> Result<Exit, ChildError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(slots.max(1) + 2)
        .build()
        .map_err(ChildError::Runtime)?;
    runtime.block_on(run(config, registry, slots, link))
}

enum Incoming {
    Delivery(Box<lapin::message::Delivery>, ShortString),
    Failed(lapin::Error, ShortString),
    Ended(ShortString),
}

struct ConsumerState {
    queue: String,
    tag: ShortString,
    eta_since_rotation: usize,
}

struct Running {
    job_msg: Arc<crate::protocol::TaskMessage>,
    acker: lapin::Acker,
    acks_late: bool,
    state: Arc<RunState>,
    abort: AbortHandle,
    route: (String, String),
}

struct Child {
    shared: Arc<Shared>,
    channel: Channel,
    session: Option<Session>,
    slots: usize,
    prefetch: u16,
    consumers: Vec<ConsumerState>,
    consumer_seq: u64,
    tx: mpsc::UnboundedSender<Incoming>,
    ready: VecDeque<Job>,
    scheduled: BTreeMap<(chrono::DateTime<Utc>, u64), Job>,
    sched_seq: u64,
    running: JoinSet<Finished>,
    running_info: HashMap<tokio::task::Id, Running>,
    tasks_run: u64,
    recycle: bool,
    signals: ChildSignals,
    received: u64,
    queued_signature: (usize, usize, u64),
    queued_at: Instant,
    next_allowed: HashMap<String, Instant>,
    queues_generation: u64,
}

/// Everything tied to one AMQP connection.
struct Session {
    conn: Connection,
    channel: Channel,
    confirmed: Channel,
    results: Channel,
    events: Channel,
}

fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> ChildError + '_ {
    move |source| {
        ChildError::Broker(BrokerError::Amqp {
            what: what.into(),
            source,
        })
    }
}

/// Connects, declares the queues and sets the per-consumer QoS.
async fn open_session(config: &WorkerConfig, prefetch: u16) -> Result<Session, ChildError> {
    let name = format!("celeriac {} pid {}", config.hostname, std::process::id());
    let conn = connect(&config.broker_url, &name).await?;
    for spec in &config.queues {
        declare_queue(&conn, spec).await?;
    }
    let channel = conn.create_channel().await.map_err(amqp("open channel"))?;
    // Per-consumer QoS (global=false): works on quorum queues and RabbitMQ 4.
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(amqp("basic.qos"))?;
    let confirmed = crate::broker::confirm_channel(&conn).await?;
    let results = conn.create_channel().await.map_err(amqp("open channel"))?;
    let events = conn.create_channel().await.map_err(amqp("open channel"))?;
    crate::events::declare_exchange(&events).await?;
    Ok(Session {
        conn,
        channel,
        confirmed,
        results,
        events,
    })
}

/// Connects, declares, consumes and runs tasks until a shutdown signal
/// has been handled. A lost connection is re-established with backoff.
pub async fn run(
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    slots: usize,
    link: Option<Link>,
) -> Result<Exit, ChildError> {
    let pid = std::process::id();
    if link.is_some_and(|l| l.shm.draining()) {
        return Ok(Exit::Shutdown);
    }
    let boot = |e: ChildError| {
        let transient = matches!(
            &e,
            ChildError::Broker(BrokerError::Connect { source, .. }) if matches!(source.kind(), lapin::ErrorKind::IOError(_))
        ) || matches!(&e, ChildError::Backend(_));
        ChildError::Boot {
            message: e.to_string(),
            transient,
        }
    };
    let prefetch = u16::try_from(slots * usize::from(config.prefetch_multiplier)).unwrap_or(0);
    let session = open_session(&config, prefetch).await.map_err(boot)?;
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
        events: crate::events::Events::new(
            crate::protocol::events::EventSource {
                hostname: config.hostname.clone(),
                pid: link.map_or(pid, |l| l.supervisor as u32),
                utcoffset: crate::protocol::events::local_utcoffset(),
            },
            link.map(|l| l.shm),
            config.task_events,
        ),
    });
    shared.events.use_channel(session.events.clone());
    let flusher = Arc::clone(&shared);
    tokio::spawn(async move { flusher.events.run_flusher().await });
    let mut child = Child {
        shared,
        channel: session.channel.clone(),
        session: Some(session),
        slots: slots.max(1),
        prefetch,
        consumers: Vec::new(),
        consumer_seq: 0,
        tx,
        ready: VecDeque::new(),
        scheduled: BTreeMap::new(),
        sched_seq: 0,
        running: JoinSet::new(),
        running_info: HashMap::new(),
        tasks_run: 0,
        recycle: false,
        signals: ChildSignals::install().map_err(ChildError::Runtime)?,
        received: 0,
        queued_signature: (0, 0, 0),
        queued_at: Instant::now(),
        next_allowed: HashMap::new(),
        queues_generation: 0,
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
        let _ = session.channel.close(200, ShortString::from("bye")).await;
        let _ = session.conn.close(200, ShortString::from("bye")).await;
    }
    result
}

/// The signals a task process reacts to.
struct ChildSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl ChildSignals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// Waits for SIGTERM/SIGINT (false) or SIGQUIT (true).
    async fn recv(&mut self) -> bool {
        tokio::select! {
            _ = self.term.recv() => false,
            _ = self.int.recv() => false,
            _ = self.quit.recv() => true,
        }
    }
}

/// Reconnect delays: 0.5 s doubling to 30 s, with up to 50 % jitter so a
/// fleet of workers does not reconnect in lockstep.
fn reconnect_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(500u64.saturating_mul(1u64 << attempt.min(6)))
        .min(Duration::from_secs(30));
    let seed = u64::from(std::process::id())
        ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into());
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let jitter = (x % 500) as f64 / 1000.0; // 0.0 ..< 0.5
    base.mul_f64(1.0 - jitter)
}

impl Child {
    /// Starts a consumer on every queue and tells the supervisor.
    /// The queues to consume now (the command line plus `add_consumer`, minus `cancel_consumer`).
    fn desired_queues(&self) -> Vec<crate::broker::QueueSpec> {
        match self.shared.link {
            Some(l) => l.shm.desired_queues(&self.shared.config.queues),
            None => self.shared.config.queues.clone(),
        }
    }

    /// Applies `add_consumer` / `cancel_consumer` changes.
    async fn sync_queues(&mut self) -> Result<(), ChildError> {
        let Some(link) = self.shared.link else {
            return Ok(());
        };
        let generation = link.shm.queues_generation();
        if generation == self.queues_generation || self.session.is_none() {
            return Ok(());
        }
        self.queues_generation = generation;
        let desired = self.desired_queues();
        for c in std::mem::take(&mut self.consumers) {
            if desired.iter().any(|q| q.name == c.queue) {
                self.consumers.push(c);
            } else {
                info!(queue = %c.queue, "no longer consuming from {}", c.queue);
                self.channel
                    .basic_cancel(c.tag.clone(), BasicCancelOptions::default())
                    .await
                    .map_err(BrokerError::amqp("basic.cancel"))?;
            }
        }
        for spec in desired {
            if !self.consumers.iter().any(|c| c.queue == spec.name) {
                if let Some(session) = &self.session {
                    declare_queue(&session.conn, &spec).await?;
                }
                info!(queue = %spec.name, "consuming from {}", spec.name);
                self.consume(&spec.name).await?;
            }
        }
        Ok(())
    }

    async fn start_consuming(&mut self) -> Result<(), ChildError> {
        if let Some(link) = self.shared.link {
            self.queues_generation = link.shm.queues_generation();
        }
        for spec in self.desired_queues() {
            if let (Some(session), false) =
                (&self.session, self.shared.config.queues.contains(&spec))
            {
                declare_queue(&session.conn, &spec).await?;
            }
            self.consume(&spec.name).await?;
        }
        if let Some(l) = self.shared.link {
            l.slot().set_state(ChildState::Consuming);
        }
        info!(queues = ?self.shared.config.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), prefetch = self.prefetch, "consuming");
        Ok(())
    }

    /// Forgets a dead connection. Messages received on it but not started
    /// are dropped here: the broker requeues them itself. Running tasks go
    /// on; acknowledging them on the dead channel fails (logged), and the
    /// broker redelivers acks-late ones.
    fn lose_session(&mut self) {
        if let Some(l) = self.shared.link {
            l.slot().set_state(ChildState::Reconnecting);
        }
        self.consumers.clear();
        let dropped = self.ready.len() + self.scheduled.len();
        self.ready.clear();
        self.scheduled.clear();
        if dropped > 0 {
            info!("{dropped} received message(s) will be redelivered by the broker");
        }
        self.session = None;
    }

    /// Re-establishes the connection with backoff and jitter, re-declares,
    /// re-applies QoS and resumes consuming. Returns `Some` if a shutdown
    /// signal arrived first. Logs once per state change, not per try.
    async fn reconnect(&mut self) -> Result<Option<Exit>, ChildError> {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut attempt: u32 = 0;
        loop {
            let wait = tokio::time::sleep(reconnect_delay(attempt));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    cold = self.signals.recv() => {
                        info!("shutdown requested while reconnecting");
                        self.wait_running(if cold { Duration::ZERO } else { self.shared.config.shutdown_timeout }).await;
                        return Ok(Some(Exit::Shutdown));
                    }
                    _ = heartbeat.tick() => {
                        self.tick().await;
                        if self.shared.link.is_some_and(|l| l.orphaned() || l.shm.draining()) {
                            info!("the worker is stopping while this process reconnects");
                            self.wait_running(self.shared.config.shutdown_timeout).await;
                            return Ok(Some(Exit::Shutdown));
                        }
                    }
                    Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => self.finished(done),
                }
            }
            attempt += 1;
            match open_session(&self.shared.config, self.prefetch).await {
                Ok(session) => {
                    self.shared.use_channels(
                        session.confirmed.clone(),
                        session.results.clone(),
                        session.events.clone(),
                    );
                    self.channel = session.channel.clone();
                    self.session = Some(session);
                    self.start_consuming().await?;
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
    async fn wait_running(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.finished(done),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.running.abort_all();
    }

    async fn consume(&mut self, queue: &str) -> Result<(), ChildError> {
        self.consumer_seq += 1;
        let tag = ShortString::from(format!(
            "celeriac-{}-{}",
            self.shared.pid, self.consumer_seq
        ));
        let mut consumer = self
            .channel
            .basic_consume(
                ShortString::from(queue),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("basic.consume {queue}")))?;
        let tx = self.tx.clone();
        let forward_tag = tag.clone();
        tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                let sent = match item {
                    Ok(d) => tx.send(Incoming::Delivery(Box::new(d), forward_tag.clone())),
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
        self.consumers.push(ConsumerState {
            queue: queue.to_owned(),
            tag,
            eta_since_rotation: 0,
        });
        Ok(())
    }

    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Incoming>,
    ) -> Result<Exit, ChildError> {
        let mut rotation = tokio::time::interval(Duration::from_millis(250));
        rotation.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let next_eta = self.next_eta_instant().unwrap_or(far);
            tokio::select! {
                cold = self.signals.recv() => return self.shutdown(rx, cold).await,
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.finished(done);
                    if self.recycle {
                        self.shutdown(rx, false).await?;
                        return Ok(Exit::Recycled);
                    }
                }
                _ = heartbeat.tick() => {
                    self.tick().await;
                    // A SIGTERM sent before our handlers existed was lost:
                    // the shared flag still says the worker is draining, or
                    // the supervisor is gone (its pdeathsig came too early).
                    if self.shared.link.is_some_and(|l| l.shm.draining()) {
                        return self.shutdown(rx, false).await;
                    }
                    if self.shared.link.is_some_and(|l| l.orphaned()) {
                        warn!("the supervisor is gone: draining");
                        return self.shutdown(rx, false).await;
                    }
                }
                incoming = rx.recv(), if !self.recycle => {
                    self.incoming(incoming).await?;
                    // Take what else has arrived before dispatching: fewer wake-ups under load.
                    for _ in 0..64 {
                        let Ok(more) = rx.try_recv() else { break };
                        self.incoming(Some(more)).await?;
                    }
                }
                () = tokio::time::sleep_until(next_eta), if next_eta != far => self.release_due(),
                _ = rotation.tick() => self.rotate_consumers().await?,
            }
            self.dispatch();
            self.publish_queued(false);
            // Task events go out when nothing else is in flight: a quick
            // task's received/started/succeeded share one message.
            self.shared
                .events
                .set_idle(rx.is_empty() && self.running.is_empty());
        }
    }

    async fn incoming(&mut self, incoming: Option<Incoming>) -> Result<(), ChildError> {
        self.shared.events.set_idle(false);
        match incoming {
            Some(Incoming::Delivery(d, tag)) => {
                self.receive(*d, &tag).await;
                Ok(())
            }
            Some(Incoming::Failed(e, tag)) if self.consumers.iter().any(|c| c.tag == tag) => {
                Err(ChildError::ConnectionLost(e.to_string()))
            }
            // A consumer of a connection already given up.
            Some(Incoming::Failed(..)) => Ok(()),
            Some(Incoming::Ended(tag)) if self.consumers.iter().any(|c| c.tag == tag) => Err(
                ChildError::ConnectionLost(format!("consumer {tag} was cancelled by the broker")),
            ),
            Some(Incoming::Ended(_)) => Ok(()),
            None => Err(ChildError::ConnectionLost("consumers stopped".into())),
        }
    }

    fn finished(&mut self, done: Result<(tokio::task::Id, Finished), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some(info) = self.running_info.remove(&id) {
            match done {
                Ok((_, finished)) => {
                    debug!(task_id = %finished.id, "slot free");
                    self.after_task();
                }
                Err(e) => {
                    error!(task_id = %info.job_msg.id, "task runner for {} stopped abnormally: {e}", info.job_msg.id)
                }
            }
        }
    }

    /// `rate_limit`: each of the worker's task processes takes an equal
    /// share of the rate. Returns how long `task` must wait, if it must.
    fn throttle(&mut self, task: &str) -> Option<Duration> {
        let rate = self.shared.runtime_limits(task).rate?;
        let processes = self
            .shared
            .link
            .map_or(self.shared.config.concurrency, |l| l.shm.target());
        let share = rate / processes.max(1) as f64;
        let interval = Duration::from_secs_f64((1.0 / share.max(1e-6)).min(86_400.0));
        let now = Instant::now();
        let next = self.next_allowed.entry(task.to_owned()).or_insert(now);
        if *next > now {
            return Some(*next - now);
        }
        *next = now + interval;
        None
    }

    /// Tells the control process what this process holds but has not
    /// started (for `inspect reserved` and `inspect scheduled`), when it changed.
    /// Under load this runs at most every 100 ms (the heartbeat tick forces
    /// it), to keep it off the per-task path.
    fn publish_queued(&mut self, force: bool) {
        let Some(link) = self.shared.link else { return };
        let signature = (self.ready.len(), self.scheduled.len(), self.received);
        if signature == self.queued_signature
            || (!force && self.queued_at.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.queued_signature = signature;
        self.queued_at = Instant::now();
        let slot = link.slot();
        slot.set_reserved((self.ready.len() + self.scheduled.len()) as u64);
        let line = |job: &Job, eta: Option<String>| {
            crate::inspect::Queued {
                eta,
                id: job.msg.id.clone(),
                name: job.msg.display_name().to_owned(),
                exchange: job.delivery.exchange.clone(),
                routing_key: job.delivery.routing_key.clone(),
                args: crate::inspect::ArgsText::of(&job.msg),
            }
            .line()
                + "\n"
        };
        // Reserved and scheduled alternate, so that when the slot's space
        // runs out both lists are cut, not one of them.
        let reserved = self.ready.iter().take(16).map(|job| line(job, None));
        let scheduled = self
            .scheduled
            .iter()
            .take(16)
            .map(|((eta, _), job)| line(job, Some(crate::protocol::format_iso(*eta))));
        let mut lines = String::new();
        let (mut reserved, mut scheduled) = (reserved.fuse(), scheduled.fuse());
        loop {
            let (r, s) = (reserved.next(), scheduled.next());
            if r.is_none() && s.is_none() {
                break;
            }
            lines.extend(r.into_iter().chain(s));
        }
        slot.set_queued(&lines);
    }

    /// `--max-tasks-per-child` and `--max-memory-per-child` (checked after
    /// each task, as Celery does): finish cleanly and let the supervisor
    /// start a fresh process.
    fn after_task(&mut self) {
        self.tasks_run += 1;
        let cfg = &self.shared.config;
        if cfg
            .max_tasks_per_child
            .is_some_and(|max| self.tasks_run >= max)
        {
            info!("recycling this process after {} task(s)", self.tasks_run);
            self.recycle = true;
        }
        if let Some(limit) = cfg.max_memory_per_child {
            let rss = resident_kib();
            if rss > limit {
                info!("recycling this process: resident memory {rss} KiB is above {limit} KiB");
                self.recycle = true;
            }
        }
    }

    /// Once a second: tell the supervisor we are alive, and store the
    /// failure of early-acked tasks whose process died.
    async fn tick(&mut self) {
        let Some(link) = self.shared.link else { return };
        link.slot().beat();
        self.publish_queued(true);
        if let Err(e) = self.sync_queues().await {
            warn!("could not change the consumed queues: {e}");
        }
        while let Some(lost) = link.shm.claim_report() {
            let msg = lost_message(&lost);
            if let Some(revoke) = link.shm.revoked(&msg.id).filter(|r| r.signal != 0) {
                info!(task_id = %msg.id, "Task {}[{}] terminated by revoke", msg.task, msg.id);
                let exc = ExceptionInfo::revoked("terminated");
                if lost.task.flags & TaskFlags::IGNORE_RESULT == 0 {
                    let doc = self.shared.document(
                        &msg,
                        TaskState::Revoked,
                        serde_json::to_value(&exc).unwrap_or_default(),
                    );
                    self.shared.store(&msg, doc).await;
                }
                self.shared.record(&msg.task, Outcome::Revoked, None);
                self.shared.events.task("task-revoked", || {
                    events::task_revoked(&msg.id, true, Some(revoke.signal as i32), false)
                });
                continue;
            }
            let exc = lost_exception(&lost);
            self.shared.record(&msg.task, Outcome::Failed, None);
            self.shared.events.task("task-failed", || {
                events::task_failed(&msg.id, &exc.repr(), &exc.traceback())
            });
            error!(task_id = %msg.id, "Task {}[{}] failed: {}", msg.task, msg.id, exc.repr());
            if lost.task.flags & TaskFlags::IGNORE_RESULT == 0 {
                let mut doc = self.shared.document(
                    &msg,
                    TaskState::Failure,
                    serde_json::to_value(&exc).unwrap_or_default(),
                );
                doc.traceback = Some(exc.traceback());
                self.shared.store(&msg, doc).await;
            }
        }
    }

    /// For a redelivered message: the record of its process dying, if that is
    /// why it came back. The broker can redeliver before the supervisor has
    /// reaped the process and counted the death (the dead process's slot
    /// still lists the task), so that is waited for briefly: an older record
    /// of the same task would otherwise show one death too few.
    async fn lost_record(&self, id: &str) -> Option<Lost> {
        let link = self.shared.link?;
        for _ in 0..40 {
            if link.shm.running_elsewhere(id, link.index).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        link.shm.find_lost(id)
    }

    /// Celery's WorkerLostError semantics for an acks-late message whose
    /// process died, plus a quarantine for messages that keep killing it.
    /// Returns true when the message was settled (not to be run).
    async fn settle_lost(&self, job: &Job, lost: &Lost) -> bool {
        let link = self
            .shared
            .link
            .expect("lost records exist only under a supervisor");
        let msg = &job.msg;
        let ignore = msg
            .ignore_result
            .unwrap_or(lost.task.flags & TaskFlags::IGNORE_RESULT != 0);
        let store = |exc: ExceptionInfo| async move {
            if !ignore {
                let mut doc = self.shared.document(
                    msg,
                    TaskState::Failure,
                    serde_json::to_value(&exc).unwrap_or_default(),
                );
                doc.traceback = Some(exc.traceback());
                self.shared.store(msg, doc).await;
            }
        };
        if lost.deaths >= self.shared.config.max_task_deaths {
            error!(
                task_id = %msg.id,
                "Task {}[{}] killed its task process {} times; rejecting it without requeue (dead-lettered if the queue has a dead-letter exchange)",
                msg.display_name(), msg.id, lost.deaths
            );
            let exc = lost_exception(lost);
            self.shared.events.task("task-failed", || {
                events::task_failed(&msg.id, &exc.repr(), &exc.traceback())
            });
            self.shared
                .events
                .task("task-rejected", || events::task_rejected(&msg.id, false));
            store(exc).await;
            reject(&job.acker, &msg.id, false).await;
            self.shared.record(&msg.task, Outcome::Rejected, None);
            link.shm.settle_lost(lost.index);
            return true;
        }
        match lost.reason {
            LostReason::WorkerLost if lost.task.flags & TaskFlags::REJECT_ON_WORKER_LOST != 0 => {
                warn!(task_id = %msg.id, "Task {}[{}] was requeued after its process died; running it again", msg.display_name(), msg.id);
                false
            }
            _ => {
                let exc = lost_exception(lost);
                error!(task_id = %msg.id, "Task {}[{}] failed: {}", msg.display_name(), msg.id, exc.repr());
                self.shared.events.task("task-failed", || {
                    events::task_failed(&msg.id, &exc.repr(), &exc.traceback())
                });
                store(exc).await;
                job::ack(&job.acker, &msg.id).await;
                self.shared.record(&msg.task, Outcome::Failed, None);
                link.shm.settle_lost(lost.index);
                true
            }
        }
    }

    async fn receive(&mut self, delivery: lapin::message::Delivery, tag: &ShortString) {
        let (job, acker_id) = match decode(delivery) {
            Decoded::Job(job) => {
                let id = job.msg.id.clone();
                (*job, id)
            }
            Decoded::Bad { id, error, acker } => {
                error!(task_id = %id, "Received invalid task message {id}, rejecting it (requeue=false): {error}");
                reject(&acker, &id, false).await;
                self.shared
                    .record("<invalid message>", Outcome::Rejected, None);
                return;
            }
        };
        let shared = Arc::clone(&self.shared);
        let Some(task) = shared.registry.get(&job.msg.task) else {
            error!(task_id = %acker_id, "Received unregistered task of type '{}' (id {acker_id}); rejecting it", job.msg.task);
            let exc = ExceptionInfo::not_registered(&job.msg.task);
            let mut doc = shared.document(
                &job.msg,
                TaskState::Failure,
                serde_json::to_value(&exc).unwrap_or_default(),
            );
            doc.traceback = None;
            shared.store(&job.msg, doc).await;
            reject(&job.acker, &acker_id, false).await;
            shared.record(&job.msg.task, Outcome::Rejected, None);
            shared.events.task("task-failed", || {
                vec![
                    ("uuid", acker_id.clone().into()),
                    (
                        "exception",
                        format!("NotRegistered('{}')", job.msg.task).into(),
                    ),
                ]
            });
            return;
        };
        info!(task_id = %acker_id, "Task {}[{}] received", job.msg.display_name(), acker_id);
        self.received += 1;
        self.shared
            .events
            .task("task-received", || events::task_received(&job.msg));
        if job.delivery.redelivered {
            if let Some(lost) = self.lost_record(&acker_id).await {
                if self.settle_lost(&job, &lost).await {
                    return;
                }
            }
        }
        if let Some(reason) = revoke_reason(&shared, &job.msg) {
            let ignore = job.msg.ignore_result.unwrap_or(task.options.ignore_result);
            discard_revoked(&shared, &job, reason, ignore).await;
            return;
        }
        match job.msg.eta {
            Some(eta) if eta > Utc::now() => {
                self.sched_seq += 1;
                if let Some(c) = self.consumers.iter_mut().find(|c| &c.tag == tag) {
                    c.eta_since_rotation += 1;
                }
                self.scheduled.insert((eta, self.sched_seq), job);
            }
            _ => self.ready.push_back(job),
        }
    }

    fn next_eta_instant(&self) -> Option<Instant> {
        let (eta, _) = self.scheduled.keys().next()?;
        let wait = (*eta - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }

    fn release_due(&mut self) {
        let now = Utc::now();
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    /// Held ETA messages still count against the consumer that delivered
    /// them. With per-consumer QoS the prefetch of a live consumer cannot be
    /// raised, so a consumer holding ETA messages is replaced by a fresh one
    /// (the held messages stay unacked on the channel), up to `--eta-limit`.
    async fn rotate_consumers(&mut self) -> Result<(), ChildError> {
        if self.scheduled.len() >= self.shared.config.eta_limit {
            return Ok(());
        }
        let stale: Vec<usize> = (0..self.consumers.len())
            .filter(|&i| self.consumers[i].eta_since_rotation > 0)
            .collect();
        for i in stale.into_iter().rev() {
            let old = self.consumers.remove(i);
            debug!(queue = %old.queue, "replacing consumer {} holding {} ETA task(s)", old.tag, old.eta_since_rotation);
            self.channel
                .basic_cancel(old.tag.clone(), BasicCancelOptions::default())
                .await
                .map_err(BrokerError::amqp("basic.cancel"))?;
            self.consume(&old.queue).await?;
        }
        Ok(())
    }

    fn dispatch(&mut self) {
        while self.running.len() < self.slots {
            let Some(job) = self.ready.pop_front() else {
                break;
            };
            if let Some(wait) = self.throttle(&job.msg.task) {
                // Over its rate limit: wait like an ETA task.
                self.sched_seq += 1;
                let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                self.scheduled.insert((at, self.sched_seq), job);
                continue;
            }
            let acks_late = self
                .shared
                .registry
                .get(&job.msg.task)
                .and_then(|t| t.options.acks_late)
                .unwrap_or(self.shared.config.acks_late);
            let state = Arc::new(RunState::default());
            let route = (
                job.delivery.exchange.clone(),
                job.delivery.routing_key.clone(),
            );
            let job_msg = Arc::clone(&job.msg);
            let acker = job.acker.clone();
            let abort =
                self.running
                    .spawn(execute(Arc::clone(&self.shared), job, Arc::clone(&state)));
            self.running_info.insert(
                abort.id(),
                Running {
                    job_msg,
                    acker,
                    acks_late,
                    state,
                    abort,
                    route,
                },
            );
        }
    }

    async fn shutdown(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Incoming>,
        cold: bool,
    ) -> Result<Exit, ChildError> {
        if let Some(link) = self.shared.link {
            link.slot().set_state(ChildState::Draining);
        }
        let timeout = if cold {
            Duration::ZERO
        } else {
            self.shared.config.shutdown_timeout
        };
        info!(
            "{} shutdown: stopping consumers, {} task(s) running, deadline {:?}",
            if cold { "Cold" } else { "Warm" },
            self.running.len(),
            timeout
        );
        for c in std::mem::take(&mut self.consumers) {
            if let Err(e) = self
                .channel
                .basic_cancel(c.tag.clone(), BasicCancelOptions::default())
                .await
            {
                warn!("could not cancel consumer {}: {e}", c.tag);
            }
        }
        // Everything received but not started goes back to the queue.
        let mut returned = 0usize;
        while let Ok(incoming) = rx.try_recv() {
            if let Incoming::Delivery(d, _) = incoming {
                let id = match decode(*d) {
                    Decoded::Job(job) => {
                        requeue(&job.acker, &job.msg.id).await;
                        job.msg.id.clone()
                    }
                    Decoded::Bad { id, acker, .. } => {
                        requeue(&acker, &id).await;
                        id
                    }
                };
                debug!(task_id = %id, "returned {id} to the queue");
                returned += 1;
            }
        }
        for job in self
            .ready
            .drain(..)
            .chain(std::mem::take(&mut self.scheduled).into_values())
        {
            requeue(&job.acker, &job.msg.id).await;
            returned += 1;
        }
        if returned > 0 {
            info!("Returned {returned} unstarted message(s) to the broker");
        }
        let deadline = Instant::now() + timeout;
        while !self.running.is_empty() {
            tokio::select! {
                Some(done) = self.running.join_next_with_id() => self.finished(done),
                () = tokio::time::sleep_until(deadline) => break,
                _ = self.signals.recv() => {
                    warn!("second shutdown signal: stopping running tasks now");
                    break;
                }
            }
        }
        self.hand_back_running().await;
        self.shared.events.flush().await;
        Ok(Exit::Shutdown)
    }

    /// At the drain deadline: acks_late messages are requeued; early-acked
    /// tasks are re-published under their own id (confirmed) before they are
    /// stopped, so nothing is lost either way.
    async fn hand_back_running(&mut self) {
        for (_, run) in self.running_info.drain() {
            run.abort.abort();
            let id = &run.job_msg.id;
            if run.acks_late || !run.state.acked.load(Ordering::Acquire) {
                requeue(&run.acker, id).await;
                warn!(task_id = %id, "Task {}[{}] did not finish before the deadline; requeued", run.job_msg.display_name(), id);
            } else {
                let route = (run.route.0.as_str(), run.route.1.as_str());
                match self
                    .shared
                    .publish_task(&run.job_msg.republish_message(), route)
                    .await
                {
                    Ok(()) => {
                        warn!(task_id = %id, "Task {}[{}] did not finish before the deadline; re-published", run.job_msg.display_name(), id)
                    }
                    Err(e) => {
                        error!(task_id = %id, "Task {}[{}] could not be re-published at shutdown: {e}", run.job_msg.display_name(), id)
                    }
                }
            }
        }
        self.running.abort_all();
        while self.running.join_next().await.is_some() {}
    }
}

/// This process's resident memory in KiB (`VmRSS`).
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A message standing in for a lost task when only its record is left.
fn lost_message(lost: &Lost) -> crate::protocol::TaskMessage {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    crate::protocol::TaskMessage {
        id: lost.task.id.clone(),
        task: lost.task.name.clone(),
        reply_to: non_empty(&lost.task.reply_to),
        correlation_id: non_empty(&lost.task.correlation_id),
        ..Default::default()
    }
}

/// The exception Celery stores for a lost task.
fn lost_exception(lost: &Lost) -> ExceptionInfo {
    match lost.reason {
        LostReason::TimeLimit => {
            ExceptionInfo::time_limit_exceeded(lost.task.hard_limit_ms as f64 / 1000.0)
        }
        LostReason::WorkerLost => {
            let how = match nix::sys::signal::Signal::try_from(lost.signal as i32) {
                Ok(sig) if lost.signal != 0 => format!("signal {} ({sig:?})", lost.signal),
                _ => "exitcode 1".to_owned(),
            };
            ExceptionInfo::worker_lost(format!(
                "Worker exited prematurely: {how} Job: {}.",
                lost.deaths
            ))
        }
    }
}
