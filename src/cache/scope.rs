//! What a repository is known to hold, for blob scoping (see
//! [`crate::auth::blob_scope`]): the digests its cached manifests refer
//! to, or the upstream's word for one blob.

use std::sync::Arc;

use super::{Cache, storage_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::gc::References;
use crate::reference::{Digest, MAX_MANIFEST_BYTES, RepoName};

/// The most cached manifests of one repository read per request: a pull
/// links a handful (an index and its platforms); past this bound the
/// upstream is asked instead.
pub const MAX_SCANNED_MANIFESTS: usize = 64;

impl Cache {
    /// The manifests cached for `name` and every digest they refer to
    /// (config, layers, index children, subject), reading at most
    /// [`MAX_SCANNED_MANIFESTS`] manifests of at most `MAX_MANIFEST_BYTES`.
    pub async fn referenced_in(&self, name: &RepoName) -> Result<Vec<Digest>, ApiError> {
        let manifests = self
            .storage
            .manifest_digests(name, MAX_SCANNED_MANIFESTS)
            .await
            .map_err(storage_error)?;
        let mut referenced = Vec::new();
        for manifest in manifests {
            let bytes = self
                .storage
                .read_blob_within(&manifest, MAX_MANIFEST_BYTES)
                .await
                .map_err(storage_error)?;
            if let Some(bytes) = bytes {
                referenced.extend(References::of(&bytes).all);
            }
            referenced.push(manifest);
        }
        Ok(referenced)
    }

    /// Whether the upstream says `name` has the blob (one shared `HEAD`);
    /// a failure other than "unknown" is the client's error too.
    pub async fn upstream_has_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<bool, ApiError> {
        match self.upstream_blob_size(name, digest).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.code, ErrorCode::BlobUnknown | ErrorCode::NameUnknown) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
