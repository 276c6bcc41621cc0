//! Microsoft Entra ID's client-credentials grant with a federated client
//! assertion, as AKS Workload Identity sets it up: the projected service
//! account token in `AZURE_FEDERATED_TOKEN_FILE` (re-read for every
//! request, since kubelet rotates it) is exchanged at
//! `{AZURE_AUTHORITY_HOST}{AZURE_TENANT_ID}/oauth2/v2.0/token` for an access
//! token to the broker's app (`--broker-oauth-scope`).
//!
//! The HTTP client is reqwest on the process's own current-thread runtime,
//! with rustls on *ring* and the system's trust store (the same as lapin's
//! `amqps://`, so `SSL_CERT_FILE` serves both), HTTPS only except to a
//! loopback host, no redirects (the assertion goes to the token endpoint
//! and nowhere else), and the usual `HTTPS_PROXY`/`NO_PROXY` variables.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{epoch_seconds, jwt, Issued, Secret, TokenError};

/// How long one token request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long connecting to the token endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the Workload Identity webhook puts in the pod's environment, and
/// the scope asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// `AZURE_CLIENT_ID`: the identity's application (client) id.
    pub client_id: String,
    /// `AZURE_TENANT_ID`.
    pub tenant_id: String,
    /// `AZURE_FEDERATED_TOKEN_FILE`: the projected service account token.
    pub token_file: PathBuf,
    /// `AZURE_AUTHORITY_HOST`, checked by [`check_authority_host`] (ends with `/`).
    pub authority_host: String,
    /// `--broker-oauth-scope`, e.g. `api://<rabbitmq app client id>/.default`.
    pub scope: String,
}

impl WorkloadIdentity {
    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!(
            "{}{}/oauth2/v2.0/token",
            self.authority_host, self.tenant_id
        )
    }
}

/// Checks `AZURE_AUTHORITY_HOST`: an `https://` URL, or `http://` to a
/// loopback host (a local stand-in for Entra). Returns it ending with `/`.
pub fn check_authority_host(text: &str) -> Result<String, String> {
    let url =
        reqwest::Url::parse(text.trim()).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let Some(host) = url.host_str() else {
        return Err(format!("{text:?} names no host"));
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "{text:?} is not https:// (plain http is allowed to a loopback host only)"
            ))
        }
        other => return Err(format!("{text:?}: the scheme must be https, not {other}")),
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{text:?} must be a plain base URL"));
    }
    let mut base = url.to_string();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// Checks `AZURE_TENANT_ID`: a GUID or a domain name, which goes into the
/// token endpoint's path.
pub fn check_tenant(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        Ok(())
    } else {
        Err(format!("{text:?} is not a tenant id or domain"))
    }
}

/// `application/x-www-form-urlencoded` for `pairs`.
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The TLS setup: rustls on *ring* (lapin's provider) with the system's
/// trust store (needed only for `https`: reqwest wants a TLS setup anyway).
fn tls_config(https: bool) -> Result<rustls::ClientConfig, TokenError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 && https {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(TokenError::Client(format!(
            "no trusted root certificates: {why}"
        )));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| TokenError::Client(e.to_string()))
}

/// Exchanges the federated token for access tokens.
pub(super) struct Exchange {
    identity: WorkloadIdentity,
    url: String,
    client: reqwest::Client,
}

impl Exchange {
    /// Makes the HTTP client (in the process that will use it: after the fork).
    pub(super) fn new(identity: WorkloadIdentity) -> Result<Self, TokenError> {
        let https = identity.authority_host.starts_with("https://");
        // Always given a rustls setup: reqwest has no crypto provider of its own here.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("celeriac/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured(tls_config(https)?)
            .https_only(https)
            .build()
            .map_err(|e| TokenError::Client(chain(&e)))?;
        Ok(Self {
            url: identity.token_url(),
            identity,
            client,
        })
    }

    /// Where tokens come from, for log lines.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// Reads the federated token and exchanges it for an access token.
    pub(super) async fn fetch(&self) -> Result<Issued, TokenError> {
        let path = &self.identity.token_file;
        let assertion = std::fs::read_to_string(path).map_err(|source| TokenError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
        let assertion = Secret::new(assertion.trim().to_owned());
        if assertion.expose().is_empty() {
            return Err(TokenError::BadFile {
                path: path.display().to_string(),
                reason: "it is empty".into(),
            });
        }
        let body = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &self.identity.client_id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.expose()),
            ("scope", &self.identity.scope),
        ]);
        let requested_at = SystemTime::now();
        let unreachable = |e: reqwest::Error| TokenError::Unreachable {
            url: self.url.clone(),
            reason: chain(&e),
        };
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        parse_response(&self.url, status, &bytes, requested_at)
    }
}

/// A reqwest error with its causes (`error sending request: ... : Connection refused`).
/// reqwest's messages name the URL at most, never the request body.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The first line of Entra's `error_description`, without its trace and
/// correlation ids.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    let line = line.split(" Trace ID:").next().unwrap_or(line).trim();
    let mut out: String = line.chars().take(300).collect();
    if out.is_empty() {
        out.push_str("(no description)");
    }
    out
}

/// Turns the token endpoint's answer into a token, or its error.
fn parse_response(
    url: &str,
    status: u16,
    body: &[u8],
    requested_at: SystemTime,
) -> Result<Issued, TokenError> {
    let bad = |reason: &str| TokenError::BadResponse {
        url: url.to_owned(),
        status,
        reason: reason.to_owned(),
    };
    let json: Option<serde_json::Map<String, Value>> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    };
    let Some(json) = json else {
        return Err(bad(if (200..300).contains(&status) {
            "the body is not a JSON object"
        } else {
            "an HTTP error without an OAuth 2 error body"
        }));
    };
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        return Err(TokenError::Refused {
            url: url.to_owned(),
            status,
            error: error.chars().take(100).collect(),
            description: first_line(
                json.get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
        });
    }
    if !(200..300).contains(&status) {
        return Err(bad("an HTTP error without an OAuth 2 `error`"));
    }
    let token = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no `access_token`"))?;
    if let Some(kind) = json.get("token_type").and_then(Value::as_str) {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(bad("`token_type` is not Bearer"));
        }
    }
    let claims = jwt::inspect(token).map_err(|e| bad(&format!("the access token is {e}")))?;
    // `expires_in` is a number, or a string of one in older endpoints.
    let expires_in = match json.get("expires_in") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s > 0.0)
    .map(|s| requested_at + Duration::from_secs_f64(s));
    let exp = claims.exp.map(epoch_seconds);
    let expires_at = match (expires_in, exp) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if expires_at.is_none() {
        return Err(bad("neither `expires_in` nor an `exp` claim"));
    }
    Ok(Issued {
        token: Secret::new(token.to_owned()),
        issued_at: requested_at,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::super::jwt::tests::token;
    use super::*;

    #[test]
    fn the_authority_host_is_https_unless_loopback() {
        assert_eq!(
            check_authority_host("https://login.microsoftonline.com/"),
            Ok("https://login.microsoftonline.com/".into())
        );
        assert_eq!(
            check_authority_host("https://login.microsoftonline.us"),
            Ok("https://login.microsoftonline.us/".into())
        );
        for local in [
            "http://127.0.0.1:8080/",
            "http://localhost:1/",
            "http://[::1]:9/",
        ] {
            assert!(check_authority_host(local).is_ok(), "{local}");
        }
        let err = check_authority_host("http://login.example.com/").unwrap_err();
        assert!(err.contains("not https://"), "{err}");
        assert!(check_authority_host("ftp://127.0.0.1/").is_err());
        assert!(check_authority_host("login.microsoftonline.com").is_err());
        assert!(check_authority_host("https://u:p@login.example.com/").is_err());
    }

    #[test]
    fn the_token_url_is_the_v2_endpoint_of_the_tenant() {
        let id = WorkloadIdentity {
            client_id: "c".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            token_file: "/var/run/secrets/azure/tokens/azure-identity-token".into(),
            authority_host: "https://login.microsoftonline.com/".into(),
            scope: "api://x/.default".into(),
        };
        assert_eq!(
            id.token_url(),
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"
        );
        assert!(check_tenant("72f988bf-86f1-41af-91ab-2d7cd011db47").is_ok());
        assert!(check_tenant("contoso.onmicrosoft.com").is_ok());
        assert!(check_tenant("a/b").is_err());
        assert!(check_tenant("").is_err());
    }

    #[test]
    fn the_form_is_url_encoded() {
        assert_eq!(
            form(&[
                ("scope", "api://a b/.default"),
                ("t", "urn:ietf:params:oauth"),
                ("x", "a+b=c&d~"),
            ]),
            "scope=api%3A%2F%2Fa+b%2F.default&t=urn%3Aietf%3Aparams%3Aoauth&x=a%2Bb%3Dc%26d%7E"
        );
    }

    #[test]
    fn a_token_response_gives_the_token_and_its_expiry() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t = token("RS256", r#"{"exp":1700003000}"#);
        let body = format!(
            r#"{{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"{t}"}}"#
        );
        let issued = parse_response("u", 200, body.as_bytes(), at).unwrap();
        assert_eq!(issued.token.expose(), t);
        assert_eq!(issued.lifetime(), Some(Duration::from_secs(3000)));
        // expires_in as a string; no exp claim
        let t = token("RS256", "{}");
        let body = format!(r#"{{"token_type":"Bearer","expires_in":"20","access_token":"{t}"}}"#);
        let issued = parse_response("u", 200, body.as_bytes(), at).unwrap();
        assert_eq!(issued.lifetime(), Some(Duration::from_secs(20)));
    }

    #[test]
    fn entra_errors_are_reported_with_error_and_description() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS700024: Client assertion is not within its valid time range. Current time: 2026-01-01T00:00:00Z. Trace ID: 0000 Correlation ID: 1111 Timestamp: 2026","error_codes":[700024]}"#;
        let err = parse_response(
            "https://h/t/oauth2/v2.0/token",
            401,
            body,
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the token endpoint https://h/t/oauth2/v2.0/token refused the request (HTTP 401): invalid_client: AADSTS700024: Client assertion is not within its valid time range. Current time: 2026-01-01T00:00:00Z."
        );
        assert!(!err.is_transient());
        let err = parse_response("u", 503, b"<html>busy</html>", SystemTime::now()).unwrap_err();
        assert!(err.is_transient(), "{err}");
        let err = parse_response(
            "u",
            429,
            br#"{"error":"temporarily_unavailable"}"#,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[test]
    fn only_a_real_token_is_accepted() {
        let now = SystemTime::now();
        for body in [
            r#"{"token_type":"Bearer","expires_in":60}"#.to_owned(),
            r#"{"token_type":"Bearer","expires_in":60,"access_token":""}"#.to_owned(),
            r#"{"token_type":"Bearer","expires_in":60,"access_token":"opaque"}"#.to_owned(),
            format!(
                r#"{{"token_type":"pop","expires_in":60,"access_token":"{}"}}"#,
                token("RS256", "{}")
            ),
            format!(
                r#"{{"token_type":"Bearer","access_token":"{}"}}"#,
                token("RS256", "{}")
            ),
            format!(
                r#"{{"expires_in":60,"access_token":"{}"}}"#,
                token("none", "{}")
            ),
        ] {
            let err = parse_response("u", 200, body.as_bytes(), now).unwrap_err();
            assert!(
                matches!(err, TokenError::BadResponse { .. }),
                "{body}: {err}"
            );
            assert!(!err.to_string().contains("opaque"), "{err}");
        }
    }
}
