//! Content-addressed blobs: staged on local disk while downloading, hashed
//! on the fly, committed (renamed, or uploaded to S3) only when the digest
//! matches.

use std::io;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::fs::File;

use super::Storage;
use super::objects::ObjectReader;
use crate::reference::Digest;

pub(super) const BLOBS_PREFIX: &str = "blobs/sha256/";

/// Why a staged blob was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("content digest {actual} does not match the expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What [`Storage::read_blob_budgeted`] found of a blob.
pub enum Budgeted {
    Missing,
    /// Stored, but larger than the limit or what the budget had left: not
    /// read beyond the probe that found it too large.
    Skipped,
    Read(Vec<u8>),
}

/// See [`Storage::serve_blob`]; both carry the blob's size.
pub enum ServedBlob {
    Here(ObjectReader, u64),
    /// A presigned URL.
    Elsewhere(String, u64),
}

/// A committed blob as eviction and the tools see it.
#[derive(Debug, Clone)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size: u64,
    /// Last modified: committed, or (on disk) last flushed use.
    pub last_used: std::time::SystemTime,
}

pub fn blob_key(digest: &Digest) -> String {
    let hex = digest.hex();
    format!("{BLOBS_PREFIX}{}/{hex}", &hex[..2])
}

/// Whether a committed blob of `size` bytes can be the content `digest`
/// names. Only an empty file is known to be wrong without reading it: the
/// expected size of a blob is in no file of its own, and a crash after an
/// unsynced rename (before commits were synced) leaves exactly that, an
/// empty file under the digest's name.
fn plausible_size(digest: &Digest, size: u64) -> bool {
    size > 0 || *digest == Digest::of_bytes(b"")
}

impl Storage {
    /// Opens a committed blob for reading, with its size.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<(ObjectReader, u64)>> {
        let opened = self.objects.open(&blob_key(digest)).await?;
        match opened {
            Some((_, size)) if !plausible_size(digest, size) => self.quarantine(digest, size).await,
            opened => Ok(opened),
        }
    }

    /// Removes a committed blob whose size cannot be its digest's, so it
    /// reads as missing and is fetched again; answers `None` for it.
    async fn quarantine<T>(&self, digest: &Digest, size: u64) -> io::Result<Option<T>> {
        tracing::warn!(%digest, size, "stored blob has an impossible size; removed to fetch it again");
        self.delete_blob(digest).await?;
        Ok(None)
    }

    /// A committed blob as a client gets it: the bytes, or, when the
    /// storage redirects readers (S3), a presigned URL to fetch them from.
    /// One existence check either way.
    pub async fn serve_blob(&self, digest: &Digest) -> io::Result<Option<ServedBlob>> {
        /// Distribution's S3 driver presigns for as long.
        const EXPIRE: std::time::Duration = std::time::Duration::from_secs(20 * 60);
        let key = blob_key(digest);
        if let Some(url) = self.objects.presigned_url(&key, EXPIRE).await? {
            let size = self.blob_size(digest).await?;
            return Ok(size.map(|size| ServedBlob::Elsewhere(url, size)));
        }
        let opened = self.open_blob(digest).await?;
        Ok(opened.map(|(reader, size)| ServedBlob::Here(reader, size)))
    }

    pub async fn blob_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match self.objects.stat(&blob_key(digest)).await? {
            Some(meta) if !plausible_size(digest, meta.size) => {
                self.quarantine(digest, meta.size).await
            }
            meta => Ok(meta.map(|meta| meta.size)),
        }
    }

    /// A blob's bytes if it is stored and at most `limit` bytes long,
    /// reading no more than that (see [`Objects::read_within`]).
    ///
    /// [`Objects::read_within`]: super::Objects::read_within
    pub async fn read_blob_within(
        &self,
        digest: &Digest,
        limit: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        self.objects.read_within(&blob_key(digest), limit).await
    }

    /// A stored blob of at most `limit` bytes (a manifest), read within
    /// `budget`, what a request has left to read: every byte read is taken
    /// from it, the probe of a blob found too large included, so what one
    /// request reads stays within what it started with.
    pub async fn read_blob_budgeted(
        &self,
        digest: &Digest,
        limit: usize,
        budget: &mut usize,
    ) -> io::Result<Budgeted> {
        let within = limit.min(*budget);
        if within == 0 {
            return Ok(match self.blob_size(digest).await? {
                Some(_) => Budgeted::Skipped,
                None => Budgeted::Missing,
            });
        }
        let Some(bytes) = self.objects.read_probe(&blob_key(digest), within).await? else {
            return Ok(Budgeted::Missing);
        };
        *budget = budget.saturating_sub(bytes.len());
        Ok(match bytes.len() > within {
            true => Budgeted::Skipped,
            false => Budgeted::Read(bytes),
        })
    }

    /// Every committed blob with its size and modification time.
    pub async fn list_blobs(&self) -> io::Result<Vec<BlobEntry>> {
        let objects = self.objects.list(BLOBS_PREFIX).await?;
        Ok(objects
            .into_iter()
            .filter_map(|(key, meta)| {
                let hex = key.rsplit('/').next()?;
                Some(BlobEntry {
                    digest: Digest::parse(&format!("sha256:{hex}")).ok()?,
                    size: meta.size,
                    last_used: meta.modified,
                })
            })
            .collect())
    }

    /// Re-hashes a stored blob: whether its content still matches its name.
    pub async fn verify_blob(&self, digest: &Digest) -> io::Result<bool> {
        let Some((reader, size)) = self.open_blob(digest).await? else {
            return Ok(false);
        };
        let mut stream = reader.into_stream(0, size).await?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            hasher.update(chunk?);
        }
        Ok(&Digest::from_sha256(hasher.finalize().as_slice()) == digest)
    }

    pub async fn delete_blob(&self, digest: &Digest) -> io::Result<()> {
        self.objects.delete(&blob_key(digest)).await
    }

    /// Stores bytes already in memory (manifests) after checking their digest.
    pub async fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<(), CommitError> {
        let actual = Digest::of_bytes(bytes);
        if &actual != digest {
            return Err(CommitError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        self.write_small(&blob_key(digest), bytes).await?;
        Ok(())
    }

    /// Starts a download: a new local staging file that hashes what is written.
    pub async fn stage_blob(&self) -> io::Result<StagedBlob> {
        let path = self.new_staging_path()?;
        let file = File::create(&path).await?.into_std().await;
        Ok(StagedBlob {
            storage: self.clone(),
            path,
            writer: Some(Writer {
                file,
                hasher: Sha256::new(),
            }),
            digest: None,
            pending: Batch::default(),
            small: BytesMut::new(),
            received: 0,
            committed: false,
            from_owner: false,
        })
    }
}

/// Bytes gathered before one write to the staging file: a write (and the
/// hashing with it) is a trip to the blocking pool. A batch is the
/// upstream's own chunks, not a copy of them; it ends with the chunk that
/// reaches this size, so it is at most this plus one chunk (hyper reads at
/// most about 400 KiB at a time).
const WRITE_BATCH: usize = 1 << 20;

/// Chunks shorter than this are copied together into one part of a batch:
/// a batch then has at most `2 * WRITE_BATCH / SMALL_CHUNK + 1` parts (a
/// gathered one before each larger chunk) however the upstream slices its
/// body, a trickle of one-byte chunks included.
const SMALL_CHUNK: usize = 16 * 1024;

/// Bytes per `write` call into the staging file. The kernel sizes the
/// page-cache folios it allocates for a write by its length: a 1 MiB write
/// asks for 1 MiB of contiguous memory, which on a host whose memory is
/// fragmented (full of cache, as a cache's host is) costs a compaction:
/// 0.8-1.2 CPU-s per GiB written where 128 KiB writes cost 0.15 (measured
/// on the benchmark VM, writing a preallocated file).
const FILE_WRITE: usize = 128 * 1024;

/// Some of a download's bytes as the upstream's chunks, in order.
#[derive(Clone, Default)]
pub struct Batch {
    pub parts: Vec<Bytes>,
    pub len: usize,
}

impl Batch {
    pub fn push(&mut self, part: Bytes) {
        self.len += part.len();
        self.parts.push(part);
    }
}

/// A blob being downloaded into staging. Its file is removed when it is
/// dropped without [`StagedBlob::commit`], on every path (failure,
/// cancellation, panic), so it can never be served as a committed blob.
pub struct StagedBlob {
    storage: Storage,
    path: PathBuf,
    /// The staging file and the sha256 of what it holds, moved together
    /// into each blocking write; gone once the digest is taken.
    writer: Option<Writer>,
    digest: Option<Digest>,
    /// Received, not yet written.
    pending: Batch,
    /// Small chunks being gathered into one part of `pending`.
    small: BytesMut,
    received: u64,
    /// Renamed or uploaded: nothing left to remove.
    committed: bool,
    /// Every byte came from the blob's owner replica, which stores it too.
    from_owner: bool,
}

/// Where a download's batches go: each is hashed and written by one short
/// task on the blocking pool, [`FILE_WRITE`] bytes at a time, each piece
/// hashed right before it is written (the write then copies bytes the hash
/// has just brought into the CPU's cache). No task waits for another, so a
/// burst of downloads can queue for blocking threads but never deadlock
/// them.
struct Writer {
    file: std::fs::File,
    hasher: Sha256,
}

impl StagedBlob {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Bytes accepted so far, including those not yet on disk.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes on disk, readable through other handles on the staging file:
    /// everything received but the pending batch.
    pub fn written(&self) -> u64 {
        self.received - (self.pending.len + self.small.len()) as u64
    }

    /// Allocates the whole blob on disk before it arrives: a full disk
    /// shows now rather than halfway through (so the blob can still be
    /// passed through), and the filesystem no longer allocates block by
    /// block as the writes land, which costs about a third of the write
    /// time on ext4. Returns whether there was room.
    pub async fn preallocate(&mut self, size: u64) -> io::Result<bool> {
        use rustix::fs::{FallocateFlags, fallocate};
        use rustix::io::Errno;
        if size == 0 {
            return Ok(true); // fallocate rejects an empty range
        }
        let writer = self.take_writer()?;
        let (writer, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = fallocate(&writer.file, FallocateFlags::empty(), 0, size);
            (writer, outcome)
        })
        .await
        .map_err(io::Error::other)?;
        self.writer = Some(writer);
        match outcome {
            Ok(()) => Ok(true),
            Err(Errno::NOSPC) => Ok(false),
            // Filesystems without fallocate allocate as the writes come.
            Err(Errno::OPNOTSUPP) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn take_writer(&mut self) -> io::Result<Writer> {
        self.writer.take().ok_or_else(|| {
            io::Error::other("staging file lost after a failed write, or already hashed")
        })
    }

    /// Accepts a chunk; it reaches the file with the next batch. Returns
    /// the batch when this chunk completed one and it was written.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<Option<Batch>> {
        self.received += chunk.len() as u64;
        if chunk.len() < SMALL_CHUNK {
            self.small.extend_from_slice(&chunk);
            if self.small.len() >= SMALL_CHUNK {
                let gathered = self.small.split().freeze();
                self.pending.push(gathered);
            }
        } else {
            self.gather_small();
            self.pending.push(chunk);
        }
        if self.pending.len < WRITE_BATCH {
            return Ok(None);
        }
        self.flush().await
    }

    /// Moves the small chunks gathered so far into the pending batch.
    fn gather_small(&mut self) {
        if !self.small.is_empty() {
            let gathered = self.small.split().freeze();
            self.pending.push(gathered);
        }
    }

    /// Hashes and writes what is pending, off the async threads. Returns
    /// the batch written (it ends at [`StagedBlob::written`]), if any.
    pub async fn flush(&mut self) -> io::Result<Option<Batch>> {
        self.gather_small();
        if self.pending.len == 0 {
            return Ok(None);
        }
        let batch = std::mem::take(&mut self.pending);
        let offset = self.received - batch.len as u64;
        let mut writer = self.take_writer()?;
        let written = batch.clone();
        let writer = tokio::task::spawn_blocking(move || {
            write_parts(&mut writer, &written.parts, offset)?;
            Ok::<_, io::Error>(writer)
        })
        .await
        .map_err(io::Error::other)??;
        self.writer = Some(writer);
        Ok(Some(batch))
    }

    /// Writes what is pending and answers the digest of everything
    /// received; nothing more can be written after.
    pub async fn finish(&mut self) -> io::Result<Digest> {
        if let Some(digest) = &self.digest {
            return Ok(digest.clone());
        }
        self.flush().await?;
        let writer = self.take_writer()?;
        let digest = Digest::from_sha256(writer.hasher.finalize().as_slice());
        self.digest = Some(digest.clone());
        Ok(digest)
    }

    /// Verifies the digest and commits the blob to content-addressed
    /// storage. On mismatch the staging file is removed.
    pub async fn commit(mut self, expected: &Digest) -> Result<(), CommitError> {
        let actual = self.finish().await?;
        if &actual != expected {
            return Err(CommitError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        // Whatever becomes of it now, the commit owns the file: a failed
        // rename or upload removes it itself.
        self.committed = true;
        let (objects, key) = (&self.storage.objects, blob_key(expected));
        match self.from_owner {
            true => objects.commit_file_after_owner(&self.path, &key).await?,
            false => objects.commit_file(&self.path, &key).await?,
        }
        Ok(())
    }

    /// Marks every byte as the owner replica's, which stores the blob in
    /// the shared bucket itself: the commit then waits for that copy
    /// rather than uploading another.
    pub fn came_from_owner(&mut self) {
        self.from_owner = true;
    }
}

/// Hashes `parts` and writes them to the writer's file at `offset`,
/// [`FILE_WRITE`] bytes per call, straight from the chunks (no copy into
/// one buffer first).
fn write_parts(writer: &mut Writer, parts: &[Bytes], mut offset: u64) -> io::Result<()> {
    // Where the bytes not yet hashed and written start: a part and a
    // position in it.
    let (mut part, mut within) = (0, 0);
    while part < parts.len() {
        let mut slices = Vec::new();
        let mut gathered = 0;
        while part < parts.len() && gathered < FILE_WRITE {
            let take = (parts[part].len() - within).min(FILE_WRITE - gathered);
            let slice = &parts[part][within..within + take];
            writer.hasher.update(slice);
            slices.push(io::IoSlice::new(slice));
            gathered += take;
            within += take;
            if within == parts[part].len() {
                (part, within) = (part + 1, 0);
            }
        }
        write_all_at(&writer.file, &mut slices, offset)?;
        offset += gathered as u64;
    }
    Ok(())
}

/// Writes `slices` in order at `offset`: one `pwritev`, more only after a
/// short write.
fn write_all_at(
    file: &std::fs::File,
    mut slices: &mut [io::IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = rustix::io::pwritev(file, slices, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_file_under_a_non_empty_digest_is_removed_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        let (content, empty) = (b"layer".as_slice(), b"".as_slice());
        let (digest, empty_digest) = (Digest::of_bytes(content), Digest::of_bytes(empty));
        storage.put_blob_bytes(&digest, content).await.unwrap();
        storage.put_blob_bytes(&empty_digest, empty).await.unwrap();
        let path = dir.path().join(blob_key(&digest));
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();

        assert!(storage.open_blob(&digest).await.unwrap().is_none());
        assert!(!path.exists(), "the empty file was kept");
        let (_, size) = storage.open_blob(&empty_digest).await.unwrap().unwrap();
        assert_eq!(size, 0, "the empty blob is a blob");

        std::fs::write(&path, b"").unwrap();
        assert_eq!(storage.blob_size(&digest).await.unwrap(), None);
        assert!(!path.exists());
        assert_eq!(storage.blob_size(&empty_digest).await.unwrap(), Some(0));
    }

    /// A request's budget pays for every byte read, the probe of a blob
    /// too large included; a missing blob costs nothing.
    #[tokio::test]
    async fn budgeted_reads_take_every_byte_read_from_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        let (small, large) = (vec![1u8; 100], vec![2u8; 1000]);
        let (small_digest, large_digest) = (Digest::of_bytes(&small), Digest::of_bytes(&large));
        storage.put_blob_bytes(&small_digest, &small).await.unwrap();
        storage.put_blob_bytes(&large_digest, &large).await.unwrap();
        let missing = Digest::of_bytes(b"never stored");

        let mut budget = 600;
        let read = storage
            .read_blob_budgeted(&small_digest, 500, &mut budget)
            .await
            .unwrap();
        assert!(matches!(read, Budgeted::Read(bytes) if bytes == small));
        assert_eq!(budget, 500);
        let read = storage
            .read_blob_budgeted(&missing, 500, &mut budget)
            .await
            .unwrap();
        assert!(matches!(read, Budgeted::Missing));
        assert_eq!(budget, 500, "a missing blob cost something");
        let read = storage
            .read_blob_budgeted(&large_digest, 500, &mut budget)
            .await
            .unwrap();
        assert!(matches!(read, Budgeted::Skipped));
        assert_eq!(budget, 0, "the probe of a blob too large was free");
        let read = storage
            .read_blob_budgeted(&small_digest, 500, &mut budget)
            .await
            .unwrap();
        assert!(matches!(read, Budgeted::Skipped), "read past the budget");
    }

    /// Two processes sharing a directory downloaded the same blob: each
    /// commit is a rename onto the same name, and both succeed.
    #[tokio::test]
    async fn two_processes_committing_the_same_blob_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let content = vec![7u8; 3 << 20];
        let digest = Digest::of_bytes(&content);
        let stage = async |storage: Storage| {
            let mut staged = storage.stage_blob().await.unwrap();
            staged.write(Bytes::from(content.clone())).await.unwrap();
            staged
        };
        let first = stage(Storage::local(dir.path()).open().await.unwrap()).await;
        let second = stage(Storage::local(dir.path()).open().await.unwrap()).await;

        let (a, b) = tokio::join!(first.commit(&digest), second.commit(&digest));
        a.expect("first commit");
        b.expect("second commit");
        let stored = std::fs::read(dir.path().join(blob_key(&digest))).unwrap();
        assert!(stored == content, "the committed blob is not the content");
    }

    /// Chunks of every size an upstream sends (trickles of a few bytes,
    /// ones larger than a file write): the batches are the bytes in
    /// order, what `written` counts is always on disk, and the staging file
    /// holds exactly the bytes in the end.
    #[tokio::test]
    async fn staged_chunks_reach_the_file_and_the_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        let content: Vec<u8> = (0..3 * WRITE_BATCH + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let sizes = [1, 5000, SMALL_CHUNK, 3 * FILE_WRITE + 1, 100, 70_000];
        let mut staged = storage.stage_blob().await.unwrap();
        let (mut batches, mut at) = (Vec::new(), 0);
        for size in sizes.iter().cycle() {
            let end = (at + size).min(content.len());
            let chunk = Bytes::copy_from_slice(&content[at..end]);
            batches.extend(staged.write(chunk).await.unwrap());
            let written = staged.written() as usize;
            let on_disk = std::fs::read(staged.path()).unwrap();
            assert!(on_disk.len() >= written && on_disk[..written] == content[..written]);
            assert!(written <= end, "counted as written before it was received");
            at = end;
            if at == content.len() {
                break;
            }
        }
        assert!(batches.len() >= 2, "whole batches are written as they fill");
        for batch in &batches {
            assert!(batch.parts.len() <= 2 * WRITE_BATCH / SMALL_CHUNK + 1);
        }
        batches.extend(staged.flush().await.unwrap());
        let bytes: Vec<u8> = batches.iter().flat_map(|b| b.parts.concat()).collect();
        assert!(bytes == content, "the batches are not the bytes in order");
        assert_eq!(staged.finish().await.unwrap(), Digest::of_bytes(&content));
        assert!(std::fs::read(staged.path()).unwrap() == content);
    }
}
