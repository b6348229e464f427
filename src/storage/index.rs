//! The per-repository index: which manifests a repository has (with their
//! media type), which digest each tag last resolved to, and the referrers
//! list last fetched for a subject digest.

use std::collections::BTreeSet;
use std::io;
use std::time::SystemTime;

use super::Storage;
use super::catalog::{self, Age};
use super::objects::ObjectMeta;
use crate::cache::tags::Page;
use crate::reference::{Digest, RepoName, Tag};

const REPOSITORIES_PREFIX: &str = "repositories/";
const REVISIONS: &str = "/_manifests/revisions/sha256/";
const TAGS: &str = "/_manifests/tags/";
/// `_` cannot start a name component, so this never clashes with a name.
const REFERRERS: &str = "/_referrers/sha256/";

/// A tag's cached resolution.
#[derive(Debug, Clone)]
pub struct TagLink {
    pub digest: Digest,
    /// When the upstream last confirmed this mapping.
    pub confirmed_at: SystemTime,
}

/// A cached referrers list (an OCI image index, as Kura serves it unfiltered).
#[derive(Debug, Clone)]
pub struct StoredReferrers {
    pub index: Vec<u8>,
    /// When the upstream last confirmed this list.
    pub confirmed_at: SystemTime,
}

/// A cached referrers list, wherever it lives (for collection).
#[derive(Debug, Clone)]
pub struct ReferrersLink {
    /// The repository as clients address it (`ghcr.io/org/app`).
    pub repository: String,
    pub subject: Digest,
    pub confirmed_at: SystemTime,
}

impl ReferrersLink {
    fn key(&self) -> String {
        referrers_key(&self.repository, &self.subject)
    }
}

fn referrers_key(repository: &str, subject: &Digest) -> String {
    format!(
        "{REPOSITORIES_PREFIX}{repository}{REFERRERS}{}",
        subject.hex()
    )
}

/// A manifest a repository has cached, wherever it lives.
#[derive(Debug, Clone)]
pub struct ManifestLink {
    /// The repository as clients address it (`ghcr.io/org/app`).
    pub repository: String,
    pub digest: Digest,
}

impl ManifestLink {
    fn revision_key(&self) -> String {
        format!(
            "{REPOSITORIES_PREFIX}{}{REVISIONS}{}",
            self.repository,
            self.digest.hex()
        )
    }

    fn tags_prefix(&self) -> String {
        format!("{REPOSITORIES_PREFIX}{}{TAGS}", self.repository)
    }

    /// The referrers list cached for this manifest as a subject.
    fn referrers_key(&self) -> String {
        referrers_key(&self.repository, &self.digest)
    }
}

impl Storage {
    /// The repository's key prefix, namespaced by upstream.
    fn repo_key(&self, name: &RepoName) -> String {
        match &self.namespace {
            Some(namespace) => format!("{REPOSITORIES_PREFIX}{namespace}/{name}"),
            None => format!("{REPOSITORIES_PREFIX}{name}"),
        }
    }

    fn tag_key(&self, name: &RepoName, tag: &Tag) -> String {
        format!("{}{TAGS}{tag}", self.repo_key(name))
    }

    fn revision_key(&self, name: &RepoName, digest: &Digest) -> String {
        format!("{}{REVISIONS}{}", self.repo_key(name), digest.hex())
    }

    /// The media type of a manifest this repository has cached, if any.
    pub async fn manifest_media_type(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> io::Result<Option<String>> {
        let bytes = self.objects.read(&self.revision_key(name, digest)).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records that `name` has manifest `digest`. The manifest bytes must
    /// already be committed as a blob.
    pub async fn link_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        self.write_small(&self.revision_key(name, digest), media_type.as_bytes())
            .await?;
        self.catalog.note(&self.catalog_name(name));
        Ok(())
    }

    /// The repository as `_catalog` lists it (`ghcr.io/org/app`).
    fn catalog_name(&self, name: &RepoName) -> String {
        let key = self.repo_key(name);
        key[REPOSITORIES_PREFIX.len()..].to_owned()
    }

    pub async fn tag_link(&self, name: &RepoName, tag: &Tag) -> io::Result<Option<TagLink>> {
        let key = self.tag_key(name, tag);
        let (Some(bytes), Some(meta)) = (
            self.objects.read(&key).await?,
            self.objects.stat(&key).await?,
        ) else {
            return Ok(None);
        };
        let Ok(digest) = Digest::parse(String::from_utf8_lossy(&bytes).trim()) else {
            tracing::warn!(key, "ignoring unreadable tag link");
            return Ok(None);
        };
        Ok(Some(TagLink {
            digest,
            confirmed_at: meta.modified,
        }))
    }

    /// Points `tag` at `digest`, marking it confirmed now. The manifest must
    /// already be linked with [`Storage::link_manifest`].
    pub async fn set_tag(&self, name: &RepoName, tag: &Tag, digest: &Digest) -> io::Result<()> {
        self.write_small(&self.tag_key(name, tag), digest.to_string().as_bytes())
            .await
    }

    /// Forgets a tag the upstream says no longer exists.
    pub async fn remove_tag(&self, name: &RepoName, tag: &Tag) -> io::Result<()> {
        self.objects.delete(&self.tag_key(name, tag)).await
    }

    /// The referrers list cached for `subject`, if any; `None` too when it
    /// is larger than `limit` (no list Kura writes is).
    pub async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        limit: usize,
    ) -> io::Result<Option<StoredReferrers>> {
        let key = self.referrers_key(name, subject);
        let (Some(index), Some(meta)) = (
            self.objects.read_within(&key, limit).await?,
            self.objects.stat(&key).await?,
        ) else {
            return Ok(None);
        };
        Ok(Some(StoredReferrers {
            index,
            confirmed_at: meta.modified,
        }))
    }

    /// Stores the referrers list of `subject`, marking it confirmed now.
    pub async fn set_referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        index: &[u8],
    ) -> io::Result<()> {
        self.write_small(&self.referrers_key(name, subject), index)
            .await
    }

    fn referrers_key(&self, name: &RepoName, subject: &Digest) -> String {
        format!("{}{REFERRERS}{}", self.repo_key(name), subject.hex())
    }

    /// Every cached referrers list in every namespace.
    pub async fn list_referrers(&self) -> io::Result<Vec<ReferrersLink>> {
        let entries = self.index_entries(REFERRERS).await?;
        Ok(entries
            .into_iter()
            .map(|(repository, subject, meta)| ReferrersLink {
                repository,
                subject,
                confirmed_at: meta.modified,
            })
            .collect())
    }

    /// Every index key `repositories/<repository><marker><hex>`, in every
    /// namespace: the repository, the digest, and the key's metadata.
    async fn index_entries(&self, marker: &str) -> io::Result<Vec<(String, Digest, ObjectMeta)>> {
        let keys = self.objects.list(REPOSITORIES_PREFIX).await?;
        Ok(keys
            .into_iter()
            .filter_map(|(key, meta)| {
                let (repository, hex) =
                    key.strip_prefix(REPOSITORIES_PREFIX)?.split_once(marker)?;
                let digest = Digest::parse(&format!("sha256:{hex}")).ok()?;
                Some((repository.to_owned(), digest, meta))
            })
            .collect())
    }

    /// When a cached referrers list was last confirmed; `None` once it is
    /// gone. One stat.
    pub async fn referrers_confirmed_at(
        &self,
        link: &ReferrersLink,
    ) -> io::Result<Option<SystemTime>> {
        Ok(self.objects.stat(&link.key()).await?.map(|m| m.modified))
    }

    /// Whether the repository of a cached referrers list has its subject.
    pub async fn has_subject(&self, link: &ReferrersLink) -> io::Result<bool> {
        let revision = ManifestLink {
            repository: link.repository.clone(),
            digest: link.subject.clone(),
        }
        .revision_key();
        Ok(self.objects.stat(&revision).await?.is_some())
    }

    pub async fn remove_referrers(&self, link: &ReferrersLink) -> io::Result<()> {
        self.objects.delete(&link.key()).await
    }

    /// The manifests a repository has cached (its revision links), at most
    /// `limit` of them: a repository's own listing, never every namespace.
    pub async fn manifest_digests(&self, name: &RepoName, limit: usize) -> io::Result<Vec<Digest>> {
        let prefix = format!("{}{REVISIONS}", self.repo_key(name));
        let keys = self.objects.list(&prefix).await?;
        Ok(keys
            .into_iter()
            .filter_map(|(key, _)| {
                Digest::parse(&format!("sha256:{}", key.strip_prefix(&prefix)?)).ok()
            })
            .take(limit)
            .collect())
    }

    /// Cached tags of a repository, sorted.
    pub async fn list_tags(&self, name: &RepoName) -> io::Result<Vec<String>> {
        let prefix = format!("{}{TAGS}", self.repo_key(name));
        let mut tags: Vec<String> = self
            .objects
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// Every manifest link in every namespace.
    pub async fn list_manifest_links(&self) -> io::Result<Vec<ManifestLink>> {
        let entries = self.index_entries(REVISIONS).await?;
        Ok(entries
            .into_iter()
            .map(|(repository, digest, _)| ManifestLink { repository, digest })
            .collect())
    }

    /// Every repository with at least one cached manifest, in every
    /// namespace, as clients address them (`ghcr.io/org/app`), sorted.
    pub async fn list_repositories(&self) -> io::Result<Vec<String>> {
        let links = self.list_manifest_links().await?;
        let repositories: BTreeSet<String> =
            links.into_iter().map(|link| link.repository).collect();
        Ok(repositories.into_iter().collect())
    }

    /// A page of [`Storage::list_repositories`] counting only names
    /// `visible` accepts: from the in-memory catalog while it is fresh;
    /// with [`Age::Kept`], from the last listing however old while a new
    /// one runs in the background; else after one (shared) listing.
    pub async fn catalog_page(
        &self,
        age: Age,
        n: Option<usize>,
        last: Option<&str>,
        visible: impl Fn(&str) -> bool,
    ) -> io::Result<Page> {
        if let Some(page) = self.catalog.kept_page(Age::Fresh, n, last, &visible) {
            return Ok(page);
        }
        if age == Age::Kept
            && let Some(page) = self.catalog.kept_page(Age::Kept, n, last, &visible)
        {
            self.relist_catalog_behind();
            return Ok(page);
        }
        let listing = self.relist_catalog().await?;
        Ok(catalog::page(&listing, n, last, visible))
    }

    /// Lists every repository into the catalog in the background (at
    /// startup, so the first `_catalog` or dashboard page finds the names
    /// in memory; and while the dashboard is served older ones). No task
    /// is spawned while a listing is under way: one per stale request
    /// would only wait for it.
    pub fn relist_catalog_behind(&self) {
        if self.catalog.listing() {
            return;
        }
        let storage = self.clone();
        tokio::spawn(async move {
            if let Err(e) = storage.relist_catalog().await {
                tracing::warn!(error = %e, "cannot list repositories");
            }
        });
    }

    async fn relist_catalog(&self) -> io::Result<catalog::Names> {
        let storage = self.clone();
        self.catalog
            .relist(async move {
                let links = storage.list_manifest_links().await;
                links
                    .map(|links| links.into_iter().map(|link| link.repository).collect())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(io::Error::other)
    }

    /// Tags of a link's repository that point at the link's manifest.
    pub async fn tags_of(&self, link: &ManifestLink) -> io::Result<Vec<String>> {
        let prefix = link.tags_prefix();
        let target = link.digest.to_string();
        let mut tags = Vec::new();
        for (key, _) in self.objects.list(&prefix).await? {
            let points_here = self
                .objects
                .read(&key)
                .await?
                .is_some_and(|b| String::from_utf8_lossy(&b).trim() == target);
            if points_here && let Some(tag) = key.strip_prefix(&prefix) {
                tags.push(tag.to_owned());
            }
        }
        tags.sort();
        Ok(tags)
    }

    /// Removes a manifest link, the tags pointing at it (tags first, so a
    /// tag never points at a missing link) and the referrers list cached
    /// for it as a subject.
    pub async fn remove_manifest_link(&self, link: &ManifestLink) -> io::Result<()> {
        for tag in self.tags_of(link).await? {
            self.objects
                .delete(&format!("{}{tag}", link.tags_prefix()))
                .await?;
        }
        self.objects.delete(&link.referrers_key()).await?;
        self.objects.delete(&link.revision_key()).await?;
        self.catalog.invalidate();
        Ok(())
    }
}
