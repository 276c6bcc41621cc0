//! From the parsed flags and the environment to a [`WorkerConfig`]: every
//! value checked, one [`ConfigError`] naming the first bad one.

use std::time::Duration;

use super::args::WorkerArgs;
use super::celery_cli::{self, GlobalArgs};
use super::machine::local_hostname;
use super::*;
use crate::broker::{mask_url, parse_url, QueueSpec};

pub(super) fn validate(
    a: WorkerArgs,
    g: GlobalArgs,
    env: &dyn Env,
) -> Result<WorkerConfig, ConfigError> {
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
