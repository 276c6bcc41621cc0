//! Opening a broker connection with the process's token as the password.

use std::sync::Arc;

use lapin::Connection;
use thiserror::Error;
use tracing::debug;

use super::{TokenError, TokenKeeper};
use crate::broker::{connect_with_password, BrokerError};

/// Why a connection could not be opened.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// No token could be obtained.
    #[error("cannot obtain a broker token: {0}")]
    Token(#[from] TokenError),
    /// The broker could not be reached, or refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl ConnectError {
    /// Whether trying again later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Token(e) => e.is_transient(),
            Self::Broker(BrokerError::Connect { source, .. }) => {
                matches!(source.kind(), lapin::ErrorKind::IOError(_))
            }
            Self::Broker(_) => false,
        }
    }
}

/// Whether the broker refused the login (403 ACCESS_REFUSED).
fn login_refused(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Connect { source, .. } if source.to_string().contains("ACCESS_REFUSED"))
}

/// Opens a connection named `name` to `url`: with the password in the URL
/// without `tokens`, else with a fresh token as the password, and the
/// connection attached to the keeper so that later tokens reach it. A login
/// refused with a cached token is tried once more with a new one.
pub async fn connect(
    url: &str,
    name: &str,
    tokens: Option<&TokenKeeper>,
) -> Result<Arc<Connection>, ConnectError> {
    let Some(tokens) = tokens else {
        return Ok(Arc::new(connect_with_password(url, name, None).await?));
    };
    let mut retried = false;
    loop {
        let generation = tokens.generation();
        let token = tokens.password().await?;
        let just_obtained = tokens.generation() != generation;
        match connect_with_password(url, name, Some(token.expose())).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                tokens.attach(&conn);
                return Ok(conn);
            }
            Err(e) if login_refused(&e) && !just_obtained && !retried => {
                debug!("the broker refused the cached token; trying a new one: {e}");
                tokens.forget();
                retried = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
