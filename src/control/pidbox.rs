//! Remote control (`celery inspect`, `celery control`, Flower): the
//! commands a worker answers, computed from the memory the processes share.

use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use crate::broker::mask_url;
use crate::config::{BackendUrl, WorkerConfig};
use crate::inspect::Queued;
use crate::shm::{now_ms, Outcome, SharedState, TaskFlags};
use crate::task::Registry;

/// What a command asks the control loop to do besides replying.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing.
    None,
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
    /// Handlers reading `shm`; `supervisor` is the worker's main pid.
    pub fn new(
        shm: SharedState,
        config: Arc<WorkerConfig>,
        registry: Arc<Registry>,
        supervisor: i32,
    ) -> Self {
        Self {
            shm,
            config,
            registry,
            supervisor,
        }
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
            "revoke" => self.revoke(args, false),
            "terminate" => self.revoke(args, true),
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
        (reply, Effect::None)
    }

    fn task_info(&self, t: &Info<'_>) -> Value {
        json!({
            "id": t.id,
            "name": t.name,
            "args": t.args,
            "kwargs": t.kwargs,
            "type": t.name,
            "hostname": self.config.hostname,
            "time_start": t.started,
            "acknowledged": t.acked,
            "delivery_info": {"exchange": t.route.0, "routing_key": t.route.1, "priority": 0, "redelivered": false},
            "worker_pid": t.pid,
        })
    }

    /// `Request.info()` of every running task; `safe` gives the argument
    /// reprs instead of their values.
    fn active(&self, safe: bool) -> Vec<Value> {
        self.shm
            .task_slots()
            .iter()
            .filter_map(|slot| {
                let t = slot.running_task()?;
                let (args, kwargs) = t.args.values(safe);
                Some(self.task_info(&Info {
                    id: &t.id,
                    name: &t.name,
                    args,
                    kwargs,
                    started: Some(t.started_ms as f64 / 1000.0),
                    pid: Some(slot.pid()),
                    acked: t.flags & TaskFlags::ACKS_LATE == 0,
                    route: (&t.exchange, &t.routing_key),
                }))
            })
            .collect()
    }

    /// The messages every task process holds: reserved (no ETA) or
    /// scheduled (with one, in Celery's `{eta, priority, request}` form).
    fn queued(&self, scheduled: bool) -> Vec<Value> {
        let mut out = Vec::new();
        for slot in self.shm.task_slots() {
            for q in slot.queued().lines().filter_map(Queued::parse) {
                if q.eta.is_some() != scheduled {
                    continue;
                }
                let (args, kwargs) = q.args.values(false);
                let request = self.task_info(&Info {
                    id: &q.id,
                    name: &q.name,
                    args,
                    kwargs,
                    started: None,
                    pid: None,
                    acked: false,
                    route: (&q.exchange, &q.routing_key),
                });
                out.push(match q.eta {
                    Some(eta) => json!({"eta": eta, "priority": 6, "request": request}),
                    None => request,
                });
            }
        }
        out
    }

    fn query_task(&self, args: &Map<String, Value>) -> Value {
        let ids = ids_of(args.get("ids"));
        let mut found = Map::new();
        for info in self.active(false) {
            if let Some(id) = info["id"].as_str().filter(|id| ids.iter().any(|i| i == id)) {
                found.insert(id.to_owned(), json!(["active", info]));
            }
        }
        for info in self.queued(false) {
            if let Some(id) = info["id"].as_str().filter(|id| ids.iter().any(|i| i == id)) {
                found.insert(id.to_owned(), json!(["reserved", info]));
            }
        }
        Value::Object(found)
    }

    fn stats(&self) -> Value {
        let mut total = Map::new();
        for s in self.shm.task_stats() {
            let ran: u64 = [Outcome::Succeeded, Outcome::Failed, Outcome::Retried]
                .iter()
                .map(|o| s.outcomes[Outcome::ALL.iter().position(|x| x == o).unwrap_or(0)])
                .sum();
            if ran > 0 {
                total.insert(s.name, ran.into());
            }
        }
        let processes: Vec<u32> = self
            .shm
            .task_slots()
            .iter()
            .map(|s| s.pid())
            .filter(|p| *p != 0)
            .collect();
        let uri = crate::broker::parse_url(&self.config.broker_url).ok();
        let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok();
        let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        json!({
            "total": total,
            "pid": self.supervisor,
            "clock": self.shm.clock().to_string(),
            "uptime": now_ms().saturating_sub(self.shm.started_ms()) / 1000,
            "pool": {
                "implementation": "celeriac:prefork",
                "max-concurrency": self.shm.target(),
                "processes": processes,
                "max-tasks-per-child": self.config.max_tasks_per_child.map_or(json!("N/A"), Value::from),
                "put-guarded-by-semaphore": false,
                "timeouts": [self.config.soft_time_limit.unwrap_or(0.0), self.config.time_limit.unwrap_or(0.0)],
            },
            "broker": {
                "hostname": uri.as_ref().map(|u| u.authority.host.clone()),
                "userid": uri.as_ref().map(|u| u.authority.userinfo.username.clone()),
                "virtual_host": uri.as_ref().map(|u| u.vhost.clone()),
                "port": uri.as_ref().map(|u| u.authority.port),
                "insist": false,
                "ssl": self.config.broker_url.to_ascii_lowercase().starts_with("amqps"),
                "transport": "amqp",
                "connect_timeout": 10,
                "transport_options": {},
                "login_method": "PLAIN",
                "uri_prefix": null,
                "heartbeat": 60.0,
                "failover_strategy": "round-robin",
                "alternates": [],
            },
            "prefetch_count": self.shm.target() * usize::from(self.config.prefetch_multiplier),
            "rusage": {
                "utime": usage.map(|u| secs(u.user_time())),
                "stime": usage.map(|u| secs(u.system_time())),
                "maxrss": usage.map(|u| u.max_rss()),
            },
        })
    }

    fn active_queues(&self) -> Vec<Value> {
        self.shm
            .desired_queues(&self.config.queues)
            .iter()
            .map(|q| {
                let args = q.queue_type.as_ref().map(|t| json!({"x-queue-type": t}));
                json!({
                    "name": q.name,
                    "exchange": {"name": q.exchange, "type": "direct", "arguments": null, "durable": true,
                                 "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
                    "routing_key": q.routing_key,
                    "queue_arguments": args,
                    "binding_arguments": null,
                    "consumer_arguments": null,
                    "durable": true,
                    "exclusive": false,
                    "auto_delete": false,
                    "no_ack": false,
                    "alias": null,
                    "bindings": [],
                    "no_declare": null,
                    "expires": null,
                    "message_ttl": null,
                    "max_length": null,
                    "max_length_bytes": null,
                    "max_priority": q.max_priority,
                })
            })
            .collect()
    }

    fn conf(&self) -> Value {
        let c = &self.config;
        let backend = match &c.result_backend {
            None => Value::Null,
            Some(BackendUrl::Rpc) => "rpc://".into(),
            Some(BackendUrl::Redis(u)) => mask_url(u).into(),
        };
        json!({
            "broker_url": mask_url(&c.broker_url),
            "result_backend": backend,
            "worker_concurrency": c.concurrency,
            "worker_prefetch_multiplier": c.prefetch_multiplier,
            "task_acks_late": c.acks_late,
            "task_reject_on_worker_lost": c.reject_on_worker_lost,
            "task_track_started": c.track_started,
            "task_time_limit": c.time_limit,
            "task_soft_time_limit": c.soft_time_limit,
            "worker_max_tasks_per_child": c.max_tasks_per_child,
            "worker_max_memory_per_child": c.max_memory_per_child,
            "worker_send_task_events": self.shm.task_events(),
            "task_default_queue": c.queues.first().map(|q| q.name.clone()),
        })
    }

    fn report(&self) -> String {
        format!(
            "software -> celeriac:{} (prefork)\nplatform -> Linux\nnode -> {}\nbroker -> {}\nqueues -> {}\n",
            env!("CARGO_PKG_VERSION"),
            self.config.hostname,
            mask_url(&self.config.broker_url),
            self.config.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    }

    fn add_consumer(&self, args: &Map<String, Value>) -> Value {
        let Some(queue) = args
            .get("queue")
            .and_then(Value::as_str)
            .filter(|q| !q.is_empty())
        else {
            return nok("add_consumer needs a queue");
        };
        if self
            .shm
            .desired_queues(&self.config.queues)
            .iter()
            .any(|q| q.name == queue)
        {
            return ok(format!("already consuming from {queue}"));
        }
        let mut spec = crate::broker::QueueSpec::celery_default(queue);
        if let Some(exchange) = args.get("exchange").and_then(Value::as_str) {
            spec.exchange = exchange.to_owned();
        }
        if let Some(key) = args.get("routing_key").and_then(Value::as_str) {
            spec.routing_key = key.to_owned();
        }
        if !self.shm.change_queue(&spec, true) {
            return nok("too many queue changes");
        }
        ok(format!("add consumer {queue}"))
    }

    fn cancel_consumer(&self, args: &Map<String, Value>) -> Value {
        let Some(queue) = args.get("queue").and_then(Value::as_str) else {
            return nok("cancel_consumer needs a queue");
        };
        let spec = crate::broker::QueueSpec::celery_default(queue);
        if !self.shm.change_queue(&spec, false) {
            return nok("too many queue changes");
        }
        ok(format!("no longer consuming from {queue}"))
    }

    fn known_task(&self, args: &Map<String, Value>) -> Option<String> {
        let name = args.get("task_name").and_then(Value::as_str)?;
        self.registry.get(name).map(|_| name.to_owned())
    }

    fn time_limit(&self, args: &Map<String, Value>) -> Value {
        let Some(name) = self.known_task(args) else {
            return nok("unknown task");
        };
        let secs = |k: &str| {
            args.get(k).and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
        };
        let index = self.shm.task_stat_index(&name);
        // A missing value removes the limit, as Celery's command does.
        self.shm.set_time_limits(
            index,
            Some(secs("soft").unwrap_or(0.0)),
            Some(secs("hard").unwrap_or(0.0)),
        );
        info!(
            "new time limits for {name}: soft={:?} hard={:?}",
            secs("soft"),
            secs("hard")
        );
        ok("time limits set successfully")
    }

    fn rate_limit(&self, args: &Map<String, Value>) -> Value {
        let Some(name) = self.known_task(args) else {
            return nok("unknown task");
        };
        let text = match args.get("rate_limit") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.trim().to_owned(),
            Some(v) => v.to_string(),
        };
        let rate = match parse_rate(&text) {
            Ok(r) => r,
            Err(e) => return nok(e),
        };
        let index = self.shm.task_stat_index(&name);
        self.shm.set_rate_limit(index, rate);
        match rate {
            None => ok("rate limit disabled successfully"),
            Some(_) => ok("new rate limit set successfully"),
        }
    }

    /// `revoke` (and `terminate`): remembered by every task process, which
    /// discards the task if it arrives or is about to start. With
    /// `terminate`, the process running it is stopped: TERM, INT and QUIT
    /// would make a task process drain instead of stop, so those become
    /// SIGKILL; the requested signal is what the `task-revoked` event reports.
    fn revoke(&self, args: &Map<String, Value>, force_terminate: bool) -> Value {
        let ids = ids_of(args.get("task_id"));
        let terminate = force_terminate
            || args
                .get("terminate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let requested = args
            .get("signal")
            .and_then(Value::as_str)
            .map(|s| {
                if s.starts_with("SIG") {
                    s.to_owned()
                } else {
                    format!("SIG{s}")
                }
            })
            .and_then(|s| s.parse::<Signal>().ok())
            .unwrap_or(Signal::SIGTERM);
        let mut terminated = Vec::new();
        for id in &ids {
            let running = self
                .shm
                .task_slots()
                .iter()
                .find(|s| s.running_task().is_some_and(|t| &t.id == id));
            if terminate && running.is_some() {
                self.shm.revoke(id, requested as u32);
            } else {
                self.shm.revoke(id, 0);
            }
            if let (true, Some(slot)) = (terminate, running) {
                let signal = match requested {
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => Signal::SIGKILL,
                    other => other,
                };
                info!(task_id = %id, "terminating task {id} (process {}, {signal:?})", slot.pid());
                let _ = kill(Pid::from_raw(slot.pid() as i32), signal);
                terminated.push(id.clone());
            }
        }
        let set = format!(
            "{{{}}}",
            ids.iter()
                .map(|i| format!("'{i}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if terminate {
            if terminated.is_empty() {
                ok("terminate: tasks unknown")
            } else {
                ok(format!("terminate: {}", terminated.join(", ")))
            }
        } else {
            ok(format!("tasks {set} flagged as revoked"))
        }
    }
}

/// Celery's rate strings: `"10/s"`, `"100/m"`, `"1000/h"`, `"10"` (per
/// second); empty or zero means unlimited.
pub fn parse_rate(text: &str) -> Result<Option<f64>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let (number, unit) = text.split_once('/').unwrap_or((text, "s"));
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("Invalid rate limit string: {text:?}"))?;
    let per = match unit.trim().chars().next() {
        Some('s') => 1.0,
        Some('m') => 60.0,
        Some('h') => 3600.0,
        _ => return Err(format!("Invalid rate limit string: {text:?}")),
    };
    Ok((n > 0.0).then_some(n / per))
}

#[cfg(test)]
mod tests {
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
