//! Operations endpoints: `/metrics` (Prometheus), `/healthz` (the process
//! answers) and `/readyz` (storage accepts writes). Upstream reachability
//! is reported in `/readyz`'s body but never makes Kura unready: it can
//! still serve what it has.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use crate::metrics::{UpstreamLabels, metrics};

pub(super) async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics().render(),
    )
        .into_response()
}

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let storage = state.storage.probe_writable().await;
    let mut upstreams = Map::new();
    for label in state.registries.upstream_labels() {
        let up = metrics()
            .upstream_up
            .get(&UpstreamLabels {
                upstream: label.clone(),
            })
            .map(|g| g.get());
        let status = match up {
            Some(1) => "reachable",
            Some(_) => "unreachable",
            None => "unknown",
        };
        upstreams.insert(label, Value::from(status));
    }
    let (status, storage_state) = match storage {
        Ok(()) => (StatusCode::OK, "writable".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not writable: {e}"),
        ),
    };
    (
        status,
        Json(json!({ "storage": storage_state, "upstreams": upstreams })),
    )
        .into_response()
}
