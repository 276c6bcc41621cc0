//! Writers: mixed; each method's doc names who calls it. The supervisor
//! sets the start time, first target and events switch, counts forks and
//! deaths and raises `draining`; the control process changes the target and
//! the events switch; every process that sends events ticks the Lamport clock
//! and counts what it published. Readers: every process.
//!
//! The header also holds the lost ring's next index (see `lost.rs`) and the
//! queue-change generation (see `queues.rs`).

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use super::SharedState;

shm_record! {
    /// Worker-wide values at the start of the region.
    pub(super) struct Header {
        pub(super) lost_next: AtomicU64,
        draining: AtomicU32,
        spawns: AtomicU64,
        deaths: [AtomicU64; DeathCause::ALL.len()],
        clock: AtomicU64,
        task_events: AtomicU32,
        delayed_delivery: AtomicU32,
        events_published: AtomicU64,
        started_ms: AtomicU64,
        pub(super) queues_gen: AtomicU64,
        target: AtomicU64,
        supervisor_wake_ms: AtomicU64,
    }
}

/// Why a child process ended, for the `celeriac_child_deaths_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// Exited cleanly to be replaced (max tasks or memory).
    Recycled,
    /// Killed by a signal it did not expect (crash, OOM kill).
    Crashed,
    /// Exited with an error code.
    Failed,
    /// Killed by the supervisor at a task's hard time limit.
    TimeLimit,
    /// Killed by the supervisor after going silent while idle.
    Wedged,
    /// Could not connect or was refused at startup.
    Boot,
    /// Stopped by a shutdown.
    Shutdown,
}

impl DeathCause {
    /// Every cause, in metric order.
    pub const ALL: [DeathCause; 7] = [
        Self::Recycled,
        Self::Crashed,
        Self::Failed,
        Self::TimeLimit,
        Self::Wedged,
        Self::Boot,
        Self::Shutdown,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Recycled => "recycled",
            Self::Crashed => "crashed",
            Self::Failed => "failed",
            Self::TimeLimit => "time_limit",
            Self::Wedged => "wedged",
            Self::Boot => "boot_failure",
            Self::Shutdown => "shutdown",
        }
    }
}

impl SharedState {
    /// Supervisor only: counts a fork.
    pub(crate) fn count_spawn(&self) {
        self.header.spawns.fetch_add(1, Ordering::Relaxed);
    }

    /// Supervisor only: counts a child's end.
    pub(crate) fn count_death(&self, cause: DeathCause) {
        let i = DeathCause::ALL
            .iter()
            .position(|c| *c == cause)
            .expect("listed");
        self.header.deaths[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Processes forked since start.
    pub fn spawns(&self) -> u64 {
        self.header.spawns.load(Ordering::Relaxed)
    }

    /// Child ends per [`DeathCause::ALL`].
    pub fn deaths(&self) -> Vec<u64> {
        self.header
            .deaths
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect()
    }

    /// How many task processes the worker should run (`-c`, then
    /// `pool_grow` / `pool_shrink`).
    pub fn target(&self) -> usize {
        self.header.target.load(Ordering::Acquire) as usize
    }

    /// Supervisor (at start) and control process: sets
    /// [`SharedState::target`], kept between 1 and the slots mapped.
    pub fn set_target(&self, n: usize) -> usize {
        let n = n.clamp(1, self.tasks);
        self.header.target.store(n as u64, Ordering::Release);
        n
    }

    /// Any process sending events: advances the worker's Lamport clock and
    /// returns the new value.
    pub fn tick_clock(&self) -> u64 {
        self.header.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Control process: moves the clock past `seen` (a clock received from
    /// another node).
    pub fn adjust_clock(&self, seen: u64) -> u64 {
        let mut current = self.header.clock.load(Ordering::Acquire);
        loop {
            let next = current.max(seen) + 1;
            match self.header.clock.compare_exchange(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return next,
                Err(actual) => current = actual,
            }
        }
    }

    /// The clock's current value.
    pub fn clock(&self) -> u64 {
        self.header.clock.load(Ordering::Acquire)
    }

    /// Whether task events are on (`-E`, `enable_events`).
    pub fn task_events(&self) -> bool {
        self.header.task_events.load(Ordering::Acquire) != 0
    }

    /// Supervisor (at start) and control process: turns task events on or
    /// off; returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.header
            .task_events
            .swap(u32::from(on), Ordering::AcqRel)
            != 0
    }

    /// Whether the broker's native delayed delivery is declared (task
    /// processes then send countdown retries through it).
    pub fn delayed_delivery(&self) -> bool {
        self.header.delayed_delivery.load(Ordering::Acquire) != 0
    }

    /// Control process: records whether the delayed-delivery topology is
    /// declared on the broker.
    pub fn set_delayed_delivery(&self, ready: bool) {
        self.header
            .delayed_delivery
            .store(u32::from(ready), Ordering::Release);
    }

    /// Any process sending events: counts published event messages.
    pub fn count_events(&self, n: u64) {
        self.header.events_published.fetch_add(n, Ordering::Relaxed);
    }

    /// Event messages published since start.
    pub fn events_published(&self) -> u64 {
        self.header.events_published.load(Ordering::Relaxed)
    }

    /// When the supervisor started (ms since the epoch).
    pub fn started_ms(&self) -> u64 {
        self.header.started_ms.load(Ordering::Relaxed)
    }

    /// Supervisor only, before forking: records the start time.
    pub(crate) fn set_started_ms(&self, ms: u64) {
        self.header.started_ms.store(ms, Ordering::Relaxed);
    }

    /// Supervisor only: when it looks at the slots next without being rung
    /// (ms since the epoch, never before the real moment), set just before
    /// it sleeps; 0 from when it wakes until then.
    pub(crate) fn set_supervisor_wake_ms(&self, ms: u64) {
        self.header.supervisor_wake_ms.store(ms, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// A task process that has just published a task with a hard deadline
    /// (ms since the epoch): whether the supervisor would look too late to
    /// enforce it, so the process must ring it. The supervisor clears its
    /// wake time before it reads the slots and publishes it after; with the
    /// task published before this look, either it sees the task or this
    /// says to ring.
    pub fn supervisor_wakes_after(&self, deadline_ms: u64) -> bool {
        fence(Ordering::SeqCst);
        let wake = self.header.supervisor_wake_ms.load(Ordering::SeqCst);
        wake == 0 || deadline_ms < wake
    }

    /// Whether the worker is draining.
    pub fn draining(&self) -> bool {
        self.header.draining.load(Ordering::Acquire) != 0
    }

    /// Supervisor only: the worker drains from now on (never undone).
    pub(crate) fn set_draining(&self) {
        self.header.draining.store(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_before_the_supervisors_next_look_rings_it() {
        let shm = SharedState::map(1).unwrap();
        // Awake (or not started): it looks at the slots anyway, but a
        // process cannot tell whether it already has.
        assert!(shm.supervisor_wakes_after(5_000));
        shm.set_supervisor_wake_ms(10_000);
        assert!(shm.supervisor_wakes_after(9_999));
        assert!(!shm.supervisor_wakes_after(10_000));
        shm.set_supervisor_wake_ms(0);
        assert!(shm.supervisor_wakes_after(20_000));
    }

    #[test]
    fn the_clock_ticks_and_moves_past_what_it_sees() {
        let shm = SharedState::map(1).unwrap();
        assert_eq!((shm.tick_clock(), shm.tick_clock()), (1, 2));
        assert_eq!(shm.adjust_clock(10), 11);
        assert_eq!(shm.adjust_clock(3), 12);
        assert_eq!(shm.clock(), 12);
    }

    #[test]
    fn the_target_stays_within_the_slots_mapped() {
        let shm = SharedState::map(4).unwrap();
        assert_eq!(shm.set_target(0), 1);
        assert_eq!(shm.set_target(9), 4);
        assert_eq!(shm.target(), 4);
    }

    #[test]
    fn counters_and_switches() {
        let shm = SharedState::map(1).unwrap();
        shm.count_spawn();
        shm.count_death(DeathCause::Wedged);
        shm.count_death(DeathCause::Wedged);
        shm.count_events(3);
        assert_eq!(shm.spawns(), 1);
        assert_eq!(shm.deaths(), [0, 0, 0, 0, 2, 0, 0]);
        assert_eq!(shm.events_published(), 3);
        assert!(!shm.set_task_events(true));
        assert!(shm.task_events());
        assert!(!shm.draining());
        shm.set_draining();
        assert!(shm.draining());
    }
}
