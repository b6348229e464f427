//! The HTTP surface: the read side of the OCI Distribution API.
//!
//! Every request goes through [`dispatch`], which recognises the route
//! ([`route`]), validates names/references/digests ([`crate::reference`])
//! before anything touches storage, and hands over to [`manifests`],
//! [`blobs`] or [`listing`]. Errors are OCI error JSON ([`error`]).

pub mod blobs;
pub mod error;
pub mod listing;
pub mod manifests;
pub mod route;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::reference::{Digest, DigestError, Reference, RepoName};
use crate::routing::Registries;
use crate::storage::Storage;
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
    /// The root view, for `_catalog` across every upstream.
    storage: Storage,
}

pub fn router(registries: Arc<Registries>, storage: Storage, access_log: bool) -> Router {
    let router = Router::new()
        .fallback(dispatch)
        .with_state(AppState {
            registries,
            storage,
        })
        .layer(middleware::from_fn(add_api_version));
    if access_log {
        router.layer(middleware::from_fn(log_access))
    } else {
        router
    }
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
            listing::tags(&routed.cache, &repo, name, query).await
        }
        Route::Manifest { name, reference } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            let reference = parse_reference(reference)?;
            manifests::serve(&routed.cache, &repo, &reference, head).await
        }
        Route::Blob { name, digest } => {
            let routed = state.registries.route(name, ns)?;
            let repo = parse_name(routed.name)?;
            let digest = parse_digest(digest)?;
            blobs::serve(&routed.cache, &repo, &digest, head, headers).await
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

fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    Reference::parse(reference).map_err(|err| {
        if reference.contains(':') {
            digest_error(err)
        } else {
            ApiError::new(ErrorCode::TagInvalid, "invalid tag")
        }
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

/// One line per request. Only method, path, status, outcome and timing:
/// never headers, so credentials cannot leak into logs.
async fn log_access(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let outcome = response.extensions().get::<Outcome>().map_or("-", |o| o.0);
    tracing::info!(
        target: "kura::access",
        %method,
        path,
        status = response.status().as_u16(),
        outcome,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
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
