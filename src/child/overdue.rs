//! A task longer than the broker's delivery-acknowledgement timeout
//! (`consumer_timeout`, 30 min by default). RabbitMQ 3.x and 4.0–4.2 close
//! the consumer channel with `406 PRECONDITION_FAILED` ("delivery
//! acknowledgement on channel N timed out") and requeue every message that
//! was unacknowledged on it: the running task's and the prefetched ones.
//!
//! What this process does then:
//! - the running task goes on, and the connection with it (only the channel
//!   is gone): its result is stored once, by this run;
//! - it records the task in the shared `overdue` table, so that the process
//!   the broker redelivers the message to acknowledges that copy without
//!   running it (now or after the first run ended): the message does not loop;
//! - it does not consume again until its running task is done, so the
//!   prefetched messages the broker requeued go to the other processes at
//!   once instead of waiting behind the long task again;
//! - it logs one WARNING naming the broker setting to change, and counts the
//!   event (`celeriac_consumer_timeouts_total`).

use lapin::options::BasicQosOptions;
use tracing::{info, warn};

use super::job::Job;
use super::{Child, ChildError};
use crate::broker::BrokerError;
use crate::shm::FirstRun;

/// The text RabbitMQ closes the channel with on a consumer timeout.
const TIMED_OUT: &str = "delivery acknowledgement on channel";

/// Whether `error` is RabbitMQ closing a channel for a consumer timeout;
/// `Some(timeout in ms)` if so (0 when the text gives no value).
pub(super) fn consumer_timeout(error: &lapin::Error) -> Option<u64> {
    timeout_of(&error.to_string())
}

fn timeout_of(text: &str) -> Option<u64> {
    if !(text.contains("PRECONDITION_FAILED") && text.contains(TIMED_OUT)) {
        return None;
    }
    let value = text
        .split("Timeout value used: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok());
    Some(value.unwrap_or(0))
}

impl Child {
    /// The broker closed the consumer channel for a consumer timeout
    /// (`timeout_ms`, 0 if unknown). Called once per closed channel: the
    /// other consumers of the channel report the same error, but they are
    /// no longer current once this has run.
    pub(super) fn channel_timed_out(&mut self, timeout_ms: u64) {
        self.consumers.clear();
        // Their acknowledgements would go to the closed channel: the broker
        // has requeued them already.
        let requeued = self.held.clear();
        let shm = self.link.shm;
        shm.count_consumer_timeout();
        let after = if timeout_ms > 0 {
            format!("within the broker's delivery acknowledgement timeout ({timeout_ms} ms)")
        } else {
            "within the broker's delivery acknowledgement timeout".to_owned()
        };
        let advice = "To let acks-late tasks run longer, raise `consumer_timeout` in rabbitmq.conf \
            (RabbitMQ 3.11.15 and later also take the per-queue argument `x-consumer-timeout` or the \
            policy key `consumer-timeout`) above the longest task";
        let mut running = Vec::new();
        for run in self.running_info.values().filter(|r| r.acks_late) {
            let msg = &run.job_msg;
            let times = shm.record_overdue(&msg.id, self.link.index, self.shared.pid);
            running.push((msg.display_name().to_owned(), msg.id.clone(), times));
        }
        match running.as_slice() {
            [] => {
                warn!(
                    "RabbitMQ closed this process's consumer channel: a message it held was not acknowledged {after}; \
                     it and {requeued} other held message(s) were requeued. {advice}."
                );
            }
            [(name, id, times), ..] => {
                let again = if *times > 1 {
                    format!(" (its delivery timed out {times} times)")
                } else {
                    String::new()
                };
                warn!(
                    task_id = %id,
                    "Task {name}[{id}] was not acknowledged {after}{again}: RabbitMQ closed this process's consumer \
                     channel and requeued its message with {requeued} prefetched message(s). The task runs on and its \
                     result is stored once: its redelivered copy is acknowledged without running, and this process \
                     consumes again when the task is done. {advice}."
                );
            }
        }
        self.timed_out = true;
    }

    /// After a consumer timeout, once no task runs: a new channel on the same
    /// connection, the QoS again, and the consumers.
    pub(super) async fn resume_after_timeout(&mut self) -> Result<(), ChildError> {
        if !self.timed_out || !self.running.is_empty() {
            return Ok(());
        }
        let Some(session) = &mut self.session else {
            return Ok(());
        };
        let lost = |e: BrokerError| ChildError::ConnectionLost(e.to_string());
        let channel = session
            .conn
            .create_channel()
            .await
            .map_err(|e| lost(BrokerError::amqp("open channel")(e)))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| lost(BrokerError::amqp("basic.qos")(e)))?;
        session.channel = channel.clone();
        self.channel = channel;
        self.timed_out = false;
        self.start_consuming()
            .await
            .map_err(|e| ChildError::ConnectionLost(e.to_string()))?;
        info!("consuming again after the consumer timeout");
        Ok(())
    }

    /// A task's run ended: if its delivery had timed out, a copy that
    /// arrives from now on is acknowledged without running.
    pub(super) fn overdue_run_ended(&self, id: &str) {
        self.link.shm.finish_overdue(id);
    }

    /// For a redelivered message: if it is the copy of a task whose delivery
    /// timed out while it ran here or in another process of this worker, and
    /// that run goes on or has ended, acknowledges it without running it.
    /// Returns true when it did.
    ///
    /// The broker requeues and redelivers the message as it closes the
    /// channel, so the copy can arrive before the running process has seen
    /// the close and recorded it: while another live process runs the task,
    /// the record is waited for (at most 2 s, the wait `lost_record` makes
    /// for a process that died, which ends as soon as it is reaped).
    pub(super) async fn settle_overdue_copy(&self, job: &Job) -> bool {
        let shm = self.link.shm;
        let msg = &job.msg;
        let mut waits = 0;
        loop {
            let Some(overdue) = shm.find_overdue(&msg.id) else {
                if waits < 200 && shm.running_elsewhere(&msg.id, self.link.index).is_some() {
                    waits += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
                return false;
            };
            let how = match overdue.first_run {
                FirstRun::Running { slot } => {
                    // The process that recorded it still owns its slot: the
                    // run goes on there, or has just ended. (If the process
                    // died, the lost-task path settles the copy; if it is
                    // dying, `record_lost` sees the copy settled and reports
                    // the task like an early-acknowledged one.)
                    let Some(s) = shm.task_slots().get(slot) else {
                        return false;
                    };
                    if s.pid() != overdue.owner.1 {
                        return false;
                    }
                    if s.running_task().is_some_and(|t| t.id == msg.id) {
                        format!("still runs in ForkPoolWorker-{}", slot + 1)
                    } else {
                        "has ended".to_owned()
                    }
                }
                FirstRun::Finished => "has ended".to_owned(),
            };
            if !shm.claim_overdue_copy(&overdue) {
                continue; // the first run ended meanwhile: decide again
            }
            info!(task_id = %msg.id, queue = %job.queue, "Task {}[{}] came back after its delivery timed out; its first run {how}: acknowledged the copy without running it", msg.display_name(), msg.id);
            job.settler.ack(&msg.id).await;
            self.link.slot().count_copy_settled();
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_timeout_close_is_recognised_with_its_value() {
        let text = "protocol error: PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
                    Timeout value used: 3000 ms. This timeout value can be configured, see consumers doc guide to learn more";
        assert_eq!(timeout_of(text), Some(3000));
        assert_eq!(
            timeout_of("PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out"),
            Some(0)
        );
    }

    #[test]
    fn other_channel_errors_are_not_timeouts() {
        assert_eq!(
            timeout_of("PRECONDITION_FAILED - unknown delivery tag 7"),
            None
        );
        assert_eq!(timeout_of("NOT_FOUND - no queue 'x' in vhost '/'"), None);
    }
}
