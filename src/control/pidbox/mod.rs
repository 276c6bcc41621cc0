//! Remote control (`celery inspect`, `celery control`, Flower): the
//! commands a worker answers, computed from the memory the processes share.
//! Read-only commands (Celery's `inspect_command`s) are in `inspect.rs`,
//! commands that change state (`control_command`s) in `commands.rs`.

mod commands;
mod inspect;

use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::host::TaskHost;
use crate::shm::SharedState;
use crate::task::Registry;

/// What a command asks the control loop to do besides replying.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing.
    None,
    /// Before replying, have the result backend record these revoked tasks
    /// that no task process runs (id, and name when a task process holds
    /// the message): the app's ([`TaskHost::revoked_elsewhere`]), or
    /// the worker's Redis backend; with neither (rpc://), nothing.
    RevokedElsewhere(Vec<(String, Option<String>)>),
    /// Send a `worker-heartbeat` now (the `heartbeat` command).
    Heartbeat,
    /// Stop the worker (the `shutdown` command; no reply).
    Shutdown,
}

/// What `Request.info()` shows of a task.
struct Info<'a> {
    id: &'a str,
    name: &'a str,
    args: Value,
    kwargs: Value,
    started: Option<f64>,
    pid: Option<u32>,
    acked: bool,
    route: (&'a str, &'a str),
}

/// The remote-control handlers of one worker.
pub struct Pidbox {
    shm: SharedState,
    config: Arc<WorkerConfig>,
    registry: Arc<Registry>,
    supervisor: i32,
    host: Option<Arc<dyn TaskHost>>,
}

/// Whether a request addressed by `destination`, `pattern` and `matcher` is for `hostname`.
pub fn addressed_to(request: &Value, hostname: &str) -> bool {
    if let Some(dest) = request.get("destination").and_then(Value::as_array) {
        if !dest.is_empty() {
            return dest.iter().any(|d| d.as_str() == Some(hostname));
        }
    }
    match (
        request.get("pattern").and_then(Value::as_str),
        request.get("matcher").and_then(Value::as_str),
    ) {
        (Some(pattern), Some("glob") | None) => glob_match(pattern, hostname),
        (Some(_), Some(other)) => {
            warn!("remote control matcher {other:?} is not supported; ignoring the request");
            false
        }
        (None, _) => true,
    }
}

fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    go(&p, &t)
}

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

fn nok(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

/// A flag argument as Celery reads one: Python's truthiness (false for
/// null, false, 0, "" and empty lists or maps; absent is false).
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

fn ids_of(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

impl Pidbox {
    /// Handlers reading `shm`; `supervisor` is the worker's main pid;
    /// `host` the hosted app, which answers the commands it serves.
    pub fn new(
        shm: SharedState,
        config: Arc<WorkerConfig>,
        registry: Arc<Registry>,
        supervisor: i32,
        host: Option<Arc<dyn TaskHost>>,
    ) -> Self {
        Self {
            shm,
            config,
            registry,
            supervisor,
            host,
        }
    }

    /// The worker's configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The hosted app, if any.
    pub fn host(&self) -> Option<&Arc<dyn TaskHost>> {
        self.host.as_ref()
    }

    /// The hosted app if it answers `method` itself ([`TaskHost::serves_control`]).
    pub fn answered_by_app(&self, method: &str) -> Option<&Arc<dyn TaskHost>> {
        self.host.as_ref().filter(|h| h.serves_control(method))
    }

    /// Runs `method` with `args`; returns the reply value and a side effect.
    pub fn handle(&self, method: &str, args: &Map<String, Value>) -> (Value, Effect) {
        let reply = match method {
            "ping" => ok("pong"),
            "clock" => json!({"clock": self.shm.clock()}),
            "hello" => {
                if args.get("from_node").and_then(Value::as_str)
                    == Some(self.config.hostname.as_str())
                {
                    Value::Null
                } else {
                    let revoked: Map<String, Value> = self
                        .shm
                        .revoked_ids()
                        .into_iter()
                        .map(|id| (id.clone(), json!([0, id])))
                        .collect();
                    json!({"revoked": revoked, "clock": self.shm.clock()})
                }
            }
            "registered" => json!(self
                .registry
                .names()
                .filter(|n| !n.starts_with("celery."))
                .collect::<Vec<_>>()),
            "active" => Value::Array(self.active(truthy(args.get("safe")))),
            "reserved" => Value::Array(self.queued(false)),
            "scheduled" => Value::Array(self.queued(true)),
            "revoked" => json!(self.shm.revoked_ids()),
            "query_task" => self.query_task(args),
            "stats" => self.stats(),
            "active_queues" => Value::Array(self.active_queues()),
            "conf" => self.conf(),
            "report" => ok(self.report()),
            "enable_events" => {
                let was = self.shm.set_task_events(true);
                ok(if was {
                    "task events already enabled"
                } else {
                    "task events enabled"
                })
            }
            "disable_events" => {
                let was = self.shm.set_task_events(false);
                ok(if was {
                    "task events disabled"
                } else {
                    "task events already disabled"
                })
            }
            "heartbeat" => return (Value::Null, Effect::Heartbeat),
            "shutdown" => {
                info!("remote shutdown requested");
                let _ = kill(Pid::from_raw(self.supervisor), Signal::SIGTERM);
                return (Value::Null, Effect::Shutdown);
            }
            "revoke" | "terminate" => {
                let (reply, elsewhere) = self.revoke(args, method == "terminate");
                if !elsewhere.is_empty() {
                    return (reply, Effect::RevokedElsewhere(elsewhere));
                }
                reply
            }
            "revoke_by_stamped_headers" => self.revoke_by_stamped_headers(args),
            "time_limit" => self.time_limit(args),
            "add_consumer" => self.add_consumer(args),
            "pool_grow" | "pool_shrink" => {
                let n = args
                    .get("n")
                    .and_then(|v| {
                        v.as_u64()
                            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    })
                    .unwrap_or(1) as usize;
                let grow = method == "pool_grow";
                let now = self.shm.target();
                let wanted = if grow { now + n } else { now.saturating_sub(n) };
                let set = self.shm.set_target(wanted);
                info!("{method} {n}: {now} -> {set} task processes");
                if set == wanted {
                    ok(if grow {
                        "pool will grow"
                    } else {
                        "pool will shrink"
                    })
                } else if grow {
                    nok(format!("pool cannot grow beyond {set} processes"))
                } else {
                    nok("pool cannot shrink below 1 process")
                }
            }
            "cancel_consumer" => self.cancel_consumer(args),
            "rate_limit" => self.rate_limit(args),
            "election" => Value::Null,
            other => nok(format!("KeyError('{other}')")),
        };
        self.ring_after(method);
        (reply, Effect::None)
    }

    /// Rings those who act on what `method` changed in the shared memory
    /// (see [`crate::signals::DOORBELL`]): the supervisor for the pool size
    /// and the queues (its probe file lists them), the task processes for
    /// the queues.
    fn ring_after(&self, method: &str) {
        let tasks = match method {
            "pool_grow" | "pool_shrink" => false,
            "add_consumer" | "cancel_consumer" => true,
            _ => return,
        };
        crate::signals::ring(self.supervisor as u32);
        if tasks {
            for slot in self.shm.task_slots() {
                crate::signals::ring(slot.pid());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::commands::parse_rate;
    use super::*;

    #[test]
    fn rate_strings() {
        assert_eq!(parse_rate("10/s"), Ok(Some(10.0)));
        assert_eq!(parse_rate("120/m"), Ok(Some(2.0)));
        assert_eq!(parse_rate("3600/h"), Ok(Some(1.0)));
        assert_eq!(parse_rate("5"), Ok(Some(5.0)));
        assert_eq!(parse_rate(""), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn destination_and_glob_matching() {
        assert!(addressed_to(&json!({"destination": null}), "celery@a"));
        assert!(addressed_to(
            &json!({"destination": ["celery@a"]}),
            "celery@a"
        ));
        assert!(!addressed_to(
            &json!({"destination": ["celery@b"]}),
            "celery@a"
        ));
        assert!(addressed_to(
            &json!({"destination": [], "pattern": "celery@*", "matcher": "glob"}),
            "celery@a"
        ));
        assert!(!addressed_to(
            &json!({"pattern": "w?@x", "matcher": "glob"}),
            "celery@a"
        ));
    }
}
