//! The upstream's referrers API (OCI 1.1): a subject's whole referrers
//! list, its pages (`Link: <...>; rel="next"`) followed and merged within
//! bounds. A registry without the API answers 404 (Distribution) or 405;
//! the cache then reads the referrers tag schema instead.

use reqwest::header::HeaderMap;
use reqwest::{Method, Url};

use super::courtesy::SlotKind;
use super::{Upstream, UpstreamError};
use crate::reference::{Digest, MAX_MANIFEST_BYTES, RepoName};

/// Pages of one referrers list followed at most: registries page by a
/// hundred or more descriptors, so this is well over a thousand referrers,
/// and it bounds the requests one list costs.
pub const MAX_REFERRERS_PAGES: usize = 16;
/// All pages of one list together at most: a manifest's cap (4 MiB, some
/// 15,000 descriptors), so a list is never more than Kura would hold as
/// one manifest.
pub const MAX_REFERRERS_BYTES: usize = MAX_MANIFEST_BYTES;

const INDEX_ACCEPT: &str = "application/vnd.oci.image.index.v1+json";

impl UpstreamError {
    /// The upstream has no referrers API: nothing is routed there
    /// (Distribution answers 404) or the method is not allowed (405). A
    /// registry with the API never answers 404 for a subject.
    pub fn means_no_referrers_api(&self) -> bool {
        matches!(
            self,
            UpstreamError::Status {
                status: 404 | 405,
                ..
            }
        )
    }
}

impl Upstream {
    /// Every descriptor of `subject`'s referrers list, unfiltered, in the
    /// upstream's order. A list longer than [`MAX_REFERRERS_PAGES`] pages or
    /// [`MAX_REFERRERS_BYTES`] is refused whole ([`UpstreamError::Unusable`]):
    /// a verifier must not be handed a silently truncated list.
    pub async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, UpstreamError> {
        let mut url = self.url(&self.upstream_name(name), &format!("referrers/{subject}"));
        let mut descriptors = Vec::new();
        let mut budget = MAX_REFERRERS_BYTES;
        for _ in 0..MAX_REFERRERS_PAGES {
            let response = self
                .send_to(
                    Method::GET,
                    name,
                    url,
                    SlotKind::Metadata,
                    super::accept(INDEX_ACCEPT),
                )
                .await?;
            let next = next_page(response.headers(), response.response.url(), &self.base)?;
            let body = response
                .bytes(budget, "referrers list")
                .await
                .map_err(|err| match err {
                    UpstreamError::Unusable(_) => UpstreamError::Unusable(format!(
                        "referrers list larger than {} KiB over all its pages",
                        MAX_REFERRERS_BYTES >> 10
                    )),
                    other => other,
                })?;
            budget -= body.len();
            descriptors.extend(page_descriptors(&body)?);
            match next {
                Some(next) => url = next,
                None => return Ok(descriptors),
            }
        }
        Err(UpstreamError::Unusable(format!(
            "referrers list longer than {MAX_REFERRERS_PAGES} pages"
        )))
    }
}

/// The descriptors of one page (an image index).
fn page_descriptors(body: &[u8]) -> Result<Vec<serde_json::Value>, UpstreamError> {
    #[derive(serde::Deserialize)]
    struct Page {
        manifests: Vec<serde_json::Value>,
    }
    serde_json::from_slice::<Page>(body)
        .map(|page| page.manifests)
        .map_err(|e| UpstreamError::Unusable(format!("unreadable referrers list: {e}")))
}

/// The next page the upstream links to, resolved against the page it came
/// with. Only on the upstream's own origin: Kura dials no host a response
/// names, except redirects and token realms.
fn next_page(headers: &HeaderMap, page: &Url, base: &Url) -> Result<Option<Url>, UpstreamError> {
    let Some(target) = super::link::next_target(headers) else {
        return Ok(None);
    };
    let next = page
        .join(&target)
        .map_err(|e| UpstreamError::Unusable(format!("unreadable referrers page link: {e}")))?;
    if next.origin() != base.origin() {
        return Err(UpstreamError::Unusable(
            "referrers page link to another host".into(),
        ));
    }
    Ok(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::LINK;

    #[test]
    fn next_pages_stay_on_the_upstreams_origin() {
        let base: Url = "https://registry.example:5000/mirror/".parse().unwrap();
        let page: Url = "https://registry.example:5000/v2/a/referrers/sha256:00"
            .parse()
            .unwrap();
        let headers = |link: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(LINK, link.parse().unwrap());
            headers
        };
        let next = next_page(
            &headers("</v2/a/referrers/sha256:00?last=x>; rel=\"next\""),
            &page,
            &base,
        );
        assert_eq!(
            next.unwrap().unwrap().as_str(),
            "https://registry.example:5000/v2/a/referrers/sha256:00?last=x"
        );
        assert!(
            next_page(&HeaderMap::new(), &page, &base)
                .unwrap()
                .is_none()
        );
        for elsewhere in [
            "<https://evil.example/v2/a/referrers/x>; rel=\"next\"",
            "<http://registry.example:5000/v2/x>; rel=\"next\"",
            "<//registry.example:6000/v2/x>; rel=\"next\"",
        ] {
            assert!(
                matches!(
                    next_page(&headers(elsewhere), &page, &base),
                    Err(UpstreamError::Unusable(_))
                ),
                "{elsewhere}"
            );
        }
    }

    #[test]
    fn a_page_must_be_an_index() {
        let page =
            br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:00","artifactType":"x"}]}"#;
        assert_eq!(page_descriptors(page).unwrap().len(), 1);
        assert!(page_descriptors(b"<html>").is_err());
        assert!(page_descriptors(b"{}").is_err());
    }
}
