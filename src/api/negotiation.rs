//! `Accept` negotiation for manifests, after Distribution 2.8
//! (`registry/handlers/manifests.go`), which clients of a registry expect:
//!
//! - a client whose `Accept` names no manifest media type (no header, `*/*`,
//!   `application/json`) gets the manifest as stored. Distribution would
//!   take it for a schema-1 client and rewrite; Kura never rewrites a
//!   manifest, and curl and older tooling expect the stored bytes;
//! - a stored type the client accepts is served as stored;
//! - an index or manifest list it does not accept, asked for by tag, is
//!   answered with the list's first `linux/amd64` manifest (by digest,
//!   through the cache), else 404 `MANIFEST_UNKNOWN`. Distribution does
//!   this for Docker lists and answers 404 for OCI indexes; Kura treats
//!   both alike, and the chosen manifest must itself be acceptable;
//! - by digest, nothing is substituted (the bytes must match the digest):
//!   a Docker list is served as stored, as Distribution does;
//! - an OCI manifest or index the client does not accept is 404
//!   `MANIFEST_UNKNOWN`, by tag and by digest, as Distribution answers;
//! - anything else (Docker schema 2 to a client without it) is served as
//!   stored, where Distribution would rewrite it as schema 1.

use axum::http::{HeaderMap, header};

use super::error::{ApiError, ErrorCode};
use crate::cache::Manifest;
use crate::reference::Digest;
use crate::upstream::MANIFEST_ACCEPT;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The platform served to a client that cannot read a list.
const DEFAULT_OS: &str = "linux";
const DEFAULT_ARCHITECTURE: &str = "amd64";

/// The manifest media types a request's `Accept` headers name.
pub struct Accepted {
    types: Vec<String>,
}

impl Accepted {
    /// Every `Accept` header, split on `,`, parameters (`q` too) dropped,
    /// keeping only the manifest types Kura knows.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let types = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|item| item.split(';').next().unwrap_or("").trim())
            .filter(|item| is_manifest_type(item))
            .map(str::to_owned)
            .collect();
        Self { types }
    }

    fn takes(&self, media_type: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| t == media_type)
    }
}

fn is_manifest_type(media_type: &str) -> bool {
    MANIFEST_ACCEPT
        .split(',')
        .any(|known| known.trim() == media_type)
}

/// What to answer with.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    AsStored,
    /// This manifest of the list, in its place.
    PlatformManifest(Digest),
}

/// `by_tag`: whether the client named a tag (only then may another
/// manifest be served in the list's place).
pub fn choose(accepted: &Accepted, manifest: &Manifest, by_tag: bool) -> Result<Choice, ApiError> {
    let media_type = manifest.media_type.as_str();
    if accepted.takes(media_type) {
        return Ok(Choice::AsStored);
    }
    let is_list = media_type == OCI_INDEX || media_type == DOCKER_LIST;
    match media_type {
        _ if is_list && by_tag => default_platform(&manifest.bytes)
            .map(Choice::PlatformManifest)
            .ok_or_else(|| {
                not_acceptable(
                    "manifest list without a linux/amd64 manifest, and the accept header does not support manifest lists",
                )
            }),
        DOCKER_LIST => Ok(Choice::AsStored),
        OCI_INDEX => Err(not_acceptable(
            "OCI index found, but accept header does not support OCI indexes",
        )),
        OCI_MANIFEST => Err(not_acceptable(
            "OCI manifest found, but accept header does not support OCI manifests",
        )),
        _ => Ok(Choice::AsStored),
    }
}

/// Whether the manifest chosen from a list may be served as it is.
pub fn check_chosen(accepted: &Accepted, chosen: &Manifest) -> Result<(), ApiError> {
    choose(accepted, chosen, false).map(|_| ())
}

fn not_acceptable(message: &str) -> ApiError {
    ApiError::new(ErrorCode::ManifestUnknown, message)
}

/// The digest of the list's first `linux/amd64` entry (any variant), as
/// Distribution picks it.
fn default_platform(list: &[u8]) -> Option<Digest> {
    #[derive(serde::Deserialize)]
    struct List {
        #[serde(default)]
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Platform {
        os: String,
        architecture: String,
    }
    let list: List = serde_json::from_slice(list).ok()?;
    list.manifests
        .into_iter()
        .find(|entry| {
            entry
                .platform
                .as_ref()
                .is_some_and(|p| p.os == DEFAULT_OS && p.architecture == DEFAULT_ARCHITECTURE)
        })
        .and_then(|entry| Digest::parse(&entry.digest).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

    fn accepting(values: &[&str]) -> Accepted {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        }
        Accepted::from_headers(&headers)
    }

    fn digest(n: u8) -> Digest {
        Digest::of_bytes(&[n])
    }

    fn manifest(media_type: &str, bytes: serde_json::Value) -> Manifest {
        Manifest {
            digest: digest(0),
            media_type: media_type.to_owned(),
            bytes: bytes.to_string().into(),
            stale: false,
            cache_hit: true,
        }
    }

    fn list(media_type: &str, platforms: &[(&str, &str, u8)]) -> Manifest {
        let entries: Vec<_> = platforms
            .iter()
            .map(|(os, arch, n)| {
                serde_json::json!({"digest": digest(*n).to_string(), "platform": {"os": os, "architecture": arch}})
            })
            .collect();
        manifest(media_type, serde_json::json!({ "manifests": entries }))
    }

    fn code(result: Result<Choice, ApiError>) -> ErrorCode {
        result.unwrap_err().code
    }

    #[test]
    fn no_manifest_type_named_means_as_stored() {
        let index = list(OCI_INDEX, &[("linux", "arm64", 1)]);
        for accept in [vec![], vec!["*/*"], vec!["application/json, text/plain"]] {
            assert_eq!(
                choose(&accepting(&accept), &index, true).unwrap(),
                Choice::AsStored,
                "{accept:?}"
            );
        }
    }

    #[test]
    fn a_list_not_accepted_by_tag_is_answered_with_linux_amd64() {
        let schema2_only = accepting(&[&format!("{DOCKER_MANIFEST}; q=0.9")]);
        let platforms = [
            ("linux", "arm64", 1),
            ("windows", "amd64", 2),
            ("linux", "amd64", 3),
        ];
        for media_type in [DOCKER_LIST, OCI_INDEX] {
            assert_eq!(
                choose(&schema2_only, &list(media_type, &platforms), true).unwrap(),
                Choice::PlatformManifest(digest(3))
            );
            let no_amd64 = list(media_type, &platforms[..2]);
            assert_eq!(
                code(choose(&schema2_only, &no_amd64, true)),
                ErrorCode::ManifestUnknown
            );
        }
        // Accepted lists, and lists asked for by digest, are never replaced.
        let both = accepting(&[DOCKER_MANIFEST, DOCKER_LIST]);
        let docker_list = list(DOCKER_LIST, &platforms);
        assert_eq!(choose(&both, &docker_list, true).unwrap(), Choice::AsStored);
        assert_eq!(
            choose(&schema2_only, &docker_list, false).unwrap(),
            Choice::AsStored
        );
        assert_eq!(
            code(choose(&schema2_only, &list(OCI_INDEX, &platforms), false)),
            ErrorCode::ManifestUnknown
        );
    }

    #[test]
    fn oci_manifests_need_their_type_and_others_pass_as_stored() {
        let docker_only = accepting(&[DOCKER_MANIFEST, DOCKER_LIST]);
        let oci = manifest(OCI_MANIFEST, serde_json::json!({}));
        assert_eq!(
            check_chosen(&docker_only, &oci).unwrap_err().code,
            ErrorCode::ManifestUnknown
        );
        assert!(check_chosen(&accepting(&[OCI_MANIFEST]), &oci).is_ok());
        let schema2 = manifest(DOCKER_MANIFEST, serde_json::json!({}));
        assert!(check_chosen(&accepting(&[OCI_MANIFEST]), &schema2).is_ok());
    }
}
