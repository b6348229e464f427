//! Manifests: by digest they are immutable and cached forever; by tag they
//! are served from cache for `tagttl`, then revalidated with a HEAD and
//! fetched again only if the digest changed. When the upstream fails, a
//! cached tag is served stale. An immutable tag (`policy.immutabletags`)
//! is resolved once and from then on served by its cached digest, with no
//! revalidation.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::{Cache, bookkeeping_failed, fetch_overran, storage_error, upstream_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::reference::{Digest, MAX_MANIFEST_BYTES, Reference, RepoName, Tag};
use crate::storage::index::TagLink;

/// Media type assumed when neither the upstream nor the manifest says.
const DEFAULT_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Served from cache because the upstream could not confirm the tag.
    pub stale: bool,
    /// Whether it was already cached (for the access log).
    pub cache_hit: bool,
}

impl Cache {
    /// A manifest as a client asks for it: admitted by the content policy,
    /// then by an immutable tag's cached digest or as any other.
    pub async fn manifest(
        self: &Arc<Self>,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<Manifest, ApiError> {
        let tag = match reference {
            Reference::Tag(tag) => Some(tag),
            Reference::Digest(_) => None,
        };
        if let Some(pinned) = self.admitted(name, tag).await? {
            return Ok(pinned);
        }
        self.resolve_manifest(name, reference).await
    }

    /// The content policy's word before any manifest is fetched or served:
    /// refused, or (an immutable tag resolved before) its cached digest's
    /// manifest, never revalidated; `None` to go on.
    async fn admitted(
        self: &Arc<Self>,
        name: &RepoName,
        tag: Option<&Tag>,
    ) -> Result<Option<Manifest>, ApiError> {
        self.admit(name, tag)?;
        if let Some(tag) = tag
            && self.policy().is_immutable(tag.as_str())
            && let Some(link) = self.stored_tag_link(name, tag).await?
        {
            let pinned = Reference::Digest(link.digest);
            return self.resolve_manifest(name, &pinned).await.map(Some);
        }
        Ok(None)
    }

    /// A manifest by digest or by tag (fresh, revalidated or stale), with
    /// no policy: for the client paths above and the referrers tag schema,
    /// whose tags are Kura's own lookups, not a client's choice.
    pub(super) async fn resolve_manifest(
        self: &Arc<Self>,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<Manifest, ApiError> {
        let manifest = match reference {
            Reference::Digest(digest) => self.manifest_by_digest(name, digest).await,
            Reference::Tag(tag) => self.manifest_by_tag(name, tag).await,
        }?;
        self.storage.record_access(&manifest.digest);
        Ok(manifest)
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Manifest, ApiError> {
        if let Some(manifest) = self.cached_manifest(name, digest).await? {
            return Ok(manifest);
        }
        let this = self.clone();
        let (name, digest) = (name.clone(), digest.clone());
        let key = (name.clone(), digest.clone());
        self.digest_flights
            .run(key, move || async move {
                let reference = digest.to_string();
                let manifest = this.fetch_manifest(&name, &reference).await?;
                if manifest.digest != digest {
                    return Err(bad_upstream_digest(&name, &reference));
                }
                Ok(manifest)
            })
            .await
            .unwrap_or_else(|| Err(fetch_overran()))
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        name: &RepoName,
        tag: &Tag,
    ) -> Result<Manifest, ApiError> {
        let link = self.stored_tag_link(name, tag).await?;
        if let Some(link) = &link
            && self.is_fresh(link)
            && let Some(manifest) = self.cached_manifest(name, &link.digest).await?
        {
            return Ok(manifest);
        }
        self.revalidate_shared(name, tag, link).await
    }

    /// Where the storage says a tag points, as last resolved.
    async fn stored_tag_link(
        &self,
        name: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagLink>, ApiError> {
        self.storage
            .tag_link(name, tag)
            .await
            .map_err(storage_error)
    }

    /// Asks the upstream where a tag points now, whatever its `tagttl`
    /// freshness: for warming, which was told (by a push event or its
    /// schedule) that the tag may have moved. A HEAD, then a GET only if
    /// the digest is not cached. The content policy applies as to clients:
    /// a refused tag is not fetched, an immutable one not moved.
    pub async fn manifest_revalidated(
        self: &Arc<Self>,
        name: &RepoName,
        tag: &Tag,
    ) -> Result<Manifest, ApiError> {
        if let Some(pinned) = self.admitted(name, Some(tag)).await? {
            return Ok(pinned);
        }
        let link = self.stored_tag_link(name, tag).await?;
        let manifest = self.revalidate_shared(name, tag, link).await?;
        self.storage.record_access(&manifest.digest);
        Ok(manifest)
    }

    /// One revalidation per tag at a time, shared by everyone asking.
    async fn revalidate_shared(
        self: &Arc<Self>,
        name: &RepoName,
        tag: &Tag,
        link: Option<TagLink>,
    ) -> Result<Manifest, ApiError> {
        let this = self.clone();
        let key = (name.clone(), tag.clone());
        let (flight_name, flight_tag) = key.clone();
        let flight_link = link.clone();
        let revalidated = self
            .tag_flights
            .run(key, move || async move {
                this.revalidate_tag(&flight_name, &flight_tag, flight_link)
                    .await
            })
            .await;
        match revalidated {
            Some(result) => result,
            None => self.serve_stale(name, tag, link, fetch_overran()).await,
        }
    }

    fn is_fresh(&self, link: &TagLink) -> bool {
        SystemTime::now()
            .duration_since(link.confirmed_at)
            .is_ok_and(|age| age < self.tag_ttl)
    }

    /// Asks the upstream (HEAD, which Docker Hub does not count against pull
    /// limits) whether the tag still points where the cache thinks.
    async fn revalidate_tag(
        &self,
        name: &RepoName,
        tag: &Tag,
        link: Option<TagLink>,
    ) -> Result<Manifest, ApiError> {
        let result = match self.upstream.head_manifest(name, tag.as_str()).await {
            Ok(meta) => match meta.digest {
                Some(digest) => match self.cached_manifest(name, &digest).await? {
                    Some(manifest) => Ok(manifest),
                    None => self.fetch_manifest(name, tag.as_str()).await,
                },
                None => self.fetch_manifest(name, tag.as_str()).await,
            },
            Err(err) if err.is_not_found() => {
                if let Err(e) = self.storage.remove_tag(name, tag).await {
                    bookkeeping_failed("tag removal", name, e);
                }
                return Err(upstream_error(&err, ErrorCode::ManifestUnknown));
            }
            Err(err) => Err(upstream_error(&err, ErrorCode::ManifestUnknown)),
        };
        match result {
            Ok(manifest) => {
                if let Err(e) = self.storage.set_tag(name, tag, &manifest.digest).await {
                    bookkeeping_failed("tag", name, e);
                }
                Ok(manifest)
            }
            Err(err) => self.serve_stale(name, tag, link, err).await,
        }
    }

    /// Falls back to the cached resolution of a tag when the upstream
    /// cannot answer; a 404 (`MANIFEST_UNKNOWN`) is never papered over.
    async fn serve_stale(
        &self,
        name: &RepoName,
        tag: &Tag,
        link: Option<TagLink>,
        err: ApiError,
    ) -> Result<Manifest, ApiError> {
        if err.code == ErrorCode::ManifestUnknown {
            return Err(err);
        }
        let Some(link) = link else {
            return Err(err);
        };
        match self.cached_manifest(name, &link.digest).await? {
            Some(manifest) => {
                // The client-facing message ("... not cached") does not fit
                // here; the code says what the upstream did.
                tracing::warn!(%name, %tag, upstream = err.code.as_str(), "upstream failed; serving cached tag");
                Ok(Manifest {
                    stale: true,
                    ..manifest
                })
            }
            None => Err(err),
        }
    }

    async fn cached_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Manifest>, ApiError> {
        let Some(media_type) = self
            .storage
            .manifest_media_type(name, digest)
            .await
            .map_err(storage_error)?
        else {
            return Ok(None);
        };
        // Nothing larger is ever stored as a manifest; a file that large
        // under a manifest's name is not one.
        let Some(bytes) = self
            .storage
            .read_blob_within(digest, MAX_MANIFEST_BYTES)
            .await
            .map_err(storage_error)?
        else {
            return Ok(None);
        };
        // Cheap next to the request (manifests are small), and the only
        // check a manifest gets after a crash or a bad disk: bytes that are
        // not what their name says are never served.
        if &Digest::of_bytes(&bytes) != digest {
            tracing::warn!(%name, %digest, "stored manifest does not match its digest; removed to fetch it again");
            if let Err(e) = self.storage.delete_blob(digest).await {
                tracing::warn!(%digest, error = %e, "cannot remove a corrupt manifest");
            }
            return Ok(None);
        }
        Ok(Some(Manifest {
            digest: digest.clone(),
            media_type,
            bytes: bytes.into(),
            stale: false,
            cache_hit: true,
        }))
    }

    /// GETs a manifest, checks it against the upstream's stated digest, and
    /// stores it (blob first, then the repository link).
    async fn fetch_manifest(&self, name: &RepoName, reference: &str) -> Result<Manifest, ApiError> {
        let (meta, bytes) = self
            .upstream
            .get_manifest(name, reference)
            .await
            .map_err(|e| upstream_error(&e, ErrorCode::ManifestUnknown))?;
        let digest = Digest::of_bytes(&bytes);
        if meta.digest.as_ref().is_some_and(|stated| stated != &digest) {
            return Err(bad_upstream_digest(name, reference));
        }
        let media_type = meta
            .media_type
            .filter(|t| !t.is_empty() && t != "application/octet-stream")
            .or_else(|| embedded_media_type(&bytes))
            .unwrap_or_else(|| DEFAULT_MEDIA_TYPE.to_owned());
        self.store_manifest(name, &digest, &media_type, &bytes)
            .await;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            stale: false,
            cache_hit: false,
        })
    }

    /// Stores a verified manifest, blob first, then the repository link
    /// (never a link to missing bytes). A failure is logged, not returned:
    /// the client gets the verified bytes either way, and the next request
    /// fetches and tries to store them again.
    async fn store_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) {
        if let Err(e) = self.storage.put_blob_bytes(digest, bytes).await {
            bookkeeping_failed("manifest", name, e);
        } else if let Err(e) = self.storage.link_manifest(name, digest, media_type).await {
            bookkeeping_failed("manifest link", name, e);
        }
    }
}

/// The `mediaType` field inside the manifest JSON, if present.
fn embedded_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type
}

fn bad_upstream_digest(name: &RepoName, reference: &str) -> ApiError {
    tracing::error!(%name, reference, "upstream manifest does not match its digest; not cached");
    ApiError::new(
        ErrorCode::Unavailable,
        "upstream registry sent a manifest that does not match its digest",
    )
}
