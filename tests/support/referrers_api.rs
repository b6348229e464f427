//! A registry stub with the OCI 1.1 referrers API, which no registry installable here has. It
//! never filters by `artifactType` and pages every list by [`PAGE_SIZE`], linking each page to the
//! next with a relative `Link: <...?page=N>; rel="next"`. Subjects:
//!
//! - [`ReferrersApi::paged_subject`]: [`PAGED_REFERRERS`] referrers, alternately of
//!   [`SIGNATURE_TYPE`] and [`SBOM_TYPE`], each with an annotation;
//! - [`ReferrersApi::endless_subject`]: every page links to one more;
//! - [`ReferrersApi::elsewhere_subject`]: the first page links to the same server under another
//!   origin (`localhost` instead of `127.0.0.1`);
//! - any other digest: an empty list.
//!
//! Every request is counted by method, path and query.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::hits::Hits;
use super::images::{OCI_INDEX, OCI_MANIFEST, sha256_digest};
use super::server::BackgroundServer;

pub const PAGE_SIZE: usize = 2;
pub const PAGED_REFERRERS: usize = 5;
pub const SIGNATURE_TYPE: &str = "application/vnd.example.signature.v1";
pub const SBOM_TYPE: &str = "application/spdx+json";

#[derive(Clone)]
struct Shared {
    port: u16,
    hits: Hits,
}

pub struct ReferrersApi {
    server: BackgroundServer,
    shared: Shared,
}

impl ReferrersApi {
    pub fn start() -> Self {
        let hits = Hits::default();
        let shared_hits = hits.clone();
        let server = BackgroundServer::spawn("referrers-api", move |listener| async move {
            let port = listener.local_addr().expect("local_addr").port();
            let app = axum::Router::new().fallback(answer).with_state(Shared {
                port,
                hits: shared_hits,
            });
            let _ = axum::serve(listener, app).await;
        });
        let shared = Shared {
            port: server.addr().port(),
            hits,
        };
        Self { server, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn paged_subject() -> String {
        sha256_digest(b"paged subject")
    }

    pub fn endless_subject() -> String {
        sha256_digest(b"endless subject")
    }

    pub fn elsewhere_subject() -> String {
        sha256_digest(b"elsewhere subject")
    }

    /// The descriptors of the paged subject's referrers, in list order.
    pub fn paged_referrers() -> Vec<Value> {
        (0..PAGED_REFERRERS).map(referrer).collect()
    }

    /// Requests seen for `method path[?query]` (e.g. `GET /v2/a/referrers/sha256:..?page=2`).
    pub fn hits(&self, method: &str, path_and_query: &str) -> usize {
        self.shared.hits.of(method, path_and_query)
    }

    /// Every request seen whose path contains `substring`.
    pub fn hits_containing(&self, substring: &str) -> usize {
        self.shared.hits.containing(substring)
    }
}

fn referrer(i: usize) -> Value {
    let artifact_type = if i.is_multiple_of(2) {
        SIGNATURE_TYPE
    } else {
        SBOM_TYPE
    };
    json!({
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(format!("referrer {i}").as_bytes()),
        "size": 100 + i,
        "artifactType": artifact_type,
        "annotations": { "org.example.index": i.to_string() },
    })
}

async fn answer(State(shared): State<Shared>, request: Request) -> Response {
    let uri = request.uri().clone();
    let target = match uri.query() {
        Some(query) => format!("{}?{query}", uri.path()),
        None => uri.path().to_owned(),
    };
    shared.hits.record(request.method().as_str(), &target);
    let path = uri.path();
    if path == "/v2/" {
        return axum::Json(json!({})).into_response();
    }
    let Some((_, subject)) = path.rsplit_once("/referrers/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let page: usize = uri
        .query()
        .and_then(|q| q.strip_prefix("page="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (descriptors, next) = if subject == ReferrersApi::paged_subject() {
        let all = ReferrersApi::paged_referrers();
        let start = page * PAGE_SIZE;
        let end = (start + PAGE_SIZE).min(all.len());
        let next = (end < all.len()).then(|| format!("{path}?page={}", page + 1));
        (all[start.min(end)..end].to_vec(), next)
    } else if subject == ReferrersApi::endless_subject() {
        (
            vec![referrer(page)],
            Some(format!("{path}?page={}", page + 1)),
        )
    } else if subject == ReferrersApi::elsewhere_subject() && page == 0 {
        let next = format!("http://localhost:{}{path}?page=1", shared.port);
        (vec![referrer(0)], Some(next))
    } else {
        (Vec::new(), None)
    };
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors });
    let mut response = ([(header::CONTENT_TYPE, OCI_INDEX)], axum::Json(index)).into_response();
    if let Some(next) = next {
        let link = format!("<{next}>; rel=\"next\"");
        response
            .headers_mut()
            .insert(header::LINK, link.parse().expect("link header"));
    }
    response
}
