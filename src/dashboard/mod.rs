//! The dashboard: a read-only page at `/` and the JSON API under
//! `/kura/api/v1/` it is drawn from, behind the registry's own client
//! authentication (the gate in [`crate::api`] covers every path but the
//! probes and `/metrics`).
//!
//! The page is one HTML file, one script and one style sheet embedded in
//! the binary: no CDN, no build step. Every number comes from state Kura
//! keeps anyway (the metrics, the upstreams' health, the in-memory
//! catalog, the downloads map, the last collection) or from reading the
//! storage index of one repository or one manifest; nothing here ever asks
//! an upstream. See [`api`] for the endpoints and [`history`] for the
//! 24-hour charts.

mod api;
pub mod history;
mod manifest;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::auth::Gate;
use crate::gc::LastCollection;
use crate::routing::Registries;
use crate::storage::Storage;
use history::History;

const INDEX_HTML: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");

/// What the dashboard reads.
pub struct Dashboard {
    pub registries: Arc<Registries>,
    /// The root view: every upstream's repositories.
    pub storage: Storage,
    /// `cache.maxsize`, if set.
    pub max_size: Option<u64>,
    pub last_collection: LastCollection,
    pub history: Arc<History>,
    /// What each client may see: only repositories it may pull.
    pub gate: Arc<Gate>,
}

/// The page, its assets and the JSON API.
pub fn routes(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/kura/dashboard.js", get(script))
        .route("/kura/dashboard.css", get(style))
        .route("/kura/api/v1/upstreams", get(api::upstreams))
        .route("/kura/api/v1/cache", get(api::cache))
        .route("/kura/api/v1/repositories", get(api::repositories))
        .route("/kura/api/v1/repositories/{*path}", get(api::repository))
        .route("/kura/api/v1/downloads", get(api::downloads))
        .route("/kura/api/v1/history", get(api::history))
        .with_state(dashboard)
}

async fn page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
