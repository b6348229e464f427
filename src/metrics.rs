//! Prometheus metrics, served at `/metrics` (and on `http.debug.addr`).
//!
//! One process-wide set, reachable from every layer through [`metrics()`],
//! because what is worth counting happens deep in the cache and upstream
//! code and threading a handle through every call would only add noise.
//! Labels never carry repository names or digests (unbounded cardinality).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    /// `GET`, `HEAD` or `other`: never the client's verbatim method.
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// The configured upstream label (`proxy` or a registry name).
    pub upstream: String,
    /// `manifest`, `blob`, `referrers`, or `peer_blob` (a blob served to
    /// another replica as its owner).
    pub kind: &'static str,
    /// `hit`, `miss` or `stale`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The configured upstream label (`proxy` or a registry name).
    pub upstream: String,
    /// `cache` (committed blob), `download` (followed a live download),
    /// or `peer` (sent to another replica as the blob's owner).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamStatusLabels {
    pub upstream: String,
    /// The HTTP status, or `error` when no answer came.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamMethodLabels {
    pub upstream: String,
    /// `GET` or `HEAD`.
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub upstream: String,
    /// `metadata` (manifests, HEADs, tag lists) or `body` (blob bodies).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A warming job's state (`queued`, `running`, `retrying`) or outcome
/// (`done`, `failed`), or what became of a submission or a push event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmLabels {
    pub state: &'static str,
}

/// What became of a cold blob asked of its owner replica: `served`, or
/// why this replica fetched it itself (`refused`, `failed`, `timeout`,
/// `cut` when the peer's body broke off and the upstream took over).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub lookups: Family<LookupLabels, Counter>,
    pub coalesced_waiters: Counter,
    pub blob_bytes_served: Family<SourceLabels, Counter>,
    pub upstream_bytes_fetched: Family<UpstreamLabels, Counter>,
    pub upstream_requests: Family<UpstreamStatusLabels, Counter>,
    pub upstream_up: Family<UpstreamLabels, Gauge>,
    pub token_fetches: Family<UpstreamLabels, Counter>,
    pub upstream_manifest_requests: Family<UpstreamMethodLabels, Counter>,
    pub ratelimit_limit: Family<UpstreamLabels, Gauge>,
    pub ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    pub ratelimit_window_seconds: Family<UpstreamLabels, Gauge>,
    pub downloads_in_flight: Gauge,
    pub downloads_waiting: Gauge,
    pub upstream_slots_in_use: Family<SlotLabels, Gauge>,
    pub download_failures: Family<ReasonLabels, Counter>,
    pub storage_bytes: Gauge,
    pub storage_objects: Gauge,
    pub evicted_blobs: Counter,
    pub evicted_bytes: Counter,
    pub catalog_listings: Counter,
    pub cluster_replicas: Gauge,
    pub peer_requests: Family<PeerLabels, Counter>,
    pub warm_jobs: Family<WarmLabels, Gauge>,
    pub warm_jobs_finished: Family<WarmLabels, Counter>,
    pub warm_submissions: Family<WarmLabels, Counter>,
    pub warm_events: Family<WarmLabels, Counter>,
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("kura");
        let metrics = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            lookups: Family::default(),
            coalesced_waiters: Counter::default(),
            blob_bytes_served: Family::default(),
            upstream_bytes_fetched: Family::default(),
            upstream_requests: Family::default(),
            upstream_up: Family::default(),
            token_fetches: Family::default(),
            upstream_manifest_requests: Family::default(),
            ratelimit_limit: Family::default(),
            ratelimit_remaining: Family::default(),
            ratelimit_window_seconds: Family::default(),
            downloads_in_flight: Gauge::default(),
            downloads_waiting: Gauge::default(),
            upstream_slots_in_use: Family::default(),
            download_failures: Family::default(),
            storage_bytes: Gauge::default(),
            storage_objects: Gauge::default(),
            evicted_blobs: Counter::default(),
            evicted_bytes: Counter::default(),
            catalog_listings: Counter::default(),
            cluster_replicas: Gauge::default(),
            peer_requests: Family::default(),
            warm_jobs: Family::default(),
            warm_jobs_finished: Family::default(),
            warm_submissions: Family::default(),
            warm_events: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "HTTP requests by route, method and status",
            metrics.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to response headers, by route",
            metrics.request_duration.clone(),
        );
        r.register(
            "cache_lookups",
            "Manifest, blob and referrers lookups by upstream: hit, miss or stale",
            metrics.lookups.clone(),
        );
        r.register(
            "coalesced_waiters",
            "Requests that joined an upstream fetch already in flight",
            metrics.coalesced_waiters.clone(),
        );
        r.register(
            "blob_bytes_served",
            "Blob bytes sent to clients (and, source peer, to other replicas), by upstream and source",
            metrics.blob_bytes_served.clone(),
        );
        r.register(
            "upstream_bytes_fetched",
            "Blob bytes received from upstreams",
            metrics.upstream_bytes_fetched.clone(),
        );
        r.register(
            "upstream_requests",
            "Upstream requests by upstream and status",
            metrics.upstream_requests.clone(),
        );
        r.register(
            "upstream_up",
            "1 if the upstream answered its last request, 0 if it did not",
            metrics.upstream_up.clone(),
        );
        r.register(
            "upstream_token_fetches",
            "Bearer tokens fetched, by upstream",
            metrics.token_fetches.clone(),
        );
        r.register(
            "upstream_manifest_requests",
            "Manifest requests sent upstream, by upstream and method \
             (a GET counts against Docker Hub's pull limit, a HEAD does not)",
            metrics.upstream_manifest_requests.clone(),
        );
        r.register(
            "upstream_ratelimit_limit",
            "The pull allowance the upstream last reported (ratelimit-limit)",
            metrics.ratelimit_limit.clone(),
        );
        r.register(
            "upstream_ratelimit_remaining",
            "The pulls left the upstream last reported (ratelimit-remaining)",
            metrics.ratelimit_remaining.clone(),
        );
        r.register(
            "upstream_ratelimit_window_seconds",
            "The window of the upstream's pull allowance, in seconds (w=)",
            metrics.ratelimit_window_seconds.clone(),
        );
        r.register(
            "downloads_in_flight",
            "Blob downloads currently running",
            metrics.downloads_in_flight.clone(),
        );
        r.register(
            "downloads_waiting",
            "Blob downloads waiting for a turn (cache.maxdownloads)",
            metrics.downloads_waiting.clone(),
        );
        r.register(
            "upstream_slots_in_use",
            "Upstream connection slots held, by upstream and kind",
            metrics.upstream_slots_in_use.clone(),
        );
        r.register(
            "download_failures",
            "Blob downloads not committed, by reason",
            metrics.download_failures.clone(),
        );
        r.register(
            "storage_bytes",
            "Bytes of committed blobs",
            metrics.storage_bytes.clone(),
        );
        r.register(
            "storage_objects",
            "Committed blobs",
            metrics.storage_objects.clone(),
        );
        r.register(
            "evicted_blobs",
            "Blobs removed by eviction (TTL or size cap)",
            metrics.evicted_blobs.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes of blobs removed by eviction",
            metrics.evicted_bytes.clone(),
        );
        r.register(
            "catalog_listings",
            "Listings of every repository in storage, for _catalog",
            metrics.catalog_listings.clone(),
        );
        r.register(
            "cluster_replicas",
            "Live replicas of the cluster as this one sees them (1 without cluster:)",
            metrics.cluster_replicas.clone(),
        );
        r.register(
            "peer_requests",
            "Cold blob fetches this replica asked of the owner replica, by outcome",
            metrics.peer_requests.clone(),
        );
        r.register(
            "warm_jobs",
            "Warming jobs by state: queued, running, retrying (waiting out a backoff)",
            metrics.warm_jobs.clone(),
        );
        r.register(
            "warm_jobs_finished",
            "Warming jobs finished, by state: done or failed (after its last attempt)",
            metrics.warm_jobs_finished.clone(),
        );
        r.register(
            "warm_submissions",
            "Images submitted for warming, by state: queued, coalesced (already queued or running), dropped (queue full)",
            metrics.warm_submissions.clone(),
        );
        r.register(
            "warm_events",
            "Push events received, by state: accepted, ignored (filtered out or not a tag push), unauthorized, invalid",
            metrics.warm_events.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn lookup(&self, upstream: &str, kind: &'static str, outcome: &'static str) {
        self.lookups
            .get_or_create(&LookupLabels {
                upstream: upstream.to_owned(),
                kind,
                outcome,
            })
            .inc();
    }

    /// A counter of `family` read without creating its series (0 if it
    /// was never touched), for the dashboard.
    pub fn count<L>(family: &Family<L, Counter>, labels: &L) -> u64
    where
        L: Clone + std::hash::Hash + Eq,
    {
        family.get(labels).map_or(0, |c| c.get())
    }

    /// A gauge of `family`, `None` if it was never set.
    pub fn gauge<L>(family: &Family<L, Gauge>, labels: &L) -> Option<i64>
    where
        L: Clone + std::hash::Hash + Eq,
    {
        family.get(labels).map(|g| g.get())
    }
}
