//! `--broker-auth` and its companions: the password in the broker URL, or
//! OAuth 2 access tokens (Entra ID through AKS Workload Identity, or a
//! token file) with a URL that carries no password.

use std::path::{Path, PathBuf};

use clap::ValueEnum;

use super::{ConfigError, Env};
use crate::broker::url_has_password;
use crate::token::{check_authority_host, BrokerAuth, WorkloadIdentity};

/// How the worker authenticates to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerAuthArg {
    /// The password in the broker URL.
    Password,
    /// Entra ID access tokens for the pod's AKS Workload Identity.
    AzureWorkloadIdentity,
    /// An OAuth 2 access token kept in a file by another component.
    Oauth2TokenFile,
}

/// The Workload Identity webhook's variables, in the order they are checked.
const AZURE_VARIABLES: [&str; 4] = [
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
];

/// Checks that `path` can be opened for reading now.
fn readable(name: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        ConfigError::new(
            name,
            format!("cannot read the token file {}: {e}", path.display()),
        )
    })
}

/// Validates the broker authentication against the broker URL (given as
/// `broker_name`, or the default when `None`).
pub(super) fn validate(
    kind: BrokerAuthArg,
    scope: Option<String>,
    token_file: Option<PathBuf>,
    broker: (&str, &str),
    env: &dyn Env,
) -> Result<BrokerAuth, ConfigError> {
    let (broker_name, broker_url) = broker;
    let scope = scope.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let auth = match kind {
        BrokerAuthArg::Password => {
            if scope.is_some() {
                return Err(ConfigError::new(
                    "--broker-oauth-scope",
                    "is used with --broker-auth azure-workload-identity only",
                ));
            }
            if token_file.is_some() {
                return Err(ConfigError::new(
                    "--broker-oauth-token-file",
                    "is used with --broker-auth oauth2-token-file only",
                ));
            }
            return Ok(BrokerAuth::Password);
        }
        BrokerAuthArg::AzureWorkloadIdentity => {
            if token_file.is_some() {
                return Err(ConfigError::new(
                    "--broker-oauth-token-file",
                    "is used with --broker-auth oauth2-token-file only (Workload Identity's token file is AZURE_FEDERATED_TOKEN_FILE)",
                ));
            }
            let scope = scope.ok_or_else(|| {
                ConfigError::new(
                    "--broker-oauth-scope",
                    "is required with --broker-auth azure-workload-identity (e.g. api://<rabbitmq app client id>/.default)",
                )
            })?;
            let mut values = Vec::new();
            for name in AZURE_VARIABLES {
                values.push(env.var(name).map(|v| v.trim().to_owned()).ok_or_else(|| {
                    ConfigError::new(
                        name,
                        "not set: the Azure Workload Identity webhook sets it in pods labelled azure.workload.identity/use: \"true\" whose service account names a client id",
                    )
                })?);
            }
            let [client_id, tenant_id, token_file, authority] =
                <[String; 4]>::try_from(values).expect("four variables");
            crate::token::check_tenant(&tenant_id)
                .map_err(|r| ConfigError::new("AZURE_TENANT_ID", r))?;
            let authority_host = check_authority_host(&authority)
                .map_err(|r| ConfigError::new("AZURE_AUTHORITY_HOST", r))?;
            let token_file = PathBuf::from(token_file);
            readable("AZURE_FEDERATED_TOKEN_FILE", &token_file)?;
            BrokerAuth::AzureWorkloadIdentity(WorkloadIdentity {
                client_id,
                tenant_id,
                token_file,
                authority_host,
                scope,
            })
        }
        BrokerAuthArg::Oauth2TokenFile => {
            if scope.is_some() {
                return Err(ConfigError::new(
                    "--broker-oauth-scope",
                    "is used with --broker-auth azure-workload-identity only",
                ));
            }
            let path = token_file
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "--broker-oauth-token-file",
                        "is required with --broker-auth oauth2-token-file",
                    )
                })?;
            readable("--broker-oauth-token-file", &path)?;
            BrokerAuth::TokenFile(path)
        }
    };
    if url_has_password(broker_url) {
        return Err(ConfigError::new(
            broker_name,
            format!(
                "carries a password, but with --broker-auth {} the password is the access token: give the URL without one (amqps://host:5671/vhost)",
                auth.name()
            ),
        ));
    }
    Ok(auth)
}
