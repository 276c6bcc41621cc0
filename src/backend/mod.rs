//! Result backends: where task states go so a Python `AsyncResult` finds them.

mod redis_backend;
mod rpc;

use lapin::Channel;
use thiserror::Error;

use crate::broker::BrokerError;
use crate::config::BackendUrl;
use crate::protocol::{ResultDocument, TaskMessage};

pub use redis_backend::RedisBackend;
pub use rpc::RpcBackend;

/// How long results are kept in Redis (Celery's `result_expires`, one day).
pub const RESULT_EXPIRES_SECS: u64 = 86_400;

/// A failure to store a result.
#[derive(Debug, Error)]
pub enum BackendError {
    /// Publishing an rpc reply failed.
    #[error("rpc backend: {0}")]
    Rpc(#[from] BrokerError),
    /// Redis failed.
    #[error("redis backend: {0}")]
    Redis(String),
}

/// A configured result backend.
pub enum Backend {
    /// rpc:// — replies to the client's `reply_to` queue.
    Rpc(RpcBackend),
    /// redis:// — `celery-task-meta-<id>` keys plus pub/sub.
    Redis(RedisBackend),
}

impl Backend {
    /// Connects the backend named by `url`; rpc publishes on `channel`.
    pub async fn connect(url: &BackendUrl, channel: Channel) -> Result<Self, BackendError> {
        Ok(match url {
            BackendUrl::Rpc => Self::Rpc(RpcBackend::new(channel)),
            BackendUrl::Redis(u) => Self::Redis(RedisBackend::connect(u).await?),
        })
    }

    /// Stores `doc` for the task `msg` describes.
    pub async fn store(&self, msg: &TaskMessage, doc: &ResultDocument) -> Result<(), BackendError> {
        match self {
            Self::Rpc(b) => b.store(msg, doc).await,
            Self::Redis(b) => b.store(doc).await,
        }
    }
}
