//! `auth.htpasswd`: user names and bcrypt hashes, as Distribution accepts
//! them. The file is re-read when it changes ([`WatchedFile`]); successful
//! checks are remembered per credential (until the file changes) so
//! bcrypt's deliberate slowness is paid once, not on every blob request.
//!
//! Wrong passwords are bounded too, since a client with a stale password
//! retries in a loop and a flood of them must not occupy the blocking pool
//! that downloads write and hash on: at most [`CONCURRENT_CHECKS`] bcrypt
//! checks run at once (the rest wait on the async side, each holding only
//! its connection), and refused credentials (up to [`MAX_REFUSED`], the
//! set emptied when full) are refused again without bcrypt.
//!
//! A user the file does not name costs the same bcrypt check as a wrong
//! password (against another user's hash), so the time of a refusal does
//! not tell which user names exist.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::watched::WatchedFile;
use crate::config::HtpasswdConfig;

/// bcrypt checks running at once (each is a blocking thread at full CPU
/// for tens of milliseconds).
pub const CONCURRENT_CHECKS: usize = 2;
/// Refused credentials remembered per file version (their sha256 only).
pub const MAX_REFUSED: usize = 1024;

pub struct Htpasswd {
    pub realm: String,
    file: WatchedFile<Entries>,
    /// Held by each check until its blocking task ends, even if the
    /// request that started it is gone.
    checks: Arc<Semaphore>,
}

/// One version of the file.
struct Entries {
    /// user → bcrypt hash.
    hashes: HashMap<String, String>,
    /// The hash of the highest bcrypt cost, which unknown users are
    /// checked against (never accepted): their refusal takes as long as
    /// the slowest known user's.
    slowest: Option<String>,
    /// sha256 of `user:password` pairs that verified against `hashes`: only
    /// valid credentials get in, so this is bounded by the users' passwords.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// sha256 of `user:password` pairs refused by bcrypt, at most
    /// [`MAX_REFUSED`] (emptied when full).
    refused: Mutex<HashSet<[u8; 32]>>,
}

impl Htpasswd {
    /// Reads the file; an unreadable file is a startup error.
    pub fn load(config: &HtpasswdConfig) -> io::Result<Self> {
        Ok(Self {
            realm: config.realm.clone(),
            file: WatchedFile::load(&config.path, "htpasswd", parse_entries)?,
            checks: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        })
    }

    /// Whether `password` is `user`'s.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let entries = self.file.current();
        let fingerprint: [u8; 32] = Sha256::digest(format!("{user}:{password}")).into();
        if entries.verified().contains(&fingerprint) {
            return true;
        }
        if entries.refused().contains(&fingerprint) {
            return false;
        }
        let known = entries.hashes.contains_key(user);
        // An unknown user is checked against the slowest hash (at least
        // any user's cost) and refused whatever the outcome.
        let Some(hash) = entries
            .hashes
            .get(user)
            .or(entries.slowest.as_ref())
            .cloned()
        else {
            return false;
        };
        let Ok(check) = Arc::clone(&self.checks).acquire_owned().await else {
            return false;
        };
        // Parallel requests with one credential (a client pulling layers
        // at once) queue here: the first check settles the others.
        if entries.verified().contains(&fingerprint) {
            return true;
        }
        if entries.refused().contains(&fingerprint) {
            return false;
        }
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || {
            let _check = check;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = known && matches;
        if ok {
            entries.verified().insert(fingerprint);
        } else {
            let mut refused = entries.refused();
            if refused.len() >= MAX_REFUSED {
                refused.clear();
            }
            refused.insert(fingerprint);
        }
        ok
    }
}

impl Entries {
    fn verified(&self) -> MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().expect("htpasswd lock")
    }

    fn refused(&self) -> MutexGuard<'_, HashSet<[u8; 32]>> {
        self.refused.lock().expect("htpasswd lock")
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
    let slowest = hashes
        .values()
        .max_by_key(|hash| bcrypt_cost(hash))
        .cloned();
    Ok(Entries {
        hashes,
        slowest,
        verified: Mutex::default(),
        refused: Mutex::default(),
    })
}

/// The cost of a bcrypt hash (`$2y$<cost>$...`); 0 if unreadable.
fn bcrypt_cost(hash: &str) -> u32 {
    hash.split('$')
        .nth(2)
        .and_then(|cost| cost.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tempfile::TempDir;

    use super::*;

    /// An htpasswd file with alice's bcrypt entry, then `more` lines.
    fn alice_with_password(password: &str, more: &str) -> (Htpasswd, PathBuf, TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash(password, 4).unwrap();
        std::fs::write(&path, format!("alice:{hash}\n{more}")).unwrap();
        let htpasswd = Htpasswd::load(&HtpasswdConfig {
            realm: "r".into(),
            path: path.clone(),
        })
        .unwrap();
        (htpasswd, path, dir)
    }

    #[tokio::test]
    async fn checks_bcrypt_entries_and_reloads_on_change() {
        let (htpasswd, path, _dir) = alice_with_password("right", "bob:{SHA}plain\n");
        assert!(htpasswd.verify("alice", "right").await);
        assert!(htpasswd.verify("alice", "right").await, "cached");
        assert!(!htpasswd.verify("alice", "wrong").await);
        assert!(!htpasswd.verify("bob", "plain").await, "non-bcrypt refused");
        assert!(!htpasswd.verify("", "").await);
        assert!(
            !htpasswd.verify("mallory", "right").await,
            "an unknown user got in with another user's password"
        );
        assert_eq!(bcrypt_cost(&bcrypt::hash("x", 5).unwrap()), 5);
        let fingerprint: [u8; 32] = Sha256::digest("mallory:right").into();
        assert!(
            htpasswd.file.current().refused().contains(&fingerprint),
            "an unknown user was not checked like a wrong password"
        );

        let new_hash = bcrypt::hash("changed", 4).unwrap();
        std::fs::write(&path, format!("alice:{new_hash}\n")).unwrap();
        htpasswd.file.recheck_now();
        assert!(
            !htpasswd.verify("alice", "right").await,
            "old password dropped"
        );
        assert!(htpasswd.verify("alice", "changed").await);
    }

    #[tokio::test]
    async fn wrong_passwords_are_remembered_within_a_bound() {
        let (htpasswd, _path, _dir) = alice_with_password("right", "");
        assert!(!htpasswd.verify("alice", "stale").await);
        assert!(htpasswd.file.current().refused().len() == 1);
        // A flood of distinct wrong passwords, checked at most
        // CONCURRENT_CHECKS at a time, leaves the memory at its bound.
        let attempts = (0..MAX_REFUSED + 10).map(|i| {
            let htpasswd = &htpasswd;
            async move { htpasswd.verify("alice", &format!("wrong-{i}")).await }
        });
        let answers = futures_util::future::join_all(attempts).await;
        assert!(answers.iter().all(|ok| !ok));
        assert!(htpasswd.file.current().refused().len() <= MAX_REFUSED);
        assert_eq!(htpasswd.checks.available_permits(), CONCURRENT_CHECKS);
        assert!(htpasswd.verify("alice", "right").await);
    }
}
