//! Broker credentials that expire: OAuth 2 access tokens used as the AMQP
//! password (RabbitMQ's `rabbitmq_auth_backend_oauth2`), obtained from
//! Microsoft Entra ID with an AKS Workload Identity (`entra.rs`) or read
//! from a file another component keeps current (`file.rs`), and kept fresh
//! on open connections with AMQP `update-secret` (`keeper.rs`, on the
//! schedule of `schedule.rs`).
//!
//! Each task process and the control process has its own [`TokenKeeper`],
//! made after the fork on the process's current-thread runtime: the
//! supervisor never holds a token, a runtime or an HTTP client. Tokens are
//! held in [`Secret`] and never reach a log line, error, metric, state file
//! or `inspect conf`; `jwt.rs` refuses anything the broker would find
//! malformed before it is sent.

mod connect;
mod entra;
mod file;
mod jwt;
mod keeper;
mod schedule;
mod secret;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use thiserror::Error;

pub use connect::{connect, ConnectError};
pub use entra::{check_authority_host, check_tenant, WorkloadIdentity};
pub use jwt::{inspect as inspect_jwt, Claims, JwtError};
pub use keeper::TokenKeeper;
pub use schedule::{refresh_after, RETRY};
pub use secret::Secret;

/// How the worker authenticates to the broker (`--broker-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAuth {
    /// The password in the broker URL.
    Password,
    /// Entra ID access tokens for an AKS Workload Identity
    /// (`azure-workload-identity`).
    AzureWorkloadIdentity(WorkloadIdentity),
    /// An access token read from this file, pushed again when the file
    /// changes (`oauth2-token-file`).
    TokenFile(PathBuf),
}

impl BrokerAuth {
    /// The `--broker-auth` value naming this kind.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::AzureWorkloadIdentity(_) => "azure-workload-identity",
            Self::TokenFile(_) => "oauth2-token-file",
        }
    }
}

/// Why no token could be obtained. Messages name the cause and never carry
/// a token or an assertion.
#[derive(Debug, Error)]
pub enum TokenError {
    /// A token file (the federated token, or `--broker-oauth-token-file`)
    /// cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A token file holds no usable token.
    #[error("the token file {path} holds no usable token: {reason}")]
    BadFile {
        /// The file.
        path: String,
        /// Why (empty, not a JWT, expired).
        reason: String,
    },
    /// The token endpoint could not be reached or did not answer in time.
    #[error("cannot reach the token endpoint {url}: {reason}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The token endpoint answered with an OAuth 2 error (Entra's `error`
    /// and `error_description`).
    #[error(
        "the token endpoint {url} refused the request (HTTP {status}): {error}: {description}"
    )]
    Refused {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// OAuth's `error` (`invalid_client`, `invalid_scope`, ...).
        error: String,
        /// Entra's `error_description`, first line only.
        description: String,
    },
    /// The token endpoint answered something that is not a token.
    #[error("the token endpoint {url} sent no usable token (HTTP {status}): {reason}")]
    BadResponse {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be made (no TLS roots).
    #[error("cannot set up the HTTPS client for the token endpoint: {0}")]
    Client(String),
}

impl TokenError {
    /// Whether asking again later may work (the endpoint is unreachable or
    /// overloaded), as opposed to a refusal that the same request will get
    /// again (rejected assertion, wrong scope, missing file).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } | Self::BadResponse { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            Self::ReadFile { .. } | Self::BadFile { .. } | Self::Client(_) => false,
        }
    }
}

/// A token as issued, with when it stops being valid.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The access token (the AMQP password).
    pub token: Secret,
    /// When it was issued (the request time, or its `iat`).
    pub issued_at: SystemTime,
    /// When it expires (`expires_in`, or its `exp` if sooner); `None` when
    /// a token file's token says nothing.
    pub expires_at: Option<SystemTime>,
}

impl Issued {
    /// How long it is valid for from issue (`None`: unknown).
    pub fn lifetime(&self) -> Option<Duration> {
        self.expires_at
            .map(|e| e.duration_since(self.issued_at).unwrap_or_default())
    }
}

/// Seconds since the Unix epoch as a time (negative values clamp to it).
fn epoch_seconds(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}
