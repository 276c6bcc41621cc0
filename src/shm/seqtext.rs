//! Writer: the one process that owns the record embedding the text (a slot's
//! process, the supervisor for a lost record, the control process for a
//! revoke or queue change). Readers: any process.
//!
//! A `SeqText<N>` holds up to `N * 8` bytes of NUL-separated strings under a
//! sequence lock: the writer makes the counter odd, stores the words and
//! makes it even again; a reader copies the words and retries until it saw
//! the same even counter before and after. There must be one writer at a
//! time; readers never block it.

use std::sync::atomic::{fence, AtomicU64, Ordering};

shm_record! {
    /// Fixed-size text written under a sequence lock.
    pub(super) struct SeqText<const N: usize> {
        seq: AtomicU64,
        words: [AtomicU64; N],
    }
}

impl<const N: usize> SeqText<N> {
    /// Stores `parts`, each followed by a NUL, cut to `N * 8` bytes.
    pub(super) fn write(&self, parts: &[&str]) {
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

    /// The parts last written, without trailing empty ones (a part cut in
    /// the middle of a character ends in U+FFFD).
    pub(super) fn read(&self) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn text<const N: usize>() -> SeqText<N> {
        SeqText {
            seq: AtomicU64::new(0),
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    #[test]
    fn parts_round_trip_and_are_cut_to_size() {
        let t = text::<2>();
        assert!(t.read().is_empty());
        t.write(&["id", "", "name"]);
        assert_eq!(t.read(), ["id", "", "name"]);
        t.write(&["0123456789abcdefXYZ"]);
        assert_eq!(t.read(), ["0123456789abcdef"]);
        t.write(&[]);
        assert!(t.read().is_empty());
    }

    /// A reader racing a writer sees one whole write or the other, never a
    /// mix of the two.
    #[test]
    fn reads_are_never_torn() {
        const N: usize = 16;
        let t = text::<N>();
        let (a, b) = ("a".repeat(N * 8 - 1), "b".repeat(N * 8 - 1));
        t.write(&[&a]);
        let stop = AtomicBool::new(false);
        let torn = std::thread::scope(|s| {
            s.spawn(|| {
                for flip in [true, false].iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    t.write(&[if *flip { &a } else { &b }]);
                }
            });
            let torn = (0..50_000)
                .map(|_| t.read())
                .find(|parts| parts.len() != 1 || (parts[0] != a && parts[0] != b));
            stop.store(true, Ordering::Relaxed);
            torn
        });
        assert_eq!(torn, None);
    }
}
