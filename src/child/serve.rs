//! The task process's loop: deliveries, finished tasks, signals, the
//! doorbell, the heartbeat, ETA timers and consumer rotation, one at a time.
//! Idle, it sleeps until the broker, a signal or the doorbell wakes it, or
//! its next heartbeat ([`crate::shm::beat_period`]) is due: one wake-up per
//! heartbeat ([`crate::deadline`]).

use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::consumers::Incoming;
use super::execute::Finished;
use super::session::next_happening;
use super::{Child, ChildError, Exit};
use crate::shm::ChildState;
use crate::signals::Stop;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// How soon consumers holding ETA tasks are replaced (several ETA tasks
/// arriving together are handled by one replacement).
const ROTATION: Duration = Duration::from_millis(250);

/// How often the loop looks while a publishing channel is closed.
const REPAIR_EVERY: Duration = Duration::from_secs(1);

impl Child {
    /// Serves until a shutdown (`Ok`) or a lost connection (`Err`).
    pub(super) async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Incoming>,
    ) -> Result<Exit, ChildError> {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        // The first look is at once: news rung before the doorbell was
        // listened to, and a SIGTERM sent before the handlers existed.
        let mut next_tick = Instant::now();
        let mut rotation_at: Option<Instant> = None;
        loop {
            let next_eta = self.next_eta_instant().unwrap_or(far);
            if !self.consumers.hold_eta() {
                rotation_at = None;
            } else if rotation_at.is_none() {
                rotation_at = Some(Instant::now() + ROTATION);
            }
            let queued_due = self.queued_due();
            tokio::select! {
                stop = self.signals.recv() => return self.shutdown(rx, stop).await,
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.finished(done);
                    if self.recycle {
                        self.shutdown(rx, Stop::Warm).await?;
                        return Ok(Exit::Recycled);
                    }
                    self.resume_after_timeout().await?;
                }
                () = self.tick_timer.until(next_tick) => {
                    self.tick().await;
                    self.check_consumed_queues().await?;
                    next_tick = Instant::now() + self.tick_every();
                    // A SIGTERM sent before our handlers existed was lost:
                    // the shared flag still says the worker is draining, or
                    // the supervisor is gone (its pdeathsig came too early).
                    if self.link.shm.draining() {
                        return self.shutdown(rx, Stop::Warm).await;
                    }
                    if self.link.orphaned() {
                        warn!("the supervisor is gone: draining");
                        return self.shutdown(rx, Stop::Warm).await;
                    }
                }
                // News in the shared memory: look now.
                () = self.doorbell.rung() => next_tick = Instant::now(),
                Some(happening) = next_happening(&mut self.session) => {
                    if let lapin::Event::Error(e) = happening {
                        debug!("connection event: {e}");
                        self.repair_channels().await;
                        next_tick = next_tick.min(Instant::now() + self.tick_every());
                    }
                }
                incoming = rx.recv(), if !self.recycle => {
                    self.incoming(incoming).await?;
                    // Take what else has arrived before dispatching: fewer wake-ups under load.
                    for _ in 0..64 {
                        let Ok(more) = rx.try_recv() else { break };
                        self.incoming(Some(more)).await?;
                    }
                }
                () = tokio::time::sleep_until(next_eta), if next_eta != far => self.held.release_due(Utc::now()),
                () = tokio::time::sleep_until(rotation_at.unwrap_or(far)), if rotation_at.is_some() => {
                    rotation_at = None;
                    self.rotate_consumers().await?;
                }
                // The held tasks changed since `inspect reserved` last saw them.
                () = tokio::time::sleep_until(queued_due.unwrap_or(far)), if queued_due.is_some() => {}
            }
            self.dispatch();
            self.publish_queued(false);
            // Task events go out when nothing else is in flight: a quick
            // task's received/started/succeeded share one message.
            self.shared
                .events
                .set_idle(rx.is_empty() && self.running.is_empty());
        }
    }

    /// When the loop looks next: at the next heartbeat, or in a second while
    /// a publishing channel is closed.
    fn tick_every(&self) -> Duration {
        if self.channels_closed() {
            REPAIR_EVERY.min(self.beat_every)
        } else {
            self.beat_every
        }
    }

    async fn incoming(&mut self, incoming: Option<Incoming>) -> Result<(), ChildError> {
        self.shared.events.set_idle(false);
        match incoming {
            Some(Incoming::Delivery(d, tag, session)) if session == self.consumers.session() => {
                self.receive(*d, &tag).await;
                Ok(())
            }
            Some(Incoming::Delivery(d, _, _)) => {
                super::session::hand_back_stale(*d);
                Ok(())
            }
            Some(Incoming::Failed(e, tag)) if self.consumers.current(&tag) => {
                match super::overdue::consumer_timeout(&e) {
                    Some(timeout_ms) => {
                        self.channel_timed_out(timeout_ms);
                        self.resume_after_timeout().await
                    }
                    None => Err(ChildError::ConnectionLost(e.to_string())),
                }
            }
            // A consumer of a connection already given up.
            Some(Incoming::Failed(..)) => Ok(()),
            Some(Incoming::Ended(tag)) if self.consumers.current(&tag) => Err(
                ChildError::ConnectionLost(format!("consumer {tag} was cancelled by the broker")),
            ),
            Some(Incoming::Ended(_)) => Ok(()),
            None => Err(ChildError::ConnectionLost("consumers stopped".into())),
        }
    }

    /// Bookkeeping when a task's run ends.
    pub(super) fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Finished), tokio::task::JoinError>,
    ) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some(info) = self.running_info.remove(&id) {
            self.overdue_run_ended(&info.job_msg.id);
            match done {
                Ok((_, finished)) => {
                    debug!(task_id = %finished.id, "slot free");
                    self.after_task();
                }
                Err(e) => {
                    error!(task_id = %info.job_msg.id, "task runner for {} stopped abnormally: {e}", info.job_msg.id)
                }
            }
        }
    }

    /// At every heartbeat and when the doorbell rings: tell the supervisor
    /// we are alive, apply queue changes, settle tasks whose process died,
    /// and reopen publishing channels the broker closed.
    pub(super) async fn tick(&mut self) {
        self.link.slot().beat();
        self.publish_queued(true);
        if let Err(e) = self.sync_queues().await {
            warn!("could not change the consumed queues: {e}");
        }
        self.report_lost().await;
        self.repair_channels().await;
    }

    /// A consumer the broker cancelled without a notice that arrived would
    /// leave the process alive and consuming nothing. So while idle
    /// (nothing received since the last beat) each beat checks that every
    /// consumed queue can still be consumed by this connection: a passive
    /// declare, on a channel of its own. A queue that is gone (404) or held
    /// exclusively by another connection (405) ends the session as a
    /// cancelled consumer does: the queue is declared again and consumed.
    pub(super) async fn check_consumed_queues(&mut self) -> Result<(), ChildError> {
        let idle = self.received == self.received_at_check;
        self.received_at_check = self.received;
        if !idle || self.link.slot().state() != ChildState::Consuming {
            return Ok(());
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let channel = match session.check.take() {
            Some(c) if c.status().connected() => c,
            _ => match session.conn.create_channel().await {
                Ok(c) => c,
                Err(e) => {
                    debug!("cannot open a channel to check the consumed queues: {e}");
                    return Ok(());
                }
            },
        };
        for (queue, tag) in self.consumers.consumed() {
            let options = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let queue = queue.as_ref();
            if let Err(e) = channel
                .queue_declare(queue.into(), options, FieldTable::default())
                .await
            {
                use lapin::protocol::AMQPSoftError::{NOTFOUND, RESOURCELOCKED};
                if crate::broker::refused_with(&e, &[NOTFOUND, RESOURCELOCKED]) {
                    return Err(ChildError::ConnectionLost(format!(
                        "queue {queue} can no longer be consumed ({e}); its consumer {tag} is gone"
                    )));
                }
                debug!("could not check queue {queue}: {e}");
                return Ok(());
            }
        }
        session.check = Some(channel);
        Ok(())
    }

    fn next_eta_instant(&self) -> Option<Instant> {
        let wait = (self.held.next_due()? - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }
}
