//! Upstream courtesy: a cap on concurrent upstream requests, and a pause
//! after the upstream says "slow down" (429, or 503 with `Retry-After`),
//! so clients retrying in a tight loop do not turn into upstream load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;

/// Pause used when a 429 carries no `Retry-After`.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause honoured, whatever the upstream asks.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub struct Courtesy {
    slots: Arc<Semaphore>,
    paused: Mutex<Option<Pause>>,
}

#[derive(Clone, Copy)]
struct Pause {
    until: Instant,
    status: u16,
}

impl Courtesy {
    pub fn new(max_connections: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            paused: Mutex::new(None),
        }
    }

    /// Fails fast while the upstream asked us to back off.
    pub fn check_pause(&self) -> Result<(), UpstreamError> {
        let paused = *self.paused.lock().expect("courtesy lock");
        match paused {
            Some(pause) if Instant::now() < pause.until => Err(UpstreamError::Status {
                status: pause.status,
                retry_after: Some(pause.until.duration_since(Instant::now()).as_secs().max(1)),
                code: None,
            }),
            _ => Ok(()),
        }
    }

    /// One of the capped upstream connection slots, waiting at most `timeout`.
    pub async fn slot(&self, timeout: Duration) -> Result<OwnedSemaphorePermit, UpstreamError> {
        let acquire = self.slots.clone().acquire_owned();
        match tokio::time::timeout(timeout, acquire).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(UpstreamError::Unreachable(
                "all upstream connection slots busy".into(),
            )),
        }
    }

    /// Learns from a response status whether to pause.
    pub fn observe(&self, status: u16, retry_after: Option<u64>) {
        let pause_for = match (status, retry_after) {
            (429, seconds) => seconds.map_or(DEFAULT_BACKOFF, Duration::from_secs),
            (503, Some(seconds)) => Duration::from_secs(seconds),
            _ => return,
        };
        let until = Instant::now() + pause_for.min(MAX_BACKOFF);
        tracing::warn!(
            status,
            pause_seconds = pause_for.min(MAX_BACKOFF).as_secs(),
            "upstream asked to slow down; pausing requests"
        );
        *self.paused.lock().expect("courtesy lock") = Some(Pause { until, status });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_after_429_for_retry_after() {
        let courtesy = Courtesy::new(4);
        assert!(courtesy.check_pause().is_ok());
        courtesy.observe(500, Some(10));
        assert!(courtesy.check_pause().is_ok(), "500 does not pause");
        courtesy.observe(429, Some(10));
        match courtesy.check_pause() {
            Err(UpstreamError::Status {
                status: 429,
                retry_after: Some(s),
                ..
            }) => assert!(s <= 10),
            other => panic!("expected a pause, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn slots_are_capped() {
        let courtesy = Courtesy::new(1);
        let held = courtesy.slot(Duration::from_millis(10)).await.unwrap();
        assert!(courtesy.slot(Duration::from_millis(10)).await.is_err());
        drop(held);
        assert!(courtesy.slot(Duration::from_millis(10)).await.is_ok());
    }
}
