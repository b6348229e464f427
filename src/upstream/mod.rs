//! The client for the upstream registry: builds `/v2/` URLs (with Docker
//! Hub's `library/` rule), authenticates ([`auth`]), follows redirects
//! without leaking credentials, and applies timeouts.

pub mod auth;
pub mod courtesy;
pub mod health;
mod link;
mod ratelimit;
pub mod referrers;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName,
    HeaderValue, RANGE, RETRY_AFTER,
};
use reqwest::{Method, Response, StatusCode, Url};

use anyhow::Context as _;

use crate::config::UpstreamConfig;
use crate::metrics::{UpstreamLabels, UpstreamMethodLabels, UpstreamStatusLabels, metrics};
use crate::reference::{Digest, MAX_MANIFEST_BYTES, RepoName};
use auth::{Authenticator, Credentials};
use courtesy::{Courtesy, Slot, SlotKind};

/// Every manifest media type Kura passes through, so the upstream never
/// down-converts (e.g. an index to a single-platform manifest).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/vnd.docker.distribution.manifest.v1+json, \
application/vnd.oci.artifact.manifest.v1+json";

/// How an upstream request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No usable answer: connection refused, timeout, reset, garbled body.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream answered, but with something Kura will not use: a
    /// body over its size cap, a tag list that is not JSON.
    #[error("unusable upstream answer: {0}")]
    Unusable(String),
    /// The upstream answered with a non-success status.
    #[error("upstream answered {status}")]
    Status {
        status: u16,
        retry_after: Option<u64>,
        /// The first OCI error code of the upstream's error body, if any
        /// (e.g. `NAME_UNKNOWN` vs `MANIFEST_UNKNOWN` for a 404).
        code: Option<String>,
    },
}

/// Error bodies are small; anything longer is not worth reading.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The largest tag list read from an upstream (one page, and all pages of
/// one walk together): about 300,000 tags of typical length, far beyond
/// any real repository.
pub const MAX_TAG_LIST_BYTES: usize = 16 << 20;
/// The largest token response read from a token service (a JWT is a few
/// KiB; a response this size is not one).
const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;

impl UpstreamError {
    fn from_transport(err: reqwest::Error) -> Self {
        // reqwest's message names the URL, which never carries credentials.
        let kind = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "connection failed"
        } else {
            "transfer failed"
        };
        UpstreamError::Unreachable(format!("{kind}: {err}"))
    }

    /// Consumes a non-success response, keeping what the client should learn.
    async fn from_response(response: Response) -> Self {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let small =
            content_length(response.headers()).is_some_and(|len| len as usize <= MAX_ERROR_BODY);
        let code = match small {
            true => response
                .bytes()
                .await
                .ok()
                .and_then(|body| first_error_code(&body)),
            false => None,
        };
        UpstreamError::Status {
            status,
            retry_after,
            code,
        }
    }

    /// Why no answer came (for an [`UpstreamError::Unreachable`]), else
    /// what kind of answer it was.
    fn reason(&self) -> &str {
        match self {
            UpstreamError::Unreachable(reason) | UpstreamError::Unusable(reason) => reason,
            UpstreamError::Status { .. } => "an error status",
        }
    }

    /// Whether the upstream said "this does not exist" (as opposed to
    /// failing): the one case where cached state should be forgotten.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status: 404, .. })
    }
}

/// What a manifest HEAD or GET told about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestMeta {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

pub struct Upstream {
    /// The registry name, or `proxy` for the default upstream (metrics, logs).
    label: String,
    /// The registry as access rules name it: the configured name, else
    /// `docker.io` for Docker Hub, else the remote URL's host (and port).
    rule_registry: String,
    base: Url,
    http: reqwest::Client,
    auth: Authenticator,
    docker_hub: bool,
    response_timeout: Duration,
    idle_timeout: Duration,
    courtesy: Courtesy,
    health: health::Health,
}

/// An upstream response that holds one of the capped connection slots
/// until it (or its body stream) is dropped.
pub struct SlottedResponse {
    response: Response,
    slot: Slot,
    /// `idletimeout`: the window [`MIN_BYTES_PER_WINDOW`] is counted in.
    window: Duration,
}

/// Bytes an upstream body must deliver in every `idletimeout` window. A
/// body that trickles (a byte now and then) never trips the idle timeout,
/// yet would hold its connection slot, its download turn and every client
/// following it for hours; any real transfer moves far more.
const MIN_BYTES_PER_WINDOW: usize = 64 * 1024;

impl SlottedResponse {
    pub fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    pub fn content_length(&self) -> Option<u64> {
        content_length(self.response.headers())
    }

    /// For a `206 Partial Content` answer, where its bytes start and the
    /// whole blob's size (`Content-Range: bytes <start>-<end>/<size>`);
    /// `Ok(None)` for a whole body.
    pub fn partial(&self) -> Result<Option<(u64, u64)>, UpstreamError> {
        if self.response.status() != StatusCode::PARTIAL_CONTENT {
            return Ok(None);
        }
        let range = self
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(content_range);
        range.map(Some).ok_or_else(|| {
            UpstreamError::Unusable("a partial answer without a readable Content-Range".into())
        })
    }

    /// A whole (small) body: manifests, tag lists; `what` names it in the
    /// error when it is over `limit`.
    async fn bytes(self, limit: usize, what: &str) -> Result<Bytes, UpstreamError> {
        read_capped(self.response, limit, what).await
    }

    /// The body as a stream of chunks; the slot is released when it ends.
    /// A body slower than [`MIN_BYTES_PER_WINDOW`] per window ends in an
    /// error.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let (slot, window) = (self.slot, self.window);
        let (mut window_start, mut window_bytes) = (std::time::Instant::now(), 0);
        self.response.bytes_stream().map(move |chunk| {
            let _held = &slot;
            let chunk = chunk.map_err(UpstreamError::from_transport)?;
            window_bytes += chunk.len();
            if window_start.elapsed() >= window {
                if window_bytes < MIN_BYTES_PER_WINDOW {
                    return Err(UpstreamError::Unreachable(format!(
                        "upstream body too slow: under {} KiB in {window:?}",
                        MIN_BYTES_PER_WINDOW >> 10
                    )));
                }
                (window_start, window_bytes) = (std::time::Instant::now(), 0);
            }
            Ok(chunk)
        })
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Self> {
        // reqwest drops Authorization when a redirect changes host, which is
        // what Docker Hub's and S3-backed registries' blob redirects need.
        let mut http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.idle_timeout)
            .user_agent(concat!("kura/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(config.insecure);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("cafile: cannot read {}", path.display()))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("cafile: {} is not PEM", path.display()))?
            {
                http = http.add_root_certificate(certificate);
            }
        }
        let http = http.build()?;
        let credentials = config.username.clone().map(|username| Credentials {
            username,
            password: config
                .password
                .clone()
                .unwrap_or_else(|| String::new().into()),
        });
        let docker_hub = config.is_docker_hub();
        let label = config.name.clone().unwrap_or_else(|| "proxy".to_owned());
        let rule_registry = match (&config.name, docker_hub) {
            (Some(name), _) => name.clone(),
            (None, true) => "docker.io".to_owned(),
            // The default upstream's first alias is its host (and port).
            (None, false) => config.aliases().swap_remove(0),
        };
        Ok(Self {
            base: config.url.clone(),
            auth: Authenticator::new(
                http.clone(),
                credentials,
                config.response_timeout,
                label.clone(),
            ),
            courtesy: Courtesy::new(config.max_connections, &label),
            health: health::Health::default(),
            label,
            rule_registry,
            http,
            docker_hub,
            response_timeout: config.response_timeout,
            idle_timeout: config.idle_timeout,
        })
    }

    /// Requests, failures and the last failure, for the dashboard.
    pub fn health(&self) -> health::HealthSnapshot {
        self.health.snapshot()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// `<registry>/<repository>` as access rules match it, the repository
    /// as the upstream knows it (`docker.io/library/alpine` for `alpine`).
    pub fn rule_name(&self, name: &RepoName) -> String {
        format!("{}/{}", self.rule_registry, self.upstream_name(name))
    }

    /// The longest a shared fetch of metadata (a tag revalidation: HEAD,
    /// then GET) may take: per request a slot wait, a token and the
    /// response headers, each bounded by the response timeout, then a body
    /// whose reads are bounded by the idle timeout.
    pub fn fetch_deadline(&self) -> Duration {
        4 * self.response_timeout + self.idle_timeout
    }

    /// Counts a request; `status` is `None` when no answer came.
    fn record(&self, status: Option<u16>) {
        let m = metrics();
        let status_label = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        m.upstream_requests
            .get_or_create(&UpstreamStatusLabels {
                upstream: self.label.clone(),
                status: status_label,
            })
            .inc();
        m.upstream_up
            .get_or_create(&UpstreamLabels {
                upstream: self.label.clone(),
            })
            .set(i64::from(status.is_some()));
    }

    /// The repository name as the upstream knows it.
    pub(crate) fn upstream_name(&self, name: &RepoName) -> String {
        if self.docker_hub && !name.as_str().contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        }
    }

    /// `suffix` may carry a query (`tags/list?n=10`).
    fn url(&self, name: &str, suffix: &str) -> Url {
        let (path, query) = match suffix.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (suffix, None),
        };
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/v2/{name}/{path}"));
        url.set_query(query);
        url
    }

    /// Sends a request for `name`, answering one auth challenge. Non-success
    /// statuses become [`UpstreamError::Status`]. Only the wait for the
    /// headers is bounded here; bodies are bounded by the idle timeout.
    async fn send(
        &self,
        method: Method,
        name: &RepoName,
        suffix: &str,
        header: Option<RequestHeader>,
    ) -> Result<SlottedResponse, UpstreamError> {
        let kind = match (&method, suffix.starts_with("blobs/")) {
            (&Method::GET, true) => SlotKind::Body,
            _ => SlotKind::Metadata,
        };
        if suffix.starts_with("manifests/") {
            self.count_manifest_request(&method);
        }
        let url = self.url(&self.upstream_name(name), suffix);
        self.send_to(method, name, url, kind, header).await
    }

    /// Counts a manifest request apart by method: Docker Hub counts a GET
    /// as a pull against its limit, a HEAD not.
    fn count_manifest_request(&self, method: &Method) {
        let method = if method == Method::HEAD {
            "HEAD"
        } else {
            "GET"
        };
        metrics()
            .upstream_manifest_requests
            .get_or_create(&UpstreamMethodLabels {
                upstream: self.label.clone(),
                method,
            })
            .inc();
    }

    /// [`Self::send`] to a URL already built: a next page the upstream
    /// linked to (its origin checked by the caller).
    async fn send_to(
        &self,
        method: Method,
        name: &RepoName,
        url: Url,
        kind: SlotKind,
        header: Option<RequestHeader>,
    ) -> Result<SlottedResponse, UpstreamError> {
        self.courtesy.check_pause()?;
        let slot = self.courtesy.slot(kind, self.response_timeout).await?;
        let scope = format!("repository:{}:pull", self.upstream_name(name));
        for attempt in 0..2 {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some((name, value)) = &header {
                request = request.header(name, value);
            }
            if let Some(header) = self.auth.header_for(&scope).await? {
                request = request.header(AUTHORIZATION, header);
            }
            // Bounded wait for the response headers: a hung upstream must
            // not hang clients that could be served from cache.
            let sent = tokio::time::timeout(self.response_timeout, request.send())
                .await
                .map_err(|_| UpstreamError::Unreachable("timed out waiting for a response".into()))
                .and_then(|result| result.map_err(UpstreamError::from_transport));
            self.record(sent.as_ref().ok().map(|r| r.status().as_u16()));
            self.health.record(match &sent {
                Ok(response) => Ok(response.status().as_u16()),
                Err(err) => Err(err.reason()),
            });
            let response = sent?;
            ratelimit::observe(&self.label, response.headers());
            if response.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = response
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok());
                if self.auth.on_challenge(challenge, &scope) {
                    continue;
                }
            }
            if !response.status().is_success() {
                let err = UpstreamError::from_response(response).await;
                if let UpstreamError::Status {
                    status,
                    retry_after,
                    ..
                } = &err
                {
                    self.courtesy.observe(*status, *retry_after);
                }
                return Err(err);
            }
            return Ok(SlottedResponse {
                response,
                slot,
                window: self.idle_timeout,
            });
        }
        unreachable!("the loop returns on its second attempt")
    }

    pub async fn head_manifest(
        &self,
        name: &RepoName,
        reference: &str,
    ) -> Result<ManifestMeta, UpstreamError> {
        let suffix = format!("manifests/{reference}");
        let response = self
            .send(Method::HEAD, name, &suffix, accept(MANIFEST_ACCEPT))
            .await?;
        Ok(manifest_meta(response.headers()))
    }

    /// Fetches a manifest's exact bytes.
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &str,
    ) -> Result<(ManifestMeta, Bytes), UpstreamError> {
        let suffix = format!("manifests/{reference}");
        let response = self
            .send(Method::GET, name, &suffix, accept(MANIFEST_ACCEPT))
            .await?;
        let meta = manifest_meta(response.headers());
        let body = response.bytes(MAX_MANIFEST_BYTES, "manifest").await?;
        Ok((meta, body))
    }

    /// The blob's size, without downloading it.
    pub async fn head_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let suffix = format!("blobs/{digest}");
        let response = self.send(Method::HEAD, name, &suffix, None).await?;
        Ok(content_length(response.headers()))
    }

    /// Starts a blob download; the body streams from the returned response.
    /// No total timeout: large blobs take as long as they take, while the
    /// idle timeout catches a stalled transfer.
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<SlottedResponse, UpstreamError> {
        self.get_blob_from(name, digest, 0).await
    }

    /// [`Self::get_blob`] from byte `offset` on, asked with `Range`; the
    /// upstream may answer with the whole blob instead (see
    /// [`SlottedResponse::partial`]).
    pub async fn get_blob_from(
        &self,
        name: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<SlottedResponse, UpstreamError> {
        let suffix = format!("blobs/{digest}");
        let range = (offset > 0).then(|| {
            let value = HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii");
            (RANGE, value)
        });
        self.send(Method::GET, name, &suffix, range).await
    }

    /// One page of the upstream's tag list: `query` is empty for the first
    /// page, then what the previous page's `Link` said.
    pub async fn tags_page(&self, name: &RepoName, query: &str) -> Result<TagPage, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let suffix = if query.is_empty() {
            "tags/list".to_owned()
        } else {
            format!("tags/list?{query}")
        };
        let response = self.send(Method::GET, name, &suffix, None).await?;
        let next = next_page_query(response.headers());
        let body = response.bytes(MAX_TAG_LIST_BYTES, "tag list").await?;
        let list: TagList = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Unusable(format!("unreadable tag list: {e}")))?;
        Ok(TagPage {
            tags: list.tags.unwrap_or_default(),
            body_bytes: body.len(),
            next,
        })
    }
}

/// One page of an upstream tag list.
#[derive(Debug)]
pub struct TagPage {
    pub tags: Vec<String>,
    /// What the page weighed on the wire (the walk's memory budget).
    pub body_bytes: usize,
    /// The query of the next page, when the upstream's `Link` names one.
    pub next: Option<String>,
}

/// The query string of the `rel="next"` target of a `Link` header
/// (RFC 8288). Only the query is kept: the next page is asked of the
/// configured upstream, at the same path, whatever host the link names.
fn next_page_query(headers: &HeaderMap) -> Option<String> {
    let base = Url::parse("http://upstream.invalid/").ok()?;
    let query = base
        .join(&link::next_target(headers)?)
        .ok()?
        .query()?
        .to_owned();
    (!query.is_empty()).then_some(query)
}

/// A whole body of at most `limit` bytes, refused as soon as it is known
/// to be larger (by `Content-Length` or by what arrived), so an upstream
/// cannot make Kura hold an arbitrary amount in memory.
async fn read_capped(
    mut response: Response,
    limit: usize,
    what: &str,
) -> Result<Bytes, UpstreamError> {
    let too_large = || UpstreamError::Unusable(format!("{what} larger than {} KiB", limit >> 10));
    if content_length(response.headers()).is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(UpstreamError::from_transport)?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn first_error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: String,
    }
    let errors: Errors = serde_json::from_slice(body).ok()?;
    errors.errors.into_iter().next().map(|e| e.code)
}

fn manifest_meta(headers: &HeaderMap) -> ManifestMeta {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ManifestMeta {
        digest: header("docker-content-digest").and_then(|d| Digest::parse(d).ok()),
        media_type: header(CONTENT_TYPE.as_str())
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned()),
    }
}

/// `bytes <start>-<end>/<size>`: the start and the whole size.
fn content_range(value: &str) -> Option<(u64, u64)> {
    let (span, size) = value.strip_prefix("bytes ")?.split_once('/')?;
    let start = span.split_once('-')?.0.parse().ok()?;
    Some((start, size.parse().ok()?))
}

/// The one header some upstream requests add to the usual ones.
type RequestHeader = (HeaderName, HeaderValue);

/// `Accept: <types>`.
fn accept(types: &'static str) -> Option<RequestHeader> {
    Some((ACCEPT, HeaderValue::from_static(types)))
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::LINK;

    #[test]
    fn a_content_range_gives_its_start_and_the_whole_size() {
        assert_eq!(content_range("bytes 100-199/200"), Some((100, 200)));
        assert_eq!(content_range("bytes 0-0/1"), Some((0, 1)));
        for unreadable in [
            "bytes */200",
            "bytes 100-199/*",
            "items 1-2/3",
            "bytes 100/200",
            "",
        ] {
            assert_eq!(content_range(unreadable), None, "{unreadable}");
        }
    }

    fn next_of(links: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for link in links {
            headers.append(LINK, HeaderValue::from_str(link).unwrap());
        }
        next_page_query(&headers)
    }

    #[test]
    fn the_next_page_is_the_query_of_the_rel_next_link() {
        assert_eq!(
            next_of(&["</v2/a/tags/list?n=2&last=b>; rel=\"next\""]).as_deref(),
            Some("n=2&last=b")
        );
        // Absolute targets (another host even) give only their query.
        assert_eq!(
            next_of(&["<https://elsewhere.example/v2/a/tags/list?last=c>; rel=next"]).as_deref(),
            Some("last=c")
        );
        assert_eq!(
            next_of(&["</p?last=a>; rel=\"prev\", </p?last=z>; rel=\"next\""]).as_deref(),
            Some("last=z")
        );
        assert_eq!(next_of(&["</p?last=a>; rel=\"prev\""]), None);
        assert_eq!(next_of(&["</v2/a/tags/list>; rel=\"next\""]), None);
        assert_eq!(next_of(&["garbage"]), None);
        assert_eq!(next_of(&[]), None);
    }
}
