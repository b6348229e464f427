//! Staging on a cache directory that several processes share: each
//! process (server or tool run) stages in a directory of its own and holds
//! an advisory lock (`flock`) on it for as long as it uses the storage.
//!
//! ```text
//! staging/<pid>-<start ms>-<random>/owner.lock   locked by the owner while it lives
//! staging/<pid>-<start ms>-<random>/<uuid>       a download or small write in progress
//! ```
//!
//! The kernel releases the lock however the owner ends (exit, crash,
//! SIGKILL), so a directory whose lock can be taken has no owner left: its
//! files can never be committed, and any process may remove it. No process
//! ever removes a directory whose lock it cannot take. Sweeps run at once
//! in several processes, so every entry may vanish under one: "not found"
//! is never an error here.
//!
//! Claiming cannot take the lock at the instant the directory appears, so
//! a sweep may see a new directory before its owner locked it: without a
//! lock file it is removed only if empty (`rmdir`), and a claim that finds
//! its directory or lock file gone afterwards starts over under a new name.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The file in each staging directory its owner keeps locked.
pub const LOCK_FILE: &str = "owner.lock";

/// How often a claim starts over after losing its new directory to a
/// concurrent sweep; each loss needs a sweep to run in the microseconds
/// between creating the directory and locking it, so a few are plenty.
const CLAIM_ATTEMPTS: usize = 8;

/// Files directly in `staging/` come from Kura versions before per-process
/// directories. One still running (a rolling upgrade) keeps writing to its
/// downloads; one untouched this long was abandoned.
const LEGACY_IDLE: Duration = Duration::from_secs(60 * 60);

/// This process's staging directory, locked until dropped; dropping it
/// removes the directory.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    /// Holds the `flock`; closing it releases the directory.
    _lock: File,
}

impl StagingDir {
    /// Creates and locks a new directory of this process's own in
    /// `staging`.
    pub fn claim(staging: &Path) -> io::Result<Self> {
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(claimed) = Self::try_claim(staging)? {
                return Ok(claimed);
            }
        }
        Err(io::Error::other(format!(
            "{}: a concurrent sweep removed each new staging directory",
            staging.display()
        )))
    }

    /// One attempt; `None` when a sweep took the new directory first.
    fn try_claim(staging: &Path) -> io::Result<Option<Self>> {
        let path = staging.join(unique_name());
        std::fs::create_dir(&path)?;
        let lock_path = path.join(LOCK_FILE);
        let lock = match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&lock_path)
        {
            Ok(lock) => lock,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !try_lock(&lock)? || !is_still_at(&lock, &lock_path)? {
            // A sweep holds it or has removed it: it is not ours to use.
            return Ok(None);
        }
        Ok(Some(Self { path, _lock: lock }))
    }

    /// A fresh path for one staged file.
    pub fn new_path(&self) -> PathBuf {
        self.path.join(uuid::Uuid::new_v4().to_string())
    }

    /// Removes the directory and everything staged in it (downloads that
    /// did not finish can never be committed); the lock is held until the
    /// value is dropped. Running it again finds nothing to do.
    pub fn remove(&self) -> io::Result<()> {
        remove_locked_dir(&self.path)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, dir = %self.path.display(), "cannot remove staging directory");
        }
    }
}

/// `<pid>-<start in ms>-<random>`: unique among processes sharing the
/// directory (even from several hosts or PID namespaces), and telling an
/// operator whose it is.
fn unique_name() -> String {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{started}-{}", std::process::id(), &random[..8])
}

/// Takes the lock without waiting; `false` when another process holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` still names the open `file` (a sweep may have removed
/// it between opening and locking).
fn is_still_at(file: &File, path: &Path) -> io::Result<bool> {
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes what no live process owns in `staging`: directories whose lock
/// can be taken, and idle files of older versions. Best effort: another
/// process may sweep at the same time, and what cannot be removed now is
/// left for the next sweep (with a warning).
pub fn sweep_abandoned(staging: &Path) {
    let entries = match std::fs::read_dir(staging) {
        Ok(entries) => entries,
        Err(e) => return warn_unless_gone(staging, e),
    };
    for entry in entries {
        let swept = entry.and_then(|entry| {
            if entry.file_type()?.is_dir() {
                remove_if_abandoned(&entry.path())
            } else {
                remove_if_legacy_and_idle(&entry.path())
            }
        });
        if let Err(e) = swept {
            warn_unless_gone(staging, e);
        }
    }
}

fn warn_unless_gone(path: &Path, e: io::Error) {
    if e.kind() != io::ErrorKind::NotFound {
        tracing::warn!(error = %e, path = %path.display(), "cannot sweep abandoned staging");
    }
}

/// Removes a staging directory whose owner is gone, holding its lock while
/// it does; leaves it alone while the owner lives.
fn remove_if_abandoned(dir: &Path) -> io::Result<()> {
    let lock = match File::options()
        .read(true)
        .write(true)
        .open(dir.join(LOCK_FILE))
    {
        Ok(lock) => lock,
        // Being claimed (not locked yet: only an empty one may go), or
        // being removed by another sweep (its lock goes last).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return remove_if_empty(dir),
        Err(e) => return Err(e),
    };
    if !try_lock(&lock)? {
        return Ok(());
    }
    remove_locked_dir(dir)
}

fn remove_if_empty(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(()),
        other => ignore_not_found(other),
    }
}

/// Removes a staging directory whose lock the caller holds: the staged
/// files, then the lock file, then the directory, so one interrupted
/// half-way still has its lock (and is swept later) or is empty.
fn remove_locked_dir(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name() != LOCK_FILE {
            ignore_not_found(std::fs::remove_file(entry.path()))?;
        }
    }
    ignore_not_found(std::fs::remove_file(dir.join(LOCK_FILE)))?;
    ignore_not_found(std::fs::remove_dir(dir))
}

fn remove_if_legacy_and_idle(file: &Path) -> io::Result<()> {
    let idle = std::fs::metadata(file)?
        .modified()?
        .elapsed()
        .is_ok_and(|idle| idle > LEGACY_IDLE);
    if idle {
        ignore_not_found(std::fs::remove_file(file))?;
    }
    Ok(())
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        (dir, staging)
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.count())
    }

    /// What a crashed owner leaves: a directory with its lock file, unlocked.
    fn abandoned(staging: &Path, staged: &[u8]) -> PathBuf {
        let dir = staging.join(unique_name());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(LOCK_FILE), b"").unwrap();
        std::fs::write(dir.join("download"), staged).unwrap();
        dir
    }

    #[test]
    fn a_sweep_removes_only_what_no_live_process_owns() {
        let (_dir, staging) = staging();
        let live = StagingDir::claim(&staging).unwrap();
        std::fs::write(live.new_path(), b"downloading").unwrap();
        let gone = abandoned(&staging, b"never committed");
        let unlocked_yet = staging.join("being-claimed");
        std::fs::create_dir(&unlocked_yet).unwrap();
        let (legacy_idle, legacy_busy) = (staging.join("old-idle"), staging.join("old-busy"));
        std::fs::write(&legacy_busy, b"an older Kura still downloading").unwrap();
        File::create(&legacy_idle)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * LEGACY_IDLE)
            .unwrap();

        sweep_abandoned(&staging);

        assert!(!gone.exists(), "an abandoned directory was kept");
        assert!(!unlocked_yet.exists(), "an empty directory was kept");
        assert!(!legacy_idle.exists(), "an idle legacy file was kept");
        assert!(legacy_busy.exists(), "a legacy file in use was removed");
        assert_eq!(entries(&live.path), 2, "a live directory was touched");
    }

    #[test]
    fn the_owner_removes_its_directory_when_done_or_dropped() {
        let (_dir, staging) = staging();
        let claimed = StagingDir::claim(&staging).unwrap();
        std::fs::write(claimed.new_path(), b"unfinished").unwrap();
        claimed.remove().unwrap();
        claimed.remove().expect("nothing left to remove");
        assert_eq!(entries(&staging), 0);
        drop(claimed);

        let claimed = StagingDir::claim(&staging).unwrap();
        std::fs::write(claimed.new_path(), b"unfinished").unwrap();
        drop(claimed);
        assert_eq!(entries(&staging), 0);
    }

    /// Claims and sweeps racing from many threads, as processes starting
    /// at once do: every claim succeeds and keeps its directory.
    #[test]
    fn concurrent_claims_and_sweeps_never_take_a_live_directory() {
        let (_dir, staging) = staging();
        for round in 0..20 {
            abandoned(&staging, format!("round {round}").as_bytes());
            let claims: Vec<StagingDir> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            sweep_abandoned(&staging);
                            StagingDir::claim(&staging).unwrap()
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            sweep_abandoned(&staging);
            for claim in &claims {
                assert!(claim.path.join(LOCK_FILE).exists(), "round {round}");
            }
            assert_eq!(entries(&staging), claims.len(), "round {round}");
        }
    }
}
