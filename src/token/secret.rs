//! A credential that never prints: access tokens and client assertions are
//! held in [`Secret`], whose `Debug` shows no content and which has no
//! `Display`, so a log line, error or metric cannot carry one by accident.

use std::fmt;

/// An access token or client assertion. Read it only where it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: String) -> Self {
        Self(text)
    }

    /// The text, for the one place that sends it (the AMQP password,
    /// `update-secret`, the token request's `client_assertion`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_content() {
        let s = Secret::new("eyJhbGciOi.secret.sig".into());
        let shown = format!("{s:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "Secret(21 bytes)");
        assert_eq!(s.expose(), "eyJhbGciOi.secret.sig");
    }
}
