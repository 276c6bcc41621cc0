//! `--broker-auth oauth2-token-file`: the access token is whatever another
//! component (a sidecar, a CSI driver, a Kubernetes secret) keeps in a file.
//! The file is watched by its identity (device, inode, size, modification
//! time; followed through symlinks, so Kubernetes' atomic `..data` swaps are
//! seen) and read again when that changes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

use super::{epoch_seconds, jwt, Issued, Secret, TokenError};

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i64,
}

/// The token file.
pub(super) struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// Watches `path`.
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The file, for log lines.
    pub(super) fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// The version of the file now (`None`: it cannot be looked at).
    pub(super) fn fingerprint(&self) -> Option<Fingerprint> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
        })
    }

    /// Reads the token: a JWT, not expired.
    pub(super) fn read(&self) -> Result<Issued, TokenError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| TokenError::ReadFile {
            path: self.path(),
            source,
        })?;
        let token = text.trim();
        let bad = |reason: String| TokenError::BadFile {
            path: self.path(),
            reason,
        };
        if token.is_empty() {
            return Err(bad("it is empty".into()));
        }
        let claims = jwt::inspect(token).map_err(|e| bad(e.to_string()))?;
        let now = SystemTime::now();
        let expires_at = claims.exp.map(epoch_seconds);
        if let Some(ago) = expires_at.and_then(|e| now.duration_since(e).ok()) {
            return Err(bad(format!("its token expired {}s ago", ago.as_secs())));
        }
        Ok(Issued {
            token: Secret::new(token.to_owned()),
            issued_at: claims.iat.map_or(now, epoch_seconds).min(now),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::tests::token;
    use super::*;

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_changed_file_is_seen_and_read() {
        let dir = std::env::temp_dir().join(format!("celeriac-tokenfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let file = TokenFile::new(path.clone());
        assert!(file.fingerprint().is_none());
        let err = file.read().unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read the token file {}: ", path.display())),
            "{err}"
        );

        let first = token(
            "RS256",
            &format!(r#"{{"iat":{},"exp":{}}}"#, now() - 5, now() + 15),
        );
        std::fs::write(&path, format!("{first}\n")).unwrap();
        let seen = file.fingerprint().unwrap();
        let issued = file.read().unwrap();
        assert_eq!(issued.token.expose(), first);
        assert_eq!(issued.lifetime().map(|d| d.as_secs()), Some(20));

        // Replaced the way Kubernetes does it: a new file renamed over the old.
        let second = token("RS256", &format!(r#"{{"exp":{}}}"#, now() + 60));
        std::fs::write(dir.join("new"), &second).unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        assert_ne!(file.fingerprint().unwrap(), seen);
        assert_eq!(file.read().unwrap().token.expose(), second);

        std::fs::write(&path, "").unwrap();
        assert!(file
            .read()
            .unwrap_err()
            .to_string()
            .ends_with("holds no usable token: it is empty"));
        std::fs::write(&path, "opaque-secret").unwrap();
        let err = file.read().unwrap_err().to_string();
        assert!(
            err.contains("not a JWT") && !err.contains("opaque"),
            "{err}"
        );
        std::fs::write(
            &path,
            token("RS256", &format!(r#"{{"exp":{}}}"#, now() - 30)),
        )
        .unwrap();
        let err = file.read().unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
