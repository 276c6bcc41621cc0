//! The commands that change the worker: `add_consumer`,
//! `cancel_consumer`, `time_limit`, `rate_limit`, `revoke`/`terminate`.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tracing::info;

use super::{ids_of, nok, ok, truthy, Pidbox};
use crate::inspect::Queued;

impl Pidbox {
    pub(super) fn add_consumer(&self, args: &Map<String, Value>) -> Value {
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

    pub(super) fn cancel_consumer(&self, args: &Map<String, Value>) -> Value {
        let Some(queue) = args.get("queue").and_then(Value::as_str) else {
            return nok("cancel_consumer needs a queue");
        };
        let spec = crate::broker::QueueSpec::celery_default(queue);
        if !self.shm.change_queue(&spec, false) {
            return nok("too many queue changes");
        }
        ok(format!("no longer consuming from {queue}"))
    }

    pub(super) fn known_task(&self, args: &Map<String, Value>) -> Option<String> {
        let name = args.get("task_name").and_then(Value::as_str)?;
        self.registry.get(name).map(|_| name.to_owned())
    }

    pub(super) fn time_limit(&self, args: &Map<String, Value>) -> Value {
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

    pub(super) fn rate_limit(&self, args: &Map<String, Value>) -> Value {
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
    ///
    /// Also returns the ids no task process runs, with the task's name when
    /// a task process holds its message: the app's backend records them
    /// (see [`super::Effect::RevokedElsewhere`]).
    pub(super) fn revoke(
        &self,
        args: &Map<String, Value>,
        force_terminate: bool,
    ) -> (Value, Vec<(String, Option<String>)>) {
        let ids = ids_of(args.get("task_id"));
        let terminate = force_terminate
            || args
                .get("terminate")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let requested = requested_signal(args);
        let mut terminated = Vec::new();
        let mut elsewhere = Vec::new();
        for id in &ids {
            let running = self
                .shm
                .task_slots()
                .iter()
                .find(|s| s.running_task().is_some_and(|t| &t.id == id));
            if running.is_none() {
                elsewhere.push((id.clone(), self.held_task_name(id)));
            }
            if terminate && running.is_some() {
                self.shm.revoke(id, requested as u32);
            } else {
                self.shm.revoke(id, 0);
            }
            if let (true, Some(slot)) = (terminate, running) {
                kill_running(slot.pid(), id, requested);
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
        let reply = if terminate {
            if terminated.is_empty() {
                ok("terminate: tasks unknown")
            } else {
                ok(format!("terminate: {}", terminated.join(", ")))
            }
        } else {
            ok(format!("tasks {set} flagged as revoked"))
        };
        (reply, elsewhere)
    }

    /// The name of task `id` if a task process holds its message (reserved
    /// or scheduled).
    fn held_task_name(&self, id: &str) -> Option<String> {
        self.shm.task_slots().iter().find_map(|slot| {
            slot.queued()
                .lines()
                .filter_map(Queued::parse)
                .find(|q| q.id == id)
                .map(|q| q.name)
        })
    }

    /// `revoke_by_stamped_headers`: tasks stamped with one of `headers`'
    /// values (a map of header to value or list of values, or Celery's
    /// `["header=value", …]` form) are discarded when they arrive or are
    /// about to start; with `terminate`, running tasks stamped so are
    /// terminated as `terminate` does.
    pub(super) fn revoke_by_stamped_headers(&self, args: &Map<String, Value>) -> Value {
        let headers: Map<String, Value> = match args.get("headers") {
            Some(Value::Object(map)) => map.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|item| item.split_once('='))
                .map(|(k, v)| (k.to_owned(), Value::from(v)))
                .collect(),
            _ => return nok("revoke_by_stamped_headers needs headers"),
        };
        for (header, stamps) in &headers {
            match stamps {
                Value::Array(values) => {
                    for value in values {
                        self.shm.revoke_stamp(header, value);
                    }
                }
                value => self.shm.revoke_stamp(header, value),
            }
        }
        let shown = crate::repr::python_repr(&Value::Object(headers.clone()));
        info!("tasks stamped with {shown} flagged as revoked");
        if truthy(args.get("terminate")) {
            let requested = requested_signal(args);
            // Per header, the stamp values that matched a running task (Celery's reply shows them).
            let mut matched: Vec<(String, Vec<Value>)> = Vec::new();
            for slot in self.shm.task_slots() {
                let Some(task) = slot.running_task() else {
                    continue;
                };
                let Ok(Value::Object(stamps)) = serde_json::from_str::<Value>(&task.stamps) else {
                    continue;
                };
                let mut hit = false;
                for (header, wanted) in &headers {
                    let Some(actual) = stamps.get(header).filter(|v| !v.is_null()) else {
                        continue;
                    };
                    let wanted = as_list(wanted);
                    for value in as_list(actual).into_iter().filter(|v| wanted.contains(v)) {
                        hit = true;
                        match matched.iter_mut().find(|(h, _)| h == header) {
                            Some((_, values)) if values.contains(&value) => {}
                            Some((_, values)) => values.push(value),
                            None => matched.push((header.clone(), vec![value])),
                        }
                    }
                }
                if hit {
                    self.shm.revoke(&task.id, requested as u32);
                    kill_running(slot.pid(), &task.id, requested);
                }
            }
            if matched.is_empty() {
                return ok(format!("headers {shown} were not terminated"));
            }
            let sets: Vec<String> = matched
                .iter()
                .map(|(header, values)| {
                    let values: Vec<String> = values.iter().map(crate::repr::python_repr).collect();
                    format!("'{header}': {{{}}}", values.join(", "))
                })
                .collect();
            return ok(format!(
                "headers defaultdict(<class 'set'>, {{{}}}) revoked",
                sets.join(", ")
            ));
        }
        ok(format!(
            "headers {shown} flagged as revoked, but not terminated"
        ))
    }
}

/// A value or each value of a list (Celery's `maybe_list`).
fn as_list(value: &Value) -> Vec<Value> {
    match value {
        Value::Array(values) => values.clone(),
        other => vec![other.clone()],
    }
}

/// The signal a `revoke`/`terminate` asks for (`"KILL"`, `"SIGUSR1"`, …;
/// SIGTERM when absent or unknown).
fn requested_signal(args: &Map<String, Value>) -> Signal {
    args.get("signal")
        .and_then(Value::as_str)
        .map(|s| {
            if s.starts_with("SIG") {
                s.to_owned()
            } else {
                format!("SIG{s}")
            }
        })
        .and_then(|s| s.parse::<Signal>().ok())
        .unwrap_or(Signal::SIGTERM)
}

/// Stops the task process `pid` running task `id`. TERM, INT and QUIT would
/// make a task process drain instead of stop, so those become SIGKILL; the
/// requested signal is what the revoke records and the `task-revoked`
/// event reports.
fn kill_running(pid: u32, id: &str, requested: Signal) {
    let signal = match requested {
        Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => Signal::SIGKILL,
        other => other,
    };
    info!(task_id = %id, "terminating task {id} (process {pid}, {signal:?})");
    let _ = kill(Pid::from_raw(pid as i32), signal);
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
