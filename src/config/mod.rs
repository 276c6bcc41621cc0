//! The `celeriac worker` command line and environment, validated before
//! anything connects or forks. A bad value exits with code 64 ([`crate::exit::USAGE`]) and
//! one line naming it.
//!
//! Most of this file is the clap definition of every flag with its help
//! text; it stays in one file so that a flag, its environment variable and
//! its validation read together.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::broker::{mask_url, parse_url, QueueSpec};
pub use crate::token::BrokerAuth;
pub use broker_auth::BrokerAuthArg;
use celery_cli::{CeleryWorkerArgs, GlobalArgs};

mod broker_auth;
mod celery_cli;

/// The default broker, as Celery's.
pub const DEFAULT_BROKER: &str = "amqp://guest:guest@localhost:5672//";

/// The queue consumed when none is given (Celery's `task_default_queue`).
pub const DEFAULT_QUEUE: &str = "celery";

/// The default state directory, the one the probe binaries read.
pub use celeriac_probes::DEFAULT_STATE_DIR;

/// A configuration value that cannot be used.
#[derive(Debug, Error, PartialEq)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    /// The flag or variable.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(name: &str, reason: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "celeriac",
    version,
    about = "A Celery-compatible worker runtime",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
struct WorkerArgs {
    /// Queues to consume, comma-separated (repeatable) [default: celery; with -A, every queue the app declares]
    #[arg(short = 'Q', long = "queues")]
    queues: Vec<String>,
    /// Number of task processes, or `auto` (the CPUs this process may use, capped by the container's CPU limit) [default: the machine's CPU count, as Celery]
    #[arg(
        short = 'c',
        long,
        env = "CELERIAC_CONCURRENCY",
        allow_hyphen_values = true
    )]
    concurrency: Option<String>,
    /// Pool implementation: `prefork` (or its Celery alias `processes`)
    #[arg(short = 'P', long, default_value = "prefork")]
    pool: String,
    /// Send task events for monitors such as Flower
    #[arg(short = 'E', long = "task-events", visible_alias = "events")]
    task_events: bool,
    /// Node name; %h = hostname, %n = its name part, %d = its domain
    #[arg(short = 'n', long, default_value = "celery@%h")]
    hostname: String,
    /// Log level: DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL
    #[arg(
        short = 'l',
        long,
        default_value = "WARNING",
        env = "CELERIAC_LOGLEVEL"
    )]
    loglevel: String,
    /// Log format
    #[arg(long, value_enum, default_value = "text", env = "CELERIAC_LOG_FORMAT")]
    log_format: LogFormat,
    /// Messages each process may reserve (prefetch = concurrency × this)
    #[arg(long, default_value_t = 4)]
    prefetch_multiplier: u16,
    /// Acknowledge tasks after they run instead of before
    #[arg(long)]
    acks_late: bool,
    /// Store a STARTED state when a task starts
    #[arg(long)]
    track_started: bool,
    /// Hard time limit for every task, in seconds
    #[arg(long, allow_negative_numbers = true)]
    time_limit: Option<f64>,
    /// Soft time limit for every task, in seconds
    #[arg(long, allow_negative_numbers = true)]
    soft_time_limit: Option<f64>,
    /// Replace a task process after it ran this many tasks
    #[arg(long)]
    max_tasks_per_child: Option<u64>,
    /// Replace a task process whose resident memory exceeds this many KiB after a task
    #[arg(long)]
    max_memory_per_child: Option<u64>,
    /// Seconds a warm shutdown may take before unfinished tasks are handed back to the broker
    #[arg(
        long,
        default_value_t = 100.0,
        env = "CELERIAC_SHUTDOWN_TIMEOUT",
        allow_negative_numbers = true
    )]
    shutdown_timeout: f64,
    /// Directory for the state file read by the probe binaries
    #[arg(long, env = "CELERIAC_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// x-queue-type for queues this worker declares
    #[arg(
        long,
        value_enum,
        default_value = "classic",
        env = "CELERIAC_QUEUE_TYPE"
    )]
    queue_type: QueueType,
    /// Type of the exchanges this worker declares for its queues (`topic`
    /// for RabbitMQ's native delayed delivery with quorum queues)
    #[arg(
        long,
        value_enum,
        default_value = "direct",
        env = "CELERIAC_EXCHANGE_TYPE"
    )]
    exchange_type: ExchangeTypeArg,
    /// Most ETA/countdown tasks one process holds in memory
    #[arg(long, default_value_t = 1000)]
    eta_limit: usize,
    /// Prometheus endpoint address (host:port), or `none`
    #[arg(long, default_value = "127.0.0.1:9808", env = "CELERIAC_METRICS_BIND")]
    metrics_bind: String,
    /// Seconds an idle task process may go without a heartbeat before it is replaced
    #[arg(long, default_value_t = 60)]
    child_heartbeat_timeout: u64,
    /// Seconds an unreachable broker is retried at startup before the worker exits
    #[arg(long, default_value_t = 30, env = "CELERIAC_BOOT_TIMEOUT")]
    boot_timeout: u64,
    /// A message whose task process died this many times is rejected without requeue
    #[arg(long, default_value_t = 3)]
    max_task_deaths: u32,
    /// Do not register the celeriac.* diagnostic tasks
    #[arg(long, env = "CELERIAC_WITHOUT_BUILTIN_TASKS")]
    without_builtin_tasks: bool,
    /// Register celeriac.test.* (crash, spin, hog, record): for celeriac's own tests only
    #[arg(long, hide = true)]
    with_test_tasks: bool,
    /// Requeue an acks-late message when its task process dies (task_reject_on_worker_lost)
    #[arg(long)]
    reject_on_worker_lost: bool,
    /// Accepted for Celery compatibility (celeriac has no gossip)
    #[arg(long)]
    without_gossip: bool,
    /// Accepted for Celery compatibility (celeriac has no mingle)
    #[arg(long)]
    without_mingle: bool,
    /// Send no worker-heartbeat events (monitors then show the node offline, as with Celery)
    #[arg(long)]
    without_heartbeat: bool,
    /// How to authenticate to the broker: `password` (the one in the URL), `azure-workload-identity` (Entra ID access tokens for the pod's AKS Workload Identity, refreshed on open connections), `oauth2-token-file` (an access token kept in --broker-oauth-token-file)
    #[arg(
        long,
        value_enum,
        default_value = "password",
        env = "CELERIAC_BROKER_AUTH"
    )]
    broker_auth: BrokerAuthArg,
    /// The scope asked for with azure-workload-identity: api://<rabbitmq app client id>/.default
    #[arg(long, env = "CELERIAC_BROKER_OAUTH_SCOPE")]
    broker_oauth_scope: Option<String>,
    /// The file holding the broker's access token with oauth2-token-file (read again when it changes)
    #[arg(long, env = "CELERIAC_BROKER_OAUTH_TOKEN_FILE")]
    broker_oauth_token_file: Option<PathBuf>,
    #[command(flatten)]
    celery: CeleryWorkerArgs,
}

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
    /// Broker URL (contains the password: print it with [`mask_url`]).
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

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run a worker.
    Worker(Box<WorkerConfig>),
    /// Print this text and exit 0 (help, version).
    Print(String),
}

/// Reads process environment variables; replaced by a map in tests.
pub trait Env {
    /// The variable's value, if set and non-empty.
    fn var(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
    }
}

/// Parses and validates a command line (`args[0]` is the program name).
pub fn parse<I, T>(args: I, env: &dyn Env) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    parse_with_app(args, env, &[])
}

/// [`parse`], with the worker options a loaded app's configuration gives
/// (`--concurrency=4`, `--acks-late`): each applies unless the command line,
/// a `CELERY_WORKER_*` variable or the option's `CELERIAC_*` variable sets it.
pub fn parse_with_app<I, T>(
    args: I,
    env: &dyn Env,
    app: &[String],
) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // CELERY_WORKER_<OPTION> variables go in right after `worker`, as if
    // typed there, unless the command line gives the option itself.
    let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    if let Some(at) = celery_cli::subcommand_position(&args) {
        let from_env = celery_cli::options_from_environment(&args[at + 1..], env);
        args.splice(at + 1..at + 1, from_env);
        let from_app = celery_cli::options_from_app(&args[1..], env, app);
        args.splice(at + 1..at + 1, from_app);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    Ok(Invocation::Print(e.render().to_string()))
                }
                _ => Err(ConfigError::new(
                    "command line",
                    first_line(&e.render().to_string()),
                )),
            };
        }
    };
    match cli.command {
        Command::Worker(args) => {
            validate(*args, cli.global, env).map(|c| Invocation::Worker(Box::new(c)))
        }
    }
}

fn first_line(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    line.trim_start_matches("error: ").to_owned()
}

/// The first of a flag and its environment variables that is set, with
/// its name for error messages.
fn first_set(
    flag: (&'static str, Option<String>),
    vars: &[&'static str],
    env: &dyn Env,
) -> (&'static str, Option<String>) {
    match flag {
        (name, Some(v)) => (name, Some(v)),
        (name, None) => vars
            .iter()
            .find_map(|k| env.var(k).map(|v| (*k, Some(v))))
            .unwrap_or((name, None)),
    }
}

fn validate(a: WorkerArgs, g: GlobalArgs, env: &dyn Env) -> Result<WorkerConfig, ConfigError> {
    celery_cli::check_pool(&a.pool)?;
    celery_cli::refuse_unsupported(&g, &a.celery)?;
    // Celery's order: -b, then BROKER_URL, then CELERY_BROKER_URL.
    let (broker_name, broker_url) = first_set(
        ("--broker", g.broker),
        &["BROKER_URL", "CELERY_BROKER_URL"],
        env,
    );
    let app = g.app.clone().map(|name| AppArgs {
        name,
        include: a
            .celery
            .include
            .iter()
            .flat_map(|m| m.split(','))
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect(),
        loader: g.loader.clone(),
        config_module: g.config.clone(),
        broker: (broker_name != "CELERY_BROKER_URL")
            .then(|| broker_url.clone())
            .flatten(),
        result_backend: None,
        skip_checks: g.skip_checks,
        loglevel: a.loglevel.clone(),
        queues_given: !a.queues.is_empty(),
        exclude_queues: a
            .celery
            .exclude_queues
            .iter()
            .flat_map(|q| q.split(','))
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty())
            .collect(),
    });
    let broker_url = broker_url.unwrap_or_else(|| DEFAULT_BROKER.to_owned());
    parse_url(&broker_url).map_err(|e| ConfigError::new(broker_name, e.to_string()))?;
    let broker_auth = broker_auth::validate(
        a.broker_auth,
        a.broker_oauth_scope.clone(),
        a.broker_oauth_token_file.clone(),
        (broker_name, &broker_url),
        env,
    )?;

    let (backend_name, backend) = first_set(
        ("--result-backend", g.result_backend),
        &["RESULT_BACKEND", "CELERY_RESULT_BACKEND"],
        env,
    );
    let app = app.map(|mut app| {
        if backend_name != "CELERY_RESULT_BACKEND" {
            app.result_backend.clone_from(&backend);
        }
        app
    });
    let result_backend = backend
        .map(|url| parse_backend(&url).map_err(|reason| ConfigError::new(backend_name, reason)))
        .transpose()?;

    let excluded: Vec<&str> = a
        .celery
        .exclude_queues
        .iter()
        .flat_map(|q| q.split(','))
        .map(str::trim)
        .collect();
    let mut names = Vec::new();
    let default_queue = [DEFAULT_QUEUE.to_owned()];
    let given_queues = if a.queues.is_empty() {
        &default_queue[..]
    } else {
        &a.queues[..]
    };
    for part in given_queues.iter().flat_map(|q| q.split(',')) {
        let name = part.trim();
        if name.is_empty() {
            continue;
        }
        if name.len() > 255 {
            return Err(ConfigError::new(
                "--queues",
                format!("queue name {name:?} is longer than 255 bytes"),
            ));
        }
        if !names.iter().any(|n| n == name) && !excluded.contains(&name) {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Err(ConfigError::new(
            "--queues",
            "no queue left to consume (none given, or all excluded by --exclude-queues)",
        ));
    }
    let queue_type = match a.queue_type {
        QueueType::Classic => None,
        QueueType::Quorum => Some("quorum".to_owned()),
    };
    let queues = names
        .iter()
        .map(|n| QueueSpec {
            queue_type: queue_type.clone(),
            exchange_kind: match a.exchange_type {
                ExchangeTypeArg::Direct => crate::broker::ExchangeType::Direct,
                ExchangeTypeArg::Topic => crate::broker::ExchangeType::Topic,
            },
            ..QueueSpec::celery_default(n)
        })
        .collect();

    let concurrency = match a.concurrency.as_deref().map(str::trim) {
        None | Some("") => default_concurrency(),
        Some(text) if text.eq_ignore_ascii_case("auto") => auto_concurrency(),
        Some(text) => match text.parse::<i64>() {
            // As Celery: 0 means the default.
            Ok(0) => default_concurrency(),
            Ok(n) => concurrency(n)?,
            Err(_) => {
                return Err(ConfigError::new(
                    "--concurrency",
                    format!("{text:?} is not a number of processes or `auto`"),
                ))
            }
        },
    };
    let log_level = match a.loglevel.to_ascii_uppercase().as_str() {
        "DEBUG" => tracing::Level::DEBUG,
        "INFO" => tracing::Level::INFO,
        "WARNING" | "WARN" => tracing::Level::WARN,
        "ERROR" | "CRITICAL" | "FATAL" => tracing::Level::ERROR,
        "TRACE" => tracing::Level::TRACE,
        other => {
            return Err(ConfigError::new(
                "--loglevel",
                format!("{other:?} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL, FATAL"),
            ))
        }
    };
    let hostname = expand_hostname(&a.hostname, &local_hostname())
        .map_err(|r| ConfigError::new("--hostname", r))?;
    let positive = |name: &str, v: Option<f64>| -> Result<Option<f64>, ConfigError> {
        match v {
            Some(s) if !(s.is_finite() && s > 0.0) => Err(ConfigError::new(
                name,
                format!("{s} is not a positive number of seconds"),
            )),
            other => Ok(other),
        }
    };
    let time_limit = positive("--time-limit", a.time_limit)?;
    let soft_time_limit = positive("--soft-time-limit", a.soft_time_limit)?;
    if !(a.shutdown_timeout.is_finite()
        && a.shutdown_timeout >= 0.0
        && a.shutdown_timeout <= 86_400.0)
    {
        return Err(ConfigError::new(
            "--shutdown-timeout",
            format!("{} is not between 0 and 86400 seconds", a.shutdown_timeout),
        ));
    }
    if a.max_tasks_per_child == Some(0) {
        return Err(ConfigError::new(
            "--max-tasks-per-child",
            "must be at least 1",
        ));
    }
    if a.max_memory_per_child == Some(0) {
        return Err(ConfigError::new(
            "--max-memory-per-child",
            "must be at least 1 KiB",
        ));
    }
    if a.state_dir.as_os_str().is_empty() {
        return Err(ConfigError::new("--state-dir", "must not be empty"));
    }
    let metrics_bind = match a.metrics_bind.trim() {
        "" | "none" | "off" => None,
        addr => Some(addr.parse::<std::net::SocketAddr>().map_err(|e| {
            ConfigError::new(
                "--metrics-bind",
                format!("{addr:?} is not host:port ({e}); use e.g. 0.0.0.0:9808 or none"),
            )
        })?),
    };
    if a.max_task_deaths == 0 {
        return Err(ConfigError::new("--max-task-deaths", "must be at least 1"));
    }
    if a.eta_limit == 0 {
        return Err(ConfigError::new("--eta-limit", "must be at least 1"));
    }
    let umask = a
        .celery
        .umask
        .as_deref()
        .map(celery_cli::parse_umask)
        .transpose()?;
    let heartbeat_interval = match a.celery.heartbeat_interval {
        _ if a.without_heartbeat => None,
        None => Some(Duration::from_secs(2)),
        Some(s) if s.is_finite() && (0.5..=3600.0).contains(&s) => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(ConfigError::new(
                "--heartbeat-interval",
                format!("{s} is not between 0.5 and 3600 seconds"),
            ))
        }
    };
    Ok(WorkerConfig {
        broker_url,
        broker_auth,
        result_backend,
        queues,
        concurrency,
        task_events: a.task_events,
        hostname,
        log_level,
        log_format: a.log_format,
        prefetch_multiplier: a.prefetch_multiplier,
        acks_late: a.acks_late,
        track_started: a.track_started,
        time_limit,
        soft_time_limit,
        max_tasks_per_child: a.max_tasks_per_child,
        max_memory_per_child: a.max_memory_per_child,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        state_dir: a.state_dir,
        eta_limit: a.eta_limit,
        builtin_tasks: !a.without_builtin_tasks,
        max_task_deaths: a.max_task_deaths,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        child_heartbeat_timeout: Duration::from_secs(a.child_heartbeat_timeout.max(2)),
        metrics_bind,
        test_tasks: a.with_test_tasks,
        reject_on_worker_lost: a.reject_on_worker_lost,
        quiet: g.quiet,
        workdir: g.workdir,
        umask,
        heartbeat_interval,
        app,
    })
}

/// A `--concurrency` given: 1 to 1024 task processes.
fn concurrency(n: i64) -> Result<usize, ConfigError> {
    match usize::try_from(n) {
        Ok(n @ 1..=1024) => Ok(n),
        Ok(0) | Err(_) => Err(ConfigError::new(
            "--concurrency",
            format!("must be at least 1, not {n}"),
        )),
        Ok(_) => Err(ConfigError::new(
            "--concurrency",
            format!("{n} is more than 1024"),
        )),
    }
}

fn parse_backend(url: &str) -> Result<BackendUrl, String> {
    let lower = url.to_ascii_lowercase();
    if lower == "rpc" || lower.starts_with("rpc://") {
        return Ok(BackendUrl::Rpc);
    }
    if lower.starts_with("redis://") || lower.starts_with("rediss://") {
        return redis::Client::open(url)
            .map(|_| BackendUrl::Redis(url.to_owned()))
            .map_err(|e| {
                format!("invalid Redis URL {}: {e}", mask_url(url)).replace(url, &mask_url(url))
            });
    }
    Err(format!(
        "{} is not supported: use rpc:// or redis://",
        mask_url(url)
    ))
}

/// Celery's default concurrency: the machine's online CPUs, what
/// `os.cpu_count()` returns (billiard's `cpu_count`), whatever the
/// container's CPU limit or the process's CPU affinity; 2 when unknown, as
/// Celery. `std::thread::available_parallelism` is not used: it applies the
/// cgroup quota and the affinity mask, which Celery's default does not.
pub fn default_concurrency() -> usize {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Celery 5.7's `-c auto`: the CPUs this process may run on, capped by the
/// cgroup's CPU quota (`cpu.max`) rounded up, at least 1.
pub fn auto_concurrency() -> usize {
    let available = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count()
        })
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(default_concurrency);
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|text| cpu_quota(&text));
    quota.map_or(available, |q| q.clamp(1, available))
}

/// cgroup v2 `cpu.max` as whole CPUs, rounded up (`"150000 100000"` → 2;
/// `"max 100000"` → no quota).
pub fn cpu_quota(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?;
    let period: u64 = parts.next()?.parse().ok().filter(|p| *p > 0)?;
    Some(quota.div_ceil(period).max(1) as usize)
}

fn local_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Expands Celery's `%h`, `%n`, `%d` and `%%` in a node name, adding
/// `celery@` when no `@` is given.
pub fn expand_hostname(template: &str, host: &str) -> Result<String, String> {
    let (name, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(name),
            Some('d') => out.push_str(domain),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("unknown placeholder %{other} in {template:?}")),
            None => return Err(format!("dangling % in {template:?}")),
        }
    }
    if out.trim().is_empty() {
        return Err("node name is empty".into());
    }
    if !out.contains('@') {
        out = format!("celery@{out}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
