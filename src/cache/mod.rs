//! The pull-through logic between the HTTP API and storage/upstream:
//! answer from storage when possible, otherwise fetch once from upstream
//! (shared by concurrent requests), verify, store, and serve.
//!
//! - [`manifests`]: manifests by digest and by tag, tag freshness, stale serving.
//! - [`blobs`]: blob downloads that stream to clients while filling the cache.
//! - [`tags`]: tag lists, from upstream (every page) or from what is cached.
//! - [`referrers`]: a subject's referrers (API or tag schema), cached like a tag.
//! - `scope`: what a repository is known to hold, for blob scoping.
//! - [`policy`]: which repositories and tags the upstream's content policy
//!   admits; [`Cache::admit`] asks it before anything else on every path.

pub mod blobs;
pub mod download;
mod follower;
pub mod manifests;
pub mod policy;
pub mod referrers;
mod scope;
pub mod tags;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::api::error::{ApiError, ErrorCode};
use crate::cluster::Cluster;
use crate::reference::{Digest, RepoName, Tag};
use crate::singleflight::Flights;
use crate::storage::Storage;
use crate::upstream::{Upstream, UpstreamError};

pub use blobs::{BlobBody, BlobStat};
pub use download::Admission;
pub use manifests::Manifest;
pub use policy::ContentPolicy;
use policy::Verdict;
pub use referrers::Referrers;

pub struct Cache {
    storage: Storage,
    upstream: Upstream,
    tag_ttl: Duration,
    tag_flights: Flights<(RepoName, Tag), Result<Manifest, ApiError>>,
    digest_flights: Flights<(RepoName, Digest), Result<Manifest, ApiError>>,
    tag_list_flights: Flights<RepoName, tags::TagList>,
    /// Blob HEADs that found nothing stored: one upstream HEAD per blob.
    head_flights: Flights<(RepoName, Digest), Result<Option<u64>, ApiError>>,
    downloads: download::Downloads,
    /// `referrersttl`: how long a cached referrers list is fresh.
    referrers_ttl: Duration,
    /// A referrers fetch may try the API, then revalidate the referrers
    /// tag: twice a metadata fetch's deadline.
    referrer_flights: Flights<(RepoName, Digest), Result<Referrers, ApiError>>,
    /// `policy`: what of this upstream is fetched and served at all;
    /// replaced whole when the configuration file changes.
    policy: RwLock<Arc<ContentPolicy>>,
    /// With `cluster:`, a cold blob whose owner is another replica is
    /// asked of that replica first.
    cluster: Option<Arc<Cluster>>,
}

impl Cache {
    pub fn new(
        storage: Storage,
        upstream: Upstream,
        tag_ttl: Duration,
        admission: Admission,
    ) -> Self {
        Self {
            tag_flights: Flights::new(upstream.fetch_deadline()),
            digest_flights: Flights::new(upstream.fetch_deadline()),
            tag_list_flights: Flights::new(upstream.fetch_deadline()),
            head_flights: Flights::new(upstream.fetch_deadline()),
            downloads: download::Downloads::new(admission),
            referrers_ttl: tag_ttl,
            referrer_flights: Flights::new(2 * upstream.fetch_deadline()),
            policy: RwLock::default(),
            storage,
            upstream,
            tag_ttl,
            cluster: None,
        }
    }

    /// Serves only what `policy` admits.
    pub fn with_policy(self, policy: ContentPolicy) -> Self {
        self.set_policy(policy);
        self
    }

    /// From now on, serves only what `policy` admits.
    pub fn set_policy(&self, policy: ContentPolicy) {
        *self.policy.write().expect("policy lock") = Arc::new(policy);
    }

    /// The content policy in force.
    fn policy(&self) -> Arc<ContentPolicy> {
        Arc::clone(&self.policy.read().expect("policy lock"))
    }

    /// Cold blobs go through their owner replica (`None`: a single node).
    pub fn with_cluster(self, cluster: Option<Arc<Cluster>>) -> Self {
        Self { cluster, ..self }
    }

    /// Referrers lists fresh for `ttl` instead of `tagttl`.
    pub fn with_referrers_ttl(self, ttl: Duration) -> Self {
        Self {
            referrers_ttl: ttl,
            ..self
        }
    }
}

impl Cache {
    /// The upstream's label (registry name, or `proxy`).
    pub fn upstream_label(&self) -> &str {
        self.upstream.label()
    }

    /// The storage view this upstream's repositories live in (namespaced
    /// for a named upstream): for read-only views of what is cached.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The repository as access rules name it, `<registry>/<repository>`
    /// (see [`Upstream::rule_name`]).
    pub fn rule_name(&self, name: &RepoName) -> String {
        self.upstream.rule_name(name)
    }

    /// The upstream's requests, failures and last failure.
    pub fn upstream_health(&self) -> crate::upstream::health::HealthSnapshot {
        self.upstream.health()
    }

    /// At most `limit` of this cache's downloads in flight, and how many
    /// there are.
    pub fn downloads_snapshot(&self, limit: usize) -> (Vec<download::DownloadStatus>, usize) {
        self.downloads.snapshot(limit)
    }

    /// Whether the content policy admits a repository at all (listings
    /// leave out what it refuses), or with `tag`, that tag of it.
    pub fn admits(&self, name: &RepoName, tag: Option<&Tag>) -> bool {
        self.verdict(name, tag) == Verdict::Allowed
    }

    fn verdict(&self, name: &RepoName, tag: Option<&Tag>) -> Verdict {
        let repository = self.upstream.upstream_name(name);
        self.policy().decide(&repository, tag.map(Tag::as_str))
    }

    /// The content policy's decision, taken first by every public method
    /// that serves content (manifests, blobs, tag lists, referrers), before
    /// storage or upstream are asked: so a refused repository is neither
    /// fetched nor served from what was cached before the policy changed.
    /// `tag` is the tag a manifest is asked for by, if any.
    fn admit(&self, name: &RepoName, tag: Option<&Tag>) -> Result<(), ApiError> {
        let message = match self.verdict(name, tag) {
            Verdict::Allowed => return Ok(()),
            Verdict::RepositoryRefused => "repository not allowed by this cache's policy",
            Verdict::TagRefused => "tag not allowed by this cache's policy",
        };
        tracing::debug!(%name, tag = tag.map(Tag::as_str), message, "refused");
        Err(ApiError::new(ErrorCode::Denied, message))
    }
}

/// Translates an upstream failure into what the client is told.
/// `not_found` is the code for a 404 (`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, ...).
fn upstream_error(err: &UpstreamError, not_found: ErrorCode) -> ApiError {
    match err {
        UpstreamError::Unreachable(reason) => {
            tracing::warn!(%reason, "upstream unreachable");
            ApiError::new(
                ErrorCode::Unavailable,
                "upstream registry unreachable and content not cached",
            )
        }
        UpstreamError::Unusable(reason) => {
            tracing::warn!(%reason, "upstream answer refused");
            ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "upstream registry sent an unusable answer ({reason}) and content not cached"
                ),
            )
        }
        UpstreamError::Status {
            status,
            retry_after,
            code: upstream_code,
        } => {
            // A 404 keeps the upstream's finer code: an unknown repository
            // is NAME_UNKNOWN whatever was asked for in it.
            let not_found = match upstream_code.as_deref() {
                Some("NAME_UNKNOWN") => ErrorCode::NameUnknown,
                _ => not_found,
            };
            let (code, message) = match status {
                // Not relayed as 401: Kura's own 401 (with its challenge)
                // means "your Kura credentials"; this refusal is about
                // Kura's credentials upstream, which no client can fix by
                // authenticating again. Distribution's proxy never relays
                // it as 401 either.
                401 => (
                    ErrorCode::Denied,
                    "upstream registry refused Kura's credentials (or the repository is private or does not exist there)",
                ),
                403 => (ErrorCode::Denied, "upstream registry denied access"),
                404 => (not_found, "not found in the upstream registry"),
                429 => (
                    ErrorCode::TooManyRequests,
                    "upstream registry rate limit reached",
                ),
                _ => (
                    ErrorCode::Unavailable,
                    "upstream registry failed and content not cached",
                ),
            };
            tracing::warn!(status, "upstream error");
            ApiError {
                retry_after: *retry_after,
                ..ApiError::new(code, message)
            }
        }
    }
}

/// A shared upstream fetch that ran past its deadline (see
/// [`crate::upstream::Upstream::fetch_deadline`]).
fn fetch_overran() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "upstream registry too slow and content not cached",
    )
}

/// A write that only records what the cache holds failed (disk full, I/O
/// error): the request it belongs to is still answered.
fn bookkeeping_failed(what: &str, name: &RepoName, err: impl std::fmt::Display) {
    tracing::warn!(%name, error = %err, "cannot store {what}; served anyway");
}

fn storage_error(err: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::PolicyPatterns;
    use crate::config::UpstreamConfig;

    /// A Docker Hub cache whose policy denies `deny`; nothing here
    /// reaches the network or storage.
    fn hub_cache_denying(deny: &str) -> Cache {
        let config = UpstreamConfig {
            url: "https://registry-1.docker.io".parse().unwrap(),
            ..crate::config::builtin_defaults()
        };
        let policy = ContentPolicy::new(PolicyPatterns {
            deny: &[deny.to_owned()],
            ..PolicyPatterns::default()
        })
        .unwrap();
        let storage = Storage::local(std::path::Path::new("/nonexistent"));
        let admission = Admission::new(1, Duration::from_secs(1));
        Cache::new(
            storage,
            Upstream::new(&config).unwrap(),
            config.tag_ttl,
            admission,
        )
        .with_policy(policy)
    }

    #[test]
    fn repositories_are_matched_by_their_upstream_name() {
        let cache = hub_cache_denying("library/alpine");
        for spelling in ["alpine", "library/alpine"] {
            let refused = cache.admit(&RepoName::parse(spelling).unwrap(), None);
            let error = refused.expect_err(spelling);
            assert_eq!(error.code, ErrorCode::Denied);
            assert_eq!(
                error.message,
                "repository not allowed by this cache's policy"
            );
        }
        let other = RepoName::parse("someone/alpine").unwrap();
        assert!(cache.admit(&other, None).is_ok());
    }
}
