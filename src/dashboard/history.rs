//! The last 24 hours of the cache's totals, for the dashboard's charts:
//! one [`Sample`] of the process's running totals every [`INTERVAL`], in a
//! ring of [`CAPACITY`] (one day; a few tens of KiB). The charts draw the
//! differences between neighbouring samples; the API appends a sample of
//! the moment, so a freshly started Kura already has one interval to show.
//! Kept in memory only: a restart starts a new day.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::api::Totals;
use crate::routing::Registries;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(300);
/// Samples kept: 24 hours of [`INTERVAL`]s.
pub const CAPACITY: usize = 288;

/// The process's running totals at one moment (every upstream together).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Manifest, blob and referrers lookups answered from the cache
    /// (stale answers included).
    pub hits: u64,
    pub misses: u64,
    pub served_bytes: u64,
    pub fetched_bytes: u64,
    pub upstream_failures: u64,
}

impl Sample {
    pub fn now(registries: &Registries) -> Self {
        let mut sum = Totals::default();
        for cache in registries.caches() {
            sum.add(&Totals::of(&cache));
        }
        Self {
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            hits: sum.hits(),
            misses: sum.misses,
            served_bytes: sum.served_cache_bytes + sum.served_download_bytes,
            fetched_bytes: sum.fetched_bytes,
            upstream_failures: sum.failures,
        }
    }
}

#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock().expect("history lock");
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The kept samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("history lock")
            .iter()
            .copied()
            .collect()
    }
}

/// Samples `registries` now and then every [`INTERVAL`], forever.
pub async fn keep(history: Arc<History>, registries: Arc<Registries>) {
    let mut ticks = tokio::time::interval(INTERVAL);
    loop {
        ticks.tick().await;
        history.record(Sample::now(&registries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_day() {
        let history = History::default();
        for at in 0..(CAPACITY as u64 + 10) {
            history.record(Sample {
                at,
                hits: 0,
                misses: 0,
                served_bytes: 0,
                fetched_bytes: 0,
                upstream_failures: 0,
            });
        }
        let kept = history.samples();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].at, 10);
    }
}
