//! The dashboard's JSON API, `/kura/api/v1/...` (read-only; errors are
//! OCI error JSON like the registry's):
//!
//! - `upstreams`: per upstream, health, requests, bytes fetched and
//!   served, lookups and hit rate, manifest GETs and HEADs, rate limit;
//! - `cache`: size against `cache.maxsize`, objects, the last collection;
//! - `repositories?q=&n=&last=`: a page of the in-memory catalog (names
//!   containing `q`), at most [`MAX_PAGE`];
//! - `repositories/<name>?n=&last=`: a page of its tags, each with digest,
//!   size, platforms, last confirmed and last pulled;
//! - `repositories/<name>/manifests/<digest>`: a manifest's config,
//!   layers and platforms, each with whether it is stored;
//! - `downloads`: the downloads in flight (at most [`MAX_DOWNLOADS`]);
//! - `history`: the samples of [`super::history`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Dashboard;
use super::history::{self, Sample};
use super::manifest;
use crate::api::error::{ApiError, ErrorCode};
use crate::auth::Identity;
use crate::cache::Cache;
use crate::cache::download::DownloadStatus;
use crate::metrics::{
    LookupLabels, Metrics, SourceLabels, UpstreamLabels, UpstreamMethodLabels, metrics,
};
use crate::reference::{Digest, RepoName, Tag};
use crate::storage::Storage;
use crate::storage::blobs::Budgeted;
use crate::storage::catalog::Age;

/// Entries per page when the request does not say.
pub const DEFAULT_PAGE: usize = 50;
/// The most entries one page holds, whatever `n` asks (repositories and
/// tags alike: each tag costs a few storage reads).
pub const MAX_PAGE: usize = 100;
/// The longest search string.
pub const MAX_QUERY: usize = 256;
/// Downloads listed at most (the longest running first).
pub const MAX_DOWNLOADS: usize = 100;

const LOOKUP_KINDS: [&str; 3] = ["manifest", "blob", "referrers"];

/// An upstream's running totals, from the metrics and its health.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub cache_hits: u64,
    pub stale: u64,
    pub misses: u64,
    pub served_cache_bytes: u64,
    pub served_download_bytes: u64,
    pub fetched_bytes: u64,
    pub failures: u64,
}

impl Totals {
    pub fn of(cache: &Cache) -> Self {
        let m = metrics();
        let upstream = cache.upstream_label().to_owned();
        let lookups = |outcome: &'static str| -> u64 {
            LOOKUP_KINDS
                .iter()
                .map(|&kind| {
                    let labels = LookupLabels {
                        upstream: upstream.clone(),
                        kind,
                        outcome,
                    };
                    Metrics::count(&m.lookups, &labels)
                })
                .sum()
        };
        let served = |source: &'static str| {
            let labels = SourceLabels {
                upstream: upstream.clone(),
                source,
            };
            Metrics::count(&m.blob_bytes_served, &labels)
        };
        Self {
            cache_hits: lookups("hit"),
            stale: lookups("stale"),
            misses: lookups("miss"),
            served_cache_bytes: served("cache"),
            served_download_bytes: served("download"),
            fetched_bytes: Metrics::count(&m.upstream_bytes_fetched, &UpstreamLabels { upstream }),
            failures: cache.upstream_health().failures,
        }
    }

    /// Lookups answered from the cache, stale ones included.
    pub fn hits(&self) -> u64 {
        self.cache_hits + self.stale
    }

    pub fn add(&mut self, other: &Totals) {
        self.cache_hits += other.cache_hits;
        self.stale += other.stale;
        self.misses += other.misses;
        self.served_cache_bytes += other.served_cache_bytes;
        self.served_download_bytes += other.served_download_bytes;
        self.fetched_bytes += other.fetched_bytes;
        self.failures += other.failures;
    }

    fn hit_rate(&self) -> Option<f64> {
        let all = self.hits() + self.misses;
        (all > 0).then(|| self.hits() as f64 / all as f64)
    }
}

pub(super) async fn upstreams(State(d): State<Arc<Dashboard>>) -> Response {
    let upstreams: Vec<Value> = d.registries.caches().iter().map(|c| upstream(c)).collect();
    Json(json!({ "upstreams": upstreams })).into_response()
}

fn upstream(cache: &Cache) -> Value {
    let m = metrics();
    let label = cache.upstream_label().to_owned();
    let labels = UpstreamLabels {
        upstream: label.clone(),
    };
    let manifest_requests = |method: &'static str| {
        let labels = UpstreamMethodLabels {
            upstream: label.clone(),
            method,
        };
        Metrics::count(&m.upstream_manifest_requests, &labels)
    };
    let totals = Totals::of(cache);
    let ratelimit = Metrics::gauge(&m.ratelimit_limit, &labels).map(|limit| {
        json!({
            "limit": limit,
            "remaining": Metrics::gauge(&m.ratelimit_remaining, &labels),
            "window_seconds": Metrics::gauge(&m.ratelimit_window_seconds, &labels),
        })
    });
    json!({
        "name": label,
        "reachable": Metrics::gauge(&m.upstream_up, &labels).map(|up| up == 1),
        "health": cache.upstream_health(),
        "fetched_bytes": totals.fetched_bytes,
        "served_bytes": {
            "cache": totals.served_cache_bytes,
            "download": totals.served_download_bytes,
        },
        "lookups": { "hit": totals.cache_hits, "stale": totals.stale, "miss": totals.misses },
        "hit_rate": totals.hit_rate(),
        "manifest_requests": { "GET": manifest_requests("GET"), "HEAD": manifest_requests("HEAD") },
        "ratelimit": ratelimit,
    })
}

pub(super) async fn cache(State(d): State<Arc<Dashboard>>) -> Response {
    let m = metrics();
    let last_collection = d
        .last_collection
        .lock()
        .expect("collection report lock")
        .clone();
    Json(json!({
        "bytes": m.storage_bytes.get(),
        "objects": m.storage_objects.get(),
        "max_bytes": d.max_size,
        "last_collection": last_collection,
        "evicted": { "blobs": m.evicted_blobs.get(), "bytes": m.evicted_bytes.get() },
        "downloads": {
            "running": m.downloads_in_flight.get(),
            "waiting": m.downloads_waiting.get(),
        },
    }))
    .into_response()
}

/// `q`, `n` and `last` of a listing request.
struct Paging {
    query: String,
    n: usize,
    last: Option<String>,
}

fn paging(raw: Option<&str>) -> Result<Paging, ApiError> {
    let mut paging = Paging {
        query: String::new(),
        n: DEFAULT_PAGE,
        last: None,
    };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "n" => {
                let n: usize = value.parse().map_err(|_| {
                    ApiError::new(
                        ErrorCode::PaginationNumberInvalid,
                        "n must be a non-negative integer",
                    )
                })?;
                paging.n = n.min(MAX_PAGE);
            }
            "last" => paging.last = Some(value.into_owned()),
            "q" if value.len() > MAX_QUERY => {
                return Err(ApiError::new(
                    ErrorCode::NameInvalid,
                    format!("q is longer than {MAX_QUERY} bytes"),
                ));
            }
            "q" => paging.query = value.into_owned(),
            _ => {}
        }
    }
    Ok(paging)
}

/// The repositories the client may pull, containing `q`.
pub(super) async fn repositories(
    State(d): State<Arc<Dashboard>>,
    Extension(identity): Extension<Identity>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let paging = paging(raw.as_deref())?;
    let visible =
        |name: &str| name.contains(&paging.query) && d.gate.may_see(&d.registries, &identity, name);
    let page = d
        .storage
        .catalog_page(Age::Kept, Some(paging.n), paging.last.as_deref(), visible)
        .await
        .map_err(|e| ApiError::internal(format!("listing repositories: {e}")))?;
    let next = page.more.then(|| page.items.last().cloned()).flatten();
    Ok(Json(json!({ "repositories": page.items, "next": next })).into_response())
}

/// `<name>` or `<name>/manifests/<digest>` (a digest has a `:`, which no
/// name component has, so the split is unambiguous).
/// A repository the client may not pull is unknown to it, as on `/v2/`.
pub(super) async fn repository(
    State(d): State<Arc<Dashboard>>,
    Extension(identity): Extension<Identity>,
    Path(path): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (name, digest) = match path.rsplit_once("/manifests/") {
        Some((name, digest)) if digest.contains(':') => (name, Some(digest)),
        _ => (path.as_str(), None),
    };
    if !d.gate.may_see(&d.registries, &identity, name) {
        return Err(ApiError::new(
            ErrorCode::NameUnknown,
            "no tags of this repository are cached",
        ));
    }
    match digest {
        Some(digest) => manifest_detail(&d, name, digest).await,
        None => tags(&d, name, raw.as_deref()).await,
    }
}

/// The storage view and name that hold `name` as the catalog lists it,
/// routed as a `/v2/` request for it (and as `may_see` authorized it):
/// the name read is the name authorized.
fn locate(d: &Dashboard, name: &str) -> Result<(Storage, RepoName), ApiError> {
    let routed = d.registries.route(name, None)?;
    let repo = RepoName::parse(routed.name)
        .ok_or_else(|| ApiError::new(ErrorCode::NameInvalid, "invalid repository name"))?;
    Ok((routed.cache.storage().clone(), repo))
}

async fn tags(d: &Dashboard, name: &str, raw: Option<&str>) -> Result<Response, ApiError> {
    let paging = paging(raw)?;
    let (storage, repo) = locate(d, name)?;
    let all = storage.list_tags(&repo).await.map_err(storage_error)?;
    if all.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NameUnknown,
            "no tags of this repository are cached",
        ));
    }
    let after = |tag: &&String| {
        paging
            .last
            .as_deref()
            .is_none_or(|last| tag.as_str() > last)
    };
    let mut rest = all.iter().filter(after);
    let (mut tags, mut budget) = (Vec::new(), manifest::REQUEST_BUDGET);
    for tag in rest.by_ref().take(paging.n) {
        tags.push(tag_line(&storage, &repo, tag, &mut budget).await?);
    }
    let next = rest
        .next()
        .and_then(|_| tags.last())
        .and_then(|t| t["tag"].as_str().map(str::to_owned));
    Ok(Json(json!({ "name": name, "tags": tags, "next": next })).into_response())
}

/// One tag: where it points, that manifest's summary (if `budget` has
/// room for its bytes; they are taken from it) and its last use.
async fn tag_line(
    storage: &Storage,
    repo: &RepoName,
    tag: &str,
    budget: &mut usize,
) -> Result<Value, ApiError> {
    let Some(link) = (match Tag::parse(tag) {
        Some(tag) => storage.tag_link(repo, &tag).await.map_err(storage_error)?,
        None => None,
    }) else {
        return Ok(json!({ "tag": tag }));
    };
    let summary = match manifest::read(storage, &link.digest, budget)
        .await
        .map_err(storage_error)?
    {
        Budgeted::Read(bytes) => Some(manifest::summary(&bytes)),
        Budgeted::Skipped | Budgeted::Missing => None,
    };
    let last_pulled = storage
        .last_use(&link.digest, &HashMap::new())
        .await
        .map_err(storage_error)?;
    Ok(json!({
        "tag": tag,
        "digest": link.digest.to_string(),
        "manifest": summary,
        "confirmed_at": epoch_seconds(link.confirmed_at),
        "last_pulled": last_pulled.map(epoch_seconds),
    }))
}

async fn manifest_detail(d: &Dashboard, name: &str, digest: &str) -> Result<Response, ApiError> {
    let (storage, repo) = locate(d, name)?;
    let digest = Digest::parse(digest)
        .map_err(|_| ApiError::new(ErrorCode::DigestInvalid, "invalid digest"))?;
    let linked = storage
        .manifest_media_type(&repo, &digest)
        .await
        .map_err(storage_error)?;
    let mut budget = manifest::REQUEST_BUDGET;
    let stored = match linked {
        Some(_) => manifest::read(&storage, &digest, &mut budget)
            .await
            .map_err(storage_error)?,
        None => Budgeted::Missing,
    };
    let Budgeted::Read(bytes) = stored else {
        return Err(ApiError::new(
            ErrorCode::ManifestUnknown,
            "this manifest is not cached for this repository",
        ));
    };
    let detail = manifest::detail(&storage, &digest, &bytes, budget)
        .await
        .map_err(storage_error)?;
    Ok(Json(detail).into_response())
}

/// Downloads in flight, of repositories the client may pull.
pub(super) async fn downloads(
    State(d): State<Arc<Dashboard>>,
    Extension(identity): Extension<Identity>,
) -> Response {
    let mut shown = Vec::new();
    let mut total = 0;
    for cache in d.registries.caches() {
        let room = MAX_DOWNLOADS - shown.len();
        let (downloads, count) = cache.downloads_snapshot(room);
        total += count;
        let upstream = cache.upstream_label();
        let visible =
            |download: &DownloadStatus| d.gate.may_pull_in(&identity, &cache, &download.repository);
        shown.extend(downloads.into_iter().filter(visible).map(|download| {
            let mut line = json!(download);
            line["upstream"] = json!(upstream);
            line
        }));
    }
    Json(json!({ "downloads": shown, "total": total })).into_response()
}

pub(super) async fn history(State(d): State<Arc<Dashboard>>) -> Response {
    let mut samples = d.history.samples();
    samples.push(Sample::now(&d.registries));
    Json(json!({
        "interval_seconds": history::INTERVAL.as_secs(),
        "samples": samples,
    }))
    .into_response()
}

fn epoch_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn storage_error(err: std::io::Error) -> ApiError {
    ApiError::internal(format!("storage: {err}"))
}
