//! `GET`/`HEAD /v2/<name>/blobs/<digest>`, with `Range` support. A HEAD
//! never downloads the blob.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{DIGEST_HEADER, Outcome, content_response};
use crate::cache::{BlobBody, Cache};
use crate::metrics::{SourceLabels, metrics};
use crate::reference::{Digest, RepoName};
use futures_util::StreamExt;

const BLOB_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn serve(
    cache: &Arc<Cache>,
    name: &RepoName,
    digest: &Digest,
    head: bool,
    request_headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if head {
        let stat = cache.blob_stat(name, digest).await?;
        let response = content_response(
            StatusCode::OK,
            digest,
            BLOB_CONTENT_TYPE,
            stat.size,
            Body::empty(),
            Outcome::from_hit(stat.cache_hit),
        );
        return Ok(with_accept_ranges(response));
    }
    let blob = cache.open_blob(name, digest).await?;
    respond(cache, blob, digest, request_headers, Audience::Client).await
}

/// Whom a blob is served to: a client, or a peer replica that asked this
/// one as the blob's owner. Peers are counted apart (lookup kind
/// `peer_blob`, bytes of source `peer`), so a cluster counts each lookup
/// and each byte a client gets once, on the replica the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Client,
    Peer,
}

/// The response for an opened blob: a redirect to the storage, or its
/// bytes (those `Range` asks for).
pub async fn respond(
    cache: &Cache,
    blob: BlobBody,
    digest: &Digest,
    request_headers: &HeaderMap,
    audience: Audience,
) -> Result<Response, ApiError> {
    let outcome = Outcome::from_hit(blob.cache_hit);
    let (kind, source) = match (audience, blob.cache_hit) {
        (Audience::Peer, _) => ("peer_blob", "peer"),
        (Audience::Client, true) => ("blob", "cache"),
        (Audience::Client, false) => ("blob", "download"),
    };
    metrics().lookup(cache.upstream_label(), kind, outcome.0);
    if let Some(location) = blob.redirect() {
        return Ok(redirect(digest, location, outcome));
    }
    let served = metrics()
        .blob_bytes_served
        .get_or_create_owned(&SourceLabels {
            upstream: cache.upstream_label().to_owned(),
            source,
        });
    let range_header = request_headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range_header, blob.size) {
        ByteRange::Full => (StatusCode::OK, 0, blob.size),
        ByteRange::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, Some(end)),
        ByteRange::Unsatisfiable => return Ok(unsatisfiable(blob.size.unwrap_or(0))),
    };
    let size = blob.size;
    let stream = blob
        .into_stream(start, end)
        .await
        .map_err(|e| ApiError::internal(format!("opening blob: {e}")))?;
    let length = end.map(|end| end - start);
    let mut response = content_response(
        status,
        digest,
        BLOB_CONTENT_TYPE,
        length,
        Body::from_stream(stream.inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                served.inc_by(chunk.len() as u64);
            }
        })),
        outcome,
    );
    if let (StatusCode::PARTIAL_CONTENT, Some(end), Some(size)) = (status, end, size) {
        let value = format!("bytes {start}-{}/{size}", end - 1);
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&value).expect("ascii"),
        );
    }
    Ok(with_accept_ranges(response))
}

/// Sends the client to the storage for the bytes, as Distribution does on
/// S3; a `Range` header travels with the client's next request.
fn redirect(digest: &Digest, location: &str, outcome: Outcome) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, location)
        .header(DIGEST_HEADER, digest.to_string())
        .body(Body::empty())
        .unwrap_or_else(|e| ApiError::internal(e).into_response());
    response.extensions_mut().insert(outcome);
    response
}

fn with_accept_ranges(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

fn unsatisfiable(size: u64) -> Response {
    let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    response.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    response
}

/// A `Range` request resolved against the blob size.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    Full,
    /// `end` is exclusive.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Single byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`). Anything else,
/// or an unknown size, gets the full body, which RFC 9110 allows.
fn parse_range(header: Option<&str>, size: Option<u64>) -> ByteRange {
    let (Some(header), Some(size)) = (header, size) else {
        return ByteRange::Full;
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(start), Ok(last)) if start <= last => Some((start, last.saturating_add(1).min(size))),
        (Ok(start), Err(_)) if last.is_empty() => Some((start, size)),
        (Err(_), Ok(suffix)) if first.is_empty() => {
            if suffix == 0 {
                return ByteRange::Unsatisfiable;
            }
            Some((size.saturating_sub(suffix), size))
        }
        _ => None,
    };
    match parsed {
        None => ByteRange::Full,
        Some((start, _)) if start >= size => ByteRange::Unsatisfiable,
        Some((start, end)) => ByteRange::Partial { start, end },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_size() {
        let size = Some(100);
        let partial = |start, end| ByteRange::Partial { start, end };
        assert_eq!(parse_range(None, size), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-9"), size), partial(0, 10));
        assert_eq!(parse_range(Some("bytes=90-"), size), partial(90, 100));
        assert_eq!(parse_range(Some("bytes=90-500"), size), partial(90, 100));
        assert_eq!(parse_range(Some("bytes=-10"), size), partial(90, 100));
        assert_eq!(parse_range(Some("bytes=-1000"), size), partial(0, 100));
        assert_eq!(
            parse_range(Some("bytes=100-"), size),
            ByteRange::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some("bytes=-0"), size),
            ByteRange::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=5-1"), size), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), size), ByteRange::Full);
        assert_eq!(parse_range(Some("items=0-1"), size), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-9"), None), ByteRange::Full);
    }
}
