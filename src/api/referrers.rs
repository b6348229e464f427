//! `GET`/`HEAD /v2/<name>/referrers/<digest>[?artifactType=<type>]`: the
//! subject's referrers as an OCI image index, filtered by Kura when asked
//! (`OCI-Filters-Applied: artifactType`), stale with `Warning: 110` when
//! the upstream could not be asked.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Outcome;
use super::error::ApiError;
use super::manifests::STALE_WARNING;
use crate::cache::Cache;
use crate::cache::referrers::INDEX_MEDIA_TYPE;
use crate::metrics::metrics;
use crate::reference::{Digest, RepoName};

const FILTERS_APPLIED_HEADER: &str = "oci-filters-applied";

pub async fn serve(
    cache: &Arc<Cache>,
    name: &RepoName,
    subject: &Digest,
    query: &str,
    head: bool,
) -> Result<Response, ApiError> {
    let artifact_type = artifact_type_param(query);
    let referrers = cache.referrers(name, subject).await?;
    let outcome = if referrers.stale {
        Outcome("stale")
    } else {
        Outcome::from_hit(referrers.cache_hit)
    };
    metrics().lookup(cache.upstream_label(), "referrers", outcome.0);
    let index = referrers.index(artifact_type.as_deref());
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, INDEX_MEDIA_TYPE)
        .header(header::CONTENT_LENGTH, index.len());
    if artifact_type.is_some() {
        builder = builder.header(FILTERS_APPLIED_HEADER, "artifactType");
    }
    if referrers.stale {
        builder = builder.header(header::WARNING, HeaderValue::from_static(STALE_WARNING));
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(index)
    };
    let mut response = builder
        .body(body)
        .unwrap_or_else(|e| ApiError::internal(e).into_response());
    response.extensions_mut().insert(outcome);
    Ok(response)
}

/// The `artifactType` filter; an empty one filters nothing.
fn artifact_type_param(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "artifactType")
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}
