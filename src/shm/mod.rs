//! Memory shared by the supervisor, its task processes and the control
//! process, without locks.
//!
//! The supervisor maps the region `MAP_SHARED | MAP_ANONYMOUS` once, before
//! the first fork, so every process sees the same physical pages. It holds
//! only atomics, so any bit
//! pattern, the initial zeros included, is a valid value. Text is stored in
//! 8-byte words under a sequence lock (`seqtext.rs`).
//!
//! The region holds a header and six tables, in this order. Each file
//! starts by naming who writes its table and who reads it:
//!
//! | table | file | written by | read by |
//! |---|---|---|---|
//! | header: draining, target, Lamport clock, task-events switch, counters | `header.rs` | supervisor (start, forks, deaths, drain); control (target, events switch); any process sending events (clock, event count) | everyone |
//! | one slot per process: pid, state, heartbeat, running task, queued messages | `slot.rs` | the owning process; the supervisor sets the pid and resets it | supervisor, control process, task processes |
//! | lost tasks: a ring of [`LOST_RING`] records | `lost.rs` | supervisor records; task processes claim and settle | task processes |
//! | per-task-name stats and run-time limits, [`TASK_STATS`] entries | `stats.rs` | task processes count; control sets limits | control (metrics, inspect); task processes (limits) |
//! | revoked ids, [`REVOKED_TABLE`] entries | `revoked.rs` | control process | task processes, control process |
//! | queue changes, [`QUEUE_CHANGES`] entries | `queues.rs` | control process | task processes, supervisor, control process |
//!
//! Where several processes write one value (a stats entry's name, a lost
//! record's claim, the clock), they do it by compare-and-swap. This file
//! holds the module's only `unsafe` code: the mapping.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::num::NonZeroUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

mod header;
mod lost;
mod queues;
mod revoked;
mod seqtext;
mod slot;
mod stats;

pub use header::DeathCause;
use header::Header;
pub use lost::{Lost, LostReason, LostRecord, LOST_RING};
pub use queues::{QueueChange, QUEUE_CHANGES};
pub use revoked::{Revoke, RevokedEntry, REVOKED_TABLE, REVOKE_EXPIRES_MS};
pub use slot::{ChildState, RunningTask, Slot, TaskFlags};
pub use stats::{
    Outcome, RuntimeLimits, TaskStat, TaskStatSnapshot, OVERFLOW_NAME, RUNTIME_BUCKETS, TASK_STATS,
};

/// Words (8 bytes each) of text a slot or lost record carries: task id,
/// name, reply_to and correlation id.
const TEXT_WORDS: usize = 64;
/// Words of the last boot error a slot keeps.
const ERROR_WORDS: usize = 32;
/// Words a slot keeps of the running task's route and arguments (JSON and
/// repr, each up to [`crate::inspect::FIELD_LIMIT`] bytes).
const DETAIL_WORDS: usize = 288;
/// Words a slot has to list the messages it holds (for `inspect reserved/scheduled`).
const QUEUED_WORDS: usize = 1024;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
}
