//! The cache's storage: content-addressed blobs and the per-repository
//! index, on local disk (default) or in an S3-compatible bucket
//! ([`objects`]), with downloads staged on local disk either way.
//!
//! ```text
//! blobs/sha256/<2 hex>/<64 hex>                             content, layers and manifests alike
//! repositories/<name>/_manifests/revisions/sha256/<hex>      manifest media type: "this repo has it"
//! repositories/<name>/_manifests/tags/<tag>                 "sha256:<hex>"; modified = last confirmed
//! repositories/<name>/_referrers/sha256/<hex>              a subject's referrers index; modified = last confirmed
//! repositories/<registry>/<name>/...                        the same, for a named upstream
//! _kura/access/<node>                                       last use per blob (S3 only)
//! _kura/replicas/<id>                                       a cluster replica's heartbeat (address)
//! <local root>/staging/<process>/<uuid>                     downloads in progress, per process
//! ```
//!
//! A blob is committed (renamed or uploaded) only after its digest was
//! verified ([`blobs`]); an index entry is written only after the content
//! it points at ([`index`]). Small files are written via staging + rename,
//! objects by a single PUT, so readers see complete content or nothing.
//! Any number of processes may share the directory: each stages in its
//! own locked directory and only ever sweeps those of processes that are
//! gone ([`staging`]).

pub mod access;
pub mod blobs;
pub mod catalog;
pub mod file_reads;
pub mod index;
pub mod objects;
pub mod replicas;
pub mod staging;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::fs;

pub use blobs::StagedBlob;
pub use objects::Objects;

use crate::reference::Digest;
use staging::StagingDir;

#[derive(Debug, Clone)]
pub struct Storage {
    /// The cache root on disk; for S3, only staging lives here.
    local: PathBuf,
    objects: Objects,
    /// The registry whose repositories this view indexes (`ghcr.io`), so
    /// equal repository names of different upstreams never collide; `None`
    /// for the default upstream. Blobs are shared by all views.
    namespace: Option<String>,
    /// Shared by every view: recency is per blob, whoever serves it.
    access: Arc<access::AccessTracker>,
    /// Shared by every view: `_catalog` lists every namespace.
    catalog: Arc<catalog::Catalog>,
    /// When a readiness probe last wrote successfully.
    proven_writable: Arc<std::sync::Mutex<Option<Instant>>>,
    /// This process's own staging directory, shared by every view and
    /// locked until the last one is dropped; `None` for the tools that
    /// only read or delete, which never stage.
    staging: Option<Arc<StagingDir>>,
}

/// How long a successful write probe is trusted: readiness checks come
/// every few seconds from every replica, and each probe is two requests to
/// the bucket.
const PROBE_TRUST: Duration = Duration::from_secs(30);

impl Storage {
    /// A storage view without any I/O that cannot stage (write); see
    /// [`Storage::open`].
    pub fn new(local: &Path, objects: Objects) -> Self {
        Self {
            local: local.to_owned(),
            objects,
            namespace: None,
            access: Arc::default(),
            catalog: Arc::default(),
            proven_writable: Arc::default(),
            staging: None,
        }
    }

    /// A cache on local disk at `root`, as the tools open it (no I/O).
    pub fn local(root: &Path) -> Self {
        Self::new(
            root,
            Objects::Fs {
                root: root.to_owned(),
            },
        )
    }

    /// Creates the layout if missing, removes the staging of processes
    /// that are gone (their downloads can never be committed) and claims a
    /// staging directory of this process's own, so it can write. Safe
    /// while other processes use the same directory.
    pub async fn open(mut self) -> io::Result<Self> {
        if self.objects.is_local() {
            fs::create_dir_all(self.local.join("blobs")).await?;
            fs::create_dir_all(self.local.join("repositories")).await?;
        }
        let staging = self.staging_dir();
        let claimed = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&staging)?;
            staging::sweep_abandoned(&staging);
            StagingDir::claim(&staging)
        })
        .await
        .map_err(io::Error::other)??;
        self.staging = Some(Arc::new(claimed));
        Ok(self)
    }

    /// Removes the staging of processes that are gone, as [`Storage::open`]
    /// does first: for `kura gc`, which frees what a crashed server left
    /// even when no server starts on the directory again.
    pub async fn sweep_abandoned_staging(&self) -> io::Result<()> {
        let staging = self.staging_dir();
        tokio::task::spawn_blocking(move || staging::sweep_abandoned(&staging))
            .await
            .map_err(io::Error::other)
    }

    /// Whether this is a local cache (the tools check it exists).
    pub fn is_local(&self) -> bool {
        self.objects.is_local()
    }

    pub fn local_root(&self) -> &Path {
        &self.local
    }

    /// A view whose repositories live under `repositories/<registry>/`,
    /// which is also how `_catalog` then lists them. `registry` must be a
    /// validated registry name (no `/`, no `..`).
    pub fn namespaced(&self, registry: &str) -> Self {
        Self {
            namespace: Some(registry.to_owned()),
            ..self.clone()
        }
    }

    /// Names this process's access record (S3) `node`: see
    /// [`access::AccessTracker::name_node`].
    pub fn name_access_records(&self, node: &str) {
        self.access.name_node(node);
    }

    /// Notes that a blob or manifest was just served.
    pub fn record_access(&self, digest: &Digest) {
        self.access.record(digest);
    }

    /// Last use per blob beyond what the backend's modification times say:
    /// accesses not yet flushed, plus (S3) every node's flushed accesses.
    pub async fn access_times(&self) -> io::Result<HashMap<Digest, SystemTime>> {
        let mut times = self.access.load(&self.objects).await?;
        for (digest, time) in self.access.snapshot() {
            let entry = times.entry(digest).or_insert(time);
            *entry = (*entry).max(time);
        }
        Ok(times)
    }

    /// Every node's flushed access times (S3); nothing on disk, where the
    /// blobs' modification times carry them.
    pub async fn flushed_access_times(&self) -> io::Result<HashMap<Digest, SystemTime>> {
        self.access.load(&self.objects).await
    }

    /// A blob's latest use as known right now: its modification time
    /// (commit, or on disk the last flushed use), this node's accesses
    /// flushed or not, and `elsewhere` (other nodes' access records, S3, as
    /// [`Storage::flushed_access_times`] read them). `None` once the blob is
    /// gone. One stat, no listing.
    pub async fn last_use(
        &self,
        digest: &Digest,
        elsewhere: &HashMap<Digest, SystemTime>,
    ) -> io::Result<Option<SystemTime>> {
        let Some(meta) = self.objects.stat(&blobs::blob_key(digest)).await? else {
            return Ok(None);
        };
        let recorded = self.access.last_recorded(digest).await;
        let latest = [
            Some(meta.modified),
            recorded,
            elsewhere.get(digest).copied(),
        ]
        .into_iter()
        .flatten()
        .max();
        Ok(latest)
    }

    /// Prunes access records (S3) after a collection: see
    /// [`access::AccessTracker::prune`].
    pub async fn prune_access_records(
        &self,
        is_stored: impl Fn(&Digest) -> bool,
        stale_before: SystemTime,
    ) -> io::Result<()> {
        self.access
            .prune(&self.objects, is_stored, stale_before)
            .await
    }

    /// Writes recorded accesses out (blob mtimes, or this node's access
    /// object on S3).
    pub async fn flush_accesses(&self) {
        let flushed = match self.new_staging_path() {
            Ok(staging) => self.access.flush(&self.objects, &staging).await,
            Err(e) => Err(e),
        };
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "cannot record access times");
        }
    }

    /// Whether a blob of `size` bytes fits in staging with room to spare,
    /// so a cold download that cannot be stored is passed through instead
    /// of failing midway with ENOSPC.
    pub fn has_room_for(&self, size: u64) -> bool {
        // Keep some space for index files and concurrent downloads.
        const RESERVE: u64 = 16 << 20;
        match rustix::fs::statvfs(&self.local) {
            Ok(stats) => {
                stats.f_bavail.saturating_mul(stats.f_frsize) >= size.saturating_add(RESERVE)
            }
            // Unknown: try to store; a write error still fails safely.
            Err(_) => true,
        }
    }

    fn staging_dir(&self) -> PathBuf {
        self.local.join("staging")
    }

    /// A fresh file name in this process's staging directory; an error
    /// for a storage that was not opened to write.
    fn new_staging_path(&self) -> io::Result<PathBuf> {
        let staging = self.staging.as_ref().ok_or_else(|| {
            io::Error::other("storage opened read-only: no staging directory to write through")
        })?;
        Ok(staging.new_path())
    }

    /// Proves the storage accepts writes (readiness): a probe object
    /// written and removed, at most once per [`PROBE_TRUST`] while it
    /// succeeds; a failure is never remembered, so recovery shows at once.
    pub async fn probe_writable(&self) -> io::Result<()> {
        let proven = *self.proven_writable.lock().expect("probe lock");
        if proven.is_some_and(|at| at.elapsed() < PROBE_TRUST) {
            return Ok(());
        }
        let key = format!("_kura/probe-{}", uuid::Uuid::new_v4());
        self.objects
            .write(&key, b"probe".to_vec(), &self.new_staging_path()?)
            .await?;
        self.objects.delete(&key).await?;
        *self.proven_writable.lock().expect("probe lock") = Some(Instant::now());
        Ok(())
    }

    /// Bytes and number of committed blobs.
    pub async fn usage(&self) -> io::Result<Usage> {
        let blobs = self.objects.list(blobs::BLOBS_PREFIX).await?;
        Ok(Usage {
            bytes: blobs.iter().map(|(_, meta)| meta.size).sum(),
            blobs: blobs.len() as u64,
        })
    }

    /// Removes this process's staging directory, and nothing of any other
    /// process's: on shutdown, downloads that did not finish can never be
    /// committed.
    pub async fn clear_staging(&self) -> io::Result<()> {
        let Some(staging) = self.staging.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || staging.remove())
            .await
            .map_err(io::Error::other)?
    }

    /// Writes a small object whole (via staging + rename on disk).
    async fn write_small(&self, key: &str, contents: &[u8]) -> io::Result<()> {
        self.objects
            .write(key, contents.to_vec(), &self.new_staging_path()?)
            .await
    }
}

/// What the committed blobs take up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub blobs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_storage_not_opened_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let read_only = Storage::local(dir.path());
        assert!(read_only.probe_writable().await.is_err());
        assert!(read_only.stage_blob().await.is_err());
        assert!(!dir.path().join("staging").exists());
    }

    #[tokio::test]
    async fn write_probes_trust_a_success_for_a_while_and_never_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        storage.probe_writable().await.unwrap();
        // Break writes: the probe's parent directory becomes a file.
        let probes = dir.path().join("_kura");
        std::fs::remove_dir_all(&probes).unwrap();
        std::fs::write(&probes, b"in the way").unwrap();
        storage.probe_writable().await.expect("trusted success");

        let unproven = Storage::local(dir.path()).open().await.unwrap();
        assert!(unproven.probe_writable().await.is_err());
        std::fs::remove_file(&probes).unwrap();
        unproven
            .probe_writable()
            .await
            .expect("failure not remembered");
    }
}
