//! Publishing Celery events. Task events are buffered and sent as JSON
//! arrays on `task.multi` (as Celery's prefork pool does) by a flusher task
//! of their own ([`Events::run_flusher`]), so the loop that consumes tasks
//! never waits for an event to be written. The flusher sends when the
//! consuming loop goes idle (a quick task's received/started/succeeded
//! share one message, and a lone task's events go out at once), when a
//! batch is full, or at most [`LINGER`] after the oldest buffered event.
//! Under load (more than [`BUSY_EVENTS_PER_MS`]) it sends at most one
//! message per [`LINGER`], and a message the connection has not written yet
//! holds back the next one, so events gather into larger messages: about
//! one message per six tasks in a drain, against one per task when idle.
//! Worker events go out one by one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::broker::{json_properties, publish, BrokerError, Outgoing, PUBLISH_TIMEOUT};
use crate::protocol::events::{
    routing_key, write_event, EventSource, BATCH_LIMIT, EVENT_EXCHANGE, TASK_BATCH_KEY,
};
use crate::protocol::unix_seconds;
use crate::shm::SharedState;

/// The longest a task event waits for company before it is sent.
pub const LINGER: Duration = Duration::from_millis(1);

/// Full batches kept while the broker does not take them (24 events each);
/// beyond it the oldest are dropped.
pub const MAX_BATCHES: usize = 512;

/// Above this many task events per millisecond (about 1,300 tasks/s in one
/// process) the process is busy: its event messages are then spaced by
/// [`LINGER`] instead of going out whenever its loop is idle, so that under
/// load one message carries several tasks' events.
pub const BUSY_EVENTS_PER_MS: f64 = 4.0;

/// Declares the `celeryev` topic exchange exactly as Celery does.
pub async fn declare_exchange(channel: &Channel) -> Result<(), BrokerError> {
    crate::broker::declare_exchange(channel, EVENT_EXCHANGE, ExchangeKind::Topic, true).await
}

/// Task events waiting to be sent: full batches, and the one being filled.
#[derive(Default)]
struct Buffer {
    full: Vec<Vec<u8>>,
    /// A JSON array without its closing bracket.
    open: Vec<u8>,
    in_open: usize,
    /// When the oldest buffered event was queued.
    since: Option<Instant>,
}

impl Buffer {
    fn take(&mut self) -> Vec<Vec<u8>> {
        let mut batches = std::mem::take(&mut self.full);
        if self.in_open > 0 {
            let mut open = std::mem::take(&mut self.open);
            open.push(b']');
            batches.push(open);
        }
        self.in_open = 0;
        self.since = None;
        batches
    }
}

/// A publish handed to the connection and not yet known to be written.
pub type Sending<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// An event publisher for one process.
pub struct Events {
    source: EventSource,
    /// The start of every event of this process (see [`EventSource::prefix`]).
    prefix: Vec<u8>,
    shm: Option<SharedState>,
    local_clock: AtomicU64,
    local_enabled: bool,
    channel: RwLock<Option<Channel>>,
    buffer: Mutex<Buffer>,
    /// Whether the owner's loop has nothing in flight (see [`Events::set_idle`]).
    idle: AtomicBool,
    /// Wakes the flusher when its deadline or the batch count changes, or
    /// the owner goes idle.
    wake: Notify,
    /// Whether a flusher task is running (see [`Events::run_flusher`]).
    flusher: AtomicBool,
    /// Asks the flusher to send everything, wait for it, and stop.
    stop: AtomicBool,
    /// The flusher has stopped.
    stopped: Notify,
    /// Whether dropping events has been reported.
    drop_reported: AtomicBool,
}

impl Events {
    /// A publisher for node `source`. Clock and the on/off switch live in
    /// `shm` when the process is part of a worker.
    pub fn new(source: EventSource, shm: Option<SharedState>, enabled: bool) -> Self {
        Self {
            prefix: source.prefix(),
            source,
            shm,
            local_clock: AtomicU64::new(0),
            local_enabled: enabled,
            channel: RwLock::new(None),
            buffer: Mutex::new(Buffer::default()),
            idle: AtomicBool::new(false),
            wake: Notify::new(),
            flusher: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            drop_reported: AtomicBool::new(false),
        }
    }

    /// Publishes on `channel` from now on.
    pub fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = Some(channel);
    }

    /// Whether task events are on.
    pub fn enabled(&self) -> bool {
        self.shm.map_or(self.local_enabled, |s| s.task_events())
    }

    fn clock(&self) -> u64 {
        match self.shm {
            Some(s) => s.tick_clock(),
            None => self.local_clock.fetch_add(1, Ordering::AcqRel) + 1,
        }
    }

    fn now() -> f64 {
        unix_seconds(chrono::Utc::now())
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a task event whose fields `fields` builds (not called when
    /// task events are off).
    pub fn task<'a>(&self, kind: &str, fields: impl FnOnce() -> Vec<(&'a str, Value)>) {
        if !self.enabled() {
            return;
        }
        // Built only now: with events off (the default) a task pays nothing.
        let fields = fields();
        let (clock, timestamp) = (self.clock(), Self::now());
        let mut buffer = self.lock();
        let first = buffer.since.is_none();
        buffer.since.get_or_insert_with(Instant::now);
        let b = &mut *buffer;
        b.open.push(if b.in_open == 0 { b'[' } else { b',' });
        write_event(&self.prefix, &mut b.open, kind, clock, timestamp, &fields);
        b.in_open += 1;
        let full = b.in_open == BATCH_LIMIT;
        if full {
            let mut batch = std::mem::take(&mut b.open);
            batch.push(b']');
            b.full.push(batch);
            b.in_open = 0;
        }
        // The broker is not taking events (a blocked connection, a stalled
        // publish): keep the newest, as events are best effort.
        let dropped = b.full.len() > MAX_BATCHES;
        if dropped {
            b.full.remove(0);
        }
        drop(buffer);
        if dropped && !self.drop_reported.swap(true, Ordering::Relaxed) {
            warn!(
                "task events are being dropped: the broker is not taking them as fast as tasks run"
            );
        }
        // The flusher only needs to hear of a new deadline or a full batch.
        if first || full {
            self.wake.notify_one();
        }
    }

    /// Task events waiting to be sent.
    pub fn buffered(&self) -> usize {
        let buffer = self.lock();
        buffer.full.len() * BATCH_LIMIT + buffer.in_open
    }

    /// Tells the flusher whether the owner's loop has nothing in flight:
    /// buffered events go out as soon as it is idle.
    pub fn set_idle(&self, idle: bool) {
        let was = self.idle.swap(idle, Ordering::AcqRel);
        if idle && !was {
            self.wake.notify_one();
        }
    }

    /// Sends buffered task events for as long as the process runs (see the
    /// module docs for when). Spawn it once on the process's runtime.
    pub async fn run_flusher(&self) {
        self.flusher.store(true, Ordering::Release);
        let mut sending: Option<Sending<'_>> = None;
        let mut last_sent: Option<Instant> = None;
        let mut busy = false;
        loop {
            if self.stop.load(Ordering::Acquire) {
                // The last message first, then the rest, in order.
                if let Some(previous) = sending.take() {
                    previous.await;
                }
                self.send_buffered().await;
                self.flusher.store(false, Ordering::Release);
                self.stopped.notify_one();
                return;
            }
            let (since, full) = {
                let buffer = self.lock();
                (buffer.since, !buffer.full.is_empty())
            };
            let Some(since) = since else {
                self.wake.notified().await;
                continue;
            };
            let due = if full {
                since
            } else if self.idle.load(Ordering::Acquire) {
                match last_sent {
                    Some(last) if busy => since.max(last + LINGER),
                    _ => since,
                }
            } else {
                since + LINGER
            };
            if due > Instant::now() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep_until(due) => {}
                }
                continue;
            }
            // One message at a time: while the connection has not written
            // the last one, the next keeps gathering events.
            if let Some(previous) = sending.take() {
                previous.await;
            }
            let (batches, count) = {
                let mut buffer = self.lock();
                let count = buffer.full.len() * BATCH_LIMIT + buffer.in_open;
                (buffer.take(), count)
            };
            let now = Instant::now();
            busy = last_sent.is_some_and(|last| {
                count as f64 > BUSY_EVENTS_PER_MS * (now - last).as_secs_f64() * 1e3
            });
            last_sent = Some(now);
            let mut batches = batches.into_iter().peekable();
            while let Some(body) = batches.next() {
                let mut send: Sending<'_> = Box::pin(self.send(TASK_BATCH_KEY, body));
                if batches.peek().is_some() {
                    send.await;
                } else if Self::started(&mut send).is_pending() {
                    sending = Some(send);
                }
            }
        }
    }

    /// Polls a send once without registering this task for its completion:
    /// the frames are handed to the connection, and the connection's thread
    /// does not have to wake this one when it has written them.
    fn started(send: &mut Sending<'_>) -> Poll<()> {
        send.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Publishes every buffered task event now and waits until they are
    /// written, at most [`BATCH_LIMIT`] per message. A running flusher sends
    /// what it holds first and stops (call this once, at shutdown).
    pub async fn flush(&self) {
        if self.flusher.load(Ordering::Acquire) {
            self.stop.store(true, Ordering::Release);
            self.wake.notify_one();
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.stopped.notified()).await;
        }
        self.send_buffered().await;
    }

    /// Publishes every task event buffered so far and waits until the
    /// connection has taken them, without stopping the flusher. Called
    /// before a message about the same task goes where another process can
    /// receive it (a retry, a hand-back): monitors apply a task's events in
    /// arrival order, so this process's events must be ahead of the other
    /// process's.
    pub async fn send_pending(&self) {
        if !self.enabled() {
            return;
        }
        self.send_buffered().await;
    }

    /// Sends what the buffer holds, in order, waiting for each message.
    async fn send_buffered(&self) {
        let batches = self.lock().take();
        for body in batches {
            self.send(TASK_BATCH_KEY, body).await;
        }
    }

    /// Publishes a worker event at once.
    pub async fn worker(&self, kind: &str, fields: Vec<(&str, Value)>) {
        let mut body = Vec::with_capacity(256);
        write_event(
            &self.prefix,
            &mut body,
            kind,
            self.clock(),
            Self::now(),
            &fields,
        );
        self.send(&routing_key(kind), body).await;
    }

    /// Publishes a worker event without waiting for it to be written: the
    /// frames go to the connection at once, and its I/O thread does not
    /// have to wake this one when it has written them (the periodic
    /// `worker-heartbeat` costs one wake-up instead of two or three).
    /// `None`: done already (written, or failed and logged at DEBUG).
    /// Otherwise poll the send again later with [`Events::done`] (it is
    /// counted then), or drop it: events are best effort.
    pub fn worker_handed_over<'a>(
        &'a self,
        kind: &'a str,
        fields: Vec<(&'a str, Value)>,
    ) -> Option<Sending<'a>> {
        let mut send: Sending<'a> = Box::pin(self.worker(kind, fields));
        Self::started(&mut send).is_pending().then_some(send)
    }

    /// Whether a send handed over earlier has finished, without waiting
    /// and without asking to be woken.
    pub fn done(send: &mut Sending<'_>) -> bool {
        Self::started(send).is_ready()
    }

    async fn send(&self, key: &str, body: Vec<u8>) {
        let Some(channel) = self
            .channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("hostname"),
            AMQPValue::LongString(LongString::from(self.source.hostname.as_str())),
        );
        let properties = json_properties(headers, 1, 0);
        let out = Outgoing {
            exchange: EVENT_EXCHANGE.into(),
            routing_key: key.into(),
            properties,
            body,
        };
        match publish(&channel, &out).await {
            Ok(()) => {
                if let Some(s) = self.shm {
                    s.count_events(1);
                }
            }
            // Events are best effort, as in Celery: a lost connection is
            // reported by the consumer, not once per event.
            Err(e) => debug!("event not sent: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::events::task_started;

    fn events() -> Events {
        let source = EventSource {
            hostname: "w@h".into(),
            pid: 1,
            utcoffset: 0.0,
        };
        Events::new(source, None, true)
    }

    #[test]
    fn batches_hold_at_most_batch_limit_events_in_order() {
        let events = events();
        for i in 0..BATCH_LIMIT + 2 {
            events.task("task-started", || task_started(&i.to_string()));
        }
        assert_eq!(events.buffered(), BATCH_LIMIT + 2);
        let batches = events.lock().take();
        let parsed: Vec<Vec<Value>> = batches
            .iter()
            .map(|b| serde_json::from_slice(b).expect("a JSON array"))
            .collect();
        assert_eq!(
            parsed.iter().map(Vec::len).collect::<Vec<_>>(),
            [BATCH_LIMIT, 2]
        );
        let uuids: Vec<String> = parsed
            .iter()
            .flatten()
            .map(|e| e["uuid"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..BATCH_LIMIT + 2).map(|i| i.to_string()).collect();
        assert_eq!(uuids, expected);
        let clocks: Vec<u64> = parsed
            .iter()
            .flatten()
            .map(|e| e["clock"].as_u64().unwrap())
            .collect();
        assert!(clocks.windows(2).all(|w| w[0] < w[1]), "{clocks:?}");
        assert_eq!(events.buffered(), 0);
        assert!(events.lock().since.is_none());
    }

    #[test]
    fn nothing_is_buffered_while_task_events_are_off() {
        let source = EventSource {
            hostname: "w@h".into(),
            pid: 1,
            utcoffset: 0.0,
        };
        let events = Events::new(source, None, false);
        events.task("task-started", || task_started("x"));
        assert_eq!(events.buffered(), 0);
        assert!(events.lock().take().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_flusher_sends_when_idle_or_after_the_linger() {
        let events = std::sync::Arc::new(events());
        let flusher = std::sync::Arc::clone(&events);
        tokio::spawn(async move { flusher.run_flusher().await });
        // Lets the flusher run without moving the (paused) clock.
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };

        // Busy owner: the events wait, for at most LINGER.
        events.set_idle(false);
        events.task("task-received", || task_started("a"));
        settle().await;
        assert_eq!(events.buffered(), 1);
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(events.buffered(), 0);

        // The owner going idle sends at once.
        events.task("task-received", || task_started("b"));
        events.task("task-started", || task_started("b"));
        settle().await;
        assert_eq!(events.buffered(), 2);
        events.set_idle(true);
        settle().await;
        assert_eq!(events.buffered(), 0);

        // A full batch goes out while the owner is busy.
        events.set_idle(false);
        for i in 0..BATCH_LIMIT {
            events.task("task-started", || task_started(&i.to_string()));
        }
        settle().await;
        assert_eq!(events.buffered(), 0);

        // That was many events in no time: the next message waits for
        // LINGER although the owner is idle...
        events.set_idle(true);
        events.task("task-started", || task_started("c"));
        settle().await;
        assert_eq!(events.buffered(), 1, "spaced while busy");
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(events.buffered(), 0);
        // Busy again; a busy owner's events still wait for it to go idle
        // (or for LINGER), however long ago the last message left.
        for i in 0..BATCH_LIMIT {
            events.task("task-started", || task_started(&i.to_string()));
        }
        settle().await;
        events.set_idle(false);
        tokio::time::sleep(LINGER * 10).await;
        events.task("task-received", || task_started("e"));
        settle().await;
        assert_eq!(events.buffered(), 1, "waits for the owner");
        events.set_idle(true);
        settle().await;
        assert_eq!(events.buffered(), 0);
        // ...and once the rate has dropped, an idle owner's events go out at once.
        tokio::time::sleep(LINGER * 10).await;
        events.task("task-started", || task_started("d"));
        settle().await;
        assert_eq!(events.buffered(), 0);
    }

    #[test]
    fn a_backlog_the_broker_does_not_take_keeps_the_newest_events() {
        let events = events();
        let total = (MAX_BATCHES + 2) * BATCH_LIMIT;
        for i in 0..total {
            events.task("task-started", || task_started(&i.to_string()));
        }
        let batches = events.lock().take();
        assert_eq!(batches.len(), MAX_BATCHES);
        let first: Vec<Value> = serde_json::from_slice(&batches[0]).unwrap();
        assert_eq!(first[0]["uuid"], (2 * BATCH_LIMIT).to_string());
        let last: Vec<Value> = serde_json::from_slice(batches.last().unwrap()).unwrap();
        assert_eq!(last[BATCH_LIMIT - 1]["uuid"], (total - 1).to_string());
    }

    #[tokio::test(start_paused = true)]
    async fn flush_at_shutdown_stops_the_flusher_after_it_has_sent_everything() {
        let events = std::sync::Arc::new(events());
        let flusher = std::sync::Arc::clone(&events);
        let task = tokio::spawn(async move { flusher.run_flusher().await });
        tokio::task::yield_now().await;
        events.set_idle(false);
        for i in 0..BATCH_LIMIT + 3 {
            events.task("task-started", || task_started(&i.to_string()));
        }
        events.flush().await;
        assert_eq!(events.buffered(), 0);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the flusher stopped")
            .expect("and did not panic");
        // Events after that are sent by flush itself.
        events.task("task-started", || task_started("late"));
        events.flush().await;
        assert_eq!(events.buffered(), 0);
    }
}
