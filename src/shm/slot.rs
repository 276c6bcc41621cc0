//! Writer: the process owning the slot (one per task process, plus one for
//! the control process); the supervisor sets the pid at fork and resets the
//! slot when the process ends. Readers: the supervisor (probe state file,
//! wedge check, lost tasks), the control process (inspect, metrics, worker
//! events) and task processes (`running_elsewhere`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::seqtext::SeqText;
use super::{now_ms, DETAIL_WORDS, ERROR_WORDS, QUEUED_WORDS, TEXT_WORDS};
use crate::inspect::ArgsText;

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

/// A task message a task process sends, by why it sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    /// A task's retry.
    Retry = 0,
    /// A callback, errback or chain step.
    FollowUp = 1,
    /// A task handed back to the broker at the drain deadline.
    HandBack = 2,
}

impl Unpublished {
    /// Every kind, in index order.
    pub const ALL: [Unpublished; 3] = [Self::Retry, Self::FollowUp, Self::HandBack];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::FollowUp => "follow_up",
            Self::HandBack => "hand_back",
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
    /// Its stamps as JSON, `{"header": value}` for each of its
    /// `stamped_headers` ("" when it has none; slots only), for
    /// `revoke_by_stamped_headers(terminate=True)`.
    pub stamps: String,
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

/// How often an idle process beats ([`Slot::beat`]), given how long the
/// supervisor lets an idle process stay silent (`--child-heartbeat-timeout`):
/// a twelfth of it, between 1 s and 5 s (5 s for the default 60 s, six
/// beats within the liveness probe's default `--child-stale` of 30 s).
/// Starting and finishing a task beat too.
pub fn beat_period(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 12).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

shm_record! {
    /// One child's slot.
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
        token_expires_ms: AtomicU64,
        token_failures: AtomicU64,
        secret_updates: AtomicU64,
        unpublished: [AtomicU64; Unpublished::ALL.len()],
        copies_settled: AtomicU64,
        republished_at_limit: AtomicU64,
        task: SeqText<TEXT_WORDS>,
        error: SeqText<ERROR_WORDS>,
        queued: SeqText<QUEUED_WORDS>,
        detail: SeqText<DETAIL_WORDS>,
    }
}

impl Slot {
    /// The pid of the child owning the slot (0 = none).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Acquire)
    }
    /// Supervisor only: records the pid forked for this slot (0 when it ended).
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
    /// Counts a lost broker connection that this slot's process got back.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    /// Task messages of `kind` this slot's processes could not publish.
    pub fn unpublished(&self, kind: Unpublished) -> u64 {
        self.unpublished[kind as usize].load(Ordering::Relaxed)
    }
    /// Counts a task message of `kind` the broker refused, returned or did
    /// not confirm (logged with its task id by the caller).
    pub fn count_unpublished(&self, kind: Unpublished) {
        self.unpublished[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Redelivered copies of tasks already handled that this slot's
    /// processes acknowledged without running.
    pub fn copies_settled(&self) -> u64 {
        self.copies_settled.load(Ordering::Relaxed)
    }
    /// Counts a redelivered copy acknowledged without running (logged with
    /// its task id by the caller).
    pub fn count_copy_settled(&self) {
        self.copies_settled.fetch_add(1, Ordering::Relaxed);
    }
    /// Messages this slot's processes handed back as a re-published copy
    /// because a requeue would have taken them past their queue's delivery
    /// limit.
    pub fn republished_at_limit(&self) -> u64 {
        self.republished_at_limit.load(Ordering::Relaxed)
    }
    /// Counts a hand-back re-published at the delivery limit (logged with
    /// its task id by the caller).
    pub fn count_republished_at_limit(&self) {
        self.republished_at_limit.fetch_add(1, Ordering::Relaxed);
    }
    /// When the process's broker token expires (ms since epoch; 0: no token).
    pub fn token_expiry_ms(&self) -> u64 {
        self.token_expires_ms.load(Ordering::Relaxed)
    }
    /// Publishes [`Slot::token_expiry_ms`] for a new token.
    pub fn set_token_expiry_ms(&self, ms: u64) {
        self.token_expires_ms.store(ms, Ordering::Relaxed);
    }
    /// Failed broker-token refreshes of this slot's processes.
    pub fn token_failures(&self) -> u64 {
        self.token_failures.load(Ordering::Relaxed)
    }
    /// Counts a failed broker-token refresh.
    pub fn count_token_failure(&self) {
        self.token_failures.fetch_add(1, Ordering::Relaxed);
    }
    /// Fresh tokens pushed to open connections (AMQP `update-secret`).
    pub fn secret_updates(&self) -> u64 {
        self.secret_updates.load(Ordering::Relaxed)
    }
    /// Counts a token pushed to an open connection.
    pub fn count_secret_update(&self) {
        self.secret_updates.fetch_add(1, Ordering::Relaxed);
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
            .write(&[&t.id, &t.name, &t.reply_to, &t.correlation_id, &t.stamps]);
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
        let (id, name, reply_to, correlation_id, stamps) = (next(), next(), next(), next(), next());
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
            stamps,
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
    /// Supervisor only: clears the task, error, queued lines, reserved
    /// count and token expiry and marks the slot empty, before a fork and after a death. The
    /// pid is left to [`Slot::set_pid`]; the totals are kept.
    pub(crate) fn reset(&self) {
        self.finish_task();
        self.error.write(&[]);
        self.queued.write(&[]);
        self.reserved.store(0, Ordering::Relaxed);
        self.token_expires_ms.store(0, Ordering::Relaxed);
        self.state
            .store(ChildState::Empty as u32, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::super::SharedState;
    use super::*;

    #[test]
    fn idle_processes_beat_every_5_s_or_faster_for_a_short_timeout() {
        let s = Duration::from_secs;
        assert_eq!(beat_period(s(60)), s(5));
        assert_eq!(beat_period(s(600)), s(5));
        assert_eq!(beat_period(s(24)), s(2));
        // --child-heartbeat-timeout is at least 2 s: still a beat a second.
        assert_eq!(beat_period(s(2)), s(1));
    }

    #[test]
    fn a_task_is_published_then_the_slot_is_reset() {
        let shm = SharedState::map(1).unwrap();
        let slot = &shm.task_slots()[0];
        let task = RunningTask {
            id: "t1".into(),
            started_ms: 5,
            flags: TaskFlags::ACKS_LATE,
            routing_key: "rk".into(),
            ..RunningTask::default()
        };
        slot.set_pid(42);
        slot.set_state(ChildState::Consuming);
        slot.start_task(&task);
        slot.set_reserved(3);
        slot.set_queued("a\nb\n");
        slot.set_error("boom");
        assert_eq!(slot.running_task(), Some(task));
        slot.reset();
        assert_eq!(
            (slot.state(), slot.running_task()),
            (ChildState::Empty, None)
        );
        assert_eq!(slot.queued() + &slot.error(), "");
        assert_eq!((slot.pid(), slot.processed(), slot.reserved()), (42, 1, 0));
    }

    #[test]
    fn reconnects_add_up_across_generations() {
        let shm = SharedState::map(1).unwrap();
        let slot = shm.control_slot();
        slot.count_reconnect();
        slot.reset();
        slot.count_reconnect();
        assert_eq!(slot.reconnects(), 2);
    }

    #[test]
    fn token_counts_add_up_and_the_expiry_goes_with_the_process() {
        let shm = SharedState::map(1).unwrap();
        let slot = &shm.task_slots()[0];
        slot.set_token_expiry_ms(1_000);
        slot.count_token_failure();
        slot.count_secret_update();
        slot.reset();
        slot.count_secret_update();
        assert_eq!(
            (
                slot.token_expiry_ms(),
                slot.token_failures(),
                slot.secret_updates()
            ),
            (0, 1, 2)
        );
    }
}
