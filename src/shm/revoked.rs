//! Writer: the control process (`revoke`, `terminate`). Readers: task
//! processes (before running a message, and when reporting a lost task) and
//! the control process (`inspect revoked`, the revoked list in `hello`).
//!
//! An open-addressing hash table on the task id (linear probing). An entry
//! older than [`REVOKE_EXPIRES_MS`] counts as absent and is reused by the
//! next revoke that probes it.
//!
//! Revoked stamps (`revoke_by_stamped_headers`) live in the same table,
//! under a key no task id has: [`STAMP_MARK`], then hashes of the stamp's
//! header and of its value's JSON text.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde_json::Value;

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

/// The first character of a revoked stamp's key (a control character, which
/// Celery's task ids never hold).
const STAMP_MARK: char = '\u{1}';

fn fnv1a(text: &str) -> u64 {
    // FNV-1a: stable across processes (std's hasher is randomly keyed).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn id_hash(id: &str) -> usize {
    fnv1a(id) as usize
}

/// The table key of stamp `header` = `value` (`value` compared as its JSON
/// text: `4242` and `"4242"` are different stamps, as in Python).
fn stamp_key(header: &str, value: &Value) -> String {
    format!(
        "{STAMP_MARK}{:016x}{:016x}",
        fnv1a(header),
        fnv1a(&value.to_string())
    )
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
            .filter(|id| !id.starts_with(STAMP_MARK))
            .collect()
    }

    /// Control process only: remembers that tasks stamped `header` =
    /// `value` are revoked (`revoke_by_stamped_headers`).
    pub fn revoke_stamp(&self, header: &str, value: &Value) {
        self.revoke(&stamp_key(header, value), 0);
    }

    /// Whether a task message stamped with `stamps` (its `stamped_headers`
    /// and `stamps` headers) is revoked by one of them, as Celery's
    /// request decides: a stamp's value, or any of its values when it is a
    /// list, revoked under the same header. The first such stamp.
    pub fn revoked_stamp(
        &self,
        headers: &serde_json::Map<String, Value>,
    ) -> Option<(String, Value)> {
        let stamped = headers.get("stamped_headers")?.as_array()?;
        let stamps = headers.get("stamps").and_then(Value::as_object)?;
        for header in stamped.iter().filter_map(Value::as_str) {
            let values = match stamps.get(header) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(values)) => values.iter().collect::<Vec<_>>(),
                Some(value) => vec![value],
            };
            if let Some(hit) = values
                .into_iter()
                .find(|v| self.revoked(&stamp_key(header, v)).is_some())
            {
                return Some((header.to_owned(), hit.clone()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backdates the entry holding `id` past the expiry.
    fn expire(shm: &SharedState, id: &str) {
        let e = shm.revoked.iter().find(|e| e.holds(id)).expect("stored");
        let long_ago = now_ms() - REVOKE_EXPIRES_MS - 1;
        e.at_ms.store(long_ago, Ordering::Relaxed);
    }

    #[test]
    fn a_revoked_stamp_matches_a_value_or_a_list_holding_it_under_its_header_only() {
        let shm = SharedState::map(1).unwrap();
        let stamped = |header: &str, value: Value| {
            let mut h = serde_json::Map::new();
            h.insert("stamped_headers".into(), serde_json::json!([header]));
            h.insert("stamps".into(), serde_json::json!({ header: value }));
            h
        };
        shm.revoke_stamp("monitoring_id", &serde_json::json!("4242"));
        shm.revoke_stamp("monitoring_id", &serde_json::json!(1234));
        let hit = |h| shm.revoked_stamp(&h).map(|(k, v)| (k, v.to_string()));
        assert_eq!(
            hit(stamped("monitoring_id", serde_json::json!(["4242"]))),
            Some(("monitoring_id".into(), "\"4242\"".into()))
        );
        assert!(hit(stamped("monitoring_id", serde_json::json!(1234))).is_some());
        assert!(hit(stamped("monitoring_id", serde_json::json!(["x", 1234]))).is_some());
        // 4242 is not "4242", another header is another stamp, null is no stamp.
        assert_eq!(hit(stamped("monitoring_id", serde_json::json!(4242))), None);
        assert_eq!(hit(stamped("other", serde_json::json!("4242"))), None);
        assert_eq!(hit(stamped("monitoring_id", Value::Null)), None);
        // A stamp not listed in stamped_headers does not count.
        let mut unlisted = stamped("monitoring_id", serde_json::json!("4242"));
        unlisted.insert("stamped_headers".into(), serde_json::json!([]));
        assert_eq!(hit(unlisted), None);
        // Stamps are not task ids.
        assert!(shm.revoked_ids().is_empty());
    }

    #[test]
    fn a_revoke_is_found_until_it_expires() {
        let shm = SharedState::map(1).unwrap();
        assert_eq!(shm.revoked("t1"), None);
        shm.revoke("t1", 0);
        let r = shm.revoked("t1").expect("revoked");
        assert_eq!(r.signal, 0);
        assert!(now_ms() - r.at_ms < 60_000);
        assert_eq!(shm.revoked_ids(), ["t1"]);
        expire(&shm, "t1");
        assert_eq!(shm.revoked("t1"), None);
        assert!(shm.revoked_ids().is_empty());
    }

    #[test]
    fn revoking_again_overwrites_the_same_entry() {
        let shm = SharedState::map(1).unwrap();
        shm.revoke("t1", 0);
        shm.revoke("t1", 15);
        assert_eq!(shm.revoked("t1").unwrap().signal, 15);
        assert_eq!(shm.revoked_ids(), ["t1"]);
    }

    #[test]
    fn an_expired_entry_is_reused_by_a_colliding_id() {
        let shm = SharedState::map(1).unwrap();
        let home = id_hash("t1") % REVOKED_TABLE;
        let other = (0..)
            .map(|i| format!("other-{i}"))
            .find(|id| id_hash(id) % REVOKED_TABLE == home)
            .unwrap();
        shm.revoke("t1", 0);
        shm.revoke(&other, 9);
        assert_eq!(shm.revoked(&other).unwrap().signal, 9, "probed past t1");
        expire(&shm, "t1");
        shm.revoke(&other, 15);
        assert!(shm.revoked[home].holds(&other), "took the expired entry");
        assert_eq!(shm.revoked(&other).unwrap().signal, 15);
        assert_eq!(shm.revoked("t1"), None);
    }
}
