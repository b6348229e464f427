//! The per-repository index: which manifests a repository has (with their
//! media type) and which digest each tag last resolved to.

use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use tokio::fs;

use super::Storage;
use crate::reference::{Digest, RepoName, Tag};

/// A tag's cached resolution.
#[derive(Debug, Clone)]
pub struct TagLink {
    pub digest: Digest,
    /// When the upstream last confirmed this mapping.
    pub confirmed_at: SystemTime,
}

impl Storage {
    fn repo_dir(&self, name: &RepoName) -> PathBuf {
        let mut dir = self.repositories_dir();
        if let Some(namespace) = &self.namespace {
            dir.push(namespace);
        }
        dir.join(name.as_str())
    }

    fn tags_dir(&self, name: &RepoName) -> PathBuf {
        self.repo_dir(name).join("_manifests").join("tags")
    }

    fn revision_path(&self, name: &RepoName, digest: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_manifests")
            .join("revisions")
            .join("sha256")
            .join(digest.hex())
    }

    /// The media type of a manifest this repository has cached, if any.
    pub async fn manifest_media_type(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> io::Result<Option<String>> {
        read_optional(self.revision_path(name, digest)).await
    }

    /// Records that `name` has manifest `digest`. The manifest bytes must
    /// already be committed as a blob.
    pub async fn link_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        self.write_atomic(&self.revision_path(name, digest), media_type.as_bytes())
            .await
    }

    pub async fn tag_link(&self, name: &RepoName, tag: &Tag) -> io::Result<Option<TagLink>> {
        let path = self.tags_dir(name).join(tag.as_str());
        let Some(text) = read_optional(&path).await? else {
            return Ok(None);
        };
        let Ok(digest) = Digest::parse(text.trim()) else {
            tracing::warn!(path = %path.display(), "ignoring unreadable tag link");
            return Ok(None);
        };
        let confirmed_at = fs::metadata(&path).await?.modified()?;
        Ok(Some(TagLink {
            digest,
            confirmed_at,
        }))
    }

    /// Points `tag` at `digest`, marking it confirmed now. The manifest must
    /// already be linked with [`Storage::link_manifest`].
    pub async fn set_tag(&self, name: &RepoName, tag: &Tag, digest: &Digest) -> io::Result<()> {
        let path = self.tags_dir(name).join(tag.as_str());
        self.write_atomic(&path, digest.to_string().as_bytes())
            .await
    }

    /// Forgets a tag the upstream says no longer exists.
    pub async fn remove_tag(&self, name: &RepoName, tag: &Tag) -> io::Result<()> {
        remove_if_present(self.tags_dir(name).join(tag.as_str())).await
    }

    /// Cached tags of a repository, sorted.
    pub async fn list_tags(&self, name: &RepoName) -> io::Result<Vec<String>> {
        let mut tags = list_dir_names(self.tags_dir(name)).await?;
        tags.sort();
        Ok(tags)
    }

    /// Every repository with at least one cached manifest, in every
    /// namespace, as clients address them (`ghcr.io/org/app`), sorted.
    pub async fn list_repositories(&self) -> io::Result<Vec<String>> {
        let mut repos = Vec::new();
        let mut pending = vec![(self.repositories_dir(), String::new())];
        while let Some((dir, prefix)) = pending.pop() {
            for child in list_dir_names(&dir).await? {
                if child == "_manifests" {
                    // A repository whose manifests were all evicted is no
                    // longer cached.
                    let revisions = dir.join("_manifests").join("revisions").join("sha256");
                    if !list_dir_names(&revisions).await?.is_empty() {
                        repos.push(prefix.clone());
                    }
                } else {
                    let name = if prefix.is_empty() {
                        child.clone()
                    } else {
                        format!("{prefix}/{child}")
                    };
                    pending.push((dir.join(&child), name));
                }
            }
        }
        repos.sort();
        Ok(repos)
    }
}

/// A manifest a repository has cached, wherever it lives.
#[derive(Debug, Clone)]
pub struct ManifestLink {
    /// The repository as clients address it (`ghcr.io/org/app`).
    pub repository: String,
    pub digest: Digest,
    repo_dir: PathBuf,
}

impl Storage {
    /// Every manifest link in every namespace.
    pub async fn list_manifest_links(&self) -> io::Result<Vec<ManifestLink>> {
        let mut links = Vec::new();
        for repository in self.list_repositories().await? {
            let repo_dir = self.repositories_dir().join(&repository);
            let revisions = repo_dir.join("_manifests").join("revisions").join("sha256");
            for hex in list_dir_names(&revisions).await? {
                if let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) {
                    links.push(ManifestLink {
                        repository: repository.clone(),
                        digest,
                        repo_dir: repo_dir.clone(),
                    });
                }
            }
        }
        Ok(links)
    }

    /// Tags of a link's repository that point at the link's manifest.
    pub async fn tags_of(&self, link: &ManifestLink) -> io::Result<Vec<String>> {
        let tags_dir = link.repo_dir.join("_manifests").join("tags");
        let mut tags = Vec::new();
        for tag in list_dir_names(&tags_dir).await? {
            let target = read_optional(tags_dir.join(&tag)).await?;
            if target.is_some_and(|t| t.trim() == link.digest.to_string()) {
                tags.push(tag);
            }
        }
        tags.sort();
        Ok(tags)
    }

    /// Removes a manifest link and the tags pointing at it (tags first, so
    /// a tag never points at a missing link).
    pub async fn remove_manifest_link(&self, link: &ManifestLink) -> io::Result<()> {
        let tags_dir = link.repo_dir.join("_manifests").join("tags");
        for tag in self.tags_of(link).await? {
            remove_if_present(tags_dir.join(tag)).await?;
        }
        let revision = link
            .repo_dir
            .join("_manifests")
            .join("revisions")
            .join("sha256")
            .join(link.digest.hex());
        remove_if_present(revision).await
    }
}

async fn remove_if_present(path: PathBuf) -> io::Result<()> {
    match fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn read_optional(path: impl AsRef<std::path::Path>) -> io::Result<Option<String>> {
    match fs::read_to_string(path).await {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

async fn list_dir_names(dir: impl AsRef<std::path::Path>) -> io::Result<Vec<String>> {
    let mut entries = match fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    while let Some(entry) = entries.next_entry().await? {
        names.extend(entry.file_name().to_str().map(str::to_owned));
    }
    Ok(names)
}
