//! Blobs: served from storage when committed; otherwise one shared upstream
//! download per digest that writes to a staging file at upstream speed while
//! every client follows that file at its own pace.
//!
//! The download keeps the last byte of a known-length blob unreadable until
//! the digest is verified, so a client can never receive a complete-looking
//! body whose digest is wrong: on mismatch or truncation its transfer is
//! cut short.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, watch};

use super::{Cache, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::metrics::{ReasonLabels, UpstreamLabels, metrics};
use crate::reference::{Digest, RepoName};
use crate::storage::blobs::{CommitError, ServedBlob};
use crate::storage::objects::ObjectReader;
use crate::storage::{StagedBlob, file_reads};
use crate::upstream::{SlottedResponse, UpstreamError};

/// Written batches a download keeps in memory for its followers (about
/// 1 MiB each): a client keeping up with the upstream is served from
/// here, without reading the staging file back.
const RECENT_BATCHES: usize = 4;

/// How far a shared download has got.
#[derive(Clone)]
enum Progress {
    Connecting,
    Streaming {
        total: Option<u64>,
        readable: u64,
        recent: RecentBatches,
    },
    Complete {
        total: u64,
    },
    /// No room to store it: every client streams from upstream itself.
    PassThrough,
    Failed(ApiError),
}

struct Download {
    staging_path: PathBuf,
    progress: watch::Receiver<Progress>,
}

/// Downloads in flight, by digest.
#[derive(Default)]
pub struct Downloads {
    in_flight: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Downloads committed so far: a request that found its blob missing
    /// learns from this whether one may have landed since it looked.
    committed: AtomicU64,
}

/// A blob's size as far as known without downloading it.
pub struct BlobStat {
    pub size: Option<u64>,
    pub cache_hit: bool,
}

/// An open blob, ready to stream any byte range.
pub struct BlobBody {
    /// Known size: always for committed blobs; for a live download once
    /// the upstream sent `Content-Length`.
    pub size: Option<u64>,
    pub cache_hit: bool,
    source: Source,
}

enum Source {
    /// A committed blob.
    Stored(ObjectReader),
    /// A committed blob the client fetches from the storage itself.
    Redirect(String),
    /// A download's staging file, readable as far as its progress says.
    Live {
        file: std::fs::File,
        progress: watch::Receiver<Progress>,
    },
    /// Passed through from upstream, verified on the fly.
    Upstream(SlottedResponse, Digest),
}

impl Cache {
    /// Size of a blob for HEAD: never downloads the blob.
    pub async fn blob_stat(&self, name: &RepoName, digest: &Digest) -> Result<BlobStat, ApiError> {
        if let Some(size) = self
            .storage
            .blob_size(digest)
            .await
            .map_err(storage_error)?
        {
            return Ok(BlobStat {
                size: Some(size),
                cache_hit: true,
            });
        }
        if let Some(download) = self.downloads.in_flight.lock().await.get(digest)
            && let Progress::Streaming {
                total: Some(total), ..
            } = *download.progress.borrow()
        {
            return Ok(BlobStat {
                size: Some(total),
                cache_hit: true,
            });
        }
        let size = self
            .upstream
            .head_blob(name, digest)
            .await
            .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown))?;
        Ok(BlobStat {
            size,
            cache_hit: false,
        })
    }

    /// Opens a blob for streaming: from storage, or by starting or joining
    /// the shared download.
    pub async fn open_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        let body = self.open_blob_uncounted(name, digest).await?;
        // Only blobs that exist count as used (a 404 must not grow the map).
        self.storage.record_access(digest);
        Ok(body)
    }

    async fn open_blob_uncounted(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        let committed_before = self.downloads.committed.load(Ordering::Acquire);
        if let Some(body) = self.open_committed(digest).await? {
            return Ok(body);
        }
        let download = {
            let mut in_flight = self.downloads.in_flight.lock().await;
            match in_flight.get(digest) {
                Some(download) => {
                    metrics().coalesced_waiters.inc();
                    download.clone()
                }
                None => {
                    // A download that finished since the first check
                    // committed the blob before leaving the map. Storage is
                    // asked again (under the lock every cold open takes, so
                    // on S3 a round trip that holds up the others) only if
                    // some download committed meanwhile.
                    if self.downloads.committed.load(Ordering::Acquire) != committed_before
                        && let Some(body) = self.open_committed(digest).await?
                    {
                        return Ok(body);
                    }
                    let download = self.start_download(name, digest).await?;
                    in_flight.insert(digest.clone(), download.clone());
                    download
                }
            }
        };
        self.follow(&download, name, digest).await
    }

    async fn open_committed(&self, digest: &Digest) -> Result<Option<BlobBody>, ApiError> {
        let served = self
            .storage
            .serve_blob(digest)
            .await
            .map_err(storage_error)?;
        Ok(served.map(|served| {
            let (source, size) = match served {
                ServedBlob::Here(reader, size) => (Source::Stored(reader), size),
                ServedBlob::Elsewhere(url, size) => (Source::Redirect(url), size),
            };
            BlobBody {
                size: Some(size),
                cache_hit: true,
                source,
            }
        }))
    }

    async fn start_download(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Download>, ApiError> {
        let staged = self.storage.stage_blob().await.map_err(storage_error)?;
        let (progress_tx, progress) = watch::channel(Progress::Connecting);
        let download = Arc::new(Download {
            staging_path: staged.path().to_owned(),
            progress,
        });
        let this = self.clone();
        let (name, digest) = (name.clone(), digest.clone());
        // Spawned, not driven by the requesting client: the cache fills even
        // if every client disconnects.
        tokio::spawn(async move {
            metrics().downloads_in_flight.inc();
            let outcome = this.download(&name, &digest, staged, &progress_tx).await;
            metrics().downloads_in_flight.dec();
            let final_state = match outcome {
                Ok(state) => state,
                Err(err) => {
                    tracing::warn!(%name, %digest, error = %err, "blob download failed; nothing committed");
                    Progress::Failed(err)
                }
            };
            if matches!(final_state, Progress::Complete { .. }) {
                this.downloads.committed.fetch_add(1, Ordering::Release);
            }
            progress_tx.send_replace(final_state);
            this.downloads.in_flight.lock().await.remove(&digest);
        });
        Ok(download)
    }

    async fn download(
        &self,
        name: &RepoName,
        digest: &Digest,
        mut staged: StagedBlob,
        progress: &watch::Sender<Progress>,
    ) -> Result<Progress, ApiError> {
        match self
            .stream_to_staging(name, digest, &mut staged, progress)
            .await
        {
            Ok(Staged::Written) => {
                let total = staged.received();
                staged.commit(digest).await.map_err(|e| match e {
                    CommitError::DigestMismatch { .. } => {
                        count_failure("digest_mismatch");
                        ApiError::new(
                            ErrorCode::Unavailable,
                            format!("upstream blob rejected: {e}"),
                        )
                    }
                    CommitError::Io(e) => storage_failed(e),
                })?;
                tracing::info!(%name, %digest, bytes = total, "blob cached");
                Ok(Progress::Complete { total })
            }
            Ok(Staged::NoRoom) => {
                staged.discard().await;
                Ok(Progress::PassThrough)
            }
            Err(err) => {
                staged.discard().await;
                Err(err)
            }
        }
    }

    async fn stream_to_staging(
        &self,
        name: &RepoName,
        digest: &Digest,
        staged: &mut StagedBlob,
        progress: &watch::Sender<Progress>,
    ) -> Result<Staged, ApiError> {
        let response = self
            .upstream
            .get_blob(name, digest)
            .await
            .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown))?;
        let total = response.content_length();
        if let Some(total) = total
            && !self.room_for(staged, total).await?
        {
            warn_disk_full(total);
            return Ok(Staged::NoRoom);
        }
        progress.send_replace(Progress::Streaming {
            total,
            readable: 0,
            recent: RecentBatches::default(),
        });
        let fetched = metrics()
            .upstream_bytes_fetched
            .get_or_create_owned(&UpstreamLabels {
                upstream: self.upstream.label().to_owned(),
            });
        let mut body = response.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                count_failure("transfer");
                transfer_failed(format!("upstream transfer failed: {e}"))
            })?;
            fetched.inc_by(chunk.len() as u64);
            if total.is_some_and(|total| staged.received() + chunk.len() as u64 > total) {
                count_failure("overlong");
                return Err(transfer_failed(
                    "upstream sent more than its Content-Length".into(),
                ));
            }
            let batch = staged.write(&chunk).await.map_err(storage_failed)?;
            publish(progress, staged, batch);
        }
        if total.is_some_and(|total| staged.received() != total) {
            count_failure("truncated");
            return Err(transfer_failed(
                "upstream body shorter than its Content-Length".into(),
            ));
        }
        let batch = staged.flush().await.map_err(storage_failed)?;
        publish(progress, staged, batch);
        Ok(Staged::Written)
    }

    /// Whether a blob of this size fits, keeping the storage's margin; the
    /// space is then claimed for it.
    async fn room_for(&self, staged: &mut StagedBlob, size: u64) -> Result<bool, ApiError> {
        Ok(self.storage.has_room_for(size)
            && staged.preallocate(size).await.map_err(storage_failed)?)
    }

    /// Attaches to a download once the upstream has answered.
    async fn follow(
        &self,
        download: &Download,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        let mut progress = download.progress.clone();
        let state = progress
            .wait_for(|p| !matches!(p, Progress::Connecting))
            .await
            .map(|p| p.clone())
            .unwrap_or_else(|_| Progress::Failed(ApiError::internal("download vanished")));
        let size = match state {
            Progress::Failed(err) => return Err(err),
            Progress::Complete { .. } => return self.committed_or_gone(digest).await,
            Progress::PassThrough => return self.pass_through(name, digest).await,
            Progress::Streaming { total, .. } => total,
            Progress::Connecting => unreachable!("waited for a later state"),
        };
        match std::fs::File::open(&download.staging_path) {
            Ok(file) => Ok(BlobBody {
                size,
                cache_hit: false,
                source: Source::Live { file, progress },
            }),
            // The download finished (renamed or removed its staging file)
            // between the state check and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.committed_or_gone(digest).await,
            Err(e) => Err(storage_error(e)),
        }
    }

    /// With no room to store the blob, each client gets its own upstream
    /// stream, still verified against the digest.
    async fn pass_through(&self, name: &RepoName, digest: &Digest) -> Result<BlobBody, ApiError> {
        let response = self
            .upstream
            .get_blob(name, digest)
            .await
            .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown))?;
        Ok(BlobBody {
            size: response.content_length(),
            cache_hit: false,
            source: Source::Upstream(response, digest.clone()),
        })
    }

    /// The blob a download this request started or joined has just
    /// committed: served from storage, but still a miss for this request.
    async fn committed_or_gone(&self, digest: &Digest) -> Result<BlobBody, ApiError> {
        let body = self.open_committed(digest).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::Unavailable, "blob download failed; try again")
        })?;
        Ok(BlobBody {
            cache_hit: false,
            ..body
        })
    }
}

/// Makes a batch just written readable to followers (all but the last
/// byte of a known-length blob, which waits for verification).
fn publish(progress: &watch::Sender<Progress>, staged: &StagedBlob, batch: Option<Bytes>) {
    let Some(batch) = batch else { return };
    progress.send_modify(|state| {
        if let Progress::Streaming {
            total,
            readable,
            recent,
        } = state
        {
            *readable = readable_before_verification(staged.written(), *total);
            recent.push(staged.written() - batch.len() as u64, batch);
        }
    });
}

fn storage_failed(err: io::Error) -> ApiError {
    count_failure("storage");
    storage_error(err)
}

/// The newest written batches of a download, by offset, oldest first.
#[derive(Clone, Default)]
struct RecentBatches(std::collections::VecDeque<(u64, Bytes)>);

impl RecentBatches {
    fn push(&mut self, start: u64, batch: Bytes) {
        if self.0.len() == RECENT_BATCHES {
            self.0.pop_front();
        }
        self.0.push_back((start, batch));
    }

    /// The bytes from `pos` up to `limit` (exclusive) that are still held,
    /// as a view into the batch that holds `pos`.
    fn slice(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let (start, batch) = self
            .0
            .iter()
            .find(|(start, batch)| (*start..*start + batch.len() as u64).contains(&pos))?;
        let from = (pos - start) as usize;
        let to = limit.saturating_sub(*start).min(batch.len() as u64) as usize;
        (from < to).then(|| batch.slice(from..to))
    }
}

fn count_failure(reason: &'static str) {
    metrics()
        .download_failures
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// How much of a download followers may read before its digest is checked:
/// with a known length, everything but the last byte, so no client can
/// receive a complete-looking body that turns out wrong. (Without a length
/// there is nothing to mistake: a failed transfer ends without the final
/// chunk of chunked encoding.)
fn readable_before_verification(written: u64, total: Option<u64>) -> u64 {
    match total {
        Some(total) => written.min(total.saturating_sub(1)),
        None => written,
    }
}

/// What became of a download's bytes.
enum Staged {
    Written,
    /// Not enough disk space: nothing was written.
    NoRoom,
}

/// Logs a full disk at most once a minute: every cold pull would report it.
fn warn_disk_full(size: u64) {
    static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_LOGGED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            blob_bytes = size,
            "storage full: passing blobs through without caching"
        );
    }
}

fn transfer_failed(message: String) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, message)
}

impl BlobBody {
    /// Where the client should fetch the bytes instead (S3 with redirects).
    pub fn redirect(&self) -> Option<&str> {
        match &self.source {
            Source::Redirect(url) => Some(url),
            _ => None,
        }
    }

    /// Streams bytes `start..end` (end exclusive; `None` = to the end).
    /// A failed download ends the stream with an error, which aborts the
    /// client's transfer.
    pub async fn into_stream(
        self,
        start: u64,
        end: Option<u64>,
    ) -> io::Result<BoxStream<'static, io::Result<Bytes>>> {
        let end = end.or(self.size);
        match self.source {
            Source::Stored(reader) => {
                let end = end.ok_or_else(|| io::Error::other("stored blob without a size"))?;
                reader.into_stream(start, end).await
            }
            Source::Redirect(_) => Err(io::Error::other(
                "the blob is served by redirect, not through Kura",
            )),
            Source::Live { file, progress } => {
                let reader = Follower {
                    file: Arc::new(file),
                    pos: start,
                    end,
                    progress,
                };
                Ok(
                    futures_util::stream::unfold(reader, |mut reader| async move {
                        reader.next_chunk().await.map(|chunk| (chunk, reader))
                    })
                    .boxed(),
                )
            }
            Source::Upstream(response, digest) => {
                let verified = verified(response.into_stream(), digest);
                Ok(byte_window(verified, start, end).boxed())
            }
        }
    }
}

/// Passes chunks through while hashing them, holding back the newest one
/// until the end: if the digest does not match, the stream ends in an
/// error instead of that last chunk.
fn verified(
    upstream: impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static,
    digest: Digest,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    struct State<S> {
        upstream: S,
        hasher: Sha256,
        held: Option<Bytes>,
        digest: Digest,
    }
    let state = State {
        upstream: Box::pin(upstream),
        hasher: Sha256::new(),
        held: None,
        digest,
    };
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            match state.upstream.next().await {
                Some(Ok(chunk)) => {
                    state.hasher.update(&chunk);
                    if let Some(previous) = state.held.replace(chunk) {
                        return Some((Ok(previous), Some(state)));
                    }
                }
                Some(Err(err)) => return Some((Err(io::Error::other(err.to_string())), None)),
                None => {
                    let actual = Digest::from_sha256(state.hasher.finalize_reset().as_slice());
                    if actual != state.digest {
                        tracing::error!(expected = %state.digest, %actual, "upstream blob does not match its digest");
                        return Some((Err(io::Error::other("blob digest mismatch")), None));
                    }
                    return state.held.take().map(|last| (Ok(last), None));
                }
            }
        }
    })
}

/// The bytes `start..end` of a stream of chunks.
fn byte_window(
    chunks: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let end = end.unwrap_or(u64::MAX);
    chunks
        .scan(0u64, move |pos, chunk| {
            let chunk_start = *pos;
            if chunk_start >= end {
                return std::future::ready(None);
            }
            let item = chunk.map(|chunk| {
                *pos += chunk.len() as u64;
                let from = start.saturating_sub(chunk_start).min(chunk.len() as u64) as usize;
                let to = (end - chunk_start).min(chunk.len() as u64) as usize;
                chunk.slice(from..to.max(from))
            });
            std::future::ready(Some(item))
        })
        .filter(|item| std::future::ready(!matches!(item, Ok(chunk) if chunk.is_empty())))
}

/// Reads a live download's staging file, waiting for progress as needed.
struct Follower {
    file: Arc<std::fs::File>,
    pos: u64,
    end: Option<u64>,
    progress: watch::Receiver<Progress>,
}

impl Follower {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                return None;
            }
            let (limit, held) = match self.readable_now() {
                Ok(found) => found,
                Err(err) => return Some(Err(err)),
            };
            if let Some(bytes) = held {
                self.pos += bytes.len() as u64;
                return Some(Ok(bytes));
            }
            if self.pos < limit {
                return Some(self.read(limit - self.pos).await);
            }
            // A finished download of unknown size, fully read.
            if self.is_complete() {
                return None;
            }
            if self.progress.changed().await.is_err() && !self.is_complete() {
                return Some(Err(io::Error::other("blob download ended unexpectedly")));
            }
        }
    }

    /// How far the staging file may be read now (capped at the requested
    /// end), and the next bytes if the download still holds them in memory.
    fn readable_now(&self) -> io::Result<(u64, Option<Bytes>)> {
        let limit = |readable: u64| self.end.map_or(readable, |end| readable.min(end));
        match &*self.progress.borrow() {
            Progress::Connecting => Ok((0, None)),
            Progress::Streaming {
                readable, recent, ..
            } => {
                let limit = limit(*readable);
                Ok((limit, recent.slice(self.pos, limit)))
            }
            Progress::Complete { total } => Ok((limit(*total), None)),
            // Followers exist only once bytes were staged, which rules this out.
            Progress::PassThrough => Err(io::Error::other("download switched to pass-through")),
            Progress::Failed(err) => Err(io::Error::other(err.to_string())),
        }
    }

    fn is_complete(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Complete { .. })
    }

    /// Reads bytes the download wrote moments ago (from the page cache).
    async fn read(&mut self, available: u64) -> io::Result<Bytes> {
        let len = available.min(file_reads::CHUNK as u64) as usize;
        let chunk = file_reads::read_chunk(&self.file, self.pos, len).await?;
        self.pos += chunk.len() as u64;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let parts: Vec<Result<Bytes, UpstreamError>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures_util::stream::iter(parts)
    }

    async fn collect(stream: impl Stream<Item = io::Result<Bytes>>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut stream = Box::pin(stream);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn verified_stream_passes_matching_bytes() {
        let digest = Digest::of_bytes(b"hello world");
        let body = collect(verified(chunks(&[b"hello", b" ", b"world"]), digest)).await;
        assert_eq!(body.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn verified_stream_withholds_the_last_chunk_on_mismatch() {
        let digest = Digest::of_bytes(b"something else");
        let mut stream = Box::pin(verified(chunks(&[b"hello", b" ", b"world"]), digest));
        let mut received = Vec::new();
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => received.extend_from_slice(&chunk),
                Err(_) => failed = true,
            }
        }
        assert!(failed);
        assert_eq!(received, b"hello ", "the final chunk is never released");
    }

    #[test]
    fn recent_batches_serve_views_of_the_newest_batches() {
        let mut recent = RecentBatches::default();
        for i in 0..(RECENT_BATCHES as u64 + 1) {
            recent.push(i * 4, Bytes::from(vec![i as u8; 4]));
        }
        assert_eq!(recent.slice(0, 100), None, "the oldest batch was let go");
        assert_eq!(recent.slice(5, 100).unwrap(), vec![1u8; 3]);
        assert_eq!(
            recent.slice(9, 11).unwrap(),
            vec![2u8; 2],
            "capped at the limit"
        );
        assert_eq!(recent.slice(9, 9), None, "nothing readable yet");
        let past_the_end = 4 * (RECENT_BATCHES as u64 + 1);
        assert_eq!(recent.slice(past_the_end, past_the_end + 10), None);
    }

    #[tokio::test]
    async fn byte_window_slices_across_chunks() {
        let source = || {
            futures_util::stream::iter(
                [b"abc".as_slice(), b"def", b"ghi"].map(|p| Ok(Bytes::from_static(p))),
            )
        };
        assert_eq!(
            collect(byte_window(source(), 0, None)).await.unwrap(),
            b"abcdefghi"
        );
        assert_eq!(
            collect(byte_window(source(), 2, Some(7))).await.unwrap(),
            b"cdefg"
        );
        assert_eq!(
            collect(byte_window(source(), 3, Some(6))).await.unwrap(),
            b"def"
        );
        assert_eq!(collect(byte_window(source(), 8, None)).await.unwrap(), b"i");
    }
}
