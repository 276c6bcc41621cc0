//! The validated configuration a worker runs with.

use std::path::PathBuf;
use std::time::Duration;

use super::{BrokerAuth, LogFormat};
use crate::broker::QueueSpec;

/// Where task results go.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendUrl {
    /// `rpc://`: replies to the client's queue.
    Rpc,
    /// `redis://...`: `celery-task-meta-<id>` keys.
    Redis(String),
}

/// A validated worker configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker URL (contains the password: print it with [`crate::broker::mask_url`]).
    pub broker_url: String,
    /// How the worker authenticates to the broker (no secret in here).
    pub broker_auth: BrokerAuth,
    /// Result backend.
    pub result_backend: Option<BackendUrl>,
    /// The queues to consume.
    pub queues: Vec<QueueSpec>,
    /// Number of task processes.
    pub concurrency: usize,
    /// Send task events.
    pub task_events: bool,
    /// This worker's node name.
    pub hostname: String,
    /// Log level directive for tracing.
    pub log_level: tracing::Level,
    /// Log format.
    pub log_format: LogFormat,
    /// Prefetch multiplier.
    pub prefetch_multiplier: u16,
    /// Global acks_late.
    pub acks_late: bool,
    /// Global track_started.
    pub track_started: bool,
    /// Global hard time limit.
    pub time_limit: Option<f64>,
    /// Global soft time limit.
    pub soft_time_limit: Option<f64>,
    /// Recycle after this many tasks.
    pub max_tasks_per_child: Option<u64>,
    /// Recycle above this RSS in KiB.
    pub max_memory_per_child: Option<u64>,
    /// Warm shutdown deadline.
    pub shutdown_timeout: Duration,
    /// Probe state directory.
    pub state_dir: PathBuf,
    /// Most held ETA tasks per process.
    pub eta_limit: usize,
    /// Register the diagnostic tasks.
    pub builtin_tasks: bool,
    /// Quarantine a message after its process died this many times.
    pub max_task_deaths: u32,
    /// How long an unreachable broker is retried at startup.
    pub boot_timeout: Duration,
    /// How long an idle child may go without a heartbeat.
    pub child_heartbeat_timeout: Duration,
    /// Where the Prometheus endpoint listens (`None`: disabled).
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Register the celeriac.test.* tasks.
    pub test_tasks: bool,
    /// Global reject_on_worker_lost.
    pub reject_on_worker_lost: bool,
    /// Print no banner (`-q`).
    pub quiet: bool,
    /// Change to this directory before anything else (`--workdir`).
    pub workdir: Option<PathBuf>,
    /// File mode creation mask set before anything forks (`--umask`).
    pub umask: Option<u32>,
    /// Period of worker-heartbeat events; `None` sends none (`--without-heartbeat`).
    pub heartbeat_interval: Option<Duration>,
    /// The Python app to load (`-A`), with what Celery's command line hands it.
    pub app: Option<AppArgs>,
}

/// `-A` and the options Celery's command line passes to the app it loads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppArgs {
    /// `-A/--app`: `module`, `module:attr`, or a package with a `celery` module.
    pub name: String,
    /// `-I/--include`: more task modules to import.
    pub include: Vec<String>,
    /// `--loader`.
    pub loader: Option<String>,
    /// `--config`: the configuration module.
    pub config_module: Option<String>,
    /// `-b` (or `BROKER_URL`) when given: exported to the app as `CELERY_BROKER_URL`.
    pub broker: Option<String>,
    /// `--result-backend` (or `RESULT_BACKEND`) when given: exported as `CELERY_RESULT_BACKEND`.
    pub result_backend: Option<String>,
    /// `--skip-checks`.
    pub skip_checks: bool,
    /// `-l` as given, for the app's loggers.
    pub loglevel: String,
    /// Whether `-Q` was given (else every queue the app declares is consumed).
    pub queues_given: bool,
    /// `-X/--exclude-queues`.
    pub exclude_queues: Vec<String>,
}
