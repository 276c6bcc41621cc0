//! Writer: the control process (`revoke`, `terminate`). Readers: task
//! processes (before running a message, and when reporting a lost task) and
//! the control process (`inspect revoked`, the revoked list in `hello`).
//!
//! An open-addressing hash table on the task id (linear probing). An entry
//! older than [`REVOKE_EXPIRES_MS`] counts as absent and is reused by the
//! next revoke that probes it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::seqtext::SeqText;
use super::{now_ms, SharedState};

/// Revoked task ids remembered (Celery keeps 50,000 for 3 hours).
pub const REVOKED_TABLE: usize = 8192;
/// How long a revoke is remembered.
pub const REVOKE_EXPIRES_MS: u64 = 3 * 3600 * 1000;

/// States of a revoked entry.
struct RevokeState;

impl RevokeState {
    /// Never used: a lookup stops probing here.
    const EMPTY: u32 = 0;
    /// The control process is (re)writing it: skipped by lookups.
    const WRITING: u32 = 1;
    /// Holds a revoke (possibly expired).
    const SET: u32 = 2;
}

shm_record! {
    /// One remembered revoke.
    pub struct RevokedEntry {
        state: AtomicU32,
        signal: AtomicU32,
        at_ms: AtomicU64,
        id: SeqText<8>,
    }
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

impl RevokedEntry {
    fn holds(&self, id: &str) -> bool {
        self.id.read().first().map(String::as_str) == Some(id)
    }
}

impl SharedState {
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
            if state == RevokeState::EMPTY || expired || e.holds(id) {
                target = i;
                break;
            }
        }
        let e = &self.revoked[target];
        e.state.store(RevokeState::WRITING, Ordering::Release);
        e.id.write(&[id]);
        e.at_ms.store(now, Ordering::Relaxed);
        e.signal.store(signal, Ordering::Relaxed);
        e.state.store(RevokeState::SET, Ordering::Release);
    }

    /// Whether task `id` was revoked in the last three hours.
    pub fn revoked(&self, id: &str) -> Option<Revoke> {
        let start = id_hash(id) % REVOKED_TABLE;
        let now = now_ms();
        for probe in 0..REVOKED_TABLE {
            let e = &self.revoked[(start + probe) % REVOKED_TABLE];
            match e.state.load(Ordering::Acquire) {
                RevokeState::EMPTY => return None,
                RevokeState::SET if e.holds(id) => {
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
            .filter(|e| e.state.load(Ordering::Acquire) == RevokeState::SET)
            .filter(|e| now.saturating_sub(e.at_ms.load(Ordering::Relaxed)) <= REVOKE_EXPIRES_MS)
            .filter_map(|e| e.id.read().into_iter().next())
            .collect()
    }
}
