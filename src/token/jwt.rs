//! Just enough of a JWT to decide whether a token may be pushed to the
//! broker: three base64url parts, a header naming a signing algorithm, a
//! signature, and the `exp`/`iat` claims for the refresh schedule. The
//! signature is not checked here — the broker does that — but a token the
//! broker would find malformed or unsigned closes the whole connection
//! (530 NOT_ALLOWED), so such a token is never sent.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;
use thiserror::Error;

/// Why a text is not a usable JWT. Messages never quote the token.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum JwtError {
    /// Not three dot-separated, non-empty parts.
    #[error("not a JWT (three dot-separated base64url parts)")]
    Shape,
    /// The header is not base64url JSON naming an algorithm.
    #[error("its header is not a JSON object with an `alg`")]
    Header,
    /// The payload is not a base64url JSON object.
    #[error("its payload is not a JSON object")]
    Payload,
    /// `alg: none`.
    #[error("it is unsigned (`alg: none`)")]
    Unsigned,
}

/// The claims the schedule needs, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claims {
    /// `exp`: when the token expires.
    pub exp: Option<i64>,
    /// `iat`: when it was issued.
    pub iat: Option<i64>,
}

fn part(text: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Checks `token`'s shape and reads its `exp` and `iat`.
pub fn inspect(token: &str) -> Result<Claims, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(JwtError::Shape);
    }
    let header = part(parts[0]).ok_or(JwtError::Header)?;
    match header.get("alg").and_then(Value::as_str) {
        Some(alg) if alg.eq_ignore_ascii_case("none") => return Err(JwtError::Unsigned),
        Some(_) => {}
        None => return Err(JwtError::Header),
    }
    let payload = part(parts[1]).ok_or(JwtError::Payload)?;
    let seconds = |name: &str| payload.get(name).and_then(Value::as_f64).map(|v| v as i64);
    Ok(Claims {
        exp: seconds("exp"),
        iat: seconds("iat"),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unsigned-looking but well-shaped token with these claims.
    pub(crate) fn token(alg: &str, claims: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn reads_exp_and_iat() {
        let t = token(
            "RS256",
            r#"{"aud":"rabbitmq","exp":1700000020,"iat":1700000000}"#,
        );
        assert_eq!(
            inspect(&t),
            Ok(Claims {
                exp: Some(1_700_000_020),
                iat: Some(1_700_000_000)
            })
        );
        let t = token("ES256", r#"{"aud":"rabbitmq"}"#);
        assert_eq!(inspect(&t), Ok(Claims::default()));
    }

    #[test]
    fn refuses_what_the_broker_would_close_the_connection_for() {
        assert_eq!(inspect(""), Err(JwtError::Shape));
        assert_eq!(inspect("not-a-token"), Err(JwtError::Shape));
        assert_eq!(inspect("a.b."), Err(JwtError::Shape));
        assert_eq!(inspect("!!.e30.c2ln"), Err(JwtError::Header));
        assert_eq!(inspect("e30.e30.c2ln"), Err(JwtError::Header)); // {} has no alg
        let t = token("none", r#"{"exp":1}"#);
        assert_eq!(inspect(&t), Err(JwtError::Unsigned));
        let t = token("RS256", "[1]");
        assert_eq!(inspect(&t), Err(JwtError::Payload));
        // Entra's error JSON is not a token.
        assert_eq!(
            inspect(r#"{"error":"invalid_client"}"#),
            Err(JwtError::Shape)
        );
    }

    #[test]
    fn errors_never_quote_the_token() {
        let t = "secretpart.alsosecret";
        assert!(!inspect(t).unwrap_err().to_string().contains("secret"));
    }
}
