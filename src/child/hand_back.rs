//! Handing a message back to its queue (a drain, a recycle, the drain
//! deadline) without letting a quorum queue's delivery limit drop it.
//!
//! Before RabbitMQ 4.3 a quorum queue counts every requeue against its
//! `x-delivery-limit` (20 by default since 4.0), `basic.nack` included, and
//! drops or dead-letters a message whose count goes past the limit. A message
//! only ever handed back (held across drains, an ETA task prefetched by one
//! rolling restart after another) would vanish on the broker without a word
//! from the worker. Where a requeue would be the one that takes it past the
//! limit, the hand-back is a re-published copy under publisher confirms
//! (same id, headers and body, its count starting again) and an ack instead.

use tracing::{error, warn};

use super::job::{Job, Settler};
use super::Child;
use crate::protocol::TaskMessage;
use crate::shm::Unpublished;
use crate::task::DeliveryInfo;

/// A message to hand back, and where it came from.
pub(super) struct HandBack<'a> {
    /// The decoded message.
    pub(super) msg: &'a TaskMessage,
    /// Its delivery's settler.
    pub(super) settler: &'a Settler,
    /// Where it was published to.
    pub(super) delivery: &'a DeliveryInfo,
    /// The queue it was consumed from.
    pub(super) queue: &'a str,
}

impl<'a> HandBack<'a> {
    /// A received job's message.
    pub(super) fn of(job: &'a Job) -> Self {
        Self {
            msg: &job.msg,
            settler: &job.settler,
            delivery: &job.delivery,
            queue: &job.queue,
        }
    }
}

/// How a message went back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handed {
    /// Requeued.
    Requeued,
    /// Re-published at its queue's delivery limit, and acknowledged.
    Republished,
    /// Its re-publish failed: requeued anyway, so the broker may drop it
    /// (logged and counted).
    Failed,
}

impl Child {
    /// The returns counted and the limit of a delivery from `queue` that one
    /// more requeue would take past its delivery limit; `None` otherwise.
    fn at_delivery_limit(&self, settler: &Settler, queue: &str) -> Option<(u64, u64)> {
        settler
            .counted_returns()
            .zip(self.shared.delivery_limit(queue))
            .filter(|(returns, limit)| returns >= limit)
    }

    /// Hands a message back: a requeue, or at the delivery limit a confirmed
    /// re-publish and an ack.
    pub(super) async fn hand_back(&self, back: HandBack<'_>) -> Handed {
        let HandBack {
            msg,
            settler,
            delivery,
            queue,
        } = back;
        // A delivery whose channel is gone was returned by the broker already.
        let at_limit = self.at_delivery_limit(settler, queue);
        let Some((returns, limit)) = at_limit.filter(|_| settler.channel_open()) else {
            settler.requeue(&msg.id).await;
            return Handed::Requeued;
        };
        let route = self.shared.home_route(delivery, queue);
        match self
            .shared
            .publish_task(&msg.republish_message(), route)
            .await
        {
            Ok(()) => {
                settler.ack(&msg.id).await;
                self.link.slot().count_republished_at_limit();
                warn!(task_id = %msg.id, "Task {}[{}] was returned to queue {queue} {returns} time(s), its delivery limit ({limit}): re-published instead of requeued, as one more requeue would take it past the limit", msg.display_name(), msg.id);
                Handed::Republished
            }
            Err(e) => {
                self.link.slot().count_unpublished(Unpublished::HandBack);
                settler.requeue(&msg.id).await;
                error!(task_id = %msg.id, "Task {}[{}] could not be re-published at queue {queue}'s delivery limit ({limit}) and was requeued: the broker may drop or dead-letter it: {e}", msg.display_name(), msg.id);
                Handed::Failed
            }
        }
    }
}
