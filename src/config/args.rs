//! The clap definition of `celeriac worker`: every flag with its help text
//! and environment variable (validated by the config module before use).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use super::celery_cli::{CeleryWorkerArgs, GlobalArgs};
use super::{BrokerAuthArg, DEFAULT_STATE_DIR};

#[derive(Parser, Debug)]
#[command(
    name = "celeriac",
    version,
    about = "A Celery-compatible worker runtime",
    disable_help_subcommand = true
)]
pub(super) struct Cli {
    #[command(flatten)]
    pub(super) global: GlobalArgs,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand, Debug)]
pub(super) enum Command {
    /// Start a worker: consume Celery tasks from RabbitMQ and run them.
    Worker(Box<WorkerArgs>),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Exchange type for the queues the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExchangeTypeArg {
    /// kombu's default.
    Direct,
    /// For native delayed delivery.
    Topic,
}

/// `x-queue-type` for queues the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    /// Classic queues (Celery's default).
    Classic,
    /// Quorum queues (`task_default_queue_type = "quorum"`).
    Quorum,
}

#[derive(clap::Args, Debug)]
#[command(args_override_self = true)]
pub(super) struct WorkerArgs {
    /// Queues to consume, comma-separated (repeatable) [default: celery; with -A, every queue the app declares]
    #[arg(short = 'Q', long = "queues")]
    pub(super) queues: Vec<String>,
    /// Number of task processes, or `auto` (the CPUs this process may use, capped by the container's CPU limit) [default: the machine's CPU count, as Celery]
    #[arg(
        short = 'c',
        long,
        env = "CELERIAC_CONCURRENCY",
        allow_hyphen_values = true
    )]
    pub(super) concurrency: Option<String>,
    /// Pool implementation: `prefork` (or its Celery alias `processes`)
    #[arg(short = 'P', long, default_value = "prefork")]
    pub(super) pool: String,
    /// Send task events for monitors such as Flower
    #[arg(short = 'E', long = "task-events", visible_alias = "events")]
    pub(super) task_events: bool,
    /// Node name; %h = hostname, %n = its name part, %d = its domain
    #[arg(short = 'n', long, default_value = "celery@%h")]
    pub(super) hostname: String,
    /// Log level: DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL
    #[arg(
        short = 'l',
        long,
        default_value = "WARNING",
        env = "CELERIAC_LOGLEVEL"
    )]
    pub(super) loglevel: String,
    /// Log format
    #[arg(long, value_enum, default_value = "text", env = "CELERIAC_LOG_FORMAT")]
    pub(super) log_format: LogFormat,
    /// Messages each process may reserve (prefetch = concurrency × this)
    #[arg(long, default_value_t = 4)]
    pub(super) prefetch_multiplier: u16,
    /// Acknowledge tasks after they run instead of before
    #[arg(long)]
    pub(super) acks_late: bool,
    /// Store a STARTED state when a task starts
    #[arg(long)]
    pub(super) track_started: bool,
    /// Hard time limit for every task, in seconds
    #[arg(long, allow_negative_numbers = true)]
    pub(super) time_limit: Option<f64>,
    /// Soft time limit for every task, in seconds
    #[arg(long, allow_negative_numbers = true)]
    pub(super) soft_time_limit: Option<f64>,
    /// Replace a task process after it ran this many tasks
    #[arg(long)]
    pub(super) max_tasks_per_child: Option<u64>,
    /// Replace a task process whose resident memory exceeds this many KiB after a task
    #[arg(long)]
    pub(super) max_memory_per_child: Option<u64>,
    /// Seconds a warm shutdown may take before unfinished tasks are handed back to the broker
    #[arg(
        long,
        default_value_t = 100.0,
        env = "CELERIAC_SHUTDOWN_TIMEOUT",
        allow_negative_numbers = true
    )]
    pub(super) shutdown_timeout: f64,
    /// Directory for the state file read by the probe binaries
    #[arg(long, env = "CELERIAC_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub(super) state_dir: PathBuf,
    /// x-queue-type for queues this worker declares
    #[arg(
        long,
        value_enum,
        default_value = "classic",
        env = "CELERIAC_QUEUE_TYPE"
    )]
    pub(super) queue_type: QueueType,
    /// Type of the exchanges this worker declares for its queues (`topic`
    /// for RabbitMQ's native delayed delivery with quorum queues)
    #[arg(
        long,
        value_enum,
        default_value = "direct",
        env = "CELERIAC_EXCHANGE_TYPE"
    )]
    pub(super) exchange_type: ExchangeTypeArg,
    /// Most ETA/countdown tasks one process holds in memory
    #[arg(long, default_value_t = 1000)]
    pub(super) eta_limit: usize,
    /// Prometheus endpoint address (host:port), or `none`
    #[arg(long, default_value = "127.0.0.1:9808", env = "CELERIAC_METRICS_BIND")]
    pub(super) metrics_bind: String,
    /// Seconds an idle task process may go without a heartbeat before it is replaced
    #[arg(long, default_value_t = 60)]
    pub(super) child_heartbeat_timeout: u64,
    /// Seconds an unreachable broker is retried at startup before the worker exits
    #[arg(long, default_value_t = 30, env = "CELERIAC_BOOT_TIMEOUT")]
    pub(super) boot_timeout: u64,
    /// A message whose task process died this many times is rejected without requeue
    #[arg(long, default_value_t = 3)]
    pub(super) max_task_deaths: u32,
    /// Do not register the celeriac.* diagnostic tasks
    #[arg(long, env = "CELERIAC_WITHOUT_BUILTIN_TASKS")]
    pub(super) without_builtin_tasks: bool,
    /// Register celeriac.test.* (crash, spin, hog, record): for celeriac's own tests only
    #[arg(long, hide = true)]
    pub(super) with_test_tasks: bool,
    /// Requeue an acks-late message when its task process dies (task_reject_on_worker_lost)
    #[arg(long)]
    pub(super) reject_on_worker_lost: bool,
    /// Accepted for Celery compatibility (celeriac has no gossip)
    #[arg(long)]
    pub(super) without_gossip: bool,
    /// Accepted for Celery compatibility (celeriac has no mingle)
    #[arg(long)]
    pub(super) without_mingle: bool,
    /// Send no worker-heartbeat events (monitors then show the node offline, as with Celery)
    #[arg(long)]
    pub(super) without_heartbeat: bool,
    /// How to authenticate to the broker: `password` (the one in the URL), `azure-workload-identity` (Entra ID access tokens for the pod's AKS Workload Identity, refreshed on open connections), `oauth2-token-file` (an access token kept in --broker-oauth-token-file)
    #[arg(
        long,
        value_enum,
        default_value = "password",
        env = "CELERIAC_BROKER_AUTH"
    )]
    pub(super) broker_auth: BrokerAuthArg,
    /// The scope asked for with azure-workload-identity: api://<rabbitmq app client id>/.default
    #[arg(long, env = "CELERIAC_BROKER_OAUTH_SCOPE")]
    pub(super) broker_oauth_scope: Option<String>,
    /// The file holding the broker's access token with oauth2-token-file (read again when it changes)
    #[arg(long, env = "CELERIAC_BROKER_OAUTH_TOKEN_FILE")]
    pub(super) broker_oauth_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub(super) celery: CeleryWorkerArgs,
}
