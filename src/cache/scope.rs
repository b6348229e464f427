//! What a repository is known to hold, for blob scoping (see
//! [`crate::auth::blob_scope`]): a cached manifest of it that refers to the
//! blob, or the upstream's word for the blob.

use std::sync::Arc;

use super::{Cache, storage_error};
use crate::api::error::{ApiError, ErrorCode};
use crate::gc::References;
use crate::reference::{Digest, MAX_MANIFEST_BYTES, RepoName};
use crate::storage::blobs::Budgeted;

/// The most cached manifests of one repository read per request: a pull
/// links a handful (an index and its platforms); past this bound the
/// upstream is asked instead.
pub const MAX_SCANNED_MANIFESTS: usize = 64;
/// The most manifest bytes read per request, all manifests together.
pub const MAX_SCANNED_BYTES: usize = 16 << 20;

impl Cache {
    /// The first manifest cached for `name` that is `digest` or refers to
    /// it, as every digest it refers to (and itself): what a client pulling
    /// that image asks for next. Reads at most [`MAX_SCANNED_MANIFESTS`]
    /// manifests and [`MAX_SCANNED_BYTES`], one at a time.
    pub async fn manifest_holding(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Vec<Digest>>, ApiError> {
        self.admit(name, None)?;
        let manifests = self
            .storage
            .manifest_digests(name, MAX_SCANNED_MANIFESTS)
            .await
            .map_err(storage_error)?;
        let mut budget = MAX_SCANNED_BYTES;
        for manifest in manifests {
            if budget == 0 {
                break;
            }
            let read = self
                .storage
                .read_blob_budgeted(&manifest, MAX_MANIFEST_BYTES, &mut budget)
                .await
                .map_err(storage_error)?;
            let Budgeted::Read(bytes) = read else {
                continue;
            };
            // Not its `subject`: an artifact naming a digest learnt
            // elsewhere as its subject must not open that blob here.
            let mut held = References::of(&bytes).held;
            held.push(manifest);
            if held.contains(digest) {
                return Ok(Some(held));
            }
        }
        Ok(None)
    }

    /// Whether the upstream says `name` has the blob (one shared `HEAD`);
    /// a failure other than "unknown" is the client's error too.
    pub async fn upstream_has_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<bool, ApiError> {
        // The content policy first: a refused repository is not asked about.
        self.admit(name, None)?;
        match self.upstream_blob_size(name, digest).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.code, ErrorCode::BlobUnknown | ErrorCode::NameUnknown) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
