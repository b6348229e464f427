//! Upstream courtesy: a cap on concurrent upstream requests, and a pause
//! after the upstream says "slow down" (429, or 503 with `Retry-After`),
//! so clients retrying in a tight loop do not turn into upstream load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;
use crate::metrics::{SlotLabels, metrics};

/// Pause used when a 429 carries no `Retry-After`.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause honoured, whatever the upstream asks.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What an upstream request is for. A blob body can hold its slot for
/// minutes; everything else for the time of one small answer, and must
/// not wait behind bodies: a slow rollout of big layers would otherwise
/// stop every manifest, which every pull starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// Manifests, HEADs, tag lists.
    Metadata,
    /// Blob bodies.
    Body,
}

pub struct Courtesy {
    /// Every upstream request holds one of these (`maxconnections`).
    any: Arc<Semaphore>,
    /// Blob bodies also hold one of these: fewer than `any`, so the rest
    /// of `any` is always left for metadata.
    bodies: Arc<Semaphore>,
    in_use: [Gauge; 2],
    paused: Mutex<Option<Pause>>,
}

/// One of the capped connection slots, returned when dropped.
pub struct Slot {
    _any: OwnedSemaphorePermit,
    _body: Option<OwnedSemaphorePermit>,
    in_use: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

#[derive(Clone, Copy)]
struct Pause {
    until: Instant,
    status: u16,
}

/// Slots only metadata may use: a quarter of them, at least one. With a
/// single connection there is nothing to reserve.
fn reserved_for_metadata(max_connections: usize) -> usize {
    match max_connections {
        0 | 1 => 0,
        n => (n / 4).max(1),
    }
}

impl Courtesy {
    /// `label` names the upstream in the slot gauges.
    pub fn new(max_connections: usize, label: &str) -> Self {
        let max = max_connections.max(1);
        let gauge = |kind| {
            metrics()
                .upstream_slots_in_use
                .get_or_create(&SlotLabels {
                    upstream: label.to_owned(),
                    kind,
                })
                .clone()
        };
        Self {
            any: Arc::new(Semaphore::new(max)),
            bodies: Arc::new(Semaphore::new(max - reserved_for_metadata(max))),
            in_use: [gauge("metadata"), gauge("body")],
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
    pub async fn slot(&self, kind: SlotKind, timeout: Duration) -> Result<Slot, UpstreamError> {
        let acquire = async {
            let body = match kind {
                SlotKind::Body => Some(self.bodies.clone().acquire_owned().await.ok()?),
                SlotKind::Metadata => None,
            };
            let any = self.any.clone().acquire_owned().await.ok()?;
            Some((any, body))
        };
        match tokio::time::timeout(timeout, acquire).await {
            Ok(Some((any, body))) => {
                let in_use = self.in_use[kind as usize].clone();
                in_use.inc();
                Ok(Slot {
                    _any: any,
                    _body: body,
                    in_use,
                })
            }
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
        let courtesy = Courtesy::new(4, "test-pause");
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
        let courtesy = Courtesy::new(1, "test-cap");
        let wait = Duration::from_millis(10);
        let held = courtesy.slot(SlotKind::Metadata, wait).await.unwrap();
        assert!(courtesy.slot(SlotKind::Metadata, wait).await.is_err());
        drop(held);
        assert!(courtesy.slot(SlotKind::Body, wait).await.is_ok());
    }

    #[tokio::test]
    async fn bodies_never_take_the_slots_kept_for_metadata() {
        let courtesy = Courtesy::new(8, "test-split");
        let wait = Duration::from_millis(10);
        let mut bodies = Vec::new();
        while let Ok(slot) = courtesy.slot(SlotKind::Body, wait).await {
            bodies.push(slot);
        }
        assert_eq!(bodies.len(), 6, "a quarter is kept for metadata");
        let metadata = [
            courtesy.slot(SlotKind::Metadata, wait).await,
            courtesy.slot(SlotKind::Metadata, wait).await,
        ];
        assert!(metadata.iter().all(Result::is_ok));
        assert!(courtesy.slot(SlotKind::Metadata, wait).await.is_err());
    }
}
