//! The HTTP surface: the read side of the OCI Distribution API.
//!
//! Every request goes through [`dispatch`], which recognises the route
//! ([`route`]), validates names/references/digests ([`crate::reference`])
//! before anything touches storage, and hands over to [`manifests`],
//! [`blobs`], [`referrers`] or [`listing`]. Errors are OCI error JSON ([`error`]).

pub mod access;
pub mod blobs;
pub mod error;
pub mod listing;
pub mod manifests;
pub mod negotiation;
pub mod ops;
pub mod peer;
pub mod referrers;
pub mod route;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::{RequestLabels, RouteLabels, metrics};
use crate::reference::{Digest, DigestError, Reference, RepoName};
use crate::routing::Registries;
use crate::storage::Storage;
use access::Htpasswd;
use error::{ApiError, ErrorCode};
use route::Route;

pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const DIGEST_HEADER: &str = "docker-content-digest";
pub const NAMESPACE_HEADER: &str = "oci-namespace";

/// How a response was produced, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct Outcome(pub &'static str);

impl Outcome {
    pub fn from_hit(hit: bool) -> Self {
        Outcome(if hit { "hit" } else { "miss" })
    }
}

/// What every request handler can reach.
#[derive(Clone)]
struct AppState {
    registries: Arc<Registries>,
    /// The root view, for `_catalog` across every upstream and readiness.
    storage: Storage,
}

/// How the registry API is exposed.
pub struct ApiOptions {
    pub access_log: bool,
    /// Basic authentication required on `/v2/` when set.
    pub htpasswd: Option<Arc<Htpasswd>>,
}

/// The registry API plus `/metrics`, `/healthz` and `/readyz`.
pub fn router(registries: Arc<Registries>, storage: Storage, options: ApiOptions) -> Router {
    let access_log = options.access_log;
    let htpasswd = options.htpasswd;
    ops_routes()
        .fallback(dispatch)
        .with_state(AppState {
            registries,
            storage,
        })
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            require_credentials(htpasswd.clone(), request, next)
        }))
        .layer(middleware::from_fn(add_api_version))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            observe(access_log, request, next)
        }))
}

/// Only the operations endpoints, for `http.debug.addr`.
pub fn ops_router(registries: Arc<Registries>, storage: Storage) -> Router {
    ops_routes().with_state(AppState {
        registries,
        storage,
    })
}

fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(ops::metrics_text))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
}

async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return unsupported_method(request.uri().path()),
    };
    let Some(route) = route::parse(request.uri().path()) else {
        return (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
    };
    let query = request.uri().query().unwrap_or("");
    let ns = namespace_param(query);
    let result = handle(&state, route, head, query, ns.as_deref(), request.headers()).await;
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    // The distribution spec's answer to a request that named its registry.
    if let Some(value) = ns.and_then(|ns| HeaderValue::from_str(&ns).ok()) {
        response.headers_mut().insert(NAMESPACE_HEADER, value);
    }
    response
}

async fn handle(
    state: &AppState,
    route: Route<'_>,
    head: bool,
    query: &str,
    ns: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    match route {
        Route::Base => Ok(axum::Json(serde_json::json!({})).into_response()),
        Route::Catalog => listing::catalog(&state.storage, query).await,
        Route::Tags { name } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            listing::tags(&routed.cache, &repo, name, query, ns).await
        }
        Route::Manifest { name, reference } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            let reference = parse_reference(reference)?;
            manifests::serve(&routed.cache, &repo, &reference, head, headers).await
        }
        Route::Blob { name, digest } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            let digest = parse_digest(digest)?;
            blobs::serve(&routed.cache, &repo, &digest, head, headers).await
        }
        Route::Referrers { name, digest } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            let digest = parse_digest(digest)?;
            referrers::serve(&routed.cache, &repo, &digest, query, head).await
        }
        Route::Upload => Err(read_only()),
    }
}

/// containerd's `?ns=<registry>`.
fn namespace_param(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "ns")
        .map(|(_, value)| value.into_owned())
}

fn unsupported_method(path: &str) -> Response {
    match route::parse(path) {
        Some(_) => read_only().into_response(),
        None => (StatusCode::NOT_FOUND, "404 page not found\n").into_response(),
    }
}

fn read_only() -> ApiError {
    ApiError::new(
        ErrorCode::Unsupported,
        "Kura is a read-only pull-through cache",
    )
}

fn parse_name(name: &str) -> Result<RepoName, ApiError> {
    RepoName::parse(name)
        .ok_or_else(|| ApiError::new(ErrorCode::NameInvalid, "invalid repository name"))
}

fn parse_digest(digest: &str) -> Result<Digest, ApiError> {
    Digest::parse(digest).map_err(digest_error)
}

/// A reference that is neither a tag nor a digest Kura can verify names no
/// manifest: 404 `MANIFEST_UNKNOWN`, as Distribution answers (its routes
/// match no such reference) and the conformance tests expect. Only a blob
/// path answers a malformed digest with 400 `DIGEST_INVALID`.
fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    Reference::parse(reference).map_err(|err| {
        let message = match err {
            DigestError::Malformed => "manifest unknown: not a valid tag or digest",
            DigestError::UnsupportedAlgorithm => {
                "manifest unknown: only sha256 digests are supported"
            }
        };
        ApiError::new(ErrorCode::ManifestUnknown, message)
    })
}

fn digest_error(err: DigestError) -> ApiError {
    let message = match err {
        DigestError::Malformed => "invalid digest",
        DigestError::UnsupportedAlgorithm => {
            "unsupported digest algorithm; only sha256 is supported"
        }
    };
    ApiError::new(ErrorCode::DigestInvalid, message)
}

/// Distribution sends this on every response; some clients look for it.
async fn add_api_version(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    response
}

/// Metrics for every request, and one access-log line when enabled. Only
/// method, path, status, outcome and timing: never headers, so credentials
/// cannot leak into logs.
async fn observe(access_log: bool, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let route = route_label(&path);
    let status = response.status().as_u16();
    let m = metrics();
    m.requests
        .get_or_create(&RequestLabels {
            route,
            method: method_label(&method),
            status,
        })
        .inc();
    m.request_duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    if access_log {
        let outcome = response.extensions().get::<Outcome>().map_or("-", |o| o.0);
        tracing::info!(
            target: "kura::access",
            %method,
            path,
            status,
            outcome,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

/// The method as a metric label: the two the API serves, or `other`, so
/// that made-up methods cannot create a series each.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// A bounded set of route names for metric labels.
fn route_label(path: &str) -> &'static str {
    match route::parse(path) {
        Some(Route::Base) => "base",
        Some(Route::Catalog) => "catalog",
        Some(Route::Tags { .. }) => "tags",
        Some(Route::Manifest { .. }) => "manifest",
        Some(Route::Blob { .. }) => "blob",
        Some(Route::Referrers { .. }) => "referrers",
        Some(Route::Upload) => "upload",
        None => match path {
            "/metrics" => "metrics",
            "/healthz" | "/readyz" => "health",
            _ => "other",
        },
    }
}

/// With `auth.htpasswd`, the registry API needs valid Basic credentials;
/// health and metrics stay open for probes and scrapers. Without it,
/// whatever `Authorization` a client sends (Docker sends its Hub
/// credentials to mirrors) is ignored.
async fn require_credentials(
    htpasswd: Option<Arc<Htpasswd>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(htpasswd) = htpasswd else {
        return next.run(request).await;
    };
    if !request.uri().path().starts_with("/v2") {
        return next.run(request).await;
    }
    if htpasswd
        .authorize(request.headers().get(header::AUTHORIZATION))
        .await
    {
        return next.run(request).await;
    }
    let mut response =
        ApiError::new(ErrorCode::Unauthorized, "authentication required").into_response();
    let challenge = format!("Basic realm=\"{}\"", htpasswd.realm.replace('"', ""));
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Builds a response with the headers of a manifest or blob and an
/// optional body.
fn content_response(
    status: StatusCode,
    digest: &Digest,
    content_type: &str,
    length: Option<u64>,
    body: Body,
    outcome: Outcome,
) -> Response {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(DIGEST_HEADER, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    if let Some(length) = length {
        builder = builder.header(header::CONTENT_LENGTH, length);
    }
    let mut response = builder
        .body(body)
        .unwrap_or_else(|e| ApiError::internal(e).into_response());
    response.extensions_mut().insert(outcome);
    response
}
