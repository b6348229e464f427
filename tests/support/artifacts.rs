//! OCI 1.1 artifacts attached to an image (signatures, SBOMs), pushed the way oras and cosign do
//! against a registry without the referrers API: each artifact manifest by digest, then the
//! referrers tag schema's index under the tag `sha256-<hex of the subject digest>`.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde_json::{Value, json};

use super::images::{Blob, OCI_INDEX, OCI_MANIFEST, PushedImage, sha256_digest};
use super::registry_client::RegistryClient;

/// The OCI empty descriptor's media type (an artifact's config when it has none).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// An artifact manifest that was pushed by digest.
#[derive(Clone, Debug)]
pub struct PushedArtifact {
    pub repository: String,
    pub digest: String,
    pub size: u64,
    pub artifact_type: String,
    pub annotations: Value,
    pub config: Blob,
    pub payload: Blob,
}

impl PushedArtifact {
    /// Its descriptor, as a referrers list carries it.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": self.size,
            "artifactType": self.artifact_type,
            "annotations": self.annotations,
        })
    }

    /// Config and payload digests.
    pub fn blob_digests(&self) -> BTreeSet<String> {
        [self.config.digest.clone(), self.payload.digest.clone()].into()
    }
}

fn descriptor(blob: &Blob) -> Value {
    json!({ "mediaType": blob.media_type, "digest": blob.digest, "size": blob.size })
}

/// Pushes, by digest, an artifact of `artifact_type` whose one blob is `payload`, with `subject`
/// as its subject.
pub async fn push_artifact(
    client: &RegistryClient,
    subject: &PushedImage,
    artifact_type: &str,
    payload: &[u8],
    annotations: Value,
) -> PushedArtifact {
    let repo = &subject.repository;
    let config_bytes = Bytes::from_static(b"{}");
    let config = Blob {
        digest: client.push_blob(repo, config_bytes).await,
        size: 2,
        media_type: OCI_EMPTY.to_owned(),
    };
    let payload = Blob {
        digest: client
            .push_blob(repo, Bytes::copy_from_slice(payload))
            .await,
        size: payload.len() as u64,
        media_type: artifact_type.to_owned(),
    };
    let subject_descriptor = json!({
        "mediaType": subject.media_type, "digest": subject.digest, "size": subject.size,
    });
    let manifest = Bytes::from(
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor(&config),
            "layers": [descriptor(&payload)],
            "subject": subject_descriptor,
            "annotations": annotations,
        })
        .to_string(),
    );
    let digest = sha256_digest(&manifest);
    client
        .push_manifest(repo, &digest, OCI_MANIFEST, manifest.clone())
        .await;
    PushedArtifact {
        repository: repo.clone(),
        digest,
        size: manifest.len() as u64,
        artifact_type: artifact_type.to_owned(),
        annotations,
        config,
        payload,
    }
}

/// The referrers tag of a subject digest: `sha256-<hex>`.
pub fn referrers_tag(subject_digest: &str) -> String {
    subject_digest.replacen(':', "-", 1)
}

/// Pushes the referrers tag schema's index of `subject` listing `artifacts`; returns its digest.
pub async fn push_referrers_tag(
    client: &RegistryClient,
    subject: &PushedImage,
    artifacts: &[&PushedArtifact],
) -> String {
    let manifests: Vec<Value> = artifacts.iter().map(|a| a.descriptor()).collect();
    let index = Bytes::from(
        json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }).to_string(),
    );
    let tag = referrers_tag(&subject.digest);
    client
        .push_manifest(&subject.repository, &tag, OCI_INDEX, index)
        .await
}
