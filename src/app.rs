//! The entry point a binary calls: the CLI, the registry and the worker.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tracing::{error, info, warn};

use crate::broker::mask_url;
use crate::config::{self, Invocation, ProcessEnv, WorkerConfig};
use crate::exit::{self, USAGE};
use crate::host::{LoadedApp, TaskHost};
use crate::shm::SharedState;
use crate::supervisor::{Role, RoleBodies, Supervisor};
use crate::task::{builtins, Registry};

/// A celeriac application: the tasks it can run.
///
/// ```no_run
/// let mut app = celeriac::App::new();
/// app.registry_mut().register("proj.tasks.mul", &[], |_ctx, (x, y): (i64, i64)| Ok(x * y));
/// app.run();
/// ```
pub struct App {
    registry: Registry,
    host: Option<Arc<dyn TaskHost>>,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    /// An app with the `celeriac.*` diagnostic tasks registered.
    pub fn new() -> Self {
        let mut registry = Registry::new();
        builtins::register(&mut registry);
        Self {
            registry,
            host: None,
        }
    }

    /// Runs the tasks of the app `-A` names through `host` (the Python
    /// package's embedding; see [`crate::host`]).
    pub fn with_host(mut self, host: Arc<dyn TaskHost>) -> Self {
        self.host = Some(host);
        self
    }

    /// The task registry, to add tasks.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// With `-A`: loads the app through the host before anything forks,
    /// reads the command line again with the app's settings beneath it,
    /// declares the app's queues as it does and registers its tasks.
    /// Returns the final configuration and what was loaded, or the exit
    /// code of a refusal (reported on stderr).
    fn load_app(
        &mut self,
        args: Vec<std::ffi::OsString>,
        config: Box<WorkerConfig>,
    ) -> Result<(Box<WorkerConfig>, Option<LoadedApp>), i32> {
        let Some(app) = config.app.clone() else {
            return Ok((config, None));
        };
        let Some(host) = self.host.clone() else {
            eprintln!("celeriac: error: --app {}: not available in this binary, which runs tasks written in Rust; for a Python app, `pip install celeriac` into its virtualenv and run that `celeriac` command", app.name);
            return Err(USAGE);
        };
        let loaded = host.load(&config).map_err(|e| {
            eprintln!("celeriac: error: -A {}: {e}", app.name);
            exit::BOOT_REFUSED
        })?;
        // The fork discipline: the supervisor forks at any time, so the
        // app's import must not leave threads behind in it.
        let threads = crate::supervisor::thread_count();
        if threads > 1 {
            eprintln!("celeriac: error: -A {}: importing the app started {} thread(s) in the worker's main process, which forks its task processes at any time; start them in a worker_process_init handler instead (for numpy/OpenBLAS set OPENBLAS_NUM_THREADS=1 or OMP_NUM_THREADS=1)", app.name, threads - 1);
            return Err(exit::BOOT_REFUSED);
        }
        let mut config = match config::parse_with_app(args, &ProcessEnv, &loaded.options) {
            Ok(Invocation::Worker(c)) => c,
            Ok(Invocation::Print(_)) => return Err(USAGE),
            Err(e) => {
                eprintln!(
                    "celeriac: error: with the settings of app {}: {e}",
                    app.name
                );
                return Err(USAGE);
            }
        };
        for queue in &mut config.queues {
            if let Some(declared) = loaded.queues.iter().find(|q| q.name == queue.name) {
                *queue = declared.clone();
            }
        }
        host.register(&loaded, &mut self.registry);
        Ok((config, Some(loaded)))
    }

    /// Parses the command line and runs it, then exits the process.
    pub fn run(self) -> ! {
        let code = self.run_with_args(std::env::args_os());
        std::process::exit(code)
    }

    /// Parses `args` and runs them; returns the exit code.
    pub fn run_with_args<I, T>(mut self, args: I) -> i32
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let config = match config::parse(args.clone(), &ProcessEnv) {
            Ok(Invocation::Print(text)) => {
                print!("{text}");
                return 0;
            }
            Ok(Invocation::Worker(config)) => config,
            Err(e) => {
                eprintln!("celeriac: error: {e}");
                return USAGE;
            }
        };
        // As Celery: --workdir first, so relative paths are taken from there.
        if let Some(dir) = &config.workdir {
            if let Err(e) = std::env::set_current_dir(dir) {
                eprintln!(
                    "celeriac: error: --workdir: cannot change to {}: {e}",
                    dir.display()
                );
                return USAGE;
            }
        }
        if let Some(mask) = config.umask {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
        }
        if let Err(e) = check_state_dir(&config.state_dir) {
            eprintln!("celeriac: error: --state-dir: {e}");
            return USAGE;
        }
        let (config, loaded) = match self.load_app(args, config) {
            Ok(done) => done,
            Err(code) => return code,
        };
        crate::logging::init(config.log_level, config.log_format, &config.hostname);
        // A Python app's worker lists the app's tasks only, as `celery worker` does.
        if !config.builtin_tasks || config.app.is_some() {
            self.registry.remove_prefix(builtins::PREFIX);
        }
        if config.test_tasks {
            crate::task::testing::register(&mut self.registry);
        }
        if !config.quiet {
            banner(
                &config,
                &self.registry,
                loaded.as_ref().map(|l| l.description.as_str()),
            );
        }
        let config = Arc::new(*config);
        let bodies = Bodies {
            config: Arc::clone(&config),
            registry: Arc::new(self.registry),
            host: self.host.filter(|_| config.app.is_some()),
        };
        match Supervisor::new(config, Box::new(bodies)) {
            Ok(supervisor) => {
                if let Some(loaded) = &loaded {
                    supervisor.set_rate_limits(&loaded.rate_limits());
                }
                let code = supervisor.run();
                info!("worker stopped (exit code {code})");
                code
            }
            Err(e) => {
                error!("cannot start the supervisor: {e}");
                exit::FAILED
            }
        }
    }
}

/// The composition root: what each forked role runs, and the host's hooks
/// around forks.
struct Bodies {
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    host: Option<Arc<dyn TaskHost>>,
}

impl RoleBodies for Bodies {
    fn run(&self, role: Role, shm: SharedState) -> i32 {
        let (config, registry) = (Arc::clone(&self.config), Arc::clone(&self.registry));
        match role {
            Role::Task(n) => crate::child::main(n, shm, config, registry, self.host.clone()),
            Role::Control => crate::control::main(shm, config, registry, self.host.clone()),
        }
    }

    fn before_fork(&self) {
        if let Some(host) = &self.host {
            host.before_fork();
        }
    }

    fn after_fork_in_parent(&self) {
        if let Some(host) = &self.host {
            host.after_fork_in_parent();
        }
    }

    fn after_fork_in_child(&self) {
        if let Some(host) = &self.host {
            host.after_fork_in_child();
        }
    }
}

/// Why the probe state file could not be written.
#[derive(Debug, Error)]
enum StateDirError {
    /// The directory does not exist and cannot be made.
    #[error("cannot create {dir}: {source}")]
    Create { dir: String, source: std::io::Error },
    /// A file cannot be created or removed in it (read-only, not ours).
    #[error("cannot write in {dir}: {source}")]
    Write { dir: String, source: std::io::Error },
}

/// Makes the state directory if needed and writes and removes a file in it,
/// as the supervisor will every 2 s: a directory the probe file cannot
/// be written in is refused before anything forks.
fn check_state_dir(dir: &Path) -> Result<(), StateDirError> {
    let shown = || dir.display().to_string();
    std::fs::create_dir_all(dir).map_err(|source| StateDirError::Create {
        dir: shown(),
        source,
    })?;
    let probe = dir.join(format!(".write-check.{}.tmp", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| StateDirError::Write {
            dir: shown(),
            source,
        })
}

fn banner(config: &WorkerConfig, registry: &Registry, app: Option<&str>) {
    let queues: Vec<&str> = config.queues.iter().map(|q| q.name.as_str()).collect();
    let backend = match &config.result_backend {
        None => "disabled".to_owned(),
        Some(config::BackendUrl::Rpc) => "rpc://".to_owned(),
        Some(config::BackendUrl::Redis(u)) => mask_url(u),
    };
    // Like Celery's banner, on stdout whatever the log level, in the log format.
    let tasks: Vec<&str> = registry.names().collect();
    match config.log_format {
        config::LogFormat::Text => {
            println!(
                "celeriac {} {} ready to start: transport {}, results {}, concurrency {} (prefork), task events {}, queues [{}]",
                env!("CARGO_PKG_VERSION"),
                config.hostname,
                mask_url(&config.broker_url),
                backend,
                config.concurrency,
                if config.task_events { "ON" } else { "OFF" },
                queues.join(", ")
            );
            if let Some(app) = app {
                println!("[app] {app}");
            }
            println!("[tasks] {}", tasks.join(", "));
        }
        config::LogFormat::Json => {
            let fields = serde_json::json!({
                "message": "ready to start",
                "version": env!("CARGO_PKG_VERSION"),
                "hostname": config.hostname,
                "transport": mask_url(&config.broker_url),
                "results": backend,
                "concurrency": config.concurrency,
                "pool": "prefork",
                "task_events": config.task_events,
                "queues": queues,
                "tasks": tasks,
                "app": app,
            });
            if let serde_json::Value::Object(map) = fields {
                println!("{}", crate::logging::json_banner(map));
            }
        }
    }
    for q in queues.iter().filter(|q| q.contains("$(")) {
        warn!("queue {q:?} looks like an unresolved Kubernetes variable reference; readiness will fail until it is set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_made_and_checked() {
        let dir = std::env::temp_dir().join(format!("celeriac-state-{}", std::process::id()));
        check_state_dir(&dir.join("nested")).unwrap();
        assert_eq!(std::fs::read_dir(dir.join("nested")).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_dir_nothing_can_be_written_in_is_refused() {
        // Existing directories that refuse new files even to root (tests
        // run as root, who ignores permission bits).
        for dir in ["/sys", "/proc"] {
            let err = check_state_dir(Path::new(dir)).unwrap_err();
            assert!(matches!(err, StateDirError::Write { .. }), "{dir}: {err}");
            assert!(err
                .to_string()
                .starts_with(&format!("cannot write in {dir}: ")));
        }
        let err = check_state_dir(Path::new("/proc/version/x")).unwrap_err();
        assert!(matches!(err, StateDirError::Create { .. }), "{err}");
    }
}
