//! The read-only commands: `active`, `reserved`, `scheduled`,
//! `query_task`, `stats`, `active_queues`, `conf`, `report`.

use serde_json::{json, Map, Value};

use super::{ids_of, Info, Pidbox};
use crate::broker::mask_url;
use crate::config::BackendUrl;
use crate::inspect::Queued;
use crate::shm::{now_ms, Outcome, TaskFlags};

impl Pidbox {
    pub(super) fn task_info(&self, t: &Info<'_>) -> Value {
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
    pub(super) fn active(&self, safe: bool) -> Vec<Value> {
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
    pub(super) fn queued(&self, scheduled: bool) -> Vec<Value> {
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

    pub(super) fn query_task(&self, args: &Map<String, Value>) -> Value {
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

    pub(super) fn stats(&self) -> Value {
        let mut total = Map::new();
        for s in self.shm.task_stats() {
            let ran: u64 = [Outcome::Succeeded, Outcome::Failed, Outcome::Retried]
                .iter()
                .map(|o| s.outcomes[Outcome::ALL.iter().position(|x| x == o).unwrap_or(0)])
                .sum();
            // A task's counts are kept per queue and exception: add them up.
            let before = total.get(&s.name).and_then(Value::as_u64).unwrap_or(0);
            if ran > 0 {
                total.insert(s.name, (before + ran).into());
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

    pub(super) fn active_queues(&self) -> Vec<Value> {
        self.shm
            .desired_queues(&self.config.queues)
            .iter()
            .map(|q| {
                let d = &q.declared;
                let nonempty = |m: &Map<String, Value>| {
                    (!m.is_empty()).then(|| Value::Object(m.clone()))
                };
                let args = q.arguments_json();
                let bindings: Vec<Value> = d
                    .bindings
                    .iter()
                    .map(|b| {
                        json!({
                            "exchange": {"name": b.exchange, "type": b.exchange_kind.as_str(),
                                         "arguments": nonempty(&b.exchange_arguments),
                                         "durable": b.exchange_durable, "passive": false,
                                         "auto_delete": b.exchange_auto_delete, "delivery_mode": null,
                                         "no_declare": false},
                            "routing_key": b.routing_key,
                            "arguments": nonempty(&b.arguments),
                        })
                    })
                    .collect();
                json!({
                    "name": q.name,
                    "exchange": {"name": q.exchange, "type": q.exchange_kind.as_str(),
                                 "arguments": nonempty(&d.exchange_arguments), "durable": d.exchange_durable,
                                 "passive": false, "auto_delete": d.exchange_auto_delete,
                                 "delivery_mode": null, "no_declare": d.exchange_no_declare},
                    "routing_key": q.routing_key,
                    "queue_arguments": nonempty(&args),
                    "binding_arguments": nonempty(&d.binding_arguments),
                    "consumer_arguments": nonempty(&d.consumer_arguments),
                    "durable": d.durable,
                    "exclusive": d.exclusive,
                    "auto_delete": d.auto_delete,
                    "no_ack": false,
                    "alias": null,
                    "bindings": bindings,
                    "no_declare": d.no_declare.then_some(true),
                    "expires": null,
                    "message_ttl": null,
                    "max_length": null,
                    "max_length_bytes": null,
                    "max_priority": q.max_priority,
                })
            })
            .collect()
    }

    pub(super) fn conf(&self) -> Value {
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

    pub(super) fn report(&self) -> String {
        format!(
            "software -> celeriac:{} (prefork)\nplatform -> Linux\nnode -> {}\nbroker -> {}\nqueues -> {}\n",
            env!("CARGO_PKG_VERSION"),
            self.config.hostname,
            mask_url(&self.config.broker_url),
            self.config.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    }
}
