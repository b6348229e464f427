//! `GET`/`HEAD /v2/<name>/manifests/<reference>`: the manifest's exact
//! bytes with the upstream's media type and digest.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use super::error::ApiError;
use super::{Outcome, content_response};
use crate::cache::Cache;
use crate::metrics::metrics;
use crate::reference::{Reference, RepoName};

/// RFC 7234 warning 110: the response is stale (the upstream could not
/// confirm the tag).
pub(super) const STALE_WARNING: &str = "110 kura \"Response is Stale\"";

pub async fn serve(
    cache: &Arc<Cache>,
    name: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Response, ApiError> {
    let manifest = cache.manifest(name, reference).await?;
    let outcome = if manifest.stale {
        Outcome("stale")
    } else {
        Outcome::from_hit(manifest.cache_hit)
    };
    metrics().lookup("manifest", outcome.0);
    let length = manifest.bytes.len() as u64;
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes)
    };
    let mut response = content_response(
        StatusCode::OK,
        &manifest.digest,
        &manifest.media_type,
        Some(length),
        body,
        outcome,
    );
    if manifest.stale {
        response
            .headers_mut()
            .insert(header::WARNING, HeaderValue::from_static(STALE_WARNING));
    }
    Ok(response)
}
