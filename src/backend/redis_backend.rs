//! redis://: `SETEX celery-task-meta-<id>` plus `PUBLISH` on the same name.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{BackendError, RESULT_EXPIRES_SECS};
use crate::broker::mask_url;
use crate::protocol::{ResultDocument, TaskState};

/// The Redis result backend.
pub struct RedisBackend {
    conn: ConnectionManager,
    /// The URL with its password masked, for errors.
    masked: String,
}

/// The key Celery stores a task's state under.
pub fn task_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

impl RedisBackend {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        let masked = mask_url(url);
        let hide = |e: redis::RedisError| {
            BackendError::Redis(format!("{masked}: {}", e.to_string().replace(url, &masked)))
        };
        let client = redis::Client::open(url).map_err(hide)?;
        // Bounded: an unreachable Redis fails the connect in seconds (the
        // supervisor retries and reports it) instead of retrying inside.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(1_000)
            .set_connection_timeout(Duration::from_secs(3))
            .set_response_timeout(Duration::from_secs(10));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(hide)?;
        Ok(Self { conn, masked })
    }

    /// Stores `doc`, never overwriting a stored SUCCESS (as Celery).
    pub async fn store(&self, doc: &ResultDocument) -> Result<(), BackendError> {
        let key = task_key(&doc.task_id);
        let mut conn = self.conn.clone();
        let err = |e: redis::RedisError| BackendError::Redis(format!("{}: {e}", self.masked));
        if doc.status != TaskState::Success {
            let existing: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if existing.is_some_and(|v| {
                v.contains("\"status\":\"SUCCESS\"") || v.contains("\"status\": \"SUCCESS\"")
            }) {
                return Ok(());
            }
        }
        let body = doc.to_json();
        redis::pipe()
            .atomic()
            .cmd("SETEX")
            .arg(&key)
            .arg(RESULT_EXPIRES_SECS)
            .arg(&body)
            .ignore()
            .cmd("PUBLISH")
            .arg(&key)
            .arg(&body)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }
}
