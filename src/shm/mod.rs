//! Memory shared by the supervisor, its task processes and the control
//! process, without locks.
//!
//! The supervisor maps the region `MAP_SHARED | MAP_ANONYMOUS` once, before
//! the first fork, so every process sees the same physical pages. It holds
//! only atomics (checked by the compiler through `ShmSafe`), so any bit
//! pattern, the initial zeros included, is a valid value. Text is stored in
//! 8-byte words under a sequence lock (`seqtext.rs`).
//!
//! The region holds a header and seven tables, in this order. Each file
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
//! | deliveries the broker timed out, a ring of [`OVERDUE_RING`] records | `overdue.rs` | task processes | task processes, supervisor, control process |
//!
//! Where several processes write one value (a stats entry's name, a lost
//! record's claim, the clock), they do it by compare-and-swap. This file
//! holds the module's only `unsafe` code: the mapping and the `ShmSafe`
//! impls.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

/// Types that may be placed in the shared region: laid out `#[repr(C)]` and
/// made only of atomics, so that every bit pattern is a valid value and
/// access from several processes at once is sound.
///
/// # Safety
///
/// Implement it only for such types. Tables do it through `shm_record!`,
/// which makes the compiler check every field.
#[allow(unsafe_code)]
unsafe trait ShmSafe {}

// SAFETY: an atomic integer is valid for any bits and is only accessed by
// atomic instructions, which stay atomic between processes sharing a page.
#[allow(unsafe_code)]
unsafe impl ShmSafe for AtomicU32 {}
// SAFETY: as for AtomicU32.
#[allow(unsafe_code)]
unsafe impl ShmSafe for AtomicU64 {}
// SAFETY: an array adds no bytes of its own to its ShmSafe elements.
#[allow(unsafe_code)]
unsafe impl<T: ShmSafe, const N: usize> ShmSafe for [T; N] {}

/// Declares a struct that lives in the shared region: `#[repr(C)]`, and
/// [`ShmSafe`] only if every field type is (else the crate does not build).
macro_rules! shm_record {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident $(<const $n:ident: usize>)? {
            $($(#[$fattr:meta])* $fvis:vis $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$attr])*
        #[repr(C)]
        $vis struct $name $(<const $n: usize>)? {
            $($(#[$fattr])* $fvis $field: $ty,)*
        }

        // SAFETY: the struct is #[repr(C)] and the where-clause has the
        // compiler check that each field's type is ShmSafe.
        #[allow(unsafe_code)]
        unsafe impl $(<const $n: usize>)? $crate::shm::ShmSafe for $name $(<$n>)?
        where
            $($ty: $crate::shm::ShmSafe,)*
        {
        }
    };
}

mod header;
mod lost;
mod overdue;
mod queues;
mod revoked;
mod seqtext;
mod slot;
mod stats;

pub use header::DeathCause;
use header::Header;
pub use lost::{Lost, LostReason, LostRecord, LOST_RING};
pub use overdue::{FirstRun, Overdue, OverdueRecord, OverdueTable, OVERDUE_RING};
pub use queues::{QueueChange, QUEUE_CHANGES};
pub use revoked::{Revoke, RevokedEntry, REVOKED_TABLE, REVOKE_EXPIRES_MS};
pub use slot::{beat_period, ChildState, RunningTask, Slot, TaskFlags, Unpublished};
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
    overdue: &'static OverdueTable,
    tasks: usize,
}

impl SharedState {
    /// Maps a region for `tasks` task processes plus the control process.
    /// Call once, before forking.
    pub fn map(tasks: usize) -> std::io::Result<Self> {
        let slots = tasks + 1;
        // Every table starts at a multiple of 64 bytes, after the one before.
        let mut end = 0usize;
        let mut place = |size: usize, count: usize| {
            let at = end.next_multiple_of(64);
            end = at + size * count;
            at
        };
        let header = place(size_of::<Header>(), 1);
        let slots_at = place(size_of::<Slot>(), slots);
        let lost = place(size_of::<LostRecord>(), LOST_RING);
        let stats = place(size_of::<TaskStat>(), TASK_STATS);
        let revoked = place(size_of::<RevokedEntry>(), REVOKED_TABLE);
        let queues = place(size_of::<QueueChange>(), QUEUE_CHANGES);
        let overdue = place(size_of::<OverdueTable>(), 1);
        let region = Region::map(end)?;
        Ok(Self {
            header: &region.table::<Header>(header, 1)[0],
            slots: region.table(slots_at, slots),
            lost: region.table(lost, LOST_RING),
            stats: region.table(stats, TASK_STATS),
            revoked: region.table(revoked, REVOKED_TABLE),
            queue_changes: region.table(queues, QUEUE_CHANGES),
            overdue: &region.table::<OverdueTable>(overdue, 1)[0],
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

/// A shared anonymous mapping of `len` zeroed bytes at `base`, never
/// unmapped.
struct Region {
    base: NonNull<u8>,
    len: usize,
}

impl Region {
    fn map(len: usize) -> std::io::Result<Self> {
        let length = NonZeroUsize::new(len).expect("non-empty region");
        // SAFETY: an anonymous shared mapping with no address hint cannot
        // alias any existing Rust object; on success it returns `len` bytes
        // of zeroed, page-aligned, readable and writable memory.
        #[allow(unsafe_code)]
        let base = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(Self {
            base: base.cast(),
            len,
        })
    }

    /// The `count` values of `T` starting `offset` bytes into the region.
    fn table<T: ShmSafe>(&self, offset: usize, count: usize) -> &'static [T] {
        const { assert!(align_of::<T>() <= 64) };
        assert!(offset.is_multiple_of(64) && offset + size_of::<T>() * count <= self.len);
        // SAFETY: the range checked above lies inside the mapping, which is
        // never unmapped, so the reference is valid for 'static. It is
        // aligned (the page-aligned base plus a multiple of 64, at least
        // T's alignment), and T is ShmSafe: any bytes, zeros included, are a
        // valid T, and sharing it between processes is sound.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(offset).cast::<T>(), count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_do_not_overlap() {
        let shm = SharedState::map(3).unwrap();
        let bytes = |p: *const u8, len: usize| (p as usize, p as usize + len);
        let mut spans = vec![
            bytes((shm.header as *const Header).cast(), size_of::<Header>()),
            bytes(shm.slots.as_ptr().cast(), size_of_val(shm.slots)),
            bytes(shm.lost.as_ptr().cast(), size_of_val(shm.lost)),
            bytes(shm.stats.as_ptr().cast(), size_of_val(shm.stats)),
            bytes(shm.revoked.as_ptr().cast(), size_of_val(shm.revoked)),
            bytes(
                shm.queue_changes.as_ptr().cast(),
                size_of_val(shm.queue_changes),
            ),
            bytes(
                (shm.overdue as *const OverdueTable).cast(),
                size_of::<OverdueTable>(),
            ),
        ];
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
        assert_eq!((shm.task_slots().len(), shm.slots().len()), (3, 4));
        assert!(std::ptr::eq(shm.control_slot(), &shm.slots()[3]));
    }
}
