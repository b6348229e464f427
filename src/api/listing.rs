//! `GET /v2/_catalog` (what Kura has cached) and `GET /v2/<name>/tags/list`,
//! both with `n`/`last` paging and a `Link` header to the next page
//! (`<path?n=N&last=X>; rel="next"`, keeping the request's `ns`).

use std::sync::Arc;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::{ApiError, ErrorCode};
use crate::cache::Cache;
use crate::cache::tags::Page;
use crate::reference::RepoName;
use crate::storage::Storage;
use crate::storage::catalog::Age;

/// `n` and `last` from a query string.
struct Paging {
    n: Option<usize>,
    last: Option<String>,
}

fn parse_paging(query: &str) -> Result<Paging, ApiError> {
    let mut paging = Paging {
        n: None,
        last: None,
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "n" => {
                let n = value.parse().map_err(|_| {
                    ApiError::new(
                        ErrorCode::PaginationNumberInvalid,
                        "n must be a non-negative integer",
                    )
                })?;
                paging.n = Some(n);
            }
            "last" => paging.last = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(paging)
}

/// `visible` says which repositories the client may see (pull).
pub async fn catalog(
    storage: &Storage,
    query: &str,
    visible: impl Fn(&str) -> bool,
) -> Result<Response, ApiError> {
    let paging = parse_paging(query)?;
    let page = storage
        .catalog_page(Age::Fresh, paging.n, paging.last.as_deref(), visible)
        .await
        .map_err(|e| ApiError::internal(format!("listing repositories: {e}")))?;
    let body = json!({ "repositories": page.items });
    Ok(with_next_link("/v2/_catalog", None, &page, paging.n, body))
}

/// `repo` is the name within its upstream; `requested` the name as the
/// client wrote it (with a registry prefix, if any), which the answer echoes;
/// `ns` the request's `?ns=`, which the next page's link keeps.
pub async fn tags(
    cache: &Arc<Cache>,
    repo: &RepoName,
    requested: &str,
    query: &str,
    ns: Option<&str>,
) -> Result<Response, ApiError> {
    let paging = parse_paging(query)?;
    let page = cache.tags(repo, paging.n, paging.last.as_deref()).await?;
    let body = json!({ "name": requested, "tags": page.items });
    Ok(with_next_link(
        &format!("/v2/{requested}/tags/list"),
        ns,
        &page,
        paging.n,
        body,
    ))
}

fn with_next_link(
    path: &str,
    ns: Option<&str>,
    page: &Page,
    n: Option<usize>,
    body: serde_json::Value,
) -> Response {
    let mut response = axum::Json(body).into_response();
    if let (true, Some(last), Some(n)) = (page.more, page.items.last(), n) {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("n", &n.to_string())
            .append_pair("last", last);
        if let Some(ns) = ns {
            query.append_pair("ns", ns);
        }
        let query = query.finish();
        let link = format!("<{path}?{query}>; rel=\"next\"");
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}
