//! The HTTP surface: the read side of the OCI Distribution API.
//!
//! Every request goes through [`dispatch`], which checks a Bearer token's
//! grants with `auth.token` ([`token_gate`]), establishes who the
//! client is ([`crate::auth::Gate::identify`]), recognises the route
//! ([`route`]), validates names/references/digests ([`crate::reference`])
//! before anything touches storage, asks the gate whether the client may
//! pull the repository, and only then hands over to [`manifests`],
//! [`blobs`], [`referrers`] or [`listing`]. Errors are OCI error JSON ([`error`]).

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
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::auth::token::{Grant, HostSeen, Scope};
use crate::auth::{Gate, Identity};
use crate::metrics::{RequestLabels, RouteLabels, metrics};
use crate::reference::{Digest, DigestError, Reference, RepoName};
use crate::routing::{Registries, Routed};
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
    /// The root view, for `_catalog` across every upstream and readiness.
    storage: Storage,
    gate: Arc<Gate>,
}

/// How the registry API is exposed.
pub struct ApiOptions {
    pub access_log: bool,
    /// Who may pull what.
    pub gate: Arc<Gate>,
    /// Pages beside the registry API (the dashboard, the warming status),
    /// behind the same login; their handlers find the client's
    /// [`Identity`] in the request's extensions.
    pub pages: Router,
    /// Routes outside the login that check a secret of their own (push
    /// events, peer replicas): observed and access-logged like the rest.
    pub own_secret: Router,
}

/// The registry API plus the pages, `/metrics`, `/healthz` and `/readyz`.
pub fn router(registries: Arc<Registries>, storage: Storage, options: ApiOptions) -> Router {
    let access_log = options.access_log;
    let gate = options.gate.clone();
    ops_routes()
        .fallback(dispatch)
        .with_state(AppState {
            registries,
            storage,
            gate: options.gate,
        })
        .merge(options.pages)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            require_login(gate.clone(), request, next)
        }))
        .merge(options.own_secret)
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
        gate: Arc::new(Gate::open()),
    })
}

fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(ops::metrics_text))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
}

async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    if !request.uri().path().starts_with("/v2") {
        return (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
    }
    // Only the head is read (the API takes no bodies), and unlike the
    // request it can be held across awaits.
    let (head, _) = request.into_parts();
    let identity = match token_gate(&state.gate, &state.registries, &head).await {
        Err(refusal) => return refusal,
        // The token was checked (once) for the route's scope already.
        Ok(Some(grant)) => Ok(state.gate.token_holder(&grant)),
        Ok(None) => state.gate.identify(&head.headers).await,
    };
    let response = match identity {
        Ok(identity) => dispatch_as(&state, &identity, &head).await,
        Err(e) => e.into_response(),
    };
    with_challenge(&state.gate, response)
}

/// With `auth.token`, the token must grant what the route needs
/// ([`required_scope`]), checked as Distribution checks it and answered as
/// it answers: 401 `UNAUTHORIZED` with a Bearer challenge naming the scope,
/// `error="invalid_token"` or `"insufficient_scope"` when a token was
/// sent, and the access asked for as `detail`. Access rules then apply to
/// what passes, whose grant this returns (`None` without `auth.token`).
async fn token_gate(
    gate: &Gate,
    registries: &Registries,
    head: &Parts,
) -> Result<Option<Arc<Grant>>, Response> {
    let Some(token) = gate.token() else {
        return Ok(None);
    };
    let ns = namespace_param(head.uri.query().unwrap_or(""));
    let needed = required_scope(head.uri.path(), |name| {
        registries.token_name(name, ns.as_deref())
    });
    let authorization = head.headers.get(header::AUTHORIZATION);
    let rejection = match token
        .check(authorization.map(HeaderValue::as_bytes), needed.as_ref())
        .await
    {
        Ok(grant) => return Ok(Some(grant)),
        Err(rejection) => rejection,
    };
    let header_text = |name| head.headers.get(name).and_then(|h| h.to_str().ok());
    let host = HostSeen {
        host: header_text(header::HOST).or_else(|| head.uri.authority().map(|a| a.as_str())),
        forwarded_proto: header_text(header::HeaderName::from_static("x-forwarded-proto")),
    };
    let challenge = token.challenge(needed.as_ref(), rejection, host);
    let detail = needed
        .as_ref()
        .map_or(serde_json::Value::Null, Scope::detail);
    let mut response = ApiError::new(ErrorCode::Unauthorized, "authentication required")
        .into_response_with_detail(detail);
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    Err(response)
}

/// What a token must grant for a path, as Distribution asks: pull on the
/// repository (named as the client sent it, or as `token_name` names an
/// `?ns=`-routed one) for its content, tags and referrers;
/// `registry:catalog:*` for the catalog; any valid token for the rest.
fn required_scope(path: &str, token_name: impl Fn(&str) -> String) -> Option<Scope> {
    match route::parse(path)? {
        Route::Catalog => Some(Scope::catalog()),
        Route::Tags { name }
        | Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::Referrers { name, .. } => Some(Scope::pull(&token_name(name))),
        Route::Base | Route::Upload => None,
    }
}

/// Every 401 is Kura's own and tells the client how to log in.
fn with_challenge(gate: &Gate, mut response: Response) -> Response {
    if response.status() == StatusCode::UNAUTHORIZED
        && let Some(challenge) = gate.challenge()
    {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

async fn dispatch_as(state: &AppState, identity: &Identity, request: &Parts) -> Response {
    let head = match request.method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return unsupported_method(&state.gate, identity, request.uri.path()),
    };
    let Some(route) = route::parse(request.uri.path()) else {
        return not_found(&state.gate, identity);
    };
    let query = request.uri.query().unwrap_or("");
    let ns = namespace_param(query);
    let request = ClientRequest {
        identity,
        head,
        query,
        ns: ns.as_deref(),
        headers: &request.headers,
    };
    let result = handle(state, route, &request).await;
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    // The distribution spec's answer to a request that named its registry.
    if let Some(value) = ns.and_then(|ns| HeaderValue::from_str(&ns).ok()) {
        response.headers_mut().insert(NAMESPACE_HEADER, value);
    }
    response
}

/// What a handler needs of a request besides its route.
struct ClientRequest<'a> {
    identity: &'a Identity,
    head: bool,
    query: &'a str,
    ns: Option<&'a str>,
    headers: &'a HeaderMap,
}

/// Every route that serves content resolves its repository here and asks
/// the gate ([`Gate::authorize`]) before anything else happens; a blob is
/// further scoped to repositories that hold it.
async fn handle(
    state: &AppState,
    route: Route<'_>,
    request: &ClientRequest<'_>,
) -> Result<Response, ApiError> {
    let gate = &state.gate;
    let identity = request.identity;
    let routed = |name| -> Result<(Routed<'_>, RepoName), ApiError> {
        let routed = state.registries.route(name, request.ns)?;
        let repo = parse_name(routed.name)?;
        gate.authorize(identity, &routed.cache, &repo)?;
        Ok((routed, repo))
    };
    match route {
        Route::Base => {
            gate.check_base(identity)?;
            Ok(axum::Json(serde_json::json!({})).into_response())
        }
        Route::Catalog => {
            gate.admit(identity)?;
            let visible = |name: &str| gate.may_see(&state.registries, identity, name);
            listing::catalog(&state.storage, request.query, visible).await
        }
        Route::Tags { name } => {
            let (routed, repo) = routed(name)?;
            listing::tags(&routed.cache, &repo, name, request.query, request.ns).await
        }
        Route::Manifest { name, reference } => {
            let (routed, repo) = routed(name)?;
            let reference = parse_reference(reference)?;
            manifests::serve(
                &routed.cache,
                &repo,
                &reference,
                request.head,
                request.headers,
            )
            .await
        }
        Route::Blob { name, digest } => {
            let (routed, repo) = routed(name)?;
            let digest = parse_digest(digest)?;
            gate.scope_blob(&routed.cache, &repo, &digest).await?;
            blobs::serve(&routed.cache, &repo, &digest, request.head, request.headers).await
        }
        Route::Referrers { name, digest } => {
            let (routed, repo) = routed(name)?;
            let digest = parse_digest(digest)?;
            referrers::serve(&routed.cache, &repo, &digest, request.query, request.head).await
        }
        Route::Upload => {
            gate.admit(identity)?;
            Err(read_only())
        }
    }
}

/// containerd's `?ns=<registry>`.
fn namespace_param(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "ns")
        .map(|(_, value)| value.into_owned())
}

fn unsupported_method(gate: &Gate, identity: &Identity, path: &str) -> Response {
    match route::parse(path) {
        Some(_) => gate
            .admit(identity)
            .err()
            .unwrap_or_else(read_only)
            .into_response(),
        None => not_found(gate, identity),
    }
}

/// Not a registry route under `/v2`; a client that could not see anything
/// here is asked to log in first.
fn not_found(gate: &Gate, identity: &Identity) -> Response {
    match gate.admit(identity) {
        Ok(()) => (StatusCode::NOT_FOUND, "404 page not found\n").into_response(),
        Err(e) => e.into_response(),
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
            "/" => "dashboard",
            _ if path.starts_with("/kura/events/") => "events",
            _ if path.starts_with("/kura/peer/") => "peer",
            _ if path.starts_with("/kura/") => "dashboard",
            _ => "other",
        },
    }
}

/// Pages beside the registry API need what `/v2/` needs: a login, where
/// logins exist. The registry API decides per route in [`dispatch`]; the
/// probes and the scrape stay open (as on Distribution's debug listener:
/// no repository names reach metric labels).
async fn require_login(gate: Arc<Gate>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/v2") || matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return next.run(request).await;
    }
    let identity = gate
        .identify_for_listing(request.headers())
        .await
        .and_then(|identity| gate.check_base(&identity).map(|()| identity));
    match identity {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(e) => with_challenge(&gate, e.into_response()),
    }
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
