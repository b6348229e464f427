//! Where the cache's bytes live: files under the local root, or objects in
//! an S3-compatible bucket through OpenDAL. Everything above this module
//! speaks in keys (`blobs/sha256/ab/ab…`, `repositories/x/_manifests/…`);
//! only these few operations know the backend.
//!
//! OpenDAL rather than object_store: one crate covers S3 with path-style
//! endpoints, the AWS credential chain, ranged streaming reads and chunked
//! multipart writes with bounded memory, and is an Apache project with a
//! steady release cadence.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use opendal::{HttpTransporter, OperationContext, Operator};
use opendal_http_transport_reqwest::ReqwestTransport;
use std::sync::Arc;
use tokio::fs;
use tokio::io::AsyncReadExt;

use super::file_reads;
use crate::config::{S3Config, S3Encryption};

/// S3's smallest multipart part (all but the last), and its most parts.
const MIN_PART: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;

/// Part size for uploading an object of this size: the smallest S3 takes,
/// since an upload holds about three parts in memory (the one being read,
/// the one OpenDAL queues and the one in flight); larger only where 10,000
/// of them would not hold the object.
fn part_size(size: u64) -> usize {
    const MIB: u64 = 1 << 20;
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.max(MIN_PART) as usize
}

#[derive(Clone)]
pub enum Objects {
    /// Files under the cache root; staging is on the same filesystem, so a
    /// commit is a rename.
    Fs { root: PathBuf },
    /// A bucket; staging stays on local disk and a commit is an upload.
    /// With `redirect`, readers may be sent to presigned URLs.
    S3 { op: Operator, redirect: bool },
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objects::Fs { root } => write!(f, "Fs({})", root.display()),
            Objects::S3 { .. } => f.write_str("S3"),
        }
    }
}

/// What a listing or stat tells about an object.
#[derive(Debug, Clone, Copy)]
pub struct ObjectMeta {
    pub size: u64,
    pub modified: SystemTime,
}

/// An open object, ready to stream any byte range.
pub enum ObjectReader {
    File(std::fs::File),
    Remote(opendal::Reader),
}

fn not_found_as_none<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Objects {
    /// A bucket as Distribution's `storage.s3` describes it.
    pub fn s3(config: &S3Config) -> io::Result<Self> {
        let mut builder = opendal::services::S3::default()
            .bucket(&config.bucket)
            .region(&config.region)
            .root(&config.root);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint(endpoint);
        }
        if !config.path_style {
            builder = builder.enable_virtual_host_style();
        }
        if let (Some(access), Some(secret)) = (&config.access_key, &config.secret_key) {
            builder = builder
                .access_key_id(access)
                .secret_access_key(secret.expose());
        }
        builder = match &config.encryption {
            None => builder,
            Some(S3Encryption::S3Managed) => builder.server_side_encryption_with_s3_key(),
            Some(S3Encryption::Kms { key_id }) => {
                builder.server_side_encryption_with_customer_managed_kms_key(key_id)
            }
        };
        let op = Operator::new(builder).map_err(io::Error::from)?;
        let context = OperationContext::new()
            .with_http_transport(HttpTransporter::new(s3_transport(config)?));
        Ok(Objects::S3 {
            op: op.with_context(context),
            redirect: config.redirect,
        })
    }

    /// A URL that serves the object to whoever holds it for `expire`
    /// (a presigned GET), when this storage redirects readers; no request
    /// is made, so the object may not exist.
    pub async fn presigned_url(&self, key: &str, expire: Duration) -> io::Result<Option<String>> {
        match self {
            Objects::S3 { op, redirect: true } => {
                let request = op
                    .presign_read(key, expire)
                    .await
                    .map_err(io::Error::from)?;
                Ok(Some(request.uri().to_string()))
            }
            _ => Ok(None),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Objects::Fs { .. })
    }

    fn path(root: &Path, key: &str) -> PathBuf {
        root.join(key)
    }

    pub async fn read(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match self {
            Objects::Fs { root } => not_found_as_none(fs::read(Self::path(root, key)).await),
            Objects::S3 { op, .. } => not_found_as_none(
                op.read(key)
                    .await
                    .map(|b| b.to_vec())
                    .map_err(io::Error::from),
            ),
        }
    }

    /// The object's bytes if it holds at most `limit` of them; `None` when
    /// it is missing or larger. Never reads more than `limit + 1` bytes.
    pub async fn read_within(&self, key: &str, limit: usize) -> io::Result<Option<Vec<u8>>> {
        let bytes = self.read_probe(key, limit).await?;
        Ok(bytes.filter(|bytes| bytes.len() <= limit))
    }

    /// The object's first `limit + 1` bytes (all of them when it holds at
    /// most `limit`: more means it is larger); `None` when it is missing.
    pub async fn read_probe(&self, key: &str, limit: usize) -> io::Result<Option<Vec<u8>>> {
        let probe = limit as u64 + 1;
        let bytes = match self {
            Objects::Fs { root } => {
                let path = Self::path(root, key);
                let read = tokio::task::spawn_blocking(move || {
                    use std::io::Read;
                    let mut bytes = Vec::new();
                    std::fs::File::open(path)?
                        .take(probe)
                        .read_to_end(&mut bytes)?;
                    Ok(bytes)
                })
                .await
                .map_err(io::Error::other)?;
                not_found_as_none(read)?
            }
            Objects::S3 { op, .. } => not_found_as_none(read_prefix(op, key, probe).await)?,
        };
        Ok(bytes)
    }

    /// Writes a whole small object; readers see the old version or the new
    /// one, never a mix (`staging` holds the temporary file on disk).
    pub async fn write(&self, key: &str, bytes: Vec<u8>, staging: &Path) -> io::Result<()> {
        match self {
            Objects::Fs { root } => {
                let (staging, target) = (staging.to_owned(), Self::path(root, key));
                on_blocking_pool(move || {
                    discard_on_error(&staging, || {
                        let mut file = std::fs::File::create(&staging)?;
                        std::io::Write::write_all(&mut file, &bytes)?;
                        file.sync_all()?;
                        durable_rename(&staging, &target)
                    })
                })
                .await
            }
            Objects::S3 { op, .. } => op
                .write(key, bytes)
                .await
                .map(|_| ())
                .map_err(io::Error::from),
        }
    }

    pub async fn delete(&self, key: &str) -> io::Result<()> {
        match self {
            Objects::Fs { root } => {
                not_found_as_none(fs::remove_file(Self::path(root, key)).await).map(|_| ())
            }
            Objects::S3 { op, .. } => op.delete(key).await.map_err(io::Error::from),
        }
    }

    pub async fn stat(&self, key: &str) -> io::Result<Option<ObjectMeta>> {
        match self {
            Objects::Fs { root } => {
                let meta = not_found_as_none(fs::metadata(Self::path(root, key)).await)?;
                meta.map(|m| {
                    Ok(ObjectMeta {
                        size: m.len(),
                        modified: m.modified()?,
                    })
                })
                .transpose()
            }
            Objects::S3 { op, .. } => {
                let meta = not_found_as_none(op.stat(key).await.map_err(io::Error::from))?;
                Ok(meta.map(|m| remote_meta(&m)))
            }
        }
    }

    /// Every object under `prefix` (a directory-like key ending in `/`),
    /// recursively.
    pub async fn list(&self, prefix: &str) -> io::Result<Vec<(String, ObjectMeta)>> {
        match self {
            Objects::Fs { root } => {
                let (root, prefix) = (root.clone(), prefix.to_owned());
                tokio::task::spawn_blocking(move || walk(&root, &prefix))
                    .await
                    .map_err(io::Error::other)?
            }
            Objects::S3 { op, .. } => {
                let entries = not_found_as_none(
                    op.list_with(prefix)
                        .recursive(true)
                        .await
                        .map_err(io::Error::from),
                )?;
                Ok(entries
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.metadata().is_file())
                    .map(|e| (e.path().to_owned(), remote_meta(e.metadata())))
                    .collect())
            }
        }
    }

    pub async fn open(&self, key: &str) -> io::Result<Option<(ObjectReader, u64)>> {
        match self {
            Objects::Fs { root } => {
                // One trip to the blocking pool for open and size: this is
                // every warm blob GET.
                let path = Self::path(root, key);
                let opened = tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::open(path)?;
                    let size = file.metadata()?.len();
                    Ok((file, size))
                })
                .await
                .map_err(io::Error::other)?;
                Ok(not_found_as_none(opened)?.map(|(file, size)| (ObjectReader::File(file), size)))
            }
            Objects::S3 { op, .. } => {
                let Some(meta) = self.stat(key).await? else {
                    return Ok(None);
                };
                let reader = op
                    .reader_with(key)
                    .chunk(2 << 20)
                    .await
                    .map_err(io::Error::from)?;
                Ok(Some((ObjectReader::Remote(reader), meta.size)))
            }
        }
    }

    /// Makes a verified local file the object `key`: a durable rename on
    /// disk (see [`durable_rename`]), a streaming multipart upload (memory
    /// bounded by the part size) to S3, retried with backoff (see
    /// [`upload_with_retries`]). The local file is gone afterwards either
    /// way, on every path.
    pub async fn commit_file(&self, local: &Path, key: &str) -> io::Result<()> {
        match self {
            Objects::Fs { root } => {
                let (local, target) = (local.to_owned(), Self::path(root, key));
                on_blocking_pool(move || {
                    discard_on_error(&local, || {
                        std::fs::File::open(&local)?.sync_all()?;
                        durable_rename(&local, &target)
                    })
                })
                .await
            }
            Objects::S3 { op, .. } => {
                // Removed however the upload ends, cancellation included.
                let _staging = RemoveOnDrop(local);
                upload_with_retries(op, local, key).await
            }
        }
    }

    /// [`Self::commit_file`] for a blob another replica, its owner,
    /// fetched from the upstream and streamed here, and is uploading
    /// itself: on S3, this replica waits (at most [`OWNER_UPLOAD_WAIT`],
    /// its staging file serving meanwhile) for the owner's copy to land and
    /// uploads its own only if none does, so a rollout stores each blob
    /// once, not once per replica.
    pub async fn commit_file_after_owner(&self, local: &Path, key: &str) -> io::Result<()> {
        let Objects::S3 { op, .. } = self else {
            return self.commit_file(local, key).await;
        };
        // Removed however this ends, cancellation included.
        let _staging = RemoveOnDrop(local);
        if landed_within(op, key, OWNER_UPLOAD_WAIT).await {
            tracing::info!(key, "blob stored by its owner replica; not uploaded here");
            return Ok(());
        }
        upload_with_retries(op, local, key).await
    }

    /// Sets a file's mtime (last use). Objects cannot be touched; the S3
    /// backend keeps access times elsewhere.
    pub async fn touch(&self, key: &str, time: SystemTime) {
        if let Objects::Fs { root } = self {
            let path = Self::path(root, key);
            let _ = tokio::task::spawn_blocking(move || {
                if let Ok(file) = std::fs::File::options().write(true).open(&path) {
                    let _ = file.set_modified(time);
                }
            })
            .await;
        }
    }
}

impl ObjectReader {
    /// Bytes `start..end` as a stream.
    pub async fn into_stream(
        self,
        start: u64,
        end: u64,
    ) -> io::Result<BoxStream<'static, io::Result<Bytes>>> {
        match self {
            ObjectReader::File(file) => Ok(file_reads::stream(file, start, end).boxed()),
            ObjectReader::Remote(reader) => {
                let stream = reader
                    .into_bytes_stream(start..end)
                    .await
                    .map_err(io::Error::from)?;
                Ok(stream.map_err(io::Error::other).boxed())
            }
        }
    }
}

/// OpenDAL's HTTP client for S3: reqwest over rustls with ring (the
/// provider the rest of Kura uses) trusting the Mozilla roots compiled in,
/// like the upstream client, so a `FROM scratch` image with no CA files on
/// disk reaches HTTPS endpoints.
fn s3_transport(config: &S3Config) -> io::Result<ReqwestTransport> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = reqwest_s3::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(config.connect_timeout)
        // reqwest's read timeout runs from the request's start to its
        // response headers, then between body reads: a hung bucket fails a
        // request, where without it a cached blob's client waited forever.
        .read_timeout(config.response_timeout)
        .build()
        .map_err(io::Error::other)?;
    Ok(ReqwestTransport::new(client))
}

/// Whole multipart uploads tried before a blob is given up: a bucket that
/// fails for a moment (a restart, a throttling burst) costs a retry, not
/// the cache entry. Giving up never fails a client (its bytes were
/// verified and served from staging); the blob is fetched again on its
/// next miss.
const UPLOAD_ATTEMPTS: u32 = 4;

/// Wait before the first retry, doubled before each next one (1 s, 2 s,
/// 4 s): about seven seconds for the bucket to come back.
const FIRST_UPLOAD_BACKOFF: Duration = Duration::from_secs(1);

/// [`upload`], retried as a whole: a multipart upload that failed is
/// aborted, so each attempt starts again from the staging file, which
/// stays until the last attempt.
async fn upload_with_retries(op: &Operator, local: &Path, key: &str) -> io::Result<()> {
    let mut backoff = FIRST_UPLOAD_BACKOFF;
    let mut attempt = 1;
    loop {
        match upload(op, local, key).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < UPLOAD_ATTEMPTS => {
                tracing::warn!(key, attempt, error = %e, retry_in = ?backoff, "upload to the bucket failed; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        attempt += 1;
    }
}

/// How long a replica that got a blob from its owner replica waits for
/// the owner's upload before uploading its own copy (the owner died, or its
/// bucket is failing): about what a multi-GiB upload takes.
pub const OWNER_UPLOAD_WAIT: Duration = Duration::from_secs(60);

/// Whether `key` exists in the bucket within `wait`, asked once a second
/// (a `HEAD` each; a multipart upload appears whole when it completes).
/// A failing bucket ends the wait at once: the owner's upload fails too,
/// and this replica's own upload, with its retries, is what may still land.
async fn landed_within(op: &Operator, key: &str, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match op.exists(key).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        if tokio::time::Instant::now() + OWNER_UPLOAD_POLL > deadline {
            return false;
        }
        tokio::time::sleep(OWNER_UPLOAD_POLL).await;
    }
}

const OWNER_UPLOAD_POLL: Duration = Duration::from_secs(1);

/// Removes a staging file when dropped.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

async fn upload(op: &Operator, local: &Path, key: &str) -> io::Result<()> {
    let mut file = fs::File::open(local).await?;
    let part_size = part_size(file.metadata().await?.len());
    let mut writer = op
        .writer_with(key)
        .chunk(part_size)
        .await
        .map_err(io::Error::from)?;
    loop {
        // A fresh part each time, handed over without a copy.
        let mut part = Vec::with_capacity(part_size);
        let n = (&mut file)
            .take(part_size as u64)
            .read_to_end(&mut part)
            .await?;
        if n == 0 {
            break;
        }
        if let Err(e) = writer.write(Bytes::from(part)).await {
            let _ = writer.abort().await;
            return Err(e.into());
        }
    }
    writer.close().await.map(|_| ()).map_err(io::Error::from)
}

/// At most the first `len` bytes of an object. One GET, read only that
/// far: OpenDAL fails a ranged read that the object is too short to fill.
async fn read_prefix(op: &Operator, key: &str, len: u64) -> io::Result<Vec<u8>> {
    let reader = op.reader(key).await.map_err(io::Error::from)?;
    let mut stream = reader
        .into_bytes_stream(..)
        .await
        .map_err(io::Error::from)?;
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < len
        && let Some(chunk) = stream.next().await
    {
        bytes.extend_from_slice(&chunk?);
    }
    bytes.truncate(len as usize);
    Ok(bytes)
}

fn remote_meta(meta: &opendal::Metadata) -> ObjectMeta {
    ObjectMeta {
        size: meta.content_length(),
        modified: meta
            .last_modified()
            .map_or(SystemTime::UNIX_EPOCH, SystemTime::from),
    }
}

fn walk(root: &Path, prefix: &str) -> io::Result<Vec<(String, ObjectMeta)>> {
    let mut found = Vec::new();
    let mut pending = vec![prefix.trim_end_matches('/').to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let key = format!("{dir}/{name}");
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(key);
            } else {
                found.push((
                    key,
                    ObjectMeta {
                        size: meta.len(),
                        modified: meta.modified()?,
                    },
                ));
            }
        }
    }
    Ok(found)
}

/// One trip to the blocking pool for a whole commit: a commit is several
/// system calls, and each separate trip would be a chance to wait for a
/// thread.
async fn on_blocking_pool(
    commit: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<()> {
    tokio::task::spawn_blocking(commit)
        .await
        .map_err(io::Error::other)?
}

/// Runs `commit`, removing the staging file if it fails: a staging file
/// that was not committed is never needed again.
fn discard_on_error(staging: &Path, commit: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let result = commit();
    if result.is_err() {
        let _ = std::fs::remove_file(staging);
    }
    result
}

/// Renames a file whose data is already synced to `to`, creating `to`'s
/// parent directory if needed, and syncs the directories changed, so after
/// a power loss the name is there with all its bytes or not there at all.
/// (A rename whose data was never synced can survive a crash as an empty
/// file under a digest's name: what ext4 leaves.)
fn durable_rename(from: &Path, to: &Path) -> io::Result<()> {
    let parent = to
        .parent()
        .ok_or_else(|| io::Error::other("object path without a parent"))?;
    create_dir_durably(parent)?;
    std::fs::rename(from, to)?;
    sync_dir(parent)
}

/// `create_dir_all`, syncing each directory it creates into its parent.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent();
    if let Some(parent) = parent {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Another commit created it meanwhile (and syncs it).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match parent {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

/// Makes a directory's entries durable. Filesystems that cannot sync a
/// directory say so with EINVAL; they are taken as they are (as
/// PostgreSQL does), rather than refusing to cache at all.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match std::fs::File::open(dir)?.sync_all() {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(root: &Path) -> Objects {
        Objects::Fs {
            root: root.to_owned(),
        }
    }

    #[tokio::test]
    async fn commits_create_missing_directories_and_consume_the_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let objects = local(dir.path());
        let staged = dir.path().join("staged");
        std::fs::write(&staged, b"blob").unwrap();
        objects.commit_file(&staged, "a/b/c/blob").await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("a/b/c/blob")).unwrap(),
            b"blob"
        );
        assert!(!staged.exists());

        let staging = dir.path().join("small");
        objects
            .write("a/b/link", b"one".to_vec(), &staging)
            .await
            .unwrap();
        objects
            .write("a/b/link", b"two".to_vec(), &staging)
            .await
            .unwrap();
        assert_eq!(objects.read("a/b/link").await.unwrap().unwrap(), b"two");
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn a_failed_commit_removes_its_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let objects = local(dir.path());
        std::fs::write(dir.path().join("in-the-way"), b"a file, not a directory").unwrap();
        let staged = dir.path().join("staged");
        std::fs::write(&staged, b"blob").unwrap();
        assert!(
            objects
                .commit_file(&staged, "in-the-way/blob")
                .await
                .is_err()
        );
        assert!(!staged.exists());

        let staging = dir.path().join("small");
        let written = objects.write("in-the-way/link", b"x".to_vec(), &staging);
        assert!(written.await.is_err());
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn bounded_reads_return_nothing_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let objects = local(dir.path());
        std::fs::write(dir.path().join("four"), b"1234").unwrap();
        let read = |key: &'static str| objects.read_within(key, 4);
        assert_eq!(read("four").await.unwrap(), Some(b"1234".to_vec()));
        std::fs::write(dir.path().join("five"), b"12345").unwrap();
        assert_eq!(read("five").await.unwrap(), None);
        assert_eq!(read("missing").await.unwrap(), None);
    }

    #[test]
    fn parts_are_as_small_as_s3_allows_and_never_too_many() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size(0), 5 << 20);
        assert_eq!(part_size(512 * MIB), 5 << 20);
        assert_eq!(part_size(MIN_PART * MAX_PARTS), 5 << 20);
        let huge = 100 * 1024 * MIB;
        assert_eq!(part_size(huge), 11 << 20);
        assert!(huge.div_ceil(part_size(huge) as u64) <= MAX_PARTS);
    }
}
