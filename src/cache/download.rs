//! A shared blob download: one per digest, admitted under a process-wide
//! limit, running as a task of its own (not inside any client's request),
//! streaming the upstream body into a local staging file while its
//! followers ([`super::follower`]) read along.
//!
//! In a cluster, the body comes from the digest's owner replica when that
//! is another one and it answers promptly (`crate::cluster::peer`); it is
//! staged and verified the same way, and if it breaks off, the upstream's
//! body takes over from the first byte not yet staged (asked for with
//! `Range`).
//!
//! Admission comes first and costs nothing but a map entry: no staging
//! file, no buffers and no blocking thread exist until a download holds a
//! permit and the upstream has answered. Requests beyond the limit wait a
//! bounded time, then get 503 with `Retry-After`.
//!
//! The last byte of a known-length blob stays unreadable until the digest
//! is verified, so no client can receive a complete-looking body whose
//! digest is wrong: on mismatch or truncation its transfer is cut short.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::{Cache, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::cluster::peer;
use crate::metrics::{ReasonLabels, UpstreamLabels, metrics};
use crate::reference::{Digest, RepoName};
use crate::storage::StagedBlob;
use crate::storage::blobs::{Batch, CommitError};

/// Written bytes a download keeps in memory for its followers (the newest
/// batches, whole): a client keeping up with the upstream is served from
/// here, without reading the staging file back.
const RECENT_BYTES: usize = 4 << 20;

/// How far a shared download has got.
#[derive(Clone)]
pub(super) enum Progress {
    /// Waiting for a download turn.
    Queued,
    /// Has its turn; waiting for the upstream's (or owner's) answer.
    Connecting,
    Streaming {
        staging: Arc<Path>,
        total: Option<u64>,
        readable: u64,
        recent: RecentBatches,
    },
    /// Every byte verified; committed unless storing failed, in which case
    /// the clients already following still read their staging handles.
    Complete {
        total: u64,
    },
    /// No room to store it: every client streams from upstream itself.
    PassThrough,
    Failed(ApiError),
}

/// What a follower holds of a download: its progress.
pub(super) type Download = watch::Receiver<Progress>;

/// How many downloads may run at once, process-wide (every upstream's
/// cache shares one), and how long a request waits for a turn.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    wait: Duration,
    /// Download tasks alive (queued, running or committing).
    live: Arc<watch::Sender<usize>>,
}

impl Admission {
    pub fn new(max_downloads: usize, wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_downloads.max(1))),
            wait,
            live: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Waits until no download task is alive: a client is released when
    /// its bytes are verified, before they are committed, so a process
    /// about to exit (`kura warm`, a server shutting down) waits here for
    /// the commits.
    pub async fn settled(&self) {
        let _ = self.live.subscribe().wait_for(|live| *live == 0).await;
    }

    /// A turn to download, or 503 with `Retry-After` once `wait` is over.
    async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let waiting = GaugeGuard::inc(&metrics().downloads_waiting);
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await;
        drop(waiting);
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                count_failure("busy");
                Err(ApiError {
                    retry_after: Some(self.wait.as_secs().max(1)),
                    ..ApiError::new(
                        ErrorCode::Unavailable,
                        "too many blob downloads in progress; try again",
                    )
                })
            }
        }
    }
}

/// One download in the map: what its task reports, and what the
/// dashboard shows of it.
struct InFlight {
    reports: Reports,
    repository: RepoName,
    started: Instant,
}

/// What a download's task reports as it goes, shared with its map entry:
/// its progress (each follower holds a receiver, so the receivers are its
/// followers) and the bytes received.
#[derive(Clone)]
struct Reports {
    progress: Arc<watch::Sender<Progress>>,
    /// Bytes received from upstream so far (the followers' `readable`
    /// moves by whole batches; this by every chunk).
    received: Arc<AtomicU64>,
}

/// What the dashboard shows of a download in flight.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DownloadStatus {
    pub digest: String,
    pub repository: String,
    /// `queued` (waiting for a turn), `connecting` (waiting for the
    /// upstream's answer),
    /// `streaming`, `committing` (verified; being stored) or `passthrough`.
    pub state: &'static str,
    pub received: u64,
    /// The upstream's `Content-Length`, when it sent one.
    pub total: Option<u64>,
    /// Clients reading along right now.
    pub followers: usize,
    pub seconds: u64,
}

/// Downloads in flight, by digest.
pub struct Downloads {
    in_flight: Mutex<HashMap<Digest, InFlight>>,
    /// Downloads committed so far: a request that found its blob missing
    /// learns from this whether one may have landed since it looked.
    committed: AtomicU64,
    admission: Admission,
}

impl Downloads {
    pub fn new(admission: Admission) -> Self {
        Self {
            in_flight: Mutex::default(),
            committed: AtomicU64::new(0),
            admission,
        }
    }

    /// A mark to pass to [`Cache::join_or_start_download`].
    pub(super) fn committed_so_far(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Whether a request for `digest` would wait for a download turn: its
    /// download waits for one, or none runs and every turn is taken.
    pub(super) fn would_wait(&self, digest: &Digest) -> bool {
        let in_flight = self.in_flight.lock().expect("downloads lock");
        match in_flight.get(digest) {
            Some(download) => matches!(*download.reports.progress.borrow(), Progress::Queued),
            None => self.admission.permits.available_permits() == 0,
        }
    }

    /// A live download's size, once the upstream has told it.
    pub(super) fn live_size(&self, digest: &Digest) -> Option<u64> {
        let in_flight = self.in_flight.lock().expect("downloads lock");
        match *in_flight.get(digest)?.reports.progress.borrow() {
            Progress::Streaming { total, .. } => total,
            _ => None,
        }
    }

    /// At most `limit` downloads in flight (longest running first), and
    /// how many there are in all. The map itself is bounded by the
    /// requests in flight; this copy by `limit`.
    pub fn snapshot(&self, limit: usize) -> (Vec<DownloadStatus>, usize) {
        let in_flight = self.in_flight.lock().expect("downloads lock");
        let mut entries: Vec<(&Digest, &InFlight)> = in_flight.iter().collect();
        entries.sort_by_key(|(_, entry)| entry.started);
        let shown = entries
            .into_iter()
            .take(limit)
            .map(|(digest, entry)| entry.status(digest))
            .collect();
        (shown, in_flight.len())
    }
}

impl InFlight {
    fn status(&self, digest: &Digest) -> DownloadStatus {
        let (state, total) = match &*self.reports.progress.borrow() {
            Progress::Queued => ("queued", None),
            Progress::Connecting => ("connecting", None),
            Progress::Streaming { total, .. } => ("streaming", *total),
            Progress::Complete { total } => ("committing", Some(*total)),
            Progress::PassThrough => ("passthrough", None),
            Progress::Failed(_) => ("failed", None),
        };
        DownloadStatus {
            digest: digest.to_string(),
            repository: self.repository.to_string(),
            state,
            received: self.reports.received.load(Ordering::Relaxed),
            total,
            followers: self.reports.progress.receiver_count(),
            seconds: self.started.elapsed().as_secs(),
        }
    }
}

impl Cache {
    /// Joins the download of `digest`, starting it if none runs.
    /// `committed_before` is [`Downloads::committed_so_far`] from before
    /// the caller looked in storage.
    pub(super) fn join_or_start_download(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        committed_before: u64,
        ask_owner: AskOwner,
    ) -> Download {
        let mut in_flight = self.downloads.in_flight.lock().expect("downloads lock");
        if let Some(download) = in_flight.get(digest) {
            metrics().coalesced_waiters.inc();
            return download.reports.progress.subscribe();
        }
        let (progress_tx, progress) = watch::channel(Progress::Queued);
        let reports = Reports {
            progress: Arc::new(progress_tx),
            received: Arc::default(),
        };
        in_flight.insert(
            digest.clone(),
            InFlight {
                reports: reports.clone(),
                repository: name.clone(),
                started: Instant::now(),
            },
        );
        self.downloads.admission.live.send_modify(|live| *live += 1);
        let leaves = LeaveOnDrop {
            cache: Arc::clone(self),
            digest: digest.clone(),
        };
        let (this, name, digest) = (Arc::clone(self), name.clone(), digest.clone());
        // Spawned, not driven by the requesting client: the cache fills even
        // if every client disconnects, and the map entry goes when it ends.
        tokio::spawn(async move {
            let _leaves = leaves;
            let outcome = this
                .download(&name, &digest, committed_before, ask_owner, &reports)
                .await;
            let final_state = outcome.unwrap_or_else(|err| {
                tracing::warn!(%name, %digest, error = %err, "blob download failed; nothing committed");
                Progress::Failed(err)
            });
            reports.progress.send_replace(final_state);
        });
        progress
    }

    async fn download(
        &self,
        name: &RepoName,
        digest: &Digest,
        committed_before: u64,
        ask_owner: AskOwner,
        reports: &Reports,
    ) -> Result<Progress, ApiError> {
        let (progress, received) = (&*reports.progress, &*reports.received);
        // Held until the commit is over, upload retries included: the
        // turn is what bounds the staging files on disk and the uploads'
        // part buffers, so a failing bucket slows new cold downloads
        // down instead of piling up staging files.
        let _turn = self.downloads.admission.admit().await?;
        progress.send_replace(Progress::Connecting);
        let _running = GaugeGuard::inc(&metrics().downloads_in_flight);
        // A download of this digest may have committed it between the
        // caller's look into storage and this one's start.
        if self.downloads.committed_so_far() != committed_before
            && let Some(total) = self
                .storage
                .blob_size(digest)
                .await
                .map_err(storage_error)?
        {
            return Ok(Progress::Complete { total });
        }
        let source = match self.ask_owner(name, digest, ask_owner).await {
            Some(peer) => peer,
            None => self.upstream_source(name, digest, 0).await?,
        };
        let total = source.total;
        let mut staged = self.storage.stage_blob().await.map_err(storage_failed)?;
        if let Some(total) = total
            && !self.room_for(&mut staged, total).await?
        {
            warn_disk_full(total);
            return Ok(Progress::PassThrough);
        }
        progress.send_replace(Progress::Streaming {
            staging: staged.path().into(),
            total,
            readable: 0,
            recent: RecentBatches::default(),
        });
        self.stream_to_staging(name, digest, source, &mut staged, progress, received)
            .await?;
        let received = staged.received();
        self.verify_and_commit(digest, staged, progress).await?;
        tracing::info!(%name, %digest, bytes = received, "blob cached");
        Ok(Progress::Complete { total: received })
    }

    /// The owner replica's answer for a cold blob, when a cluster gives
    /// the digest to another live replica and it answers promptly; `None`
    /// to fetch from the upstream here.
    async fn ask_owner(
        &self,
        name: &RepoName,
        digest: &Digest,
        ask_owner: AskOwner,
    ) -> Option<Source> {
        let cluster = self
            .cluster
            .as_ref()
            .filter(|_| ask_owner == AskOwner::Yes)?;
        let owner = cluster.owner(digest.to_string().as_bytes());
        if cluster.is_me(&owner) {
            return None;
        }
        match cluster
            .peers()
            .blob(&owner, self.upstream.label(), name, digest)
            .await
        {
            Ok(response) => Some(Source {
                total: response.content_length(),
                body: response
                    .bytes_stream()
                    .map(|chunk| chunk.map_err(|e| e.to_string()))
                    .boxed(),
                from_peer: true,
            }),
            Err(failure) => {
                tracing::info!(%digest, owner = %owner.address, ?failure, "owner replica did not serve the blob; fetching it from the upstream");
                None
            }
        }
    }

    /// The upstream's body from byte `skip` on (the bytes before it came
    /// from the owner replica, whose body broke off): asked for with
    /// `Range`, or skipped in the whole body an upstream without ranges
    /// sends.
    async fn upstream_source(
        &self,
        name: &RepoName,
        digest: &Digest,
        skip: u64,
    ) -> Result<Source, ApiError> {
        let response = self
            .upstream
            .get_blob_from(name, digest, skip)
            .await
            .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown))?;
        let partial = response.partial().map_err(|e| {
            count_failure("transfer");
            upstream_error(&e, ErrorCode::BlobUnknown)
        })?;
        let (total, skip) = match partial {
            None => (response.content_length(), skip),
            Some((start, size)) if start == skip => (Some(size), 0),
            Some((start, _)) => {
                count_failure("transfer");
                return Err(transfer_failed(format!(
                    "the upstream sent bytes from {start}, not {skip} as asked"
                )));
            }
        };
        let fetched = metrics()
            .upstream_bytes_fetched
            .get_or_create_owned(&UpstreamLabels {
                upstream: self.upstream.label().to_owned(),
            });
        let mut to_skip = skip;
        let body = response
            .into_stream()
            .map(move |chunk| {
                let chunk = chunk.map_err(|e| e.to_string())?;
                fetched.inc_by(chunk.len() as u64);
                let skipped = to_skip.min(chunk.len() as u64);
                to_skip -= skipped;
                Ok(chunk.slice(skipped as usize..))
            })
            .filter(|chunk| std::future::ready(!matches!(chunk, Ok(c) if c.is_empty())))
            .boxed();
        Ok(Source {
            body,
            total,
            from_peer: false,
        })
    }

    /// Streams `source` into staging. If the owner replica's body breaks
    /// off (it died, or its download failed), the upstream takes over
    /// from the first byte not yet staged; the digest check at the end
    /// covers both parts.
    async fn stream_to_staging(
        &self,
        name: &RepoName,
        digest: &Digest,
        mut source: Source,
        staged: &mut StagedBlob,
        progress: &watch::Sender<Progress>,
        received: &AtomicU64,
    ) -> Result<(), ApiError> {
        let total = source.total;
        loop {
            let chunk = match source.body.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(_)) | None if source.from_peer && !source.complete(staged) => {
                    peer::count("cut");
                    tracing::warn!(%digest, received = staged.received(), "the owner replica's body broke off; the upstream takes over");
                    source = self
                        .upstream_source(name, digest, staged.received())
                        .await?;
                    if source.total != total {
                        count_failure("transfer");
                        return Err(transfer_failed(
                            "the upstream's size differs from the owner replica's".into(),
                        ));
                    }
                    continue;
                }
                None => break,
                Some(Err(e)) => {
                    count_failure("transfer");
                    return Err(transfer_failed(format!("upstream transfer failed: {e}")));
                }
            };
            received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if total.is_some_and(|total| staged.received() + chunk.len() as u64 > total) {
                count_failure("overlong");
                return Err(transfer_failed(
                    "upstream sent more than the blob's announced size".into(),
                ));
            }
            let batch = staged.write(chunk).await.map_err(storage_failed)?;
            publish(progress, staged, batch);
        }
        if total.is_some_and(|total| staged.received() != total) {
            count_failure("truncated");
            return Err(transfer_failed(
                "upstream body shorter than the blob's announced size".into(),
            ));
        }
        let batch = staged.flush().await.map_err(storage_failed)?;
        publish(progress, staged, batch);
        if source.from_peer {
            staged.came_from_owner();
        }
        Ok(())
    }

    /// Checks the digest, releases the held-back last byte to followers as
    /// soon as it matches, then commits. Bytes that were verified reach
    /// every follower even if storing them fails (disk full): only the
    /// cache misses out.
    async fn verify_and_commit(
        &self,
        digest: &Digest,
        mut staged: StagedBlob,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), ApiError> {
        let actual = staged.finish().await.map_err(storage_failed)?;
        if &actual != digest {
            count_failure("digest_mismatch");
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("upstream blob rejected: content digest {actual} does not match"),
            ));
        }
        let verified = staged.written();
        progress.send_modify(|state| {
            if let Progress::Streaming { readable, .. } = state {
                *readable = verified;
            }
        });
        match staged.commit(digest).await {
            Ok(()) => {
                self.downloads.committed.fetch_add(1, Ordering::Release);
            }
            Err(CommitError::DigestMismatch { .. }) => unreachable!("verified above"),
            Err(CommitError::Io(e)) => {
                count_failure("storage");
                tracing::warn!(%digest, error = %e, "verified blob served but not stored");
            }
        }
        Ok(())
    }

    /// Whether a blob of this size fits, keeping the storage's margin; the
    /// space is then claimed for it.
    async fn room_for(&self, staged: &mut StagedBlob, size: u64) -> Result<bool, ApiError> {
        Ok(self.storage.has_room_for(size)
            && staged.preallocate(size).await.map_err(storage_failed)?)
    }
}

/// Whether a download may ask the blob's owner replica: not when the
/// request comes from a peer that asked this replica as the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskOwner {
    Yes,
    No,
}

/// Where a download's bytes come from: the upstream, or the owner replica
/// (which got them from the upstream).
struct Source {
    body: BoxStream<'static, Result<Bytes, String>>,
    total: Option<u64>,
    from_peer: bool,
}

impl Source {
    /// Whether every byte announced has been staged (unknown length: the
    /// end of the body is the end).
    fn complete(&self, staged: &StagedBlob) -> bool {
        self.total.is_none_or(|total| staged.received() >= total)
    }
}

/// Removes a download's map entry when its task ends, however it ends,
/// and counts it out of the live downloads.
struct LeaveOnDrop {
    cache: Arc<Cache>,
    digest: Digest,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        let downloads = &self.cache.downloads;
        if let Ok(mut in_flight) = downloads.in_flight.lock() {
            in_flight.remove(&self.digest);
        }
        downloads.admission.live.send_modify(|live| *live -= 1);
    }
}

/// A gauge raised while this lives.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn inc(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Makes a batch just written readable to followers (all but the last
/// byte of a known-length blob, which waits for verification).
fn publish(progress: &watch::Sender<Progress>, staged: &StagedBlob, batch: Option<Batch>) {
    let Some(batch) = batch else { return };
    progress.send_modify(|state| {
        if let Progress::Streaming {
            total,
            readable,
            recent,
            ..
        } = state
        {
            *readable = readable_before_verification(staged.written(), *total);
            recent.push(staged.written() - batch.len as u64, batch);
        }
    });
}

fn storage_failed(err: std::io::Error) -> ApiError {
    count_failure("storage");
    storage_error(err)
}

/// The parts of the newest written batches of a download, by offset,
/// oldest first: whole batches, [`RECENT_BYTES`] or just over.
#[derive(Clone, Default)]
pub(super) struct RecentBatches {
    parts: std::collections::VecDeque<(u64, Bytes)>,
    /// Bytes in `parts`.
    held: usize,
    /// Parts per batch held, oldest first: batches are let go whole.
    batches: std::collections::VecDeque<usize>,
}

impl RecentBatches {
    fn push(&mut self, mut start: u64, batch: Batch) {
        while self.held + batch.len > RECENT_BYTES
            && let Some(parts) = self.batches.pop_front()
        {
            for (_, part) in self.parts.drain(..parts) {
                self.held -= part.len();
            }
        }
        self.held += batch.len;
        self.batches.push_back(batch.parts.len());
        for part in batch.parts {
            let len = part.len() as u64;
            self.parts.push_back((start, part));
            start += len;
        }
    }

    /// The bytes from `pos` up to `limit` (exclusive) that are still held,
    /// as a view into the part that holds `pos`.
    pub(super) fn slice(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let after = self.parts.partition_point(|(start, _)| *start <= pos);
        let (start, part) = self.parts.get(after.checked_sub(1)?)?;
        let from = (pos - start) as usize;
        let to = limit.saturating_sub(*start).min(part.len() as u64) as usize;
        (from < to).then(|| part.slice(from..to))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_batches_serve_views_of_the_newest_parts() {
        // Batches of two parts, a quarter of what is held each.
        let quarter = RECENT_BYTES / 4;
        let mut recent = RecentBatches::default();
        for i in 0..5u8 {
            let mut batch = Batch::default();
            batch.push(Bytes::from(vec![i; quarter - 4]));
            batch.push(Bytes::from(vec![i + 100; 4]));
            recent.push(u64::from(i) * quarter as u64, batch);
        }
        assert_eq!(
            recent.held, RECENT_BYTES,
            "the oldest batch was let go whole"
        );
        assert_eq!(recent.slice(0, u64::MAX), None);
        let second = quarter as u64;
        assert_eq!(recent.slice(second + 1, second + 4).unwrap(), vec![1u8; 3]);
        assert_eq!(
            recent.slice(2 * second - 3, u64::MAX).unwrap(),
            vec![101u8; 3],
            "a view of the part holding the position, to its end"
        );
        assert_eq!(recent.slice(second, second), None, "nothing readable yet");
        let past_the_end = 5 * quarter as u64;
        assert_eq!(recent.slice(past_the_end, past_the_end + 10), None);
    }

    #[tokio::test]
    async fn admission_beyond_the_limit_waits_then_answers_503_with_retry_after() {
        let admission = Admission::new(1, Duration::from_millis(50));
        let held = admission.admit().await.expect("the first turn is free");
        let refused = admission.admit().await.expect_err("no turn left");
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(refused.retry_after, Some(1));
        drop(held);
        let _turn = admission.admit().await.expect("a returned turn is reused");
    }
}
