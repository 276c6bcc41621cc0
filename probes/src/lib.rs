//! The worker's state file and the two checks kubelet runs against it.
//!
//! The celeriac supervisor rewrites `<state-dir>/state.json` every 2 s
//! (atomically: a temporary file, then rename), from its own timer, whether
//! or not the broker answers, and at once when a task process changes state. The probe binaries read it and exit 0 or 1
//! with a one-line reason on stdout. They never touch the broker, never fork
//! and start no runtime, so a probe costs a few milliseconds.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The state directory when neither `--state-dir` nor `CELERIAC_STATE_DIR` is given.
pub const DEFAULT_STATE_DIR: &str = "/tmp/celeriac";
/// The schema version written and understood.
pub const VERSION: u32 = 1;

/// What the supervisor publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Schema version ([`VERSION`]).
    pub version: u32,
    /// The supervisor's pid.
    pub pid: u32,
    /// The worker's node name.
    pub hostname: String,
    /// When the supervisor wrote this (ms since the Unix epoch).
    pub written_ms: u64,
    /// Whether a shutdown is under way.
    pub draining: bool,
    /// The queues every task process must consume.
    pub queues: Vec<String>,
    /// How many task processes the worker runs.
    pub concurrency: usize,
    /// One entry per task process slot.
    pub children: Vec<ChildStatus>,
    /// Why task processes cannot start, while they cannot (the broker or
    /// the result backend is unreachable or refuses them); passwords masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One task process, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// Slot index.
    pub index: usize,
    /// Its pid (0 when the slot is empty).
    pub pid: u32,
    /// `empty`, `booting`, `consuming`, `reconnecting` or `draining`.
    pub state: String,
    /// Its last heartbeat (ms since the Unix epoch).
    pub heartbeat_ms: u64,
    /// The task it is running, if any.
    pub task_id: Option<String>,
    /// That task's hard deadline (ms since the Unix epoch), 0 for none.
    pub task_deadline_ms: u64,
}

/// Thresholds of the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The state file may be this old (ms) before the supervisor counts as hung.
    pub max_age_ms: u64,
    /// An idle task process may go this long (ms) without a heartbeat.
    pub child_stale_ms: u64,
    /// Task processes that must be consuming for readiness (`None` = all).
    pub min_consuming: Option<usize>,
    /// A queue that must be among those consumed (readiness).
    pub expect_queue: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_age_ms: 10_000,
            child_stale_ms: 30_000,
            min_consuming: None,
            expect_queue: None,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The state file's path in `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Reads and parses the state file, with a one-line reason on failure.
pub fn read(dir: &Path) -> Result<State, String> {
    let path = state_path(dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no state file at {}: the worker has not started",
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| format!("state file {} is corrupt: {e}", path.display()))?;
    if state.version != VERSION {
        return Err(format!(
            "state file {} has version {}, expected {VERSION}",
            path.display(),
            state.version
        ));
    }
    Ok(state)
}

/// Writes `state` atomically (temporary file in the same directory, then rename).
pub fn write(dir: &Path, state: &State) -> std::io::Result<()> {
    let path = state_path(dir);
    let tmp = dir.join(format!(".{STATE_FILE}.{}.tmp", state.pid));
    std::fs::write(
        &tmp,
        serde_json::to_vec(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

fn supervisor_fresh(state: &State, now: u64, limits: &Limits) -> Result<(), String> {
    if state.written_ms > now + 5_000 {
        return Err(format!(
            "supervisor heartbeat is {} ms in the future",
            state.written_ms - now
        ));
    }
    let age = now.saturating_sub(state.written_ms);
    if age > limits.max_age_ms {
        return Err(format!(
            "supervisor (pid {}) wrote no heartbeat for {:.1}s (limit {:.1}s)",
            state.pid,
            age as f64 / 1000.0,
            limits.max_age_ms as f64 / 1000.0
        ));
    }
    Ok(())
}

/// Liveness: the supervisor's heartbeat is fresh and no task process is
/// wedged (silent while idle, or silent past its task's hard deadline).
/// It does not depend on the broker: restarting a pod does not fix RabbitMQ.
pub fn liveness(state: &State, now: u64, limits: &Limits) -> Result<String, String> {
    supervisor_fresh(state, now, limits)?;
    for c in state
        .children
        .iter()
        .filter(|c| c.pid != 0 && c.state != "empty")
    {
        let silent = now.saturating_sub(c.heartbeat_ms);
        if c.heartbeat_ms == 0 || silent <= limits.child_stale_ms {
            continue;
        }
        let task_has_time =
            c.task_id.is_some() && (c.task_deadline_ms == 0 || c.task_deadline_ms > now);
        if !task_has_time {
            return Err(format!(
                "task process {} (pid {}) is wedged: no heartbeat for {:.1}s",
                c.index + 1,
                c.pid,
                silent as f64 / 1000.0
            ));
        }
    }
    let alive = state.children.iter().filter(|c| c.pid != 0).count();
    Ok(format!(
        "alive: supervisor pid {} with {alive} task process(es)",
        state.pid
    ))
}

/// Readiness: not draining, every expected queue named sensibly, and the
/// task processes connected and consuming.
pub fn readiness(state: &State, now: u64, limits: &Limits) -> Result<String, String> {
    supervisor_fresh(state, now, limits)?;
    if state.draining {
        return Err("draining: the worker is shutting down".into());
    }
    if let Some(q) = state.queues.iter().find(|q| q.contains("$(")) {
        return Err(format!(
            "queue name {q:?} is an unresolved Kubernetes variable reference: the variable is not set in the pod"
        ));
    }
    if let Some(expected) = limits.expect_queue.as_deref().filter(|q| !q.is_empty()) {
        if !state.queues.iter().any(|q| q == expected) {
            return Err(format!(
                "not consuming {expected:?}: the worker consumes {:?}",
                state.queues
            ));
        }
    }
    let consuming = state
        .children
        .iter()
        .filter(|c| c.state == "consuming")
        .count();
    let needed = limits
        .min_consuming
        .unwrap_or(state.concurrency)
        .clamp(1, state.concurrency.max(1));
    if consuming < needed {
        let states: Vec<String> = state.children.iter().map(|c| c.state.clone()).collect();
        let why = state
            .problem
            .as_ref()
            .map_or_else(String::new, |p| format!(" ({p})"));
        return Err(format!(
            "{consuming} of {} task processes consuming (need {needed}): {}{why}",
            state.concurrency,
            states.join(", ")
        ));
    }
    Ok(format!(
        "ready: {consuming}/{} task processes consuming {:?}",
        state.concurrency, state.queues
    ))
}

/// Which probe a binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// worker-liveness
    Liveness,
    /// worker-readiness
    Readiness,
}

/// Runs a probe from command-line arguments and environment; returns the
/// line to print and the exit code.
pub fn run(probe: Probe, args: &[String], env: impl Fn(&str) -> Option<String>) -> (String, i32) {
    let mut limits = Limits::default();
    if probe == Probe::Readiness {
        limits.expect_queue = env("BROKER_REQUESTS_QUEUE");
    }
    let mut dir = env("CELERIAC_STATE_DIR").map(PathBuf::from);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let seconds = |v: String, name: &str| -> Result<u64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| (s * 1000.0) as u64)
                .ok_or_else(|| format!("{name}: {v:?} is not a positive number of seconds"))
        };
        let parsed: Result<(), String> = match flag.as_str() {
            "--state-dir" => value("--state-dir").map(|v| dir = Some(PathBuf::from(v))),
            "--max-age" => value("--max-age")
                .and_then(|v| seconds(v, "--max-age"))
                .map(|ms| limits.max_age_ms = ms),
            "--child-stale" => value("--child-stale")
                .and_then(|v| seconds(v, "--child-stale"))
                .map(|ms| limits.child_stale_ms = ms),
            "--min-consuming" if probe == Probe::Readiness => {
                value("--min-consuming").and_then(|v| {
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .map(|n| limits.min_consuming = Some(n))
                        .ok_or_else(|| format!("--min-consuming: {v:?} is not a positive integer"))
                })
            }
            "--expect-queue" if probe == Probe::Readiness => {
                value("--expect-queue").map(|v| limits.expect_queue = Some(v))
            }
            "-h" | "--help" => return (usage(probe), 0),
            other => Err(format!("unknown argument {other:?} (see --help)")),
        };
        if let Err(e) = parsed {
            return (format!("error: {e}"), 2);
        }
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let outcome = read(&dir).and_then(|state| match probe {
        Probe::Liveness => liveness(&state, now_ms(), &limits),
        Probe::Readiness => readiness(&state, now_ms(), &limits),
    });
    match outcome {
        Ok(line) => (line, 0),
        Err(line) => (line, 1),
    }
}

fn usage(probe: Probe) -> String {
    match probe {
        Probe::Liveness => "usage: worker-liveness [--state-dir DIR] [--max-age SECONDS (10)] [--child-stale SECONDS (30)]".into(),
        Probe::Readiness => "usage: worker-readiness [--state-dir DIR] [--max-age SECONDS (10)] [--min-consuming N (all)] [--expect-queue NAME (env BROKER_REQUESTS_QUEUE)]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(now: u64) -> State {
        State {
            version: VERSION,
            pid: 10,
            hostname: "celery@pod".into(),
            written_ms: now - 500,
            draining: false,
            queues: vec!["requests".into()],
            concurrency: 2,
            children: (0..2)
                .map(|i| ChildStatus {
                    index: i,
                    pid: 11 + i as u32,
                    state: "consuming".into(),
                    heartbeat_ms: now - 700,
                    task_id: None,
                    task_deadline_ms: 0,
                })
                .collect(),
            problem: None,
        }
    }

    #[test]
    fn readiness_says_why_task_processes_cannot_start() {
        let now = 1_000_000;
        let mut s = state(now);
        for c in &mut s.children {
            c.state = "booting".into();
        }
        s.problem =
            Some("redis backend: redis://:********@cache:6379/0: Connection refused".into());
        let why = readiness(&s, now, &Limits::default()).unwrap_err();
        assert!(why.starts_with("0 of 2 task processes consuming"), "{why}");
        assert!(
            why.ends_with("(redis backend: redis://:********@cache:6379/0: Connection refused)"),
            "{why}"
        );
    }

    #[test]
    fn an_older_state_file_without_a_problem_still_reads() {
        let now = 1_000_000;
        let text = serde_json::to_string(&state(now)).unwrap();
        assert!(!text.contains("problem"));
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back.problem, None);
    }

    #[test]
    fn healthy_worker_passes_both() {
        let now = 1_000_000;
        assert!(liveness(&state(now), now, &Limits::default()).is_ok());
        assert!(readiness(&state(now), now, &Limits::default())
            .unwrap()
            .contains("2/2"));
    }

    #[test]
    fn broker_loss_fails_readiness_only() {
        let now = 1_000_000;
        let mut s = state(now);
        s.children[1].state = "reconnecting".into();
        assert!(liveness(&s, now, &Limits::default()).is_ok());
        let err = readiness(&s, now, &Limits::default()).unwrap_err();
        assert!(err.contains("1 of 2"), "{err}");
        let relaxed = Limits {
            min_consuming: Some(1),
            ..Limits::default()
        };
        assert!(readiness(&s, now, &relaxed).is_ok());
    }

    #[test]
    fn stale_supervisor_fails_both() {
        let now = 1_000_000;
        let mut s = state(now);
        s.written_ms = now - 11_000;
        assert!(liveness(&s, now, &Limits::default())
            .unwrap_err()
            .contains("no heartbeat for 11.0s"));
        assert!(readiness(&s, now, &Limits::default()).is_err());
    }

    #[test]
    fn wedged_child_only_when_idle_or_past_deadline() {
        let now = 1_000_000;
        let mut s = state(now);
        s.children[0].heartbeat_ms = now - 40_000;
        assert!(liveness(&s, now, &Limits::default())
            .unwrap_err()
            .contains("wedged"));
        s.children[0].task_id = Some("t".into());
        assert!(
            liveness(&s, now, &Limits::default()).is_ok(),
            "a task without a deadline has time left"
        );
        s.children[0].task_deadline_ms = now - 1;
        assert!(
            liveness(&s, now, &Limits::default()).is_err(),
            "past its deadline"
        );
    }

    #[test]
    fn draining_and_unresolved_queue_names() {
        let now = 1_000_000;
        let mut s = state(now);
        s.draining = true;
        assert_eq!(
            readiness(&s, now, &Limits::default()).unwrap_err(),
            "draining: the worker is shutting down"
        );
        let mut s = state(now);
        s.queues = vec!["$(BROKER_REQUESTS_QUEUE)".into()];
        assert!(readiness(&s, now, &Limits::default())
            .unwrap_err()
            .contains("$(BROKER_REQUESTS_QUEUE)"));
        let s = state(now);
        let expect = Limits {
            expect_queue: Some("other".into()),
            ..Limits::default()
        };
        assert!(readiness(&s, now, &expect)
            .unwrap_err()
            .contains("not consuming \"other\""));
    }

    #[test]
    fn missing_and_corrupt_files_are_clear_failures() {
        let dir = std::env::temp_dir().join(format!("celeriac-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(state_path(&dir));
        assert!(read(&dir).unwrap_err().contains("has not started"));
        std::fs::write(state_path(&dir), b"{\"version\": 1, \"pid\": ").unwrap();
        assert!(read(&dir).unwrap_err().contains("corrupt"));
        let s = state(now_ms());
        write(&dir, &s).unwrap();
        assert_eq!(read(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_flags_exit_2_with_one_line() {
        let env = |_: &str| None;
        let (line, code) = run(Probe::Liveness, &["--max-age".into(), "soon".into()], env);
        assert_eq!(code, 2);
        assert!(line.contains("--max-age") && !line.contains('\n'));
        let (_, code) = run(
            Probe::Liveness,
            &["--min-consuming".into(), "1".into()],
            env,
        );
        assert_eq!(code, 2, "readiness-only flag");
    }
}
