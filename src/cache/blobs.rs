//! Where a blob comes from: storage when committed; otherwise the shared
//! download of its digest ([`super::download`]), which every client
//! follows at its own pace ([`super::follower`]); or, with no room to
//! store it, the upstream directly, verified on the fly.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};

use super::download::{AskOwner, Download, Progress};
use super::follower;
use super::{Cache, fetch_overran, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::reference::{Digest, RepoName};
use crate::storage::blobs::ServedBlob;
use crate::storage::objects::ObjectReader;
use crate::upstream::{SlottedResponse, UpstreamError};

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
        progress: Download,
    },
    /// Passed through from upstream, verified on the fly.
    Upstream(SlottedResponse, Digest),
}

impl Cache {
    /// Size of a blob for HEAD: never downloads the blob.
    pub async fn blob_stat(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobStat, ApiError> {
        self.admit(name, None)?;
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
        if let Some(total) = self.downloads.live_size(digest) {
            return Ok(BlobStat {
                size: Some(total),
                cache_hit: true,
            });
        }
        let size = self.upstream_blob_size(name, digest).await?;
        Ok(BlobStat {
            size,
            cache_hit: false,
        })
    }

    /// One upstream `HEAD` of the blob in `name`, shared by concurrent
    /// requests for the same repository and digest.
    pub(super) async fn upstream_blob_size(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, ApiError> {
        let this = Arc::clone(self);
        let (head_name, head_digest) = (name.clone(), digest.clone());
        self.head_flights
            .run((name.clone(), digest.clone()), move || async move {
                this.upstream
                    .head_blob(&head_name, &head_digest)
                    .await
                    .map_err(|e| upstream_error(&e, ErrorCode::BlobUnknown))
            })
            .await
            .unwrap_or_else(|| Err(fetch_overran()))
    }

    /// Opens a blob for streaming: from storage, or by starting or joining
    /// the shared download (which asks the blob's owner replica first).
    pub async fn open_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        self.open_blob_asking(name, digest, AskOwner::Yes).await
    }

    /// [`Cache::open_blob`] for a peer replica that asked this one as the
    /// owner: a download it starts goes to the upstream, never on to yet
    /// another replica (replicas whose views of the cluster differ for a
    /// moment could otherwise ask each other in a circle); one that would
    /// wait for a download turn is refused at once (503), so the asker
    /// fetches the blob itself right away.
    pub async fn open_blob_for_peer(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        self.open_blob_asking(name, digest, AskOwner::No).await
    }

    async fn open_blob_asking(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        ask_owner: AskOwner,
    ) -> Result<BlobBody, ApiError> {
        self.admit(name, None)?;
        let committed_before = self.downloads.committed_so_far();
        let body = match self.open_committed(digest).await? {
            Some(body) => body,
            // The asking replica gives up on this one after its
            // `peertimeout` and fetches the blob itself: waiting for a turn
            // here would only make it two fetches instead of one.
            None if ask_owner == AskOwner::No && self.downloads.would_wait(digest) => {
                return Err(ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        ErrorCode::Unavailable,
                        "every download turn of the owner replica is taken",
                    )
                });
            }
            None => {
                let download =
                    self.join_or_start_download(name, digest, committed_before, ask_owner);
                self.follow(download, name, digest).await?
            }
        };
        // Only blobs that exist count as used (a 404 must not grow the map).
        self.storage.record_access(digest);
        Ok(body)
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

    /// Attaches to a download once the upstream has answered.
    async fn follow(
        &self,
        mut progress: Download,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, ApiError> {
        let state = progress
            .wait_for(|p| !matches!(p, Progress::Queued | Progress::Connecting))
            .await
            .map(|p| p.clone())
            .unwrap_or_else(|_| Progress::Failed(ApiError::internal("download vanished")));
        let (size, staging) = match state {
            Progress::Failed(err) => return Err(err),
            Progress::Complete { .. } => return self.committed_or_gone(digest).await,
            Progress::PassThrough => return self.pass_through(name, digest).await,
            Progress::Streaming { total, staging, .. } => (total, staging),
            Progress::Queued | Progress::Connecting => unreachable!("waited for a later state"),
        };
        match std::fs::File::open(&staging) {
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
                Ok(follower::stream(file, start, end, progress).boxed())
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
