//! What a task process holds but has not started: tasks ready to run, ETA
//! and countdown tasks waiting for their time, and tasks over their rate
//! limit waiting for their turn. Pure bookkeeping with no I/O: the clock is
//! passed in, so every rule is tested without a broker.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};

/// Held items of type `J` (a received task in the process; anything in tests).
pub(crate) struct Held<J> {
    ready: VecDeque<J>,
    /// Keyed by (due time, arrival order): equal times keep their order.
    scheduled: BTreeMap<(DateTime<Utc>, u64), J>,
    seq: u64,
}

impl<J> Default for Held<J> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            scheduled: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<J> Held<J> {
    /// Takes `job`: ready now, or scheduled when `eta` is later than `now`.
    /// Returns true when it was scheduled.
    pub(crate) fn hold(&mut self, job: J, eta: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        match eta {
            Some(eta) if eta > now => {
                self.schedule(job, eta);
                true
            }
            _ => {
                self.ready.push_back(job);
                false
            }
        }
    }

    /// Holds `job` until `at`.
    pub(crate) fn schedule(&mut self, job: J, at: DateTime<Utc>) {
        self.seq += 1;
        self.scheduled.insert((at, self.seq), job);
    }

    /// When the earliest scheduled job is due.
    pub(crate) fn next_due(&self) -> Option<DateTime<Utc>> {
        self.scheduled.keys().next().map(|(at, _)| *at)
    }

    /// Moves every scheduled job due at `now` to the ready queue, in due order.
    pub(crate) fn release_due(&mut self, now: DateTime<Utc>) {
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    /// The next ready job, oldest first.
    pub(crate) fn pop_ready(&mut self) -> Option<J> {
        self.ready.pop_front()
    }

    /// Everything held, ready jobs first, then scheduled ones in due order;
    /// nothing is held afterwards.
    pub(crate) fn take_all(&mut self) -> Vec<J> {
        let mut all: Vec<J> = self.ready.drain(..).collect();
        all.extend(std::mem::take(&mut self.scheduled).into_values());
        all
    }

    /// Forgets everything held (the broker redelivers it); returns how many.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.len();
        self.ready.clear();
        self.scheduled.clear();
        n
    }

    /// Jobs held in all.
    pub(crate) fn len(&self) -> usize {
        self.ready.len() + self.scheduled.len()
    }

    /// Ready jobs.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Scheduled jobs.
    pub(crate) fn scheduled_len(&self) -> usize {
        self.scheduled.len()
    }

    /// Ready jobs, oldest first.
    pub(crate) fn ready(&self) -> impl Iterator<Item = &J> {
        self.ready.iter()
    }

    /// Scheduled jobs with their due times, earliest first.
    pub(crate) fn scheduled(&self) -> impl Iterator<Item = (DateTime<Utc>, &J)> {
        self.scheduled.iter().map(|((at, _), job)| (*at, job))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn past_or_missing_etas_are_ready_in_arrival_order() {
        let mut h = Held::default();
        assert!(!h.hold("a", None, t(10)));
        assert!(!h.hold("b", Some(t(5)), t(10)));
        assert!(!h.hold("c", Some(t(10)), t(10)), "due exactly now runs now");
        assert_eq!(h.ready_len(), 3);
        assert_eq!(h.scheduled_len(), 0);
        assert_eq!(
            [h.pop_ready(), h.pop_ready(), h.pop_ready(), h.pop_ready()],
            [Some("a"), Some("b"), Some("c"), None]
        );
    }

    #[test]
    fn etas_are_released_in_due_order_with_ties_in_arrival_order() {
        let mut h = Held::default();
        assert!(h.hold("late", Some(t(30)), t(0)));
        assert!(h.hold("tie-1", Some(t(20)), t(0)));
        assert!(h.hold("early", Some(t(10)), t(0)));
        assert!(h.hold("tie-2", Some(t(20)), t(0)));
        assert_eq!(h.next_due(), Some(t(10)));
        h.release_due(t(9));
        assert_eq!(h.ready_len(), 0, "nothing is due before its time");
        h.release_due(t(20));
        let released: Vec<_> = std::iter::from_fn(|| h.pop_ready()).collect();
        assert_eq!(released, ["early", "tie-1", "tie-2"]);
        assert_eq!(h.next_due(), Some(t(30)));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn take_all_returns_ready_then_scheduled_and_empties() {
        let mut h = Held::default();
        h.hold("s2", Some(t(20)), t(0));
        h.hold("r1", None, t(0));
        h.hold("s1", Some(t(10)), t(0));
        h.hold("r2", None, t(0));
        assert_eq!(h.take_all(), ["r1", "r2", "s1", "s2"]);
        assert_eq!(h.len(), 0);
        assert_eq!(h.next_due(), None);
    }

    #[test]
    fn clear_counts_what_it_forgets() {
        let mut h = Held::default();
        h.hold(1, None, t(0));
        h.hold(2, Some(t(5)), t(0));
        assert_eq!(h.clear(), 2);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn listing_shows_ready_and_scheduled_with_due_times() {
        let mut h = Held::default();
        h.hold("r", None, t(0));
        h.hold("s", Some(t(7)), t(0));
        assert_eq!(h.ready().copied().collect::<Vec<_>>(), ["r"]);
        assert_eq!(
            h.scheduled().map(|(at, j)| (at, *j)).collect::<Vec<_>>(),
            [(t(7), "s")]
        );
    }
}
