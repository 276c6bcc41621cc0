//! The prefork supervisor: a single-threaded process (std, nix and
//! signal-hook only) that forks the task children, reaps them (orphans too,
//! as PID 1), replaces them with backoff, enforces hard time limits and runs
//! the SIGTERM drain. It never creates a thread, a tokio runtime or a broker
//! connection, so it can fork safely at any time.

mod fork;
mod policy;
mod roles;
mod signals;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::WorkerConfig;
use crate::exit;
use crate::shm::{now_ms, DeathCause, LostReason, SharedState};
pub use fork::{thread_count, ForkError};
use policy::Ended;
pub use roles::{Role, RoleBodies};
use signals::Signals;

/// Refusals, with no child ever consuming, that stop the worker.
pub const MAX_BOOT_FAILURES: u32 = 5;

/// Grace after the hard limit before the supervisor kills the child (the
/// child aborts async tasks itself at the limit).
const HARD_LIMIT_GRACE_MS: u64 = 1_000;

/// How often the probe state file is rewritten: the probes take it as the
/// supervisor's heartbeat and allow 10 s (`--max-age`). This is the only
/// periodic wake-up of the loop, which otherwise sleeps until a signal (a
/// child's exit, a shutdown, the doorbell) or its next deadline. A task
/// process that starts a task whose hard limit falls before the loop's next
/// look rings the doorbell (see `SharedState::supervisor_wakes_after`).
const STATE_EVERY: Duration = Duration::from_secs(2);

/// After the drain deadline, how often SIGKILL is sent again to the
/// processes that are still there.
const KILL_AGAIN: Duration = Duration::from_secs(1);

/// One row of the process table: a role and the process that has it now.
struct ChildEntry {
    role: Role,
    pid: Option<Pid>,
    started: Instant,
    respawn_at: Instant,
    quick_exits: u32,
    killed_for: Option<DeathCause>,
    retiring: bool,
}

/// The supervisor's state.
pub struct Supervisor {
    config: Arc<WorkerConfig>,
    bodies: Box<dyn RoleBodies>,
    shm: SharedState,
    signals: Signals,
    children: Vec<ChildEntry>,
    drain_deadline: Option<Instant>,
    cold: bool,
    boot_failures: u32,
    unreachable_since: Option<Instant>,
    ever_consumed: bool,
    /// Why task processes could not start, as last reported (one line per change).
    boot_reason: Option<String>,
    fatal: Option<String>,
    state_written: Option<Instant>,
    control_stopped: bool,
    killed_at_deadline: bool,
    state_seen: Vec<(u32, crate::shm::ChildState)>,
}

impl Supervisor {
    /// Prepares the shared memory and signal handlers. Nothing is forked
    /// yet; `bodies` says what each forked process runs.
    pub fn new(config: Arc<WorkerConfig>, bodies: Box<dyn RoleBodies>) -> std::io::Result<Self> {
        // Room for `pool_grow`: up to twice the configured processes (at least 4 more).
        let n = config.concurrency + config.concurrency.max(4);
        let shm = SharedState::map(n)?;
        shm.set_target(config.concurrency);
        shm.set_started_ms(now_ms());
        shm.set_task_events(config.task_events);
        let signals = Signals::install()?;
        let now = Instant::now();
        // One entry per task process, then the control process.
        let children = (0..n)
            .map(Role::Task)
            .chain([Role::Control])
            .map(|role| ChildEntry {
                role,
                pid: None,
                started: now,
                respawn_at: now,
                quick_exits: 0,
                killed_for: None,
                retiring: false,
            })
            .collect();
        Ok(Self {
            config,
            bodies,
            shm,
            signals,
            children,
            drain_deadline: None,
            cold: false,
            boot_failures: 0,
            unreachable_since: None,
            ever_consumed: false,
            boot_reason: None,
            fatal: None,
            state_written: None,
            control_stopped: false,
            killed_at_deadline: false,
            state_seen: Vec::new(),
        })
    }

    /// Starts with these tasks limited to so many per second, as the
    /// `rate_limit` remote command would set them (a Python app's
    /// `rate_limit` options).
    pub fn set_rate_limits(&self, limits: &[(String, f64)]) {
        for (task, per_second) in limits {
            let index = self.shm.task_stat_index(task);
            self.shm.set_rate_limit(index, Some(*per_second));
        }
    }

    /// Runs until the worker has drained or failed; returns the exit code.
    pub fn run(mut self) -> i32 {
        // Orphans of our children (for example probe processes left behind
        // by an exec) are re-parented to us and reaped like children.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            debug!("cannot become a child subreaper: {e}");
        }
        // Start the processes now rather than at the first wake-up.
        if let Err(e) = self.spawn_missing() {
            error!("cannot start task processes: {e}");
            self.begin_drain(false);
            self.cold = true;
        }
        loop {
            self.write_state(false);
            let wake = self.next_wake();
            let sleep = wake.saturating_duration_since(Instant::now());
            // Rounded up, as the wait is: never before the real moment.
            let sleep_ms = sleep.as_micros().div_ceil(1000) as u64 + 1;
            self.shm.set_supervisor_wake_ms(now_ms() + sleep_ms);
            let pending = self.signals.wait(sleep);
            // Looking at the slots from now until the next sleep.
            self.shm.set_supervisor_wake_ms(0);
            if pending.quit {
                self.begin_drain(true);
            } else if pending.terminate {
                if self.drain_deadline.is_some() {
                    warn!("second termination signal: children stop running tasks now");
                    self.signal_children(Signal::SIGQUIT);
                } else {
                    self.begin_drain(false);
                }
            }
            self.reap();
            self.enforce_limits();
            if let Some(deadline) = self.drain_deadline {
                if self.live_task_children() == 0 && !self.control_stopped {
                    self.control_stopped = true;
                    self.signal_control(Signal::SIGTERM);
                }
                if self.live_children() == 0 {
                    self.write_state(true);
                    info!("all task processes stopped");
                    return if self.cold {
                        exit::FAILED
                    } else {
                        exit::DRAINED
                    };
                }
                if Instant::now() >= deadline {
                    if !self.killed_at_deadline {
                        error!("task processes did not stop in time; killing them");
                        self.killed_at_deadline = true;
                    }
                    self.signal_children(Signal::SIGKILL);
                    self.drain_deadline = Some(Instant::now() + KILL_AGAIN);
                }
                continue;
            }
            self.check_boot_deadline();
            if let Some(reason) = self.fatal.take() {
                error!("{reason}");
                self.begin_drain(false);
                self.cold = true;
                continue;
            }
            if let Err(e) = self.spawn_missing() {
                error!("cannot start task processes: {e}");
                self.begin_drain(false);
                self.cold = true;
            }
        }
    }

    /// When the loop must look again without being signalled: the next
    /// state-file rewrite, restart, drain or boot deadline, hard time
    /// limit, or silent idle process, whichever comes first.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let now_ms = now_ms();
        // A deadline on the shared clock (ms since the epoch), a moment
        // after it has passed.
        let at_ms = |ms: u64| now + Duration::from_millis(ms.saturating_sub(now_ms) + 1);
        let mut wake = self.state_written.map_or(now, |t| t + STATE_EVERY);
        if let Some(deadline) = self.drain_deadline {
            wake = wake.min(deadline);
        } else {
            let target = self.shm.target();
            for entry in &self.children {
                let wanted = match entry.role {
                    Role::Task(n) => n < target,
                    Role::Control => true,
                };
                if wanted && entry.pid.is_none() {
                    wake = wake.min(entry.respawn_at);
                }
            }
            if let (Some(since), false) = (self.unreachable_since, self.ever_consumed) {
                wake = wake.min(since + self.config.boot_timeout);
            }
        }
        let wedged_after_ms = self.config.child_heartbeat_timeout.as_millis() as u64;
        let task_slots = self.shm.task_slots().len();
        for entry in &self.children {
            if entry.pid.is_none() || entry.killed_for.is_some() {
                continue;
            }
            let slot = &self.shm.slots()[entry.role.slot(task_slots)];
            match slot.running_task() {
                Some(task) if task.deadline_ms > 0 => {
                    wake = wake.min(at_ms(task.deadline_ms + HARD_LIMIT_GRACE_MS));
                }
                Some(_) => {}
                None if slot.heartbeat_ms() > 0 => {
                    wake = wake.min(at_ms(slot.heartbeat_ms() + wedged_after_ms));
                }
                None => {}
            }
        }
        wake
    }

    /// Rewrites the probe state file every [`STATE_EVERY`] (or now, if
    /// `force`), from the supervisor's own timer, whatever the broker does.
    fn write_state(&mut self, force: bool) {
        // Also rewrite at once when a child changes state (it rings the
        // doorbell), so readiness follows consumption at once.
        let seen: Vec<_> = self
            .shm
            .task_slots()
            .iter()
            .map(|s| (s.pid(), s.state()))
            .collect();
        let changed = seen != self.state_seen;
        if !force
            && !changed
            && self
                .state_written
                .is_some_and(|t| t.elapsed() < STATE_EVERY)
        {
            return;
        }
        self.state_seen = seen;
        self.state_written = Some(Instant::now());
        let target = self.shm.target();
        let children = self
            .shm
            .task_slots()
            .iter()
            .enumerate()
            .filter(|(index, slot)| *index < target || slot.pid() != 0)
            .map(|(index, slot)| {
                let task = slot.running_task();
                celeriac_probes::ChildStatus {
                    index,
                    pid: slot.pid(),
                    state: slot.state().name().to_owned(),
                    heartbeat_ms: slot.heartbeat_ms(),
                    task_deadline_ms: task.as_ref().map_or(0, |t| t.deadline_ms),
                    task_id: task.map(|t| t.id),
                }
            })
            .collect();
        let state = celeriac_probes::State {
            version: celeriac_probes::VERSION,
            pid: std::process::id(),
            hostname: self.config.hostname.clone(),
            written_ms: now_ms(),
            draining: self.drain_deadline.is_some(),
            queues: self
                .shm
                .desired_queues(&self.config.queues)
                .into_iter()
                .map(|q| q.name)
                .collect(),
            concurrency: self.shm.target(),
            children,
            problem: (!self.ever_consumed)
                .then(|| self.boot_reason.clone())
                .flatten(),
        };
        if let Err(e) = celeriac_probes::write(&self.config.state_dir, &state) {
            warn!(
                "cannot write the probe state file in {}: {e}",
                self.config.state_dir.display()
            );
        }
    }

    fn live_children(&self) -> usize {
        self.children.iter().filter(|c| c.pid.is_some()).count()
    }

    fn begin_drain(&mut self, cold: bool) {
        if self.drain_deadline.is_none() {
            info!(
                "{} shutdown: stopping {} task process(es)",
                if cold { "Cold" } else { "Warm" },
                self.live_task_children()
            );
            self.shm.set_draining();
            // A hosted app's `worker_shutting_down` runs in the control
            // process, which is stopped last.
            if let Some(pid) = self.control_pid() {
                crate::signals::ring(pid.as_raw() as u32);
            }
            self.drain_deadline =
                Some(Instant::now() + self.config.shutdown_timeout + Duration::from_secs(10));
            // Readiness must fail at once.
            self.write_state(true);
        }
        self.cold |= cold;
        self.signal_children(if cold {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        });
    }

    /// Signals the task processes (the control process is stopped last,
    /// so it can announce `worker-offline` once the tasks are done).
    fn signal_children(&self, signal: Signal) {
        let tasks = self.children.iter().filter(|c| c.role.is_task());
        for pid in tasks.filter_map(|c| c.pid) {
            let _ = kill(pid, signal);
        }
        if signal == Signal::SIGKILL {
            self.signal_control(signal);
        }
    }

    fn signal_control(&self, signal: Signal) {
        if let Some(pid) = self.control_pid() {
            let _ = kill(pid, signal);
        }
    }

    fn control_pid(&self) -> Option<Pid> {
        let control = self.children.iter().find(|c| c.role == Role::Control);
        control.and_then(|c| c.pid)
    }

    fn live_task_children(&self) -> usize {
        self.children
            .iter()
            .filter(|c| c.role.is_task() && c.pid.is_some())
            .count()
    }

    fn spawn_missing(&mut self) -> Result<(), ForkError> {
        let now = Instant::now();
        let target = self.shm.target();
        for index in 0..self.children.len() {
            let entry = &mut self.children[index];
            let wanted = match entry.role {
                Role::Task(n) => n < target,
                Role::Control => true,
            };
            if !wanted {
                // `pool_shrink`: retire the process in this slot, once.
                if let (Some(pid), false) = (entry.pid, entry.retiring) {
                    info!("pool shrinks: stopping task process {pid}");
                    entry.retiring = true;
                    let _ = kill(pid, Signal::SIGTERM);
                }
                continue;
            }
            if entry.pid.is_some() || entry.respawn_at > now {
                continue;
            }
            entry.retiring = false;
            let role = entry.role;
            let pid = fork::spawn(role, &self.shm, &self.signals, self.bodies.as_ref())?;
            self.shm.count_spawn();
            debug!(pid = pid.as_raw(), "started {role}");
            let entry = &mut self.children[index];
            entry.pid = Some(pid);
            entry.started = Instant::now();
            entry.killed_for = None;
        }
        if !self.ever_consumed
            && self
                .shm
                .task_slots()
                .iter()
                .any(|s| s.state() == crate::shm::ChildState::Consuming)
        {
            self.ever_consumed = true;
            self.boot_failures = 0;
            self.unreachable_since = None;
        }
        Ok(())
    }

    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.child_exited(pid, Ended::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.child_exited(pid, Ended::Signal(signal))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    fn child_exited(&mut self, pid: Pid, ended: Ended) {
        let Some(index) = self.children.iter().position(|c| c.pid == Some(pid)) else {
            debug!(pid = pid.as_raw(), "reaped orphan");
            return;
        };
        let task_slots = self.shm.task_slots().len();
        let entry = &mut self.children[index];
        let slot = &self.shm.slots()[entry.role.slot(task_slots)];
        entry.pid = None;
        let how = ended.describe();
        let (code, signal) = (ended.code(), ended.signal());
        let cause = policy::classify(ended, self.drain_deadline.is_some(), entry.killed_for);
        self.shm.count_death(cause);
        let mut lost = false;
        if let Some(task) = slot.running_task() {
            let reason = if entry.killed_for == Some(DeathCause::TimeLimit) {
                LostReason::TimeLimit
            } else {
                LostReason::WorkerLost
            };
            let deaths = self.shm.record_lost(
                &task,
                reason,
                (signal.map_or(0, |s| s as u32), code.map_or(0, |c| c as u32)),
            );
            error!(
                task_id = %task.id,
                "Task {}[{}] lost: task process {} exited with {how} while running it ({} time(s))",
                task.name, task.id, pid, deaths
            );
            lost = true;
        }
        if let Role::Task(n) = entry.role {
            // Failures it was storing for earlier lost tasks: another
            // process stores them.
            lost |= self.shm.release_reports(n) > 0;
        }
        let boot_error = slot.error();
        slot.reset();
        slot.set_pid(0);
        let lived = entry.started.elapsed();
        if lost {
            // A live task process settles the record now (an early-acked
            // task's FAILURE); a new process also looks when it starts.
            let live = self.children.iter().filter(|c| c.role.is_task());
            for pid in live.filter_map(|c| c.pid) {
                crate::signals::ring(pid.as_raw() as u32);
            }
        }
        if self.drain_deadline.is_some() {
            debug!(pid = pid.as_raw(), "task process stopped with {how}");
            return;
        }
        if code == Some(exit::BOOT_REFUSED) {
            self.boot_failures += 1;
            let why = if boot_error.is_empty() {
                "it could not start".to_owned()
            } else {
                boot_error
            };
            if !self.ever_consumed && self.boot_failures >= MAX_BOOT_FAILURES {
                self.fatal = Some(format!(
                    "cannot start task processes after {} tries: {why}",
                    self.boot_failures
                ));
                return;
            }
            debug!(
                "task process {pid} failed to start ({}/{})",
                self.boot_failures, MAX_BOOT_FAILURES
            );
            self.report_boot(why);
        } else if code == Some(exit::UNREACHABLE) {
            self.unreachable_since.get_or_insert_with(Instant::now);
            let why = if boot_error.is_empty() {
                "the broker is unreachable".to_owned()
            } else {
                boot_error
            };
            debug!("task process {pid} could not reach the broker");
            self.report_boot(why);
            self.check_boot_deadline();
            if self.fatal.is_some() {
                return;
            }
        } else if self.children[index].retiring {
            info!("task process {pid} retired (pool shrink)");
        } else if matches!(code, Some(exit::RECYCLED | exit::DRAINED)) {
            info!("task process {pid} exited (recycled); replacing it");
        } else {
            warn!("task process {pid} exited with {how}; replacing it");
        }
        let entry = &mut self.children[index];
        entry.quick_exits = policy::quick_exits(entry.quick_exits, lived, ended);
        let delay = if code == Some(exit::UNREACHABLE) {
            policy::unreachable_retry_delay(entry.quick_exits)
        } else {
            policy::respawn_delay(entry.quick_exits)
        };
        entry.respawn_at = Instant::now() + delay;
    }

    /// Reports why task processes cannot start: one WARNING line when the
    /// reason is new, the repeats at DEBUG.
    fn report_boot(&mut self, why: String) {
        if self.boot_reason.as_deref() != Some(why.as_str()) {
            warn!("task processes cannot start yet, retrying: {why}");
            self.boot_reason = Some(why);
        }
    }

    /// Gives up once the broker has been unreachable for `--boot-timeout`
    /// without any task process ever consuming, checked at every wake-up
    /// (the deadline is one of them) so it holds whatever the restart
    /// backoff is.
    fn check_boot_deadline(&mut self) {
        let Some(since) = self.unreachable_since else {
            return;
        };
        if self.ever_consumed || self.fatal.is_some() || since.elapsed() < self.config.boot_timeout
        {
            return;
        }
        let why = self
            .boot_reason
            .clone()
            .unwrap_or_else(|| "the broker is unreachable".to_owned());
        self.fatal = Some(format!(
            "cannot start task processes: still failing after {}s: {why}",
            self.config.boot_timeout.as_secs()
        ));
    }

    fn enforce_limits(&mut self) {
        let now = now_ms();
        let wedged_after_ms = self.config.child_heartbeat_timeout.as_millis() as u64;
        let task_slots = self.shm.task_slots().len();
        for entry in self.children.iter_mut() {
            let Some(pid) = entry.pid else { continue };
            let slot = &self.shm.slots()[entry.role.slot(task_slots)];
            match slot.running_task() {
                Some(task)
                    if task.deadline_ms > 0
                        && now > task.deadline_ms + HARD_LIMIT_GRACE_MS
                        && entry.killed_for.is_none() =>
                {
                    error!(
                        task_id = %task.id,
                        "Hard time limit ({}s) exceeded for {}[{}]; killing task process {pid}",
                        task.hard_limit_ms as f64 / 1000.0,
                        task.name,
                        task.id
                    );
                    entry.killed_for = Some(DeathCause::TimeLimit);
                    let _ = kill(pid, Signal::SIGKILL);
                }
                None if slot.heartbeat_ms() > 0
                    && now.saturating_sub(slot.heartbeat_ms()) > wedged_after_ms
                    && entry.killed_for.is_none() =>
                {
                    error!(
                        "task process {pid} sent no heartbeat for {}s while idle; killing it",
                        wedged_after_ms / 1000
                    );
                    entry.killed_for = Some(DeathCause::Wedged);
                    let _ = kill(pid, Signal::SIGKILL);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
