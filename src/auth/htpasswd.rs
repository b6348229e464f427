//! `auth.htpasswd`: user names and bcrypt hashes, as Distribution accepts
//! them. The file is re-read when it changes ([`WatchedFile`]); successful
//! checks are remembered per credential (until the file changes) so
//! bcrypt's deliberate slowness is paid once, not on every blob request.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use super::watched::WatchedFile;
use crate::config::HtpasswdConfig;

pub struct Htpasswd {
    pub realm: String,
    file: WatchedFile<Entries>,
}

/// One version of the file.
struct Entries {
    /// user → bcrypt hash.
    hashes: HashMap<String, String>,
    /// sha256 of `user:password` pairs that verified against `hashes`: only
    /// valid credentials get in, so this is bounded by the users' passwords.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Htpasswd {
    /// Reads the file; an unreadable file is a startup error.
    pub fn load(config: &HtpasswdConfig) -> io::Result<Self> {
        Ok(Self {
            realm: config.realm.clone(),
            file: WatchedFile::load(&config.path, "htpasswd", parse_entries)?,
        })
    }

    /// Whether `password` is `user`'s.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let entries = self.file.current();
        let fingerprint: [u8; 32] = Sha256::digest(format!("{user}:{password}")).into();
        if entries.verified().contains(&fingerprint) {
            return true;
        }
        let Some(hash) = entries.hashes.get(user).cloned() else {
            return false;
        };
        let password = password.to_owned();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            entries.verified().insert(fingerprint);
        }
        ok
    }
}

impl Entries {
    fn verified(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().expect("htpasswd lock")
    }
}

fn parse_entries(text: &str) -> Result<Entries, String> {
    let mut hashes = HashMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let Some((user, hash)) = line.split_once(':') else {
            continue;
        };
        if !hash.starts_with("$2") {
            tracing::warn!(
                user,
                "htpasswd entry is not bcrypt (use htpasswd -B); ignored"
            );
            continue;
        }
        hashes.insert(user.to_owned(), hash.to_owned());
    }
    Ok(Entries {
        hashes,
        verified: Mutex::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_bcrypt_entries_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("right", 4).unwrap();
        std::fs::write(&path, format!("alice:{hash}\nbob:{{SHA}}plain\n")).unwrap();
        let htpasswd = Htpasswd::load(&HtpasswdConfig {
            realm: "r".into(),
            path: path.clone(),
        })
        .unwrap();
        assert!(htpasswd.verify("alice", "right").await);
        assert!(htpasswd.verify("alice", "right").await, "cached");
        assert!(!htpasswd.verify("alice", "wrong").await);
        assert!(!htpasswd.verify("bob", "plain").await, "non-bcrypt refused");
        assert!(!htpasswd.verify("", "").await);

        let new_hash = bcrypt::hash("changed", 4).unwrap();
        std::fs::write(&path, format!("alice:{new_hash}\n")).unwrap();
        htpasswd.file.recheck_now();
        assert!(
            !htpasswd.verify("alice", "right").await,
            "old password dropped"
        );
        assert!(htpasswd.verify("alice", "changed").await);
    }
}
