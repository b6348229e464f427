//! A registry stub for what an overloaded world does and a real registry
//! cannot be made to do on cue: answers that come late or never, bodies
//! that trickle, answers too large to hold. The first segment of the
//! repository name picks the behaviour:
//!
//! - `ok/...`: a small image (tag `latest`: one config, one layer), at once;
//! - `slow/...`: the same image, manifests answered after [`SLOW_DELAY`];
//! - `hang/...`: nothing is ever answered (the request waits until the
//!   client gives up);
//! - `trickle/...`: any blob announced with a length, then a byte per
//!   100 ms;
//! - `big/...`: a manifest over 4 MiB, a tag list over 16 MiB;
//! - `paged/...`: the tags [`PAGED_TAGS`] (unsorted) in pages of
//!   [`PAGE_SIZE`], each after [`PAGE_DELAY`], linked by `Link` headers with
//!   the stub's own cursor (`?page=K`, an absolute URL); `n` and `last` are
//!   ignored;
//! - `endless/...`: tag pages that always link one more;
//! - `limited/...`: the `ok/` image, its manifest answers carrying Docker
//!   Hub's `ratelimit-limit: 100;w=21600` and `ratelimit-remaining`, which
//!   only a manifest GET lowers (a HEAD does not count).
//!
//! Every request is counted by method and path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::hits::Hits;
use super::images::sha256_digest;
use super::server::BackgroundServer;

/// How late `slow/...` manifests come.
pub const SLOW_DELAY: Duration = Duration::from_millis(1500);
/// The tags of `paged/...` repositories, in the order the stub lists them.
pub const PAGED_TAGS: [&str; 7] = ["v10", "latest", "v2", "v1", "alpha", "v3", "beta"];
/// Tags per page of `paged/...`.
pub const PAGE_SIZE: usize = 3;
/// How late each page of `paged/...` comes (so that concurrent requests
/// overlap one walk through the pages).
pub const PAGE_DELAY: Duration = Duration::from_millis(200);
/// The allowance `limited/...` reports, per window of [`RATE_WINDOW`] s.
pub const RATE_LIMIT: u32 = 100;
pub const RATE_WINDOW: u32 = 21600;
const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The image every `ok/` and `slow/` repository has.
#[derive(Clone)]
pub struct StubImage {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub layer: Vec<u8>,
}

impl StubImage {
    fn new() -> Self {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let layer: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": sha256_digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": sha256_digest(&layer), "size": layer.len()}],
        }))
        .unwrap();
        Self {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config,
            layer,
        }
    }

    /// Config and layer, by digest.
    pub fn blobs(&self) -> [(String, &[u8]); 2] {
        [
            (sha256_digest(&self.config), &self.config),
            (sha256_digest(&self.layer), &self.layer),
        ]
    }
}

#[derive(Clone)]
struct Shared {
    image: StubImage,
    hits: Hits,
    /// Manifest GETs of `limited/...` so far: what Hub would count.
    counted_pulls: Arc<AtomicU32>,
}

pub struct StallingUpstream {
    server: BackgroundServer,
    shared: Shared,
}

impl StallingUpstream {
    pub fn start() -> Self {
        let shared = Shared {
            image: StubImage::new(),
            hits: Hits::default(),
            counted_pulls: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(shared.clone());
        let server = BackgroundServer::spawn("stalling-upstream", move |listener| async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { server, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn image(&self) -> &StubImage {
        &self.shared.image
    }

    /// Requests seen for `method path` (e.g. `GET /v2/slow/a/manifests/1`).
    pub fn hits(&self, method: &str, path: &str) -> usize {
        self.shared.hits.of(method, path)
    }
}

async fn answer(State(shared): State<Shared>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = request.method().clone();
    shared.hits.record(method.as_str(), &path);
    let Some(rest) = path.strip_prefix("/v2/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if rest.is_empty() {
        return axum::Json(json!({})).into_response();
    }
    let behaviour = rest.split('/').next().unwrap_or("");
    if behaviour == "hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let response = if let Some((_, reference)) = rest.rsplit_once("/manifests/") {
        let response = manifest(&shared.image, behaviour, reference).await;
        if behaviour == "limited" {
            with_rate_limit(response, &shared.counted_pulls, &method)
        } else {
            response
        }
    } else if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        blob(&shared.image, behaviour, digest)
    } else if rest.ends_with("/tags/list") {
        let page = form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "page")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        if behaviour == "paged" {
            tokio::time::sleep(PAGE_DELAY).await;
        }
        let link = |next: usize| format!("<http://{host}{path}?page={next}>; rel=\"next\"");
        tags(behaviour, page, link)
    } else {
        StatusCode::NOT_FOUND.into_response()
    };
    if method == Method::HEAD {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    response
}

async fn manifest(image: &StubImage, behaviour: &str, reference: &str) -> Response {
    if behaviour == "slow" {
        tokio::time::sleep(SLOW_DELAY).await;
    }
    let bytes = match behaviour {
        "big" => {
            let padding = "x".repeat(5 << 20);
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "annotations": {"pad": padding}})).unwrap()
        }
        _ if reference == "latest" || reference == image.manifest_digest => image.manifest.clone(),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, MANIFEST_TYPE.to_owned()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                sha256_digest(&bytes),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// Adds Docker Hub's allowance headers; a GET spends one pull first.
fn with_rate_limit(mut response: Response, counted_pulls: &AtomicU32, method: &Method) -> Response {
    if method == Method::GET {
        counted_pulls.fetch_add(1, Ordering::SeqCst);
    }
    let remaining = RATE_LIMIT.saturating_sub(counted_pulls.load(Ordering::SeqCst));
    let headers = response.headers_mut();
    for (name, count) in [
        ("ratelimit-limit", RATE_LIMIT),
        ("ratelimit-remaining", remaining),
    ] {
        let value = format!("{count};w={RATE_WINDOW}");
        headers.insert(name, header::HeaderValue::from_str(&value).unwrap());
    }
    headers.insert(
        "docker-ratelimit-source",
        header::HeaderValue::from_static("127.0.0.1"),
    );
    response
}

fn blob(image: &StubImage, behaviour: &str, digest: &str) -> Response {
    if behaviour == "trickle" {
        return trickle(1 << 20);
    }
    match image.blobs().into_iter().find(|(d, _)| d == digest) {
        Some((_, bytes)) => bytes.to_vec().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `length` announced, then one byte per 100 ms.
fn trickle(length: u64) -> Response {
    let bytes = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), ()))
    });
    Response::builder()
        .header(header::CONTENT_LENGTH, length)
        .body(Body::from_stream(bytes))
        .unwrap()
}

/// `link(k)` is the `Link` header value pointing at page `k`.
fn tags(behaviour: &str, page: usize, link: impl Fn(usize) -> String) -> Response {
    let tags: Vec<String> = match behaviour {
        "big" => (0..150_000).map(|i| format!("{i:0>120}")).collect(),
        "paged" => PAGED_TAGS
            .iter()
            .skip(page * PAGE_SIZE)
            .take(PAGE_SIZE)
            .map(|t| t.to_string())
            .collect(),
        "endless" => vec![format!("t{page:0>6}")],
        _ => vec!["latest".to_owned()],
    };
    let more = match behaviour {
        "paged" => (page + 1) * PAGE_SIZE < PAGED_TAGS.len(),
        "endless" => true,
        _ => false,
    };
    let mut response = axum::Json(json!({"name": "stub", "tags": tags})).into_response();
    if more {
        let value = header::HeaderValue::from_str(&link(page + 1)).unwrap();
        response.headers_mut().insert(header::LINK, value);
    }
    response
}
