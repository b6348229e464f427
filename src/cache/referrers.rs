//! Referrers (OCI 1.1): the signatures, SBOMs and attestations attached to
//! a subject manifest, listed as an image index.
//!
//! A subject's list is cached like a tag: served from storage for
//! `referrersttl` (default: the upstream's `tagttl`), then fetched again by
//! one coalesced task; when the upstream fails, the cached list is served
//! stale. It comes from the upstream's referrers API, all pages merged
//! ([`crate::upstream::referrers`]), or, when the upstream has none (404 or
//! 405, as Distribution), from the referrers tag schema: the tag
//! `sha256-<hex>` holding an index, read through the manifest-by-tag path
//! (so that index is cached, revalidated and served stale as any tag). A
//! subject without referrers has an empty list, never a 404.
//!
//! The list is fetched and stored unfiltered; `artifactType` filtering is
//! Kura's, per request, so one stored list answers every filter.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::{Cache, bookkeeping_failed, fetch_overran, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::reference::{Digest, MAX_MANIFEST_BYTES, Reference, RepoName, Tag};
use crate::upstream::referrers::MAX_REFERRERS_BYTES;

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// One referrer, as its descriptor in the list.
#[derive(Debug, Clone)]
pub struct Referrer {
    pub digest: Digest,
    pub artifact_type: Option<String>,
    /// The whole descriptor as the upstream gave it (`mediaType`, `size`,
    /// `annotations`, ...), served unchanged.
    descriptor: Value,
}

/// A subject's referrers, unfiltered.
#[derive(Debug, Clone)]
pub struct Referrers {
    pub referrers: Arc<Vec<Referrer>>,
    /// Served from cache because the upstream could not be asked.
    pub stale: bool,
    /// Whether it was already cached (for the access log).
    pub cache_hit: bool,
}

impl Referrers {
    /// The image index a client gets: every referrer, or only those of
    /// `artifact_type`.
    pub fn index(&self, artifact_type: Option<&str>) -> Vec<u8> {
        let manifests: Vec<&Value> = self
            .referrers
            .iter()
            .filter(|r| {
                artifact_type.is_none_or(|wanted| r.artifact_type.as_deref() == Some(wanted))
            })
            .map(|r| &r.descriptor)
            .collect();
        index_bytes(&manifests)
    }
}

fn index_bytes(manifests: &[&Value]) -> Vec<u8> {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    });
    serde_json::to_vec(&index).expect("a JSON value serialises")
}

/// The referrers among `descriptors`: those naming a sha256 digest (the
/// only ones Kura can serve), each once.
fn referrers_of(descriptors: Vec<Value>) -> Vec<Referrer> {
    let mut referrers: Vec<Referrer> = Vec::with_capacity(descriptors.len());
    // A set, not a scan of the list: an upstream's list may hold tens of
    // thousands of descriptors, and this runs on every request.
    let mut seen = std::collections::HashSet::with_capacity(descriptors.len());
    for descriptor in descriptors {
        let Some(digest) = descriptor
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| Digest::parse(d).ok())
        else {
            continue;
        };
        if !seen.insert(digest.clone()) {
            continue;
        }
        let artifact_type = descriptor
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned);
        referrers.push(Referrer {
            digest,
            artifact_type,
            descriptor,
        });
    }
    referrers
}

/// The descriptors of an image index; nothing for anything else (the tag
/// schema: "if it is not a valid index, there are no referrers").
fn index_descriptors(bytes: &[u8]) -> Vec<Value> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Vec<Value>,
    }
    match serde_json::from_slice::<Index>(bytes) {
        Ok(index)
            if index
                .media_type
                .as_deref()
                .is_none_or(|t| t == INDEX_MEDIA_TYPE) =>
        {
            index.manifests
        }
        _ => Vec::new(),
    }
}

/// The referrers tag of a subject: `sha256-<hex>`.
fn tag_schema_tag(subject: &Digest) -> Tag {
    Tag::parse(&format!("sha256-{}", subject.hex())).expect("sha256-<64 hex> is a valid tag")
}

/// A list as stored, with when the upstream last confirmed it.
struct Stored {
    referrers: Arc<Vec<Referrer>>,
    confirmed_at: SystemTime,
}

impl Cache {
    /// `subject`'s referrers: cached while fresh, else from the upstream
    /// (one fetch shared by concurrent callers), else cached and stale.
    pub async fn referrers(
        self: &Arc<Self>,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<Referrers, ApiError> {
        self.admit(name, None)?;
        let stored = self.stored_referrers(name, subject).await?;
        if let Some(stored) = &stored
            && self.referrers_are_fresh(stored.confirmed_at)
        {
            return Ok(Referrers {
                referrers: stored.referrers.clone(),
                stale: false,
                cache_hit: true,
            });
        }
        let this = self.clone();
        let key = (name.clone(), subject.clone());
        let (flight_name, flight_subject) = key.clone();
        let fetched = self
            .referrer_flights
            .run(key, move || async move {
                this.fetch_referrers(&flight_name, &flight_subject).await
            })
            .await;
        match fetched {
            Some(Ok(referrers)) => Ok(referrers),
            Some(Err(err)) => serve_stale(name, subject, stored, err),
            None => serve_stale(name, subject, stored, fetch_overran()),
        }
    }

    fn referrers_are_fresh(&self, confirmed_at: SystemTime) -> bool {
        SystemTime::now()
            .duration_since(confirmed_at)
            .is_ok_and(|age| age < self.referrers_ttl)
    }

    async fn stored_referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<Option<Stored>, ApiError> {
        let Some(stored) = self
            .storage
            .referrers(name, subject, MAX_MANIFEST_BYTES)
            .await
            .map_err(storage_error)?
        else {
            return Ok(None);
        };
        // Kura wrote it as an index; anything else (a torn write from
        // before commits were durable) is as good as missing.
        let Ok(descriptors) = serde_json::from_slice::<StoredIndex>(&stored.index) else {
            tracing::warn!(%name, %subject, "ignoring an unreadable cached referrers list");
            return Ok(None);
        };
        Ok(Some(Stored {
            referrers: Arc::new(referrers_of(descriptors.manifests)),
            confirmed_at: stored.confirmed_at,
        }))
    }

    /// Asks the upstream (its API, else the tag schema) and stores what it
    /// confirmed.
    async fn fetch_referrers(
        self: &Arc<Self>,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<Referrers, ApiError> {
        let (descriptors, confirmed) = match self.upstream.referrers(name, subject).await {
            Ok(descriptors) => (descriptors, true),
            Err(err) if err.means_no_referrers_api() => {
                self.referrers_from_tag_schema(name, subject).await?
            }
            Err(err) => return Err(upstream_error(&err, ErrorCode::ManifestUnknown)),
        };
        let referrers = referrers_of(descriptors);
        let index = index_bytes(&referrers.iter().map(|r| &r.descriptor).collect::<Vec<_>>());
        if index.len() > MAX_REFERRERS_BYTES {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "upstream registry's referrers list is too large to cache",
            ));
        }
        // An empty list is stored only for a subject this repository has:
        // any client can name made-up repositories and digests, and each
        // stored answer would be a file nobody bounds.
        let worth_storing =
            confirmed && (!referrers.is_empty() || self.has_manifest(name, subject).await);
        if worth_storing && let Err(e) = self.storage.set_referrers(name, subject, &index).await {
            bookkeeping_failed("referrers list", name, e);
        }
        Ok(Referrers {
            referrers: Arc::new(referrers),
            stale: !confirmed,
            cache_hit: false,
        })
    }

    /// Whether `name` has the manifest `digest` cached.
    async fn has_manifest(&self, name: &RepoName, digest: &Digest) -> bool {
        matches!(
            self.storage.manifest_media_type(name, digest).await,
            Ok(Some(_))
        )
    }

    /// The descriptors of the `sha256-<hex>` tag's index, and whether the
    /// upstream confirmed them (not when the tag itself was served stale).
    /// No such tag, or no such repository, means no referrers.
    async fn referrers_from_tag_schema(
        self: &Arc<Self>,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<(Vec<Value>, bool), ApiError> {
        let tag = Reference::Tag(tag_schema_tag(subject));
        match self.resolve_manifest(name, &tag).await {
            Ok(manifest) => Ok((index_descriptors(&manifest.bytes), !manifest.stale)),
            Err(err)
                if matches!(
                    err.code,
                    ErrorCode::ManifestUnknown | ErrorCode::NameUnknown
                ) =>
            {
                Ok((Vec::new(), true))
            }
            Err(err) => Err(err),
        }
    }
}

#[derive(serde::Deserialize)]
struct StoredIndex {
    manifests: Vec<Value>,
}

/// Falls back to the cached list when the upstream cannot answer.
fn serve_stale(
    name: &RepoName,
    subject: &Digest,
    stored: Option<Stored>,
    err: ApiError,
) -> Result<Referrers, ApiError> {
    let Some(stored) = stored else {
        return Err(err);
    };
    tracing::warn!(%name, %subject, upstream = err.code.as_str(), "upstream failed; serving cached referrers");
    Ok(Referrers {
        referrers: stored.referrers,
        stale: true,
        cache_hit: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn lists_keep_valid_descriptors_once_and_filter_by_artifact_type() {
        let descriptors = vec![
            json!({"mediaType": "m", "digest": digest('a'), "size": 1, "artifactType": "sig", "annotations": {"k": "v"}}),
            json!({"mediaType": "m", "digest": digest('b'), "size": 2, "artifactType": "sbom"}),
            json!({"mediaType": "m", "digest": digest('a'), "size": 1, "artifactType": "sig"}),
            json!({"mediaType": "m", "digest": "sha512:00", "size": 3}),
            json!({"mediaType": "m", "size": 4}),
        ];
        let referrers = Referrers {
            referrers: Arc::new(referrers_of(descriptors)),
            stale: false,
            cache_hit: false,
        };
        let index = |filter| serde_json::from_slice::<Value>(&referrers.index(filter)).unwrap();
        let all = index(None);
        assert_eq!(all["mediaType"], INDEX_MEDIA_TYPE);
        assert_eq!(all["schemaVersion"], 2);
        assert_eq!(all["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(all["manifests"][0]["annotations"]["k"], "v");
        let signatures = index(Some("sig"));
        assert_eq!(signatures["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(signatures["manifests"][0]["digest"], digest('a'));
        assert!(
            index(Some("none"))["manifests"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn only_an_index_in_the_referrers_tag_lists_referrers() {
        let entry = json!({"mediaType": "m", "digest": digest('a'), "size": 1});
        let index =
            json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [entry]});
        assert_eq!(index_descriptors(index.to_string().as_bytes()).len(), 1);
        let untyped = json!({"schemaVersion": 2, "manifests": [entry]});
        assert_eq!(index_descriptors(untyped.to_string().as_bytes()).len(), 1);
        let list = json!({"mediaType": "application/vnd.docker.distribution.manifest.list.v2+json", "manifests": [entry]});
        assert!(index_descriptors(list.to_string().as_bytes()).is_empty());
        let image = json!({"schemaVersion": 2, "config": entry, "layers": []});
        assert!(index_descriptors(image.to_string().as_bytes()).is_empty());
        assert!(index_descriptors(b"not json").is_empty());
    }

    #[test]
    fn the_referrers_tag_is_the_digest_with_a_dash() {
        let subject = Digest::parse(&digest('c')).unwrap();
        assert_eq!(
            tag_schema_tag(&subject).as_str(),
            format!("sha256-{}", "c".repeat(64))
        );
    }
}
