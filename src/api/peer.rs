//! `GET /kura/peer/blobs/<upstream>/<name>/<digest>`: another replica of
//! the cluster asks this one, the blob's owner, for a cold blob. It is
//! served through the normal cache path (from storage, or by starting or
//! joining this replica's one download of it), never passed on to a third
//! replica. Outside the htpasswd gate: the request carries
//! `Authorization: Bearer <cluster.secret>` (compared in constant time),
//! else 401. At most `cluster.maxpeerrequests` are served at once; more
//! get 503, and the asking replica fetches from the upstream itself.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;

use super::blobs::Audience;
use super::error::{ApiError, ErrorCode};
use crate::cluster::Cluster;
use crate::reference::{Digest, RepoName};
use crate::routing::Registries;

#[derive(Clone)]
struct PeerState {
    registries: Arc<Registries>,
    cluster: Arc<Cluster>,
}

pub fn peer_routes(registries: Arc<Registries>, cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/kura/peer/blobs/{upstream}/{*blob}", get(serve_blob))
        .with_state(PeerState {
            registries,
            cluster,
        })
}

async fn serve_blob(
    State(state): State<PeerState>,
    Path((upstream, blob)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if !state.cluster.authorizes(authorization) {
        tracing::warn!("peer request without the cluster secret; refused");
        return ApiError::new(
            ErrorCode::Unauthorized,
            "peer requests need the cluster secret",
        )
        .into_response();
    }
    let Some(slot) = state.cluster.serving_slot() else {
        return ApiError {
            retry_after: Some(1),
            ..ApiError::new(ErrorCode::Unavailable, "too many peer requests")
        }
        .into_response();
    };
    let result = async {
        let (name, digest) = parse_blob_path(&blob)?;
        let cache = state.registries.upstream(&upstream).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NameUnknown,
                "no configured upstream of this name",
            )
        })?;
        let opened = cache.open_blob_for_peer(&name, &digest).await?;
        super::blobs::respond(&cache, opened, &digest, &headers, Audience::Peer).await
    }
    .await;
    match result {
        Ok(response) => holding_until_sent(response, slot),
        Err(err) => err.into_response(),
    }
}

/// `<name>/<digest>`: the name may hold `/`, the digest never does.
fn parse_blob_path(path: &str) -> Result<(RepoName, Digest), ApiError> {
    let (name, digest) = path
        .rsplit_once('/')
        .ok_or_else(|| ApiError::new(ErrorCode::NameInvalid, "expected <name>/<digest>"))?;
    let name = RepoName::parse(name)
        .ok_or_else(|| ApiError::new(ErrorCode::NameInvalid, "invalid repository name"))?;
    let digest = Digest::parse(digest)
        .map_err(|_| ApiError::new(ErrorCode::DigestInvalid, "invalid digest"))?;
    Ok((name, digest))
}

/// The response, its body holding `slot` until the last byte is sent or
/// the asking replica goes away.
fn holding_until_sent(response: Response, slot: tokio::sync::OwnedSemaphorePermit) -> Response {
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &slot;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_split_at_the_last_slash() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let (name, parsed) = parse_blob_path(&format!("library/alpine/{digest}")).unwrap();
        assert_eq!(name.as_str(), "library/alpine");
        assert_eq!(parsed.to_string(), digest);
        for bad in ["nodigest", "UPPER/sha256:00", &format!("../x/{digest}")] {
            assert!(parse_blob_path(bad).is_err(), "{bad}");
        }
    }
}
