//! A client following a live download: it reads the staging file as far
//! as the download's progress allows, from the download's recent batches
//! in memory when it keeps up, and waits for more when it has caught up.
//! A failed download ends its stream with an error, which cuts the
//! client's transfer short.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::download::Progress;
use crate::storage::file_reads;

/// Bytes `start..end` (`None`: to the end) of a live download, read from
/// its staging file as they become readable.
pub(super) fn stream(
    file: std::fs::File,
    start: u64,
    end: Option<u64>,
    progress: watch::Receiver<Progress>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let follower = Follower {
        file: Arc::new(file),
        pos: start,
        end,
        progress,
    };
    futures_util::stream::unfold(follower, |mut follower| async move {
        follower.next_chunk().await.map(|chunk| (chunk, follower))
    })
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
            Progress::Queued | Progress::Connecting => Ok((0, None)),
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
