//! `GET`/`HEAD /v2/<name>/manifests/<reference>`: the manifest's exact
//! bytes with the upstream's media type and digest, or, for a client that
//! cannot read a manifest list, the list's default-platform manifest
//! ([`negotiation`](super::negotiation)).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::error::ApiError;
use super::negotiation::{Accepted, Choice, check_chosen, choose};
use super::{Outcome, content_response};
use crate::cache::{Cache, Manifest};
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
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let accepted = Accepted::from_headers(headers);
    let manifest = negotiated(cache, name, reference, &accepted).await?;
    let outcome = if manifest.stale {
        Outcome("stale")
    } else {
        Outcome::from_hit(manifest.cache_hit)
    };
    metrics().lookup(cache.upstream_label(), "manifest", outcome.0);
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

/// The manifest `reference` names, or the one served in its place to a
/// client that does not accept it.
async fn negotiated(
    cache: &Arc<Cache>,
    name: &RepoName,
    reference: &Reference,
    accepted: &Accepted,
) -> Result<Manifest, ApiError> {
    let manifest = cache.manifest(name, reference).await?;
    let by_tag = matches!(reference, Reference::Tag(_));
    match choose(accepted, &manifest, by_tag)? {
        Choice::AsStored => Ok(manifest),
        Choice::PlatformManifest(digest) => {
            let chosen = cache.manifest(name, &Reference::Digest(digest)).await?;
            check_chosen(accepted, &chosen)?;
            // The list's staleness carries over: the tag was not confirmed.
            Ok(Manifest {
                stale: manifest.stale,
                ..chosen
            })
        }
    }
}
