//! Every option of Celery 5.7's `celery` and `celery worker` command lines,
//! so that an existing container command keeps working: each one either
//! works as in Celery, or is refused with one line saying what to do
//! instead. `tests/interop/test_celery_cli.py` walks `celery worker --help`
//! and `celery --help` against this list.

use std::path::PathBuf;

use super::ConfigError;

/// Celery's global options (`celery [OPTIONS] worker …`). Accepted before
/// or after `worker`.
#[derive(clap::Args, Debug, Default)]
pub(super) struct GlobalArgs {
    /// Broker URL [env: BROKER_URL, CELERY_BROKER_URL] [default: amqp://guest:guest@localhost:5672//]
    #[arg(short = 'b', long, global = true)]
    pub(super) broker: Option<String>,
    /// Result backend: rpc:// or redis://host:port/db [env: RESULT_BACKEND, CELERY_RESULT_BACKEND] [default: none]
    #[arg(long, global = true)]
    pub(super) result_backend: Option<String>,
    /// Change to this directory before anything else
    #[arg(long, global = true)]
    pub(super) workdir: Option<PathBuf>,
    /// Print no banner
    #[arg(short = 'q', long, global = true)]
    pub(super) quiet: bool,
    /// Accepted for Celery compatibility (celeriac's logs have no colour)
    #[arg(short = 'C', long, global = true)]
    pub(super) no_color: bool,
    /// Accepted for Celery compatibility (Django's checks do not run in celeriac)
    #[arg(long, global = true)]
    pub(super) skip_checks: bool,
    /// The Celery app (`module`, `module:attr`)
    #[arg(short = 'A', long, global = true, hide = true)]
    pub(super) app: Option<String>,
    #[arg(long, global = true, hide = true)]
    pub(super) loader: Option<String>,
    #[arg(long, global = true, hide = true)]
    pub(super) config: Option<String>,
}

/// The options of `celery worker` that celeriac has no flag of its own for.
#[derive(clap::Args, Debug, Default)]
pub(super) struct CeleryWorkerArgs {
    /// Queues not to consume, comma-separated (repeatable)
    #[arg(short = 'X', long = "exclude-queues")]
    pub(super) exclude_queues: Vec<String>,
    /// Accepted for Celery compatibility: `default` and `fair` (the same in Celery 5.7)
    #[arg(short = 'O', long = "optimization")]
    pub(super) optimization: Option<String>,
    /// `fork` (the only start method celeriac has)
    #[arg(long)]
    pub(super) pool_start_method: Option<String>,
    /// File mode creation mask (octal, e.g. 0022) for the worker's files
    #[arg(long)]
    pub(super) umask: Option<String>,
    /// Seconds between worker-heartbeat events [default: 2]
    #[arg(long)]
    pub(super) heartbeat_interval: Option<f64>,
    #[arg(short = 'D', long, hide = true)]
    pub(super) detach: bool,
    #[arg(short = 'S', long, hide = true)]
    pub(super) statedb: Option<String>,
    #[arg(long, hide = true)]
    pub(super) disable_prefetch: bool,
    #[arg(long, alias = "discard", hide = true)]
    pub(super) purge: bool,
    #[arg(short = 'I', long, hide = true)]
    pub(super) include: Vec<String>,
    #[arg(long, hide = true)]
    pub(super) autoscale: Option<String>,
    #[arg(short = 'B', long, hide = true)]
    pub(super) beat: bool,
    #[arg(
        short = 's',
        long = "schedule-filename",
        alias = "schedule",
        hide = true
    )]
    pub(super) schedule_filename: Option<String>,
    #[arg(long, hide = true)]
    pub(super) scheduler: Option<String>,
    #[arg(short = 'f', long, hide = true)]
    pub(super) logfile: Option<String>,
    #[arg(long, hide = true)]
    pub(super) pidfile: Option<String>,
    #[arg(long, hide = true)]
    pub(super) uid: Option<String>,
    #[arg(long, hide = true)]
    pub(super) gid: Option<String>,
    #[arg(long, hide = true)]
    pub(super) executable: Option<String>,
}

/// What celeriac does instead of the refused option, in one line.
fn refusal(name: &str, instead: &str) -> ConfigError {
    ConfigError::new(name, format!("not supported by celeriac: {instead}"))
}

/// Refuses the options celeriac does not have, naming what to do instead.
pub(super) fn refuse_unsupported(g: &GlobalArgs, w: &CeleryWorkerArgs) -> Result<(), ConfigError> {
    let no_app = g.app.is_none();
    let checks: [(bool, &str, &str); 16] = [
        (no_app && g.loader.is_some(), "--loader", "it configures a Python app's loader: give the app with -A, or pass the settings as flags and environment variables"),
        (no_app && g.config.is_some(), "--config", "it names a Python configuration module: give the app with -A, or pass the broker, backend and queues as flags or environment variables"),
        (w.detach, "--detach", "celeriac runs in the foreground; let Kubernetes, systemd or another supervisor run it"),
        (w.statedb.is_some(), "--statedb", "revoked ids are kept in memory; give tasks an `expires` for revokes that must outlive a restart"),
        (w.disable_prefetch, "--disable-prefetch", "Celery honours it on Redis brokers only; on RabbitMQ use --prefetch-multiplier 1 with --acks-late"),
        (w.purge, "--purge", "run `celery -A <app> purge -f` (or `rabbitmqctl purge_queue`) before starting the worker"),
        (no_app && !w.include.is_empty(), "--include", "it imports Python task modules: give the app with -A"),
        (w.autoscale.is_some(), "--autoscale", "set -c to the most processes and use the pool_grow/pool_shrink remote control, or scale pods (KEDA, HPA)"),
        (w.beat, "--beat", "run `celery -A <app> beat` as a process of its own"),
        (w.schedule_filename.is_some(), "--schedule-filename", "it belongs to the embedded beat; give it to `celery beat`"),
        (w.scheduler.is_some(), "--scheduler", "it belongs to the embedded beat; give it to `celery beat`"),
        (w.logfile.is_some(), "--logfile", "celeriac logs to stderr; let the container runtime or journald collect it"),
        (w.pidfile.is_some(), "--pidfile", "celeriac runs in the foreground; use the supervisor's own pid tracking"),
        (w.uid.is_some(), "--uid", "start celeriac as that user (Dockerfile USER, securityContext.runAsUser)"),
        (w.gid.is_some(), "--gid", "start celeriac as that group (Dockerfile USER, securityContext.runAsGroup)"),
        (w.executable.is_some(), "--executable", "it only matters with --detach, which celeriac does not do"),
    ];
    if let Some((_, name, instead)) = checks.iter().find(|(given, _, _)| *given) {
        return Err(refusal(name, instead));
    }
    match w.optimization.as_deref() {
        None | Some("default" | "fair") => {}
        Some(other) => {
            return Err(ConfigError::new(
                "--optimization",
                format!("{other:?} is not one of default, fair"),
            ))
        }
    }
    match w.pool_start_method.as_deref() {
        None | Some("fork") => {}
        Some("spawn") => {
            return Err(refusal(
                "--pool-start-method",
                "celeriac forks its task processes (the app, if any, is imported once before, as Celery's prefork does); drop the option",
            ))
        }
        Some(other) => {
            return Err(ConfigError::new(
                "--pool-start-method",
                format!("{other:?} is not one of fork, spawn"),
            ))
        }
    }
    Ok(())
}

/// Parses `--umask` as Celery does: octal digits, with or without a
/// leading 0 (`0022`, `022`, `22`).
pub(super) fn parse_umask(text: &str) -> Result<u32, ConfigError> {
    let digits = text.trim();
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777 && !digits.is_empty())
        .ok_or_else(|| {
            ConfigError::new(
                "--umask",
                format!("{text:?} is not an octal file mode mask such as 0022"),
            )
        })
}

/// `-P/--pool`: `prefork` and its Celery alias `processes`.
pub(super) fn check_pool(pool: &str) -> Result<(), ConfigError> {
    match pool {
        "prefork" | "processes" => Ok(()),
        "eventlet" | "gevent" | "threads" | "solo" | "custom" => Err(refusal(
            "--pool",
            &format!(
                "{pool}: celeriac runs the prefork pool only; raise -c for tasks that wait on I/O"
            ),
        )),
        other => Err(ConfigError::new(
            "--pool",
            format!("{other:?} is not a pool; celeriac runs prefork"),
        )),
    }
}

/// How an option is given.
#[derive(Clone, Copy)]
enum Kind {
    /// Takes a value.
    Value,
    /// A flag: the variable holds a Click boolean (`1`, `true`, `yes`, `on`).
    Flag,
}

/// `celery worker` reads every option from `CELERY_WORKER_<OPTION>` too
/// (Click's `auto_envvar_prefix`): the variable, the long option, its short
/// spelling and how it is given.
const WORKER_VARIABLES: [(&str, &str, Option<&str>, Kind); 30] = [
    ("HOSTNAME", "--hostname", Some("-n"), Kind::Value),
    ("DETACH", "--detach", Some("-D"), Kind::Flag),
    ("STATEDB", "--statedb", Some("-S"), Kind::Value),
    ("LOGLEVEL", "--loglevel", Some("-l"), Kind::Value),
    ("OPTIMIZATION", "--optimization", Some("-O"), Kind::Value),
    (
        "PREFETCH_MULTIPLIER",
        "--prefetch-multiplier",
        None,
        Kind::Value,
    ),
    ("DISABLE_PREFETCH", "--disable-prefetch", None, Kind::Flag),
    ("CONCURRENCY", "--concurrency", Some("-c"), Kind::Value),
    ("POOL", "--pool", Some("-P"), Kind::Value),
    ("TASK_EVENTS", "--task-events", Some("-E"), Kind::Flag),
    ("TIME_LIMIT", "--time-limit", None, Kind::Value),
    ("SOFT_TIME_LIMIT", "--soft-time-limit", None, Kind::Value),
    (
        "MAX_TASKS_PER_CHILD",
        "--max-tasks-per-child",
        None,
        Kind::Value,
    ),
    (
        "POOL_START_METHOD",
        "--pool-start-method",
        None,
        Kind::Value,
    ),
    (
        "MAX_MEMORY_PER_CHILD",
        "--max-memory-per-child",
        None,
        Kind::Value,
    ),
    ("PURGE", "--purge", None, Kind::Flag),
    ("QUEUES", "--queues", Some("-Q"), Kind::Value),
    (
        "EXCLUDE_QUEUES",
        "--exclude-queues",
        Some("-X"),
        Kind::Value,
    ),
    ("INCLUDE", "--include", Some("-I"), Kind::Value),
    ("WITHOUT_GOSSIP", "--without-gossip", None, Kind::Flag),
    ("WITHOUT_MINGLE", "--without-mingle", None, Kind::Flag),
    ("WITHOUT_HEARTBEAT", "--without-heartbeat", None, Kind::Flag),
    (
        "HEARTBEAT_INTERVAL",
        "--heartbeat-interval",
        None,
        Kind::Value,
    ),
    ("AUTOSCALE", "--autoscale", None, Kind::Value),
    ("BEAT", "--beat", Some("-B"), Kind::Flag),
    ("SCHEDULER", "--scheduler", None, Kind::Value),
    ("LOGFILE", "--logfile", Some("-f"), Kind::Value),
    ("PIDFILE", "--pidfile", None, Kind::Value),
    ("UID", "--uid", None, Kind::Value),
    ("UMASK", "--umask", None, Kind::Value),
];

/// Where the `worker` subcommand is: the first argument after the program
/// name that is not a global option or a global option's value.
pub(super) fn subcommand_position(args: &[std::ffi::OsString]) -> Option<usize> {
    const TAKES_VALUE: [&str; 8] = [
        "-A",
        "--app",
        "-b",
        "--broker",
        "--result-backend",
        "--loader",
        "--config",
        "--workdir",
    ];
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "worker" {
            return Some(i);
        }
        if !a.starts_with('-') {
            return None;
        }
        i += if TAKES_VALUE.contains(&a.as_ref()) {
            2
        } else {
            1
        };
    }
    None
}

/// Click's reading of a boolean variable.
fn click_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "t" | "yes" | "y" | "on"
    )
}

/// The options `CELERY_WORKER_<OPTION>` variables give, for those the
/// command line does not: the command line wins, then these, then
/// celeriac's own `CELERIAC_*` variables.
pub(super) fn options_from_environment(
    command_line: &[std::ffi::OsString],
    env: &dyn super::Env,
) -> Vec<std::ffi::OsString> {
    let given = |long: &str, short: Option<&str>| is_given(command_line, long, short);
    let mut out = Vec::new();
    for (suffix, long, short, kind) in WORKER_VARIABLES {
        let Some(value) = env.var(&format!("CELERY_WORKER_{suffix}")) else {
            continue;
        };
        if given(long, short) {
            continue;
        }
        match kind {
            Kind::Value => out.push(format!("{long}={value}").into()),
            Kind::Flag if click_true(&value) => out.push(long.into()),
            Kind::Flag => {}
        }
    }
    out
}

/// Whether `command_line` gives the option `long` (or its `short` spelling).
fn is_given(command_line: &[std::ffi::OsString], long: &str, short: Option<&str>) -> bool {
    command_line.iter().any(|a| {
        let a = a.to_string_lossy();
        a == long
            || a.starts_with(&format!("{long}="))
            || short.is_some_and(|s| {
                a == s || (a.starts_with(s) && a.len() > 2 && !a.starts_with("--"))
            })
    })
}

/// The `CELERIAC_*` variables of the options a loaded app's configuration
/// can give (clap reads them; they win over the app).
const APP_OPTION_VARIABLES: [(&str, &str); 2] = [
    ("--concurrency", "CELERIAC_CONCURRENCY"),
    ("--loglevel", "CELERIAC_LOGLEVEL"),
];

/// The words of `app` (`--long` or `--long=value`, from a loaded app's
/// configuration) that neither `command_line` (long or short spelling,
/// `--events` for `--task-events`) nor the option's `CELERIAC_*` variable
/// sets.
pub(super) fn options_from_app(
    command_line: &[std::ffi::OsString],
    env: &dyn super::Env,
    app: &[String],
) -> Vec<std::ffi::OsString> {
    app.iter()
        .filter(|word| {
            let long = word.split('=').next().unwrap_or(word);
            let short = match long {
                "--broker" => Some("-b"),
                _ => WORKER_VARIABLES
                    .iter()
                    .find(|(_, l, _, _)| *l == long)
                    .and_then(|(_, _, short, _)| *short),
            };
            let aliased = long == "--task-events" && is_given(command_line, "--events", None);
            let variable = APP_OPTION_VARIABLES
                .iter()
                .find(|(l, _)| *l == long)
                .is_some_and(|(_, v)| env.var(v).is_some());
            !is_given(command_line, long, short) && !aliased && !variable
        })
        .map(Into::into)
        .collect()
}
