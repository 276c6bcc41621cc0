//! Writers: task processes claim an entry per task name and count outcomes
//! and runtimes; the control process claims entries too and sets the run-time
//! limits (`time_limit`, `rate_limit`). Readers: the control process
//! (metrics, `inspect stats`) and task processes (the limits).
//!
//! An entry is claimed once, by compare-and-swap, and keeps its key for the
//! life of the worker. Keys beyond [`TASK_STATS`]` - 1` share the last
//! entry, named [`OVERFLOW_NAME`]. A key is a task name alone (the entry
//! that holds its run-time limits), or a task name with the queue its
//! message came from and, for failures, the exception class (the entries
//! task processes count in, for the `queue_name` and `exception` labels).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::seqtext::SeqText;
use super::SharedState;

/// Upper bounds (seconds) of the task runtime histogram.
pub const RUNTIME_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Task names tracked individually; later names share the last entry.
pub const TASK_STATS: usize = 256;
/// The name shown for tasks beyond [`TASK_STATS`].
pub const OVERFLOW_NAME: &str = "<other>";

/// The last part of a counter entry's key.
const COUNTER_MARK: &str = "#";

/// States of a stats entry.
struct StatState;

impl StatState {
    /// No name yet.
    const FREE: u32 = 0;
    /// A process won the entry and is writing the name.
    const CLAIMED: u32 = 1;
    /// The name is written; counters may be bumped.
    const READY: u32 = 2;
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
    /// Raised `Ignore`.
    Ignored,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 6] = [
        Self::Succeeded,
        Self::Failed,
        Self::Retried,
        Self::Rejected,
        Self::Revoked,
        Self::Ignored,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
            Self::Ignored => "ignored",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).expect("listed")
    }
}

shm_record! {
    /// Counters for one task name, shared by every process.
    pub struct TaskStat {
        state: AtomicU32,
        key: SeqText<24>,
        received: AtomicU64,
        started: AtomicU64,
        outcomes: [AtomicU64; Outcome::ALL.len()],
        buckets: [AtomicU64; RUNTIME_BUCKETS.len()],
        runtime_count: AtomicU64,
        runtime_sum_us: AtomicU64,
        soft_limit_ms: AtomicU64,
        hard_limit_ms: AtomicU64,
        rate_per_hour: AtomicU64,
        rate_next_us: AtomicU64,
    }
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
    /// The queue the counted messages came from (`None` on a task's limits entry).
    pub queue: Option<String>,
    /// The exception class of the counted failures (empty for other outcomes).
    pub exception: Option<String>,
    /// Messages accepted for running.
    pub received: u64,
    /// Runs started.
    pub started: u64,
    /// Count per [`Outcome::ALL`].
    pub outcomes: Vec<u64>,
    /// Non-cumulative count per [`RUNTIME_BUCKETS`] bucket.
    pub buckets: Vec<u64>,
    /// Runs with a runtime.
    pub runtime_count: u64,
    /// Sum of runtimes in seconds.
    pub runtime_sum: f64,
}

impl SharedState {
    /// The entry of task `name` itself (its run-time limits), claiming a
    /// free one the first time. Callers cache the index: this scans the table.
    pub fn task_stat_index(&self, name: &str) -> usize {
        self.stat_index(&[name])
    }

    /// The entry task processes count `name`'s messages from `queue` in;
    /// `exception` is the class of a failure, empty otherwise.
    pub fn task_counter_index(&self, name: &str, queue: &str, exception: &str) -> usize {
        // The mark keeps empty parts from being dropped at the end of the key.
        self.stat_index(&[name, queue, exception, COUNTER_MARK])
    }

    fn stat_index(&self, key: &[&str]) -> usize {
        let last = TASK_STATS - 1;
        let named = |stat: &TaskStat| {
            let stored = stat.key.read();
            stored.len() == key.len() && stored.iter().zip(key).all(|(a, b)| a == b)
        };
        for (i, stat) in self.stats.iter().enumerate().take(last) {
            match stat.state.load(Ordering::Acquire) {
                StatState::READY if named(stat) => return i,
                StatState::READY => continue,
                StatState::CLAIMED => {
                    // Another process is writing a name here; wait for it.
                    while stat.state.load(Ordering::Acquire) == StatState::CLAIMED {
                        std::hint::spin_loop();
                    }
                    if named(stat) {
                        return i;
                    }
                }
                _ => {
                    if stat.claim() {
                        stat.key.write(key);
                        stat.state.store(StatState::READY, Ordering::Release);
                        return i;
                    }
                    if named(stat) {
                        return i;
                    }
                }
            }
        }
        let overflow = &self.stats[last];
        if overflow.claim() {
            overflow.key.write(&[OVERFLOW_NAME]);
            overflow.state.store(StatState::READY, Ordering::Release);
        }
        last
    }

    /// Task processes: counts one task outcome, with its runtime when it ran.
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

    /// Task processes: counts a message accepted for running.
    pub fn count_received(&self, index: usize) {
        self.stats[index.min(TASK_STATS - 1)]
            .received
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Task processes: counts a run that starts.
    pub fn count_started(&self, index: usize) {
        self.stats[index.min(TASK_STATS - 1)]
            .started
            .fetch_add(1, Ordering::Relaxed);
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

    /// The worker-wide turn of the task at `index` under its rate limit of
    /// `per_second` (one token bucket of capacity 1, as Celery's): `None`
    /// (and the turn is taken) when a run may start at `now_us` on the
    /// system's monotonic clock, else how many microseconds to wait.
    /// Task processes share the bucket, so the spacing holds for the whole
    /// worker, as in Celery where one process hands tasks to the pool.
    pub fn take_rate_turn(&self, index: usize, per_second: f64, now_us: u64) -> Option<u64> {
        let stat = &self.stats[index.min(TASK_STATS - 1)];
        let interval = (1e6 / per_second.max(1e-6)).min(86_400e6) as u64;
        let mut next = stat.rate_next_us.load(Ordering::Acquire);
        loop {
            if next > now_us {
                return Some(next - now_us);
            }
            match stat.rate_next_us.compare_exchange_weak(
                next,
                now_us + interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return None,
                Err(seen) => next = seen,
            }
        }
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
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.stats
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) == StatState::READY)
            .map(|s| {
                let key = s.key.read();
                let counters = key.len() == 4 && key[3] == COUNTER_MARK;
                let mut key = key.into_iter();
                let name = key.next().unwrap_or_default();
                match counters {
                    true => (s, name, key.next(), key.next()),
                    false => (s, name, None, None),
                }
            })
            .map(|(s, name, queue, exception)| TaskStatSnapshot {
                name,
                queue,
                exception,
                received: load(&s.received),
                started: load(&s.started),
                outcomes: s.outcomes.iter().map(load).collect(),
                buckets: s.buckets.iter().map(load).collect(),
                runtime_count: load(&s.runtime_count),
                runtime_sum: load(&s.runtime_sum_us) as f64 / 1e6,
            })
            .collect()
    }
}

impl TaskStat {
    /// Moves a free entry to claimed; false if another process got it first.
    fn claim(&self) -> bool {
        self.state
            .compare_exchange(
                StatState::FREE,
                StatState::CLAIMED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beyond_the_table_share_the_other_entry() {
        let shm = SharedState::map(1).unwrap();
        for i in 0..TASK_STATS - 1 {
            assert_eq!(shm.task_stat_index(&format!("task{i}")), i);
        }
        assert_eq!(
            shm.task_stat_index("task7"),
            7,
            "a known name keeps its entry"
        );
        let other = shm.task_stat_index("one.more");
        assert_eq!(other, TASK_STATS - 1);
        assert_eq!(shm.task_stat_index("and.another"), other);
        shm.record_task(other, Outcome::Failed, Some(0.2));
        shm.record_task(other + 5, Outcome::Failed, Some(1000.0));
        let stats = shm.task_stats();
        let last = stats.last().unwrap();
        assert_eq!(
            (stats.len(), last.name.as_str()),
            (TASK_STATS, OVERFLOW_NAME)
        );
        assert_eq!(last.outcomes, [0, 2, 0, 0, 0, 0]);
        assert_eq!((last.buckets[6], last.buckets.iter().sum::<u64>()), (1, 1));
        assert_eq!(last.runtime_count, 2);
        assert!((last.runtime_sum - 1000.2).abs() < 1e-6);
    }

    #[test]
    fn counters_are_kept_per_task_queue_and_exception() {
        let shm = SharedState::map(1).unwrap();
        let limits = shm.task_stat_index("t.add");
        let ok = shm.task_counter_index("t.add", "q1", "");
        let other_queue = shm.task_counter_index("t.add", "q2", "");
        let failed = shm.task_counter_index("t.add", "q1", "ValueError");
        assert_eq!(
            [limits, ok, other_queue, failed].len(),
            [limits, ok, other_queue, failed]
                .into_iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            "four keys, four entries"
        );
        assert_eq!(shm.task_counter_index("t.add", "q1", ""), ok, "stable");
        shm.count_received(ok);
        shm.count_received(ok);
        shm.count_started(ok);
        shm.record_task(ok, Outcome::Succeeded, Some(0.002));
        shm.record_task(failed, Outcome::Failed, Some(0.1));
        let stats = shm.task_stats();
        let find = |q: Option<&str>, e: Option<&str>| {
            stats
                .iter()
                .find(|s| s.queue.as_deref() == q && s.exception.as_deref() == e)
                .unwrap()
                .clone()
        };
        let s = find(Some("q1"), Some(""));
        assert_eq!((s.name.as_str(), s.received, s.started), ("t.add", 2, 1));
        assert_eq!(s.outcomes[0], 1);
        assert_eq!(find(Some("q1"), Some("ValueError")).outcomes[1], 1);
        let l = find(None, None);
        assert_eq!((l.received, l.outcomes.iter().sum::<u64>()), (0, 0));
    }

    #[test]
    fn limits_are_set_removed_or_left_alone() {
        let shm = SharedState::map(1).unwrap();
        let i = shm.task_stat_index("tasks.add");
        assert_eq!(shm.runtime_limits(i), RuntimeLimits::default());
        shm.set_time_limits(i, Some(1.5), Some(0.0));
        shm.set_rate_limit(i, Some(10.0));
        let limits = shm.runtime_limits(i);
        assert_eq!((limits.soft, limits.hard), (Some(1.5), Some(0.0)));
        assert_eq!(limits.rate, Some(10.0));
        shm.set_time_limits(i, None, None);
        shm.set_rate_limit(i, None);
        assert_eq!(shm.runtime_limits(i), RuntimeLimits::default());
    }

    #[test]
    fn a_rate_limit_spaces_runs_across_the_whole_worker() {
        let shm = SharedState::map(2).unwrap();
        let i = shm.task_stat_index("t");
        // 2/s: a run every 500 ms, whichever process asks.
        assert_eq!(shm.take_rate_turn(i, 2.0, 1_000_000), None);
        assert_eq!(shm.take_rate_turn(i, 2.0, 1_000_000), Some(500_000));
        assert_eq!(shm.take_rate_turn(i, 2.0, 1_300_000), Some(200_000));
        assert_eq!(shm.take_rate_turn(i, 2.0, 1_500_000), None);
        assert_eq!(shm.take_rate_turn(i, 2.0, 1_600_000), Some(400_000));
        // Another task has its own bucket.
        let j = shm.task_stat_index("u");
        assert_eq!(shm.take_rate_turn(j, 2.0, 1_600_000), None);
    }
}
