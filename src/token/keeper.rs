//! One process's broker token: obtained when a connection opens, refreshed
//! before it expires and pushed with AMQP `update-secret` to every open
//! connection of the process, so consumers are never cancelled and nothing
//! reconnects.
//!
//! A failed refresh is retried with backoff ([`super::RETRY`]) and logged
//! once (and its recovery once); the connections keep the current token
//! meanwhile. Only a token the endpoint issued (or the file holds), checked
//! by `jwt.rs`, is ever pushed. The process's slot in shared memory shows
//! when its token expires and counts failures and pushes, for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use lapin::types::{LongString, ShortString};
use lapin::Connection;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::entra::Exchange;
use super::file::{Fingerprint, TokenFile};
use super::schedule::{random_unit, refresh_after, RETRY};
use super::{BrokerAuth, Issued, Secret, TokenError};
use crate::shm::Slot;

/// How long pushing a token to one connection may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a token file is looked at.
const FILE_POLL: Duration = Duration::from_secs(1);
/// The reason given to the broker with `update-secret` (it logs it).
const REASON: &str = "celeriac: token refreshed";

/// Where tokens come from.
enum Source {
    Entra(Exchange),
    File(TokenFile),
}

/// The token in use.
struct Current {
    issued: Issued,
    /// When to get the next one (Entra), from the refresh schedule.
    refresh_at: Instant,
    /// The token file's version it was read from.
    fingerprint: Option<Fingerprint>,
}

struct Inner {
    source: Source,
    current: Mutex<Option<Current>>,
    /// One exchange at a time (the connect path and the refresh loop).
    fetching: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Weak<Connection>>>,
    slot: &'static Slot,
    renew: Notify,
    /// Tokens stored so far.
    generation: AtomicU64,
}

/// A process's broker token (cheap to clone: the clones share it).
#[derive(Clone)]
pub struct TokenKeeper {
    inner: Arc<Inner>,
}

impl TokenKeeper {
    /// The keeper for `auth` (`None` with a password in the URL), showing
    /// its token in `slot`. Call it in the process that uses it, after the
    /// fork: an HTTP client is made here.
    pub fn new(auth: &BrokerAuth, slot: &'static Slot) -> Result<Option<Self>, TokenError> {
        let source = match auth {
            BrokerAuth::Password => return Ok(None),
            BrokerAuth::AzureWorkloadIdentity(identity) => {
                Source::Entra(Exchange::new(identity.clone())?)
            }
            BrokerAuth::TokenFile(path) => Source::File(TokenFile::new(path.clone())),
        };
        Ok(Some(Self {
            inner: Arc::new(Inner {
                source,
                current: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
                connections: Mutex::new(Vec::new()),
                slot,
                renew: Notify::new(),
                generation: AtomicU64::new(0),
            }),
        }))
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.inner.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where tokens come from, for log lines.
    pub fn describe(&self) -> String {
        match &self.inner.source {
            Source::Entra(x) => format!("Entra ID ({})", x.url()),
            Source::File(f) => format!("the token file {}", f.path()),
        }
    }

    /// The password for a new connection: the current token while it is
    /// fresh (before its refresh time; for a token file, while the file is
    /// unchanged), else a new one obtained now — or, if none can be had,
    /// the current one while it has not expired.
    pub async fn password(&self) -> Result<Secret, TokenError> {
        let _one = self.inner.fetching.lock().await;
        let fingerprint = match &self.inner.source {
            Source::File(f) => f.fingerprint(),
            Source::Entra(_) => None,
        };
        if let Some(c) = self.current().as_ref() {
            let fresh = match &self.inner.source {
                Source::Entra(_) => Instant::now() < c.refresh_at,
                Source::File(_) => fingerprint.is_some() && c.fingerprint == fingerprint,
            };
            if fresh {
                return Ok(c.issued.token.clone());
            }
        }
        match self.obtain().await {
            Ok(issued) => Ok(self.store(issued, fingerprint)),
            // A reconnect during an outage of the token endpoint: the
            // current token is still good for the broker.
            Err(e) => match self.current().as_ref() {
                Some(c) if c.issued.expires_at.is_none_or(|t| t > SystemTime::now()) => {
                    debug!("using the current broker token: a new one cannot be had ({e})");
                    Ok(c.issued.token.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Forgets the current token, so that the next connection gets a new
    /// one (after the broker refused it at login).
    pub fn forget(&self) {
        *self.current() = None;
    }

    /// The connections tokens are pushed to, those dropped since forgotten.
    fn connections(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Connection>>> {
        let mut list = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list
    }

    /// Pushes future tokens to `conn` (until it is dropped).
    pub fn attach(&self, conn: &Arc<Connection>) {
        self.connections().push(Arc::downgrade(conn));
    }

    /// Asks the refresh loop for a new token now (the broker refused an
    /// operation: the token may have expired). [`TokenKeeper::generation`]
    /// moves on once one is stored and pushed.
    pub fn request_renewal(&self) {
        self.inner.renew.notify_one();
    }

    /// How many tokens have been stored so far.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    async fn obtain(&self) -> Result<Issued, TokenError> {
        match &self.inner.source {
            Source::Entra(x) => x.fetch().await,
            Source::File(f) => f.read(),
        }
    }

    /// Makes `issued` the current token and returns it.
    fn store(&self, issued: Issued, fingerprint: Option<Fingerprint>) -> Secret {
        let now = SystemTime::now();
        let refresh_at = match issued.lifetime() {
            Some(lifetime) => {
                let age = now.duration_since(issued.issued_at).unwrap_or_default();
                Instant::now() + refresh_after(lifetime, random_unit()).saturating_sub(age)
            }
            None => Instant::now() + Duration::from_secs(86_400 * 365),
        };
        let expiry_ms = issued
            .expires_at
            .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        self.inner.slot.set_token_expiry_ms(expiry_ms);
        let token = issued.token.clone();
        *self.current() = Some(Current {
            issued,
            refresh_at,
            fingerprint,
        });
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        token
    }

    /// Pushes `token` to every open connection of the process.
    async fn push(&self, token: &Secret) {
        let connections: Vec<Arc<Connection>> = self
            .connections()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for conn in connections.iter().filter(|c| c.status().connected()) {
            let update =
                conn.update_secret(LongString::from(token.expose()), ShortString::from(REASON));
            match tokio::time::timeout(PUSH_TIMEOUT, update).await {
                Ok(Ok(())) => {
                    self.inner.slot.count_secret_update();
                    debug!("new broker token pushed to the connection (update-secret)");
                }
                Ok(Err(e)) => warn!("cannot push the new broker token to a connection: {e}"),
                Err(_) => warn!(
                    "cannot push the new broker token to a connection: no answer in {}s",
                    PUSH_TIMEOUT.as_secs()
                ),
            }
        }
    }

    /// How long the current token stays valid, for log lines.
    fn validity(&self) -> String {
        match self.current().as_ref().and_then(|c| c.issued.expires_at) {
            Some(e) => match e.duration_since(SystemTime::now()) {
                Ok(left) => format!("the current token is valid for {}s more", left.as_secs()),
                Err(_) => "the current token has expired".to_owned(),
            },
            None => "the current token has no known expiry".to_owned(),
        }
    }

    /// Keeps the token fresh for as long as the process runs: spawn it once
    /// on the process's runtime.
    pub async fn run(self) {
        match &self.inner.source {
            Source::Entra(_) => self.run_entra().await,
            Source::File(_) => self.run_file().await,
        }
    }

    async fn run_entra(self) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        loop {
            let due = retry_at
                .or_else(|| self.current().as_ref().map(|c| c.refresh_at))
                .unwrap_or_else(Instant::now);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.inner.renew.notified() => debug!("broker token renewal requested"),
            }
            let result = {
                let _one = self.inner.fetching.lock().await;
                self.obtain().await.map(|issued| self.store(issued, None))
            };
            match result {
                Ok(token) => {
                    if failures > 0 {
                        info!("broker token refreshed after {failures} failed attempt(s)");
                    }
                    failures = 0;
                    retry_at = None;
                    self.push(&token).await;
                }
                Err(e) => {
                    self.inner.slot.count_token_failure();
                    if failures == 0 {
                        warn!(
                            "cannot refresh the broker token, retrying with backoff ({}): {e}",
                            self.validity()
                        );
                    } else {
                        debug!("broker token refresh attempt {} failed: {e}", failures + 1);
                    }
                    retry_at = Some(Instant::now() + RETRY.delay(failures));
                    failures = failures.saturating_add(1);
                }
            }
        }
    }

    async fn run_file(self) {
        let Source::File(file) = &self.inner.source else {
            return;
        };
        let mut seen = self.current().as_ref().and_then(|c| c.fingerprint);
        let mut failing = false;
        let mut tick = tokio::time::interval(FILE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.renew.notified() => seen = None,
            }
            let now = file.fingerprint();
            if now.is_some() && now == seen {
                continue;
            }
            seen = now;
            let result = {
                let _one = self.inner.fetching.lock().await;
                file.read().map(|issued| {
                    let same = self
                        .current()
                        .as_ref()
                        .is_some_and(|c| c.issued.token == issued.token);
                    (same, self.store(issued, now))
                })
            };
            match result {
                Ok((same, token)) => {
                    if failing {
                        info!("{} holds a usable token again", file.path());
                    }
                    failing = false;
                    if !same {
                        self.push(&token).await;
                    }
                }
                Err(e) => {
                    self.inner.slot.count_token_failure();
                    if !failing {
                        warn!(
                            "keeping the current broker token ({}): {e}",
                            self.validity()
                        );
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::tests::token;
    use super::*;
    use crate::shm::SharedState;

    fn in_a_minute() -> String {
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        token(
            "RS256",
            &format!(r#"{{"exp":{exp},"n":"{}"}}"#, uuid::Uuid::new_v4()),
        )
    }

    #[tokio::test]
    async fn a_token_file_is_read_again_only_when_it_changed_and_a_bad_one_keeps_the_current() {
        let dir = std::env::temp_dir().join(format!("celeriac-keeper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let shm = SharedState::map(1).unwrap();
        let slot = &shm.task_slots()[0];
        let none = TokenKeeper::new(&BrokerAuth::Password, slot).unwrap();
        assert!(none.is_none());
        let keeper = TokenKeeper::new(&BrokerAuth::TokenFile(path.clone()), slot)
            .unwrap()
            .unwrap();
        assert!(matches!(
            keeper.password().await,
            Err(TokenError::ReadFile { .. })
        ));

        let first = in_a_minute();
        std::fs::write(&path, &first).unwrap();
        assert_eq!(keeper.password().await.unwrap().expose(), first);
        assert_eq!(keeper.generation(), 1);
        assert!(slot.token_expiry_ms() > crate::shm::now_ms());
        assert_eq!(keeper.password().await.unwrap().expose(), first);
        assert_eq!(
            keeper.generation(),
            1,
            "an unchanged file is not read again"
        );

        let second = in_a_minute();
        std::fs::write(dir.join("new"), &second).unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        assert_eq!(keeper.password().await.unwrap().expose(), second);

        // A half-written file: the current token, still valid, is used.
        std::fs::write(&path, "eyJhbGc").unwrap();
        assert_eq!(keeper.password().await.unwrap().expose(), second);
        keeper.forget();
        assert!(matches!(
            keeper.password().await,
            Err(TokenError::BadFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
