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

    /// The stored state of task `id` (`None`: nothing stored, Celery's PENDING).
    pub async fn state(&self, id: &str) -> Result<Option<String>, BackendError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(task_key(id))
            .query_async(&mut conn)
            .await
            .map_err(|e| BackendError::Redis(format!("{}: {e}", self.masked)))?;
        Ok(stored.and_then(|text| {
            let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
            doc.get("status")?.as_str().map(str::to_owned)
        }))
    }

    /// Celery 5.7's rule for a revoke of task `id` that no process of this
    /// worker runs: stores REVOKED unless the stored state says it ended
    /// or another worker started it (anything but PENDING, RECEIVED, RETRY
    /// and REJECTED). Whether it stored.
    pub async fn revoke_if_waiting(&self, id: &str) -> Result<bool, BackendError> {
        let waiting = match self.state(id).await?.as_deref() {
            None | Some("PENDING" | "RECEIVED" | "RETRY" | "REJECTED") => true,
            Some(_) => false,
        };
        if waiting {
            let exc = crate::protocol::ExceptionInfo::revoked("revoked");
            let result = serde_json::to_value(&exc).unwrap_or_default();
            let doc = ResultDocument::new(id, TaskState::Revoked, result, chrono::Utc::now());
            self.store(&doc).await?;
        }
        Ok(waiting)
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
