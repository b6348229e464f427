//! Tag lists: the upstream's when it answers, otherwise the tags Kura has
//! cached, so `tags/list` keeps working while the upstream is down.
//!
//! Kura pages the list itself (`n`, `last`), whatever the upstream does
//! with them (Distribution 2.8 ignores both): it reads the upstream's
//! whole list, following the upstream's own `Link` pages, sorts it and
//! slices it. Concurrent requests for one repository share one walk.
//! Tags the content policy refuses (`policy.tags`) are left out.

use std::borrow::Cow;
use std::sync::Arc;

use super::{Cache, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::reference::RepoName;
use crate::upstream::{MAX_TAG_LIST_BYTES, UpstreamError};

/// The most upstream pages one walk follows; a longer list is refused
/// (and the cached tags served) rather than answered incomplete.
pub const MAX_TAG_PAGES: usize = 100;

/// A whole upstream tag list, sorted, shared by the requests that
/// waited for the same walk.
pub type TagList = Result<Arc<Vec<String>>, UpstreamError>;

/// One page of a sorted list and whether more follow it.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

/// Paging as the distribution spec defines it: entries after `last`, at
/// most `n` of them.
pub fn paginate(sorted: &[String], n: Option<usize>, last: Option<&str>) -> Page {
    let start = last.map_or(0, |last| {
        sorted.partition_point(|item| item.as_str() <= last)
    });
    let rest = &sorted[start..];
    let take = n.map_or(rest.len(), |n| n.min(rest.len()));
    Page {
        items: rest[..take].to_vec(),
        more: take < rest.len(),
    }
}

impl Cache {
    pub async fn tags(
        self: &Arc<Self>,
        name: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, ApiError> {
        self.admit(name, None)?;
        let page = |tags: &[String]| paginate(&self.resolvable(tags), n, last);
        match self.upstream_tags(name).await {
            Ok(tags) => Ok(page(&tags)),
            // A missing repository is an answer; anything else is upstream
            // trouble, where the cached tags are the best answer there is.
            Err(err) if !err.is_not_found() => {
                let cached = self.storage.list_tags(name).await.map_err(storage_error)?;
                if cached.is_empty() {
                    return Err(upstream_error(&err, ErrorCode::NameUnknown));
                }
                tracing::warn!(%name, error = %err, "upstream tag list failed; serving cached tags");
                Ok(page(&cached))
            }
            Err(err) => Err(upstream_error(&err, ErrorCode::NameUnknown)),
        }
    }

    /// The tags the content policy lets a client resolve: a list shows
    /// only what can be pulled (paging counts these, not the upstream's).
    fn resolvable<'a>(&self, tags: &'a [String]) -> Cow<'a, [String]> {
        let policy = self.policy();
        if tags.iter().all(|tag| policy.allows_tag(tag)) {
            return Cow::Borrowed(tags);
        }
        Cow::Owned(
            (tags.iter())
                .filter(|tag| policy.allows_tag(tag))
                .cloned()
                .collect(),
        )
    }

    /// The upstream's whole list, walked once for every request waiting
    /// on it.
    async fn upstream_tags(self: &Arc<Self>, name: &RepoName) -> TagList {
        let this = self.clone();
        let walked = name.clone();
        self.tag_list_flights
            .run(name.clone(), move || async move {
                this.walk_tag_pages(&walked).await
            })
            .await
            .unwrap_or_else(|| {
                Err(UpstreamError::Unreachable(
                    "tag list walk ran past its deadline".into(),
                ))
            })
    }

    /// Reads page after page while the upstream links a next one: at most
    /// [`MAX_TAG_PAGES`] pages, each at most [`MAX_TAG_LIST_BYTES`], and
    /// no more than that in all.
    async fn walk_tag_pages(&self, name: &RepoName) -> TagList {
        let mut tags = Vec::new();
        let mut bytes = 0;
        let mut query = String::new();
        for _ in 0..MAX_TAG_PAGES {
            let page = self.upstream.tags_page(name, &query).await?;
            bytes += page.body_bytes;
            if bytes > MAX_TAG_LIST_BYTES {
                return Err(UpstreamError::Unusable(format!(
                    "tag list larger than {} KiB",
                    MAX_TAG_LIST_BYTES >> 10
                )));
            }
            tags.extend(page.tags);
            match page.next {
                // An upstream linking a page to itself would walk in circles.
                Some(next) if next != query => query = next,
                _ => return Ok(Arc::new(sorted(tags))),
            }
        }
        Err(UpstreamError::Unusable(format!(
            "tag list longer than {MAX_TAG_PAGES} pages"
        )))
    }
}

/// Sorted (byte order, as Distribution) without duplicates: pages of a
/// list that changed between two reads may overlap.
fn sorted(mut tags: Vec<String>) -> Vec<String> {
    tags.sort_unstable();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages_follow_n_and_last() {
        let all = list(&["a", "b", "c", "d"]);
        assert_eq!(
            paginate(&all, None, None),
            Page {
                items: all.clone(),
                more: false
            }
        );
        assert_eq!(
            paginate(&all, Some(2), None),
            Page {
                items: list(&["a", "b"]),
                more: true
            }
        );
        assert_eq!(
            paginate(&all, Some(2), Some("b")),
            Page {
                items: list(&["c", "d"]),
                more: false
            }
        );
        assert_eq!(
            paginate(&all, Some(0), None),
            Page {
                items: vec![],
                more: true
            }
        );
        assert_eq!(
            paginate(&all, None, Some("z")),
            Page {
                items: vec![],
                more: false
            }
        );
    }
}
