//! Tag lists: the upstream's when it answers, otherwise the tags Kura has
//! cached, so `tags/list` keeps working while the upstream is down.

use super::{Cache, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::reference::RepoName;

/// One page of a sorted list and whether more follow it.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

/// Paging as the distribution spec defines it: entries after `last`, at
/// most `n` of them.
pub fn paginate(sorted: Vec<String>, n: Option<usize>, last: Option<&str>) -> Page {
    let mut items: Vec<String> = match last {
        Some(last) => sorted
            .into_iter()
            .filter(|item| item.as_str() > last)
            .collect(),
        None => sorted,
    };
    let more = n.is_some_and(|n| items.len() > n);
    if let Some(n) = n {
        items.truncate(n);
    }
    Page { items, more }
}

impl Cache {
    pub async fn tags(
        &self,
        name: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page, ApiError> {
        let query = page_query(n, last);
        match self.upstream.tags(name, &query).await {
            Ok(tags) => {
                let more = n.is_some_and(|n| n > 0 && tags.len() >= n);
                Ok(Page { items: tags, more })
            }
            // A missing repository is an answer; anything else is upstream
            // trouble, where the cached tags are the best answer there is.
            Err(err) if !err.is_not_found() => {
                let cached = self.storage.list_tags(name).await.map_err(storage_error)?;
                if cached.is_empty() {
                    return Err(upstream_error(&err, ErrorCode::NameUnknown));
                }
                tracing::warn!(%name, error = %err, "upstream tag list failed; serving cached tags");
                Ok(paginate(cached, n, last))
            }
            Err(err) => Err(upstream_error(&err, ErrorCode::NameUnknown)),
        }
    }
}

fn page_query(n: Option<usize>, last: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        query.append_pair("n", &n.to_string());
    }
    if let Some(last) = last {
        query.append_pair("last", last);
    }
    query.finish()
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
            paginate(all.clone(), None, None),
            Page {
                items: all.clone(),
                more: false
            }
        );
        assert_eq!(
            paginate(all.clone(), Some(2), None),
            Page {
                items: list(&["a", "b"]),
                more: true
            }
        );
        assert_eq!(
            paginate(all.clone(), Some(2), Some("b")),
            Page {
                items: list(&["c", "d"]),
                more: false
            }
        );
        assert_eq!(
            paginate(all.clone(), Some(0), None),
            Page {
                items: vec![],
                more: true
            }
        );
        assert_eq!(
            paginate(all, None, Some("z")),
            Page {
                items: vec![],
                more: false
            }
        );
    }
}
