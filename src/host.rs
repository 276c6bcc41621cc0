//! Hosting tasks written in another language: the hooks through which an
//! embedding (the `celeriac` Python package) loads an app, registers its
//! tasks and keeps its interpreter sound across forks.
//!
//! The worker stays the same program: the supervisor forks, task processes
//! consume, acknowledge, hold ETAs, apply limits and send events. A host
//! adds three things:
//! - [`TaskHost::load`], once in the supervisor before anything forks:
//!   import the app, report its tasks and the worker options its
//!   configuration gives;
//! - the fork hooks, around every fork of the supervisor, so that an
//!   interpreter living in the supervisor is forked the way it expects;
//! - the task-process hooks: start the interpreter's side of a task process,
//!   and end it; and the worker's `ready`/`stopped`, run in the control
//!   process. A hosted task runs on the task process's **main thread**
//!   (where an interpreter delivers its signal handlers), the process's
//!   async runtime moving to a thread of its own; see
//!   [`crate::task::main_thread`].

use serde_json::{Map, Value};

use crate::broker::QueueSpec;
use crate::config::WorkerConfig;
use crate::task::{Registry, TaskOptions};

/// A task the loaded app provides.
#[derive(Debug, Clone)]
pub struct HostedTask {
    /// Its Celery name.
    pub name: String,
    /// Its decorator options, as the app resolved them.
    pub options: TaskOptions,
    /// Its `rate_limit`, in tasks per second for the whole worker.
    pub rate_limit: Option<f64>,
}

/// What loading the app gave.
#[derive(Debug, Clone, Default)]
pub struct LoadedApp {
    /// Worker options from the app's configuration, as command-line words
    /// (`--concurrency=4`, `--acks-late`). The command line and the
    /// environment win over them.
    pub options: Vec<String>,
    /// Queue declarations the app makes (`task_queues`, quorum types);
    /// a consumed queue of the same name is declared this way.
    pub queues: Vec<QueueSpec>,
    /// The app's tasks.
    pub tasks: Vec<HostedTask>,
    /// What the banner shows as the app (`proj:0x7f…`).
    pub description: String,
}

impl LoadedApp {
    /// The tasks with a `rate_limit`, in tasks per second.
    pub fn rate_limits(&self) -> Vec<(String, f64)> {
        self.tasks
            .iter()
            .filter_map(|t| t.rate_limit.map(|r| (t.name.clone(), r)))
            .collect()
    }
}

/// An embedding that runs tasks of an app written in another language.
///
/// Every method is called in one process at a time, never concurrently.
pub trait TaskHost: Send + Sync {
    /// In the supervisor, before anything forks or connects: imports the
    /// app named by `-A` (`config.app`). The error is one line naming the
    /// module and the cause.
    fn load(&self, config: &WorkerConfig) -> Result<LoadedApp, String>;

    /// Registers the loaded app's tasks (a handler each, run on the main
    /// thread of a task process).
    fn register(&self, loaded: &LoadedApp, registry: &mut Registry);

    /// In the supervisor, just before `fork(2)`.
    fn before_fork(&self) {}

    /// In the supervisor, just after `fork(2)`.
    fn after_fork_in_parent(&self) {}

    /// In the new process, first thing after `fork(2)`.
    fn after_fork_in_child(&self) {}

    /// In a task process (number `index`), on its main thread, before it
    /// connects: whatever the app does when a pool process starts.
    fn task_process_started(&self, index: usize) -> Result<(), String>;

    /// In a task process, on its main thread, when it ends without being
    /// killed, with its exit code.
    fn task_process_ending(&self, code: i32) {
        let _ = code;
    }

    /// In the control process, once a task process consumes. The control
    /// process never forks, so a thread a handler starts is safe there
    /// (a metrics server, say), where in the supervisor it would stop the
    /// next fork.
    fn worker_ready(&self) {}

    /// In the control process, when the worker starts to drain (a warm
    /// shutdown).
    fn worker_shutting_down(&self) {}

    /// In the control process, when the worker has stopped (its task
    /// processes are gone).
    fn worker_stopped(&self) {}

    /// Whether the app answers the remote-control command `method` itself
    /// ([`TaskHost::control`]): its own `@control_command` and
    /// `@inspect_command` handlers, and the commands that read the app
    /// (its settings, its tasks' attributes, a bug report).
    fn serves_control(&self, method: &str) -> bool {
        let _ = method;
        false
    }

    /// In the control process, which never forks: runs the app's handler of
    /// `method` with `arguments`; the reply value (`{"error": …}` when the
    /// handler raised). Called off the control loop's thread.
    fn control(&self, method: &str, arguments: &Map<String, Value>) -> Value {
        let _ = arguments;
        serde_json::json!({"error": format!("KeyError('{method}')")})
    }

    /// In the control process: tasks a `revoke` names that no task process
    /// runs, each with its name when a task process holds its message. The
    /// app's result backend records them REVOKED unless their state says
    /// they ended or another worker started them, as Celery's worker does.
    /// Called off the control loop's thread, before the revoke is answered.
    fn revoked_elsewhere(&self, tasks: &[(String, Option<String>)]) {
        let _ = tasks;
    }
}
