//! Client access control: `auth.htpasswd` (bcrypt entries, as Distribution
//! accepts). The file is re-read when it changes; successful checks are
//! remembered per credential so bcrypt's deliberate slowness is paid once,
//! not on every blob request.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderValue;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::config::HtpasswdConfig;

/// How often the file's modification time is looked at.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

pub struct Htpasswd {
    path: PathBuf,
    pub realm: String,
    state: Mutex<Loaded>,
}

struct Loaded {
    modified: Option<SystemTime>,
    checked_at: Instant,
    /// user → bcrypt hash.
    entries: HashMap<String, String>,
    /// sha256 of `user:password` pairs that verified against `entries`.
    verified: HashSet<[u8; 32]>,
}

impl Htpasswd {
    /// Reads the file; an unreadable file is a startup error.
    pub fn load(config: &HtpasswdConfig) -> io::Result<Self> {
        let (entries, modified) = read_entries(&config.path)?;
        Ok(Self {
            path: config.path.clone(),
            realm: config.realm.clone(),
            state: Mutex::new(Loaded {
                modified,
                checked_at: Instant::now(),
                entries,
                verified: HashSet::new(),
            }),
        })
    }

    /// Whether an `Authorization` header carries valid Basic credentials.
    pub async fn authorize(&self, header: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = header.and_then(basic_credentials) else {
            return false;
        };
        let fingerprint: [u8; 32] = Sha256::digest(format!("{user}:{password}")).into();
        let hash = {
            let mut state = self.state.lock().expect("htpasswd lock");
            self.reload_if_changed(&mut state);
            if state.verified.contains(&fingerprint) {
                return true;
            }
            match state.entries.get(&user) {
                Some(hash) => hash.clone(),
                None => return false,
            }
        };
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if ok {
            self.state
                .lock()
                .expect("htpasswd lock")
                .verified
                .insert(fingerprint);
        }
        ok
    }

    fn reload_if_changed(&self, state: &mut Loaded) {
        if state.checked_at.elapsed() < RECHECK_INTERVAL {
            return;
        }
        state.checked_at = Instant::now();
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == state.modified {
            return;
        }
        match read_entries(&self.path) {
            Ok((entries, modified)) => {
                tracing::info!(path = %self.path.display(), users = entries.len(), "htpasswd file reloaded");
                state.entries = entries;
                state.modified = modified;
                state.verified.clear();
            }
            // Keep the last good file rather than locking everyone out.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot reload htpasswd file")
            }
        }
    }
}

fn read_entries(path: &PathBuf) -> io::Result<(HashMap<String, String>, Option<SystemTime>)> {
    let text = std::fs::read_to_string(path)?;
    let modified = std::fs::metadata(path)?.modified().ok();
    let mut entries = HashMap::new();
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
        entries.insert(user.to_owned(), hash.to_owned());
    }
    Ok((entries, modified))
}

fn basic_credentials(header: &HeaderValue) -> Option<(String, String)> {
    let value = header.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (user, password) = pair.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

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
        assert!(htpasswd.authorize(Some(&header("alice", "right"))).await);
        assert!(
            htpasswd.authorize(Some(&header("alice", "right"))).await,
            "cached"
        );
        assert!(!htpasswd.authorize(Some(&header("alice", "wrong"))).await);
        assert!(
            !htpasswd.authorize(Some(&header("bob", "plain"))).await,
            "non-bcrypt refused"
        );
        assert!(!htpasswd.authorize(None).await);
        assert!(
            !htpasswd
                .authorize(Some(&HeaderValue::from_static("Bearer x")))
                .await
        );

        let new_hash = bcrypt::hash("changed", 4).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, format!("alice:{new_hash}\n")).unwrap();
        htpasswd.state.lock().unwrap().checked_at = Instant::now() - RECHECK_INTERVAL * 2;
        assert!(
            !htpasswd.authorize(Some(&header("alice", "right"))).await,
            "old password dropped"
        );
        assert!(htpasswd.authorize(Some(&header("alice", "changed"))).await);
    }
}
