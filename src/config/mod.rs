//! The `celeriac worker` command line and environment, validated before
//! anything connects or forks. A bad value exits with code 64 ([`crate::exit::USAGE`]) and
//! one line naming it.
//!
//! - [`args`]: the clap definition of every flag, its help and variable;
//! - `celery_cli`: Celery's own options, `CELERY_WORKER_*` and the app's settings;
//! - `validate`: from flags to a [`WorkerConfig`];
//! - [`worker`]: the validated configuration;
//! - `machine`: CPU counts and the host name.

use clap::Parser;
use thiserror::Error;

pub use crate::token::BrokerAuth;
pub use args::{ExchangeTypeArg, LogFormat, QueueType};
pub use broker_auth::BrokerAuthArg;
pub use machine::{auto_concurrency, cpu_quota, default_concurrency, expand_hostname};
pub use worker::{AppArgs, BackendUrl, WorkerConfig};

use args::{Cli, Command};
use validate::validate;

pub mod args;
mod broker_auth;
mod celery_cli;
mod machine;
mod validate;
pub mod worker;

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

#[cfg(test)]
mod tests;
