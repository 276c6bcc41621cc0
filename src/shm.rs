//! Memory shared between the supervisor and every child, without locks:
//! one slot per child (written only by that child, read by everyone) and a
//! ring of lost-task records (written only by the supervisor, claimed by
//! children with compare-and-swap).
//!
//! The region is mapped `MAP_SHARED | MAP_ANONYMOUS` once, before the first
//! fork, so every child sees the same physical pages. It holds only atomics,
//! so any bit pattern (including the initial zeros) is a valid value.

use std::num::NonZeroUsize;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

use crate::inspect::ArgsText;

/// Bytes of text a slot or record carries (task id, name, reply_to, correlation id).
const TEXT_WORDS: usize = 64;
/// Bytes of the last boot error a slot keeps.
const ERROR_WORDS: usize = 32;
/// Words a slot keeps of the running task's route and arguments (JSON and
/// repr, each up to [`crate::inspect::FIELD_LIMIT`] bytes).
const DETAIL_WORDS: usize = 288;
/// Words a slot has to list the messages it holds (for `inspect reserved/scheduled`).
const QUEUED_WORDS: usize = 1024;
/// Revoked task ids remembered (Celery keeps 50,000 for 3 hours).
pub const REVOKED_TABLE: usize = 8192;
/// How long a revoke is remembered.
pub const REVOKE_EXPIRES_MS: u64 = 3 * 3600 * 1000;
/// Lost-task records kept.
pub const LOST_RING: usize = 64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Fixed-size text written under a sequence lock.
#[repr(C)]
struct SeqText<const N: usize> {
    seq: AtomicU64,
    words: [AtomicU64; N],
}

impl<const N: usize> SeqText<N> {
    fn write(&self, parts: &[&str]) {
        let mut bytes = Vec::with_capacity(N * 8);
        for p in parts {
            bytes.extend_from_slice(p.as_bytes());
            bytes.push(0);
        }
        bytes.truncate(N * 8);
        bytes.resize(N * 8, 0);
        self.seq.fetch_add(1, Ordering::AcqRel); // odd: writing
        for (word, chunk) in self.words.iter().zip(bytes.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        self.seq.fetch_add(1, Ordering::Release); // even: done
    }

    fn read(&self) -> Vec<String> {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut bytes = Vec::with_capacity(N * 8);
            for word in &self.words {
                bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                let text = String::from_utf8_lossy(&bytes);
                let mut parts: Vec<String> = text.split('\0').map(str::to_owned).collect();
                while parts.last().is_some_and(String::is_empty) {
                    parts.pop();
                }
                return parts;
            }
        }
    }
}

/// What a child is doing, as its slot says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ChildState {
    /// No child in this slot.
    Empty = 0,
    /// Forked, connecting.
    Booting = 1,
    /// Connected and consuming every queue.
    Consuming = 2,
    /// Lost the broker; reconnecting.
    Reconnecting = 3,
    /// Draining after a shutdown or recycle request.
    Draining = 4,
}

impl ChildState {
    /// The lower-case name used in the probe state file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Booting => "booting",
            Self::Consuming => "consuming",
            Self::Reconnecting => "reconnecting",
            Self::Draining => "draining",
        }
    }

    fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Booting,
            2 => Self::Consuming,
            3 => Self::Reconnecting,
            4 => Self::Draining,
            _ => Self::Empty,
        }
    }
}

/// The task a child is running, as published in its slot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunningTask {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// rpc reply queue ("" if none).
    pub reply_to: String,
    /// Correlation id ("" if none).
    pub correlation_id: String,
    /// When it started (ms since epoch).
    pub started_ms: u64,
    /// Hard deadline (ms since epoch), 0 for none.
    pub deadline_ms: u64,
    /// The hard limit in ms, 0 for none.
    pub hard_limit_ms: u64,
    /// Flags (see [`TaskFlags`]).
    pub flags: u64,
    /// Its arguments (slots only).
    pub args: ArgsText,
    /// The exchange it was delivered from (slots only).
    pub exchange: String,
    /// Its routing key (slots only).
    pub routing_key: String,
}

/// Bits in [`RunningTask::flags`].
pub struct TaskFlags;

impl TaskFlags {
    /// The message is acknowledged after the task.
    pub const ACKS_LATE: u64 = 1;
    /// Requeue when the child dies (acks_late only).
    pub const REJECT_ON_WORKER_LOST: u64 = 2;
    /// No result is stored.
    pub const IGNORE_RESULT: u64 = 4;
}

/// One child's slot.
#[repr(C)]
pub struct Slot {
    pid: AtomicU32,
    state: AtomicU32,
    heartbeat_ms: AtomicU64,
    processed: AtomicU64,
    reconnects: AtomicU64,
    reserved: AtomicU64,
    task_started_ms: AtomicU64,
    task_deadline_ms: AtomicU64,
    task_hard_limit_ms: AtomicU64,
    task_flags: AtomicU64,
    task: SeqText<TEXT_WORDS>,
    error: SeqText<ERROR_WORDS>,
    queued: SeqText<QUEUED_WORDS>,
    detail: SeqText<DETAIL_WORDS>,
}

impl Slot {
    /// The pid of the child owning the slot (0 = none).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Acquire)
    }
    pub(crate) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Release);
    }
    /// The child's state.
    pub fn state(&self) -> ChildState {
        ChildState::from_u32(self.state.load(Ordering::Acquire))
    }
    /// Publishes the child's state and beats.
    pub fn set_state(&self, state: ChildState) {
        self.state.store(state as u32, Ordering::Release);
        self.beat();
    }
    /// The child's last heartbeat (ms since epoch).
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.load(Ordering::Acquire)
    }
    /// Records that the child is alive now.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Release);
    }
    /// Tasks started since the worker started (all generations of this slot).
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }
    /// Times this slot's processes re-established a lost broker connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Messages received but not started (prefetched or waiting for an ETA).
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }
    /// Publishes [`Slot::reserved`].
    pub fn set_reserved(&self, n: u64) {
        self.reserved.store(n, Ordering::Relaxed);
    }
    /// Publishes the task now running.
    pub fn start_task(&self, t: &RunningTask) {
        self.task
            .write(&[&t.id, &t.name, &t.reply_to, &t.correlation_id]);
        let [args, kwargs, argsrepr, kwargsrepr] = t.args.fields();
        self.detail.write(&[
            &t.exchange,
            &t.routing_key,
            args,
            kwargs,
            argsrepr,
            kwargsrepr,
        ]);
        self.task_flags.store(t.flags, Ordering::Relaxed);
        self.task_hard_limit_ms
            .store(t.hard_limit_ms, Ordering::Relaxed);
        self.task_deadline_ms
            .store(t.deadline_ms, Ordering::Relaxed);
        self.task_started_ms
            .store(t.started_ms.max(1), Ordering::Release);
        self.processed.fetch_add(1, Ordering::Relaxed);
        self.beat();
    }
    /// Clears the running task.
    pub fn finish_task(&self) {
        self.task_started_ms.store(0, Ordering::Release);
        self.task_deadline_ms.store(0, Ordering::Relaxed);
        self.beat();
    }
    /// The task running now, if any.
    pub fn running_task(&self) -> Option<RunningTask> {
        let started_ms = self.task_started_ms.load(Ordering::Acquire);
        if started_ms == 0 {
            return None;
        }
        let mut parts = self.task.read().into_iter();
        let mut next = || parts.next().unwrap_or_default();
        let (id, name, reply_to, correlation_id) = (next(), next(), next(), next());
        let detail = self.detail.read();
        let mut route = detail.iter().cloned();
        let (exchange, routing_key) = (
            route.next().unwrap_or_default(),
            route.next().unwrap_or_default(),
        );
        Some(RunningTask {
            args: ArgsText::from_fields(detail.iter().skip(2).map(String::as_str)),
            exchange,
            routing_key,
            id,
            name,
            reply_to,
            correlation_id,
            started_ms,
            deadline_ms: self.task_deadline_ms.load(Ordering::Relaxed),
            hard_limit_ms: self.task_hard_limit_ms.load(Ordering::Relaxed),
            flags: self.task_flags.load(Ordering::Relaxed),
        })
    }
    /// Lists the messages this process holds but has not started: one line
    /// per message (see [`crate::inspect::Queued::line`]), cut at a line
    /// end to the slot's size.
    pub fn set_queued(&self, lines: &str) {
        let cut = if lines.len() > QUEUED_WORDS * 8 - 1 {
            let mut end = QUEUED_WORDS * 8 - 1;
            while !lines.is_char_boundary(end) {
                end -= 1;
            }
            &lines[..lines[..end].rfind('\n').map_or(0, |i| i + 1)]
        } else {
            lines
        };
        self.queued.write(&[cut]);
    }

    /// The lines written by [`Slot::set_queued`].
    pub fn queued(&self) -> String {
        self.queued.read().into_iter().next().unwrap_or_default()
    }

    /// Records why the child could not start.
    pub fn set_error(&self, message: &str) {
        self.error.write(&[message]);
    }
    /// The child's last boot error ("" if none).
    pub fn error(&self) -> String {
        self.error.read().into_iter().next().unwrap_or_default()
    }
    pub(crate) fn reset(&self) {
        self.finish_task();
        self.error.write(&[]);
        self.queued.write(&[]);
        self.reserved.store(0, Ordering::Relaxed);
        self.state
            .store(ChildState::Empty as u32, Ordering::Release);
    }
}

/// Why a task's child went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LostReason {
    /// The child died (signal or crash): `WorkerLostError`.
    WorkerLost = 1,
    /// The supervisor killed it at the hard time limit: `TimeLimitExceeded`.
    TimeLimit = 2,
}

/// States of a lost-task record.
const LOST_FREE: u32 = 0;
const LOST_REPORT: u32 = 1;
const LOST_WAIT_REDELIVERY: u32 = 2;
const LOST_DONE: u32 = 3;

/// A task whose child died while running it.
#[repr(C)]
pub struct LostRecord {
    state: AtomicU32,
    reason: AtomicU32,
    deaths: AtomicU32,
    signal: AtomicU32,
    hard_limit_ms: AtomicU64,
    flags: AtomicU64,
    at_ms: AtomicU64,
    task: SeqText<TEXT_WORDS>,
}

/// A lost task, as read from the ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Lost {
    /// Index in the ring (to mark it done).
    pub index: usize,
    /// The task.
    pub task: RunningTask,
    /// Why.
    pub reason: LostReason,
    /// How many times a child died running it.
    pub deaths: u32,
    /// The signal that killed the child (0 if it exited).
    pub signal: u32,
}

#[repr(C)]
struct Header {
    lost_next: AtomicU64,
    draining: AtomicU32,
    spawns: AtomicU64,
    deaths: [AtomicU64; DeathCause::ALL.len()],
    clock: AtomicU64,
    task_events: AtomicU32,
    events_published: AtomicU64,
    started_ms: AtomicU64,
    queues_gen: AtomicU64,
    target: AtomicU64,
}

/// Queues added or cancelled at run time remembered.
pub const QUEUE_CHANGES: usize = 32;

/// One `add_consumer` / `cancel_consumer` change.
#[repr(C)]
pub struct QueueChange {
    state: AtomicU32,
    text: SeqText<48>,
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

/// How a task run ended, for `celeriac_tasks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Returned a value.
    Succeeded,
    /// Raised (including time limits and lost processes).
    Failed,
    /// Asked to be retried.
    Retried,
    /// Rejected (bad message, unknown task, `Reject`, quarantine).
    Rejected,
    /// Revoked or expired.
    Revoked,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::Retried,
        Self::Rejected,
        Self::Revoked,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).expect("listed")
    }
}

/// One remembered revoke.
#[repr(C)]
pub struct RevokedEntry {
    state: AtomicU32,
    signal: AtomicU32,
    at_ms: AtomicU64,
    id: SeqText<8>,
}

/// A remembered revoke, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoke {
    /// When it was revoked (ms since the epoch).
    pub at_ms: u64,
    /// The signal sent to terminate it (0: not terminated).
    pub signal: u32,
}

fn id_hash(id: &str) -> usize {
    // FNV-1a: stable across processes (std's hasher is randomly keyed).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as usize
}

/// Upper bounds (seconds) of the task runtime histogram.
pub const RUNTIME_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Task names tracked individually; later names share the last entry.
pub const TASK_STATS: usize = 256;
/// The name shown for tasks beyond [`TASK_STATS`].
pub const OVERFLOW_NAME: &str = "<other>";
const STAT_FREE: u32 = 0;
const STAT_CLAIMED: u32 = 1;
const STAT_READY: u32 = 2;

/// Counters for one task name, shared by every process.
#[repr(C)]
pub struct TaskStat {
    state: AtomicU32,
    name: SeqText<16>,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    buckets: [AtomicU64; RUNTIME_BUCKETS.len()],
    runtime_count: AtomicU64,
    runtime_sum_us: AtomicU64,
    soft_limit_ms: AtomicU64,
    hard_limit_ms: AtomicU64,
    rate_per_hour: AtomicU64,
}

/// Limits set at run time by the `time_limit` and `rate_limit` commands.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuntimeLimits {
    /// Soft time limit override in seconds (`None`: not overridden; `Some(0.0)`: removed).
    pub soft: Option<f64>,
    /// Hard time limit override in seconds (same conventions).
    pub hard: Option<f64>,
    /// Tasks per second for the whole worker (`None`: unlimited).
    pub rate: Option<f64>,
}

/// A snapshot of one [`TaskStat`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStatSnapshot {
    /// The task name.
    pub name: String,
    /// Count per [`Outcome::ALL`].
    pub outcomes: Vec<u64>,
    /// Non-cumulative count per [`RUNTIME_BUCKETS`] bucket.
    pub buckets: Vec<u64>,
    /// Runs with a runtime.
    pub runtime_count: u64,
    /// Sum of runtimes in seconds.
    pub runtime_sum: f64,
}

/// The shared region.
#[derive(Clone, Copy)]
pub struct SharedState {
    header: &'static Header,
    slots: &'static [Slot],
    lost: &'static [LostRecord],
    stats: &'static [TaskStat],
    revoked: &'static [RevokedEntry],
    queue_changes: &'static [QueueChange],
    tasks: usize,
}

impl SharedState {
    /// Maps a region for `tasks` task processes plus the control process.
    /// Call once, before forking.
    pub fn map(tasks: usize) -> std::io::Result<Self> {
        let slots = tasks + 1;
        let header_size = std::mem::size_of::<Header>().next_multiple_of(64);
        let slots_size = std::mem::size_of::<Slot>() * slots;
        let lost_offset = (header_size + slots_size).next_multiple_of(64);
        let stats_offset =
            (lost_offset + std::mem::size_of::<LostRecord>() * LOST_RING).next_multiple_of(64);
        let revoked_offset =
            (stats_offset + std::mem::size_of::<TaskStat>() * TASK_STATS).next_multiple_of(64);
        let queues_offset = (revoked_offset + std::mem::size_of::<RevokedEntry>() * REVOKED_TABLE)
            .next_multiple_of(64);
        let total = queues_offset + std::mem::size_of::<QueueChange>() * QUEUE_CHANGES;
        let length = NonZeroUsize::new(total).expect("non-empty region");
        // SAFETY: an anonymous shared mapping with no address hint cannot alias
        // any existing Rust object; on success it returns `total` bytes of
        // zeroed, page-aligned, readable and writable memory.
        #[allow(unsafe_code)]
        let base = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(std::io::Error::from)?
        .as_ptr()
        .cast::<u8>();
        // SAFETY: the mapping is never unmapped, so references into it are
        // valid for 'static. Every type placed here is #[repr(C)] and made only
        // of atomics, for which all-zero (and any other) bytes are valid
        // values; offsets are multiples of 64, above their 8-byte alignment,
        // and all regions lie within the `total` bytes mapped. Atomics make
        // concurrent access from several processes sound on Linux.
        #[allow(unsafe_code)]
        let (header, slots, lost, stats, revoked, queue_changes) = unsafe {
            (
                &*base.cast::<Header>(),
                std::slice::from_raw_parts(base.add(header_size).cast::<Slot>(), slots),
                std::slice::from_raw_parts(base.add(lost_offset).cast::<LostRecord>(), LOST_RING),
                std::slice::from_raw_parts(base.add(stats_offset).cast::<TaskStat>(), TASK_STATS),
                std::slice::from_raw_parts(
                    base.add(revoked_offset).cast::<RevokedEntry>(),
                    REVOKED_TABLE,
                ),
                std::slice::from_raw_parts(
                    base.add(queues_offset).cast::<QueueChange>(),
                    QUEUE_CHANGES,
                ),
            )
        };
        Ok(Self {
            header,
            slots,
            lost,
            stats,
            revoked,
            queue_changes,
            tasks,
        })
    }

    /// Every slot: the task processes' first, then the control process's.
    pub fn slots(&self) -> &'static [Slot] {
        self.slots
    }

    /// The task processes' slots.
    pub fn task_slots(&self) -> &'static [Slot] {
        &self.slots[..self.tasks]
    }

    /// The control process's slot.
    pub fn control_slot(&self) -> &'static Slot {
        &self.slots[self.tasks]
    }

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

    /// Control process only: remembers that task `id` is revoked
    /// (terminated with `signal` when non-zero).
    pub fn revoke(&self, id: &str, signal: u32) {
        let start = id_hash(id) % REVOKED_TABLE;
        let now = now_ms();
        let mut target = start;
        for probe in 0..REVOKED_TABLE {
            let i = (start + probe) % REVOKED_TABLE;
            let e = &self.revoked[i];
            let state = e.state.load(Ordering::Acquire);
            let expired = now.saturating_sub(e.at_ms.load(Ordering::Relaxed)) > REVOKE_EXPIRES_MS;
            if state == 0 || expired || e.id.read().first().map(String::as_str) == Some(id) {
                target = i;
                break;
            }
        }
        let e = &self.revoked[target];
        e.state.store(1, Ordering::Release);
        e.id.write(&[id]);
        e.at_ms.store(now, Ordering::Relaxed);
        e.signal.store(signal, Ordering::Relaxed);
        e.state.store(2, Ordering::Release);
    }

    /// Whether task `id` was revoked in the last three hours.
    pub fn revoked(&self, id: &str) -> Option<Revoke> {
        let start = id_hash(id) % REVOKED_TABLE;
        let now = now_ms();
        for probe in 0..REVOKED_TABLE {
            let e = &self.revoked[(start + probe) % REVOKED_TABLE];
            match e.state.load(Ordering::Acquire) {
                0 => return None,
                2 if e.id.read().first().map(String::as_str) == Some(id) => {
                    let at_ms = e.at_ms.load(Ordering::Relaxed);
                    if now.saturating_sub(at_ms) > REVOKE_EXPIRES_MS {
                        return None;
                    }
                    return Some(Revoke {
                        at_ms,
                        signal: e.signal.load(Ordering::Relaxed),
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Every id revoked in the last three hours.
    pub fn revoked_ids(&self) -> Vec<String> {
        let now = now_ms();
        self.revoked
            .iter()
            .filter(|e| e.state.load(Ordering::Acquire) == 2)
            .filter(|e| now.saturating_sub(e.at_ms.load(Ordering::Relaxed)) <= REVOKE_EXPIRES_MS)
            .filter_map(|e| e.id.read().into_iter().next())
            .collect()
    }

    /// Control process only: records `add_consumer` (`add`) or
    /// `cancel_consumer` for `spec`. Returns false when the table is full.
    pub fn change_queue(&self, spec: &crate::broker::QueueSpec, add: bool) -> bool {
        let slot = self
            .queue_changes
            .iter()
            .find(|c| {
                c.state.load(Ordering::Acquire) != 0 && c.text.read().first() == Some(&spec.name)
            })
            .or_else(|| {
                self.queue_changes
                    .iter()
                    .find(|c| c.state.load(Ordering::Acquire) == 0)
            });
        let Some(c) = slot else { return false };
        c.text
            .write(&[&spec.name, &spec.exchange, &spec.routing_key]);
        c.state.store(if add { 1 } else { 2 }, Ordering::Release);
        self.header.queues_gen.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// How many task processes the worker should run (`-c`, then
    /// `pool_grow` / `pool_shrink`).
    pub fn target(&self) -> usize {
        self.header.target.load(Ordering::Acquire) as usize
    }

    /// Sets [`SharedState::target`], kept between 1 and the slots mapped.
    pub fn set_target(&self, n: usize) -> usize {
        let n = n.clamp(1, self.tasks);
        self.header.target.store(n as u64, Ordering::Release);
        n
    }

    /// Changes to the consumed queues since start (bumped by every change).
    pub fn queues_generation(&self) -> u64 {
        self.header.queues_gen.load(Ordering::Acquire)
    }

    /// The queues to consume now: `base` (the command line) with run-time
    /// additions and cancellations applied.
    pub fn desired_queues(
        &self,
        base: &[crate::broker::QueueSpec],
    ) -> Vec<crate::broker::QueueSpec> {
        let mut queues = base.to_vec();
        for c in self.queue_changes {
            let state = c.state.load(Ordering::Acquire);
            if state == 0 {
                continue;
            }
            let mut parts = c.text.read().into_iter();
            let mut next = || parts.next().unwrap_or_default();
            let (name, exchange, routing_key) = (next(), next(), next());
            queues.retain(|q| q.name != name);
            if state == 1 {
                queues.push(crate::broker::QueueSpec {
                    name,
                    exchange,
                    routing_key,
                    queue_type: None,
                    max_priority: None,
                });
            }
        }
        queues
    }

    /// Advances the worker's Lamport clock and returns the new value.
    pub fn tick_clock(&self) -> u64 {
        self.header.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Moves the clock past `seen` (a clock received from another node).
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

    /// Turns task events on or off; returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.header
            .task_events
            .swap(u32::from(on), Ordering::AcqRel)
            != 0
    }

    /// Counts published event messages.
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

    pub(crate) fn set_started_ms(&self, ms: u64) {
        self.header.started_ms.store(ms, Ordering::Relaxed);
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

    /// The stats entry for `name`, claiming a free one the first time.
    /// Callers cache the index: this scans the table.
    pub fn task_stat_index(&self, name: &str) -> usize {
        let last = TASK_STATS - 1;
        for (i, stat) in self.stats.iter().enumerate().take(last) {
            match stat.state.load(Ordering::Acquire) {
                STAT_READY if stat.name.read().first().map(String::as_str) == Some(name) => {
                    return i
                }
                STAT_READY => continue,
                STAT_CLAIMED => {
                    // Another process is writing a name here; wait for it.
                    while stat.state.load(Ordering::Acquire) == STAT_CLAIMED {
                        std::hint::spin_loop();
                    }
                    if stat.name.read().first().map(String::as_str) == Some(name) {
                        return i;
                    }
                }
                _ => {
                    if stat
                        .state
                        .compare_exchange(
                            STAT_FREE,
                            STAT_CLAIMED,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        stat.name.write(&[name]);
                        stat.state.store(STAT_READY, Ordering::Release);
                        return i;
                    }
                    if stat.name.read().first().map(String::as_str) == Some(name) {
                        return i;
                    }
                }
            }
        }
        let overflow = &self.stats[last];
        if overflow
            .state
            .compare_exchange(STAT_FREE, STAT_CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            overflow.name.write(&[OVERFLOW_NAME]);
            overflow.state.store(STAT_READY, Ordering::Release);
        }
        last
    }

    /// Counts one task outcome, with its runtime when it ran.
    pub fn record_task(&self, index: usize, outcome: Outcome, runtime: Option<f64>) {
        let stat = &self.stats[index.min(TASK_STATS - 1)];
        stat.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(secs) = runtime {
            if let Some(b) = RUNTIME_BUCKETS.iter().position(|ub| secs <= *ub) {
                stat.buckets[b].fetch_add(1, Ordering::Relaxed);
            }
            stat.runtime_count.fetch_add(1, Ordering::Relaxed);
            stat.runtime_sum_us
                .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        }
    }

    /// Control process only: overrides the time limits of the task at `index`
    /// (`Some(0.0)` removes a limit, `None` leaves it as configured).
    pub fn set_time_limits(&self, index: usize, soft: Option<f64>, hard: Option<f64>) {
        let stat = &self.stats[index.min(TASK_STATS - 1)];
        let encode = |v: Option<f64>| v.map_or(0, |s| (s.max(0.0) * 1000.0) as u64 + 1);
        stat.soft_limit_ms.store(encode(soft), Ordering::Release);
        stat.hard_limit_ms.store(encode(hard), Ordering::Release);
    }

    /// Control process only: limits the task at `index` to `per_second` for
    /// the whole worker (`None`: unlimited).
    pub fn set_rate_limit(&self, index: usize, per_second: Option<f64>) {
        let stat = &self.stats[index.min(TASK_STATS - 1)];
        stat.rate_per_hour.store(
            per_second.map_or(0, |r| (r * 3600.0).max(1.0) as u64),
            Ordering::Release,
        );
    }

    /// The run-time limits of the task at `index`.
    pub fn runtime_limits(&self, index: usize) -> RuntimeLimits {
        let stat = &self.stats[index.min(TASK_STATS - 1)];
        let decode = |v: u64| (v != 0).then(|| (v - 1) as f64 / 1000.0);
        let rate = stat.rate_per_hour.load(Ordering::Acquire);
        RuntimeLimits {
            soft: decode(stat.soft_limit_ms.load(Ordering::Acquire)),
            hard: decode(stat.hard_limit_ms.load(Ordering::Acquire)),
            rate: (rate != 0).then(|| rate as f64 / 3600.0),
        }
    }

    /// Every task name seen so far, with its counters.
    pub fn task_stats(&self) -> Vec<TaskStatSnapshot> {
        self.stats
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) == STAT_READY)
            .map(|s| TaskStatSnapshot {
                name: s.name.read().into_iter().next().unwrap_or_default(),
                outcomes: s
                    .outcomes
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                buckets: s
                    .buckets
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                runtime_count: s.runtime_count.load(Ordering::Relaxed),
                runtime_sum: s.runtime_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            })
            .collect()
    }

    /// Whether the worker is draining.
    pub fn draining(&self) -> bool {
        self.header.draining.load(Ordering::Acquire) != 0
    }
    pub(crate) fn set_draining(&self) {
        self.header.draining.store(1, Ordering::Release);
    }

    /// Supervisor only: records that `task` was lost. Returns how many times
    /// a child has now died running this task id.
    pub(crate) fn record_lost(&self, task: &RunningTask, reason: LostReason, signal: u32) -> u32 {
        let previous = self.find_lost(&task.id).map_or(0, |l| l.deaths);
        if let Some(old) = self.find_lost(&task.id) {
            self.lost[old.index]
                .state
                .store(LOST_DONE, Ordering::Release);
        }
        let index = (self.header.lost_next.fetch_add(1, Ordering::AcqRel) as usize) % LOST_RING;
        let r = &self.lost[index];
        r.state.store(LOST_FREE, Ordering::Release);
        r.task
            .write(&[&task.id, &task.name, &task.reply_to, &task.correlation_id]);
        r.reason.store(reason as u32, Ordering::Relaxed);
        r.deaths.store(previous + 1, Ordering::Relaxed);
        r.signal.store(signal, Ordering::Relaxed);
        r.hard_limit_ms.store(task.hard_limit_ms, Ordering::Relaxed);
        r.flags.store(task.flags, Ordering::Relaxed);
        r.at_ms.store(now_ms(), Ordering::Relaxed);
        // An early-acked task's message is gone: a child must store its
        // failure. An acks-late message comes back from the broker, and the
        // child that receives it decides.
        let state = if task.flags & TaskFlags::ACKS_LATE != 0 {
            LOST_WAIT_REDELIVERY
        } else {
            LOST_REPORT
        };
        r.state.store(state, Ordering::Release);
        previous + 1
    }

    fn read_lost(&self, index: usize) -> Option<Lost> {
        if matches!(
            self.lost[index].state.load(Ordering::Acquire),
            LOST_FREE | LOST_DONE
        ) {
            return None;
        }
        Some(self.read_record(index))
    }

    fn read_record(&self, index: usize) -> Lost {
        let r = &self.lost[index];
        let mut parts = r.task.read().into_iter();
        let mut next = || parts.next().unwrap_or_default();
        let (id, name, reply_to, correlation_id) = (next(), next(), next(), next());
        let reason = if r.reason.load(Ordering::Relaxed) == LostReason::TimeLimit as u32 {
            LostReason::TimeLimit
        } else {
            LostReason::WorkerLost
        };
        Lost {
            index,
            task: RunningTask {
                id,
                name,
                reply_to,
                correlation_id,
                started_ms: 0,
                deadline_ms: 0,
                hard_limit_ms: r.hard_limit_ms.load(Ordering::Relaxed),
                flags: r.flags.load(Ordering::Relaxed),
                ..RunningTask::default()
            },
            reason,
            deaths: r.deaths.load(Ordering::Relaxed),
            signal: r.signal.load(Ordering::Relaxed),
        }
    }

    /// The live record for task `id`, if a child died running it.
    pub fn find_lost(&self, id: &str) -> Option<Lost> {
        (0..LOST_RING)
            .filter_map(|i| self.read_lost(i))
            .find(|l| l.task.id == id)
    }

    /// Claims one lost early-acked task whose failure nobody stored yet.
    pub fn claim_report(&self) -> Option<Lost> {
        (0..LOST_RING).find_map(|i| {
            let r = &self.lost[i];
            r.state
                .compare_exchange(LOST_REPORT, LOST_DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
                .then(|| self.read_record(i))
        })
    }

    /// Marks a record handled.
    pub fn settle_lost(&self, index: usize) {
        self.lost[index].state.store(LOST_DONE, Ordering::Release);
    }

    /// The running task of a task slot other than `own` whose id is `id`.
    pub fn running_elsewhere(&self, id: &str, own: usize) -> Option<RunningTask> {
        self.task_slots()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != own)
            .filter_map(|(_, s)| s.running_task())
            .find(|t| t.id == id)
    }
}
