//! rpc://: results published to the client's reply queue on the default exchange.

use lapin::types::FieldTable;
use lapin::Channel;

use super::BackendError;
use crate::broker::{json_properties, publish, Outgoing};
use crate::protocol::{ResultDocument, TaskMessage};

/// The rpc result backend.
pub struct RpcBackend {
    channel: std::sync::RwLock<Channel>,
}

impl RpcBackend {
    /// Publishes results on `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel: std::sync::RwLock::new(channel),
        }
    }

    /// Publishes on `channel` from now on (after a reconnect).
    pub fn use_channel(&self, channel: Channel) {
        *self.channel.write().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Sends `doc` to the message's `reply_to` queue; without one there is
    /// nobody to tell, as in Celery.
    pub async fn store(&self, msg: &TaskMessage, doc: &ResultDocument) -> Result<(), BackendError> {
        let Some(reply_to) = msg.reply_to.as_deref() else {
            return Ok(());
        };
        let correlation_id = msg.correlation_id.clone().unwrap_or_else(|| msg.id.clone());
        let properties =
            json_properties(FieldTable::default(), 1, 0).with_correlation_id(correlation_id.into());
        let out = Outgoing {
            exchange: String::new(),
            routing_key: reply_to.to_owned(),
            properties,
            body: doc.to_json(),
        };
        let channel = self
            .channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        publish(&channel, &out).await?;
        Ok(())
    }
}
