//! The on-disk cache, under `storage.filesystem.rootdirectory`:
//!
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>                      content, layers and manifests alike
//! staging/<uuid>                                     downloads in progress (swept at startup)
//! repositories/<name>/_manifests/revisions/sha256/<hex>   manifest media type: "this repo has it"
//! repositories/<name>/_manifests/tags/<tag>          "sha256:<hex>"; mtime = last confirmed upstream
//! ```
//!
//! Every file is created in `staging/` and renamed into place, so a reader
//! (or a restart after `kill -9`) sees either nothing or a complete file.
//! Blobs are committed only after their digest was verified
//! ([`blobs`]), and an index entry is written only after the content it
//! points at ([`index`]).

pub mod access;
pub mod blobs;
pub mod index;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::fs;

pub use blobs::StagedBlob;

use crate::reference::Digest;

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    /// The registry whose repositories this view indexes (`ghcr.io`), so
    /// equal repository names of different upstreams never collide; `None`
    /// for the default upstream. Blobs are shared by all views.
    namespace: Option<String>,
    /// Shared by every view: recency is per blob, whoever serves it.
    access: Arc<access::AccessTracker>,
}

impl Storage {
    /// Creates the layout under `root` and removes staging leftovers of a
    /// previous run (they can never be committed: their download is gone).
    pub async fn open(root: &Path) -> io::Result<Self> {
        let staging = root.join("staging");
        if fs::try_exists(&staging).await? {
            fs::remove_dir_all(&staging).await?;
        }
        Self::prepare(root).await
    }

    /// Creates the layout if missing, leaving staging alone: for tools that
    /// write (`kura warm`) while a server may be using the same cache.
    pub async fn prepare(root: &Path) -> io::Result<Self> {
        let storage = Self::existing(root);
        for dir in [
            storage.staging_dir(),
            storage.blobs_dir(),
            storage.repositories_dir(),
        ] {
            fs::create_dir_all(&dir).await?;
        }
        Ok(storage)
    }

    /// A view of a cache another process may be serving: no staging sweep,
    /// nothing created (for the command-line tools).
    pub fn existing(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            namespace: None,
            access: Arc::default(),
        }
    }

    /// Notes that a blob or manifest was just served.
    pub fn record_access(&self, digest: &Digest) {
        self.access.record(digest);
    }

    /// Accesses not yet written out, for eviction decisions.
    pub fn recent_accesses(&self) -> std::collections::HashMap<Digest, std::time::SystemTime> {
        self.access.snapshot()
    }

    /// Writes recorded accesses out as blob mtimes.
    pub async fn flush_accesses(&self) {
        let accesses = self.access.drain();
        let paths: Vec<_> = accesses
            .into_iter()
            .map(|(digest, time)| (self.blob_path(&digest), time))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for (path, time) in paths {
                // A blob evicted or never committed has nothing to touch.
                if let Ok(file) = std::fs::File::options().write(true).open(&path) {
                    let _ = file.set_modified(time);
                }
            }
        })
        .await;
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A view whose repositories live under `repositories/<registry>/`,
    /// which is also how `_catalog` then lists them. `registry` must be a
    /// validated registry name (no `/`, no `..`).
    pub fn namespaced(&self, registry: &str) -> Self {
        Self {
            root: self.root.clone(),
            namespace: Some(registry.to_owned()),
            access: self.access.clone(),
        }
    }

    /// Whether a blob of `size` bytes fits with room to spare, so a cold
    /// download that cannot be stored is passed through instead of failing
    /// midway with ENOSPC.
    pub fn has_room_for(&self, size: u64) -> bool {
        // Keep some space for index files and concurrent downloads.
        const RESERVE: u64 = 16 << 20;
        match rustix::fs::statvfs(&self.root) {
            Ok(stats) => {
                stats.f_bavail.saturating_mul(stats.f_frsize) >= size.saturating_add(RESERVE)
            }
            // Unknown: try to store; a write error still fails safely.
            Err(_) => true,
        }
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn repositories_dir(&self) -> PathBuf {
        self.root.join("repositories")
    }

    fn new_staging_path(&self) -> PathBuf {
        self.staging_dir().join(uuid::Uuid::new_v4().to_string())
    }

    /// Proves the storage accepts writes (readiness): a probe file in
    /// staging, written and removed.
    pub async fn probe_writable(&self) -> io::Result<()> {
        let probe = self.new_staging_path();
        fs::write(&probe, b"probe").await?;
        fs::remove_file(&probe).await
    }

    /// Bytes and number of committed blobs (a directory walk).
    pub async fn usage(&self) -> io::Result<Usage> {
        let blobs_dir = self.blobs_dir();
        tokio::task::spawn_blocking(move || walk_usage(&blobs_dir))
            .await
            .map_err(io::Error::other)?
    }

    /// Removes everything in staging: on shutdown, downloads that did not
    /// finish can never be committed.
    pub async fn clear_staging(&self) -> io::Result<()> {
        let mut entries = fs::read_dir(self.staging_dir()).await?;
        while let Some(entry) = entries.next_entry().await? {
            let _ = fs::remove_file(entry.path()).await;
        }
        Ok(())
    }

    /// Writes a small file atomically: staging file, then rename.
    async fn write_atomic(&self, dest: &Path, contents: &[u8]) -> io::Result<()> {
        let staging = self.new_staging_path();
        fs::write(&staging, contents).await?;
        rename_into_place(&staging, dest).await
    }
}

/// What the committed blobs take up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub blobs: u64,
}

fn walk_usage(blobs_dir: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    for prefix in std::fs::read_dir(blobs_dir)? {
        for blob in std::fs::read_dir(prefix?.path())? {
            let meta = blob?.metadata()?;
            usage.bytes += meta.len();
            usage.blobs += 1;
        }
    }
    Ok(usage)
}

/// Renames `from` to `to`, creating `to`'s parent directory if needed.
async fn rename_into_place(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).await?;
    }
    let result = fs::rename(from, to).await;
    if result.is_err() {
        let _ = fs::remove_file(from).await;
    }
    result
}
