//! A file Kura reads once and re-reads when it changes on disk (htpasswd,
//! access rules, groups, token signing keys): the operator edits it and
//! the next request sees the new content, without a restart.
//!
//! The file's modification time and size are looked at no more than once
//! per [`RECHECK_INTERVAL`], on the request path (one `stat`), so an idle
//! Kura does no work. A file that no longer parses (or vanished) keeps the
//! last good content: a typo must not lock everyone out, nor open anything.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often the file's modification time is looked at.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Turns a file's text into its content; the error says what is wrong.
pub type Parser<T> = fn(&str) -> Result<T, String>;

pub struct WatchedFile<T> {
    path: PathBuf,
    /// What the file is, for log lines (`htpasswd`, `access rules`).
    what: &'static str,
    parse: Parser<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// Modification time and size of the version `content` came from.
    version: Option<(SystemTime, u64)>,
    checked_at: Instant,
    content: Arc<T>,
}

impl<T> WatchedFile<T> {
    /// Reads and parses the file; any failure is a startup error.
    pub fn load(path: &Path, what: &'static str, parse: Parser<T>) -> io::Result<Self> {
        let (content, version) = read(path, parse)?;
        Ok(Self {
            path: path.to_owned(),
            what,
            parse,
            state: Mutex::new(State {
                version,
                checked_at: Instant::now(),
                content: Arc::new(content),
            }),
        })
    }

    /// The current content, re-read first if the file changed.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().expect("watched file lock");
        if state.checked_at.elapsed() >= RECHECK_INTERVAL {
            state.checked_at = Instant::now();
            self.reload_if_changed(&mut state);
        }
        Arc::clone(&state.content)
    }

    fn reload_if_changed(&self, state: &mut State<T>) {
        if version_of(&self.path) == state.version {
            return;
        }
        match read(&self.path, self.parse) {
            Ok((content, version)) => {
                tracing::info!(path = %self.path.display(), what = self.what, "file reloaded");
                state.content = Arc::new(content);
                state.version = version;
            }
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                what = self.what,
                error = %e,
                "cannot reload; keeping the last good version"
            ),
        }
    }

    /// Makes the next [`Self::current`] look at the file (tests).
    #[cfg(test)]
    pub fn recheck_now(&self) {
        self.state.lock().expect("watched file lock").checked_at =
            Instant::now() - RECHECK_INTERVAL * 2;
    }
}

/// A file's modification time and size: a change of either is a new
/// version.
pub fn version_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read<T>(path: &Path, parse: Parser<T>) -> io::Result<(T, Option<(SystemTime, u64)>)> {
    // The version is taken before reading: a write racing the read is seen
    // as a change at the next check, never missed.
    let version = version_of(path);
    let text = std::fs::read_to_string(path)?;
    let content =
        parse(&text).map_err(|reason| io::Error::new(io::ErrorKind::InvalidData, reason))?;
    Ok((content, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Result<usize, String> {
        match text.contains("broken") {
            true => Err("broken".into()),
            false => Ok(text.lines().count()),
        }
    }

    #[test]
    fn reloads_on_change_and_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a\n").unwrap();
        let file = WatchedFile::load(&path, "test", lines).unwrap();
        assert_eq!(*file.current(), 1);
        std::fs::write(&path, "a\nb\n").unwrap();
        assert_eq!(
            *file.current(),
            1,
            "not looked at again within the interval"
        );
        file.recheck_now();
        assert_eq!(*file.current(), 2);
        std::fs::write(&path, "a\nb\nbroken\n").unwrap();
        file.recheck_now();
        assert_eq!(*file.current(), 2, "a broken file keeps the last good one");
        std::fs::remove_file(&path).unwrap();
        file.recheck_now();
        assert_eq!(*file.current(), 2, "so does a missing one");
        assert!(WatchedFile::load(&path, "test", lines).is_err());
    }
}
