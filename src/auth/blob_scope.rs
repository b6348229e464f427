//! Blob scoping, with access rules: blobs are content-addressed and shared
//! by every repository in storage, so a client allowed to pull repository
//! B could otherwise read a blob of repository A just by knowing its
//! digest. A blob is served under `<repo>` only when `<repo>` holds it:
//! one of its cached manifests refers to it, or the upstream confirms it
//! (a `HEAD` of the blob in `<repo>`, shared with blob HEADs). Otherwise
//! 404 `BLOB_UNKNOWN`, as a registry answers for a blob not in the
//! repository.
//!
//! Confirmations are remembered in a bounded set ([`MAX_CONFIRMATIONS`]
//! pairs of repository and digest, least recently used forgotten first);
//! a manifest found to hold a blob has its other blobs remembered with it
//! (at most [`MAX_REMEMBERED_PER_IMAGE`]), so the rest of a pull costs
//! one lookup per blob.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::api::error::{ApiError, ErrorCode};
use crate::cache::Cache;
use crate::reference::{Digest, RepoName};

/// Repository and digest pairs remembered as confirmed: about 5 MiB at
/// most with long names, far more than the blobs of the images in use.
pub const MAX_CONFIRMATIONS: usize = 16_384;

/// Digests of one image remembered when a blob of it is confirmed: its
/// config and layers, not a giant artifact's every blob.
const MAX_REMEMBERED_PER_IMAGE: usize = 256;

/// `<registry>/<repository>` and a digest it holds.
type Confirmation = (String, Digest);

#[derive(Default)]
pub struct BlobScope {
    confirmed: Mutex<Recent>,
}

impl BlobScope {
    /// `Ok` when `digest` may be served under `name` (`rule_name` being
    /// its `<registry>/<repository>`), else 404 `BLOB_UNKNOWN`.
    pub async fn check(
        &self,
        cache: &Arc<Cache>,
        rule_name: &str,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let key = (rule_name.to_owned(), digest.clone());
        if self.recent().touch(&key) {
            return Ok(());
        }
        if let Some(image) = cache.manifest_holding(name, digest).await? {
            // The rest of the image is asked for next: remember it too.
            let mut recent = self.recent();
            for digest in image.into_iter().take(MAX_REMEMBERED_PER_IMAGE) {
                recent.insert((rule_name.to_owned(), digest));
            }
            recent.insert(key);
            return Ok(());
        }
        if cache.upstream_has_blob(name, digest).await? {
            self.recent().insert(key);
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::BlobUnknown,
            "blob unknown to registry",
        ))
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.confirmed.lock().expect("blob scope lock")
    }
}

/// An approximately least-recently-used set in two generations: entries
/// go into `current`; when it holds half the bound, it becomes `previous`
/// (the old `previous` is dropped). A hit in `previous` moves back into
/// `current`. At most [`MAX_CONFIRMATIONS`] entries in all, O(1) each.
#[derive(Default)]
struct Recent {
    current: HashSet<Confirmation>,
    previous: HashSet<Confirmation>,
}

impl Recent {
    fn touch(&mut self, key: &Confirmation) -> bool {
        if self.current.contains(key) {
            return true;
        }
        match self.previous.take(key) {
            Some(key) => {
                self.insert(key);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: Confirmation) {
        if self.current.len() >= MAX_CONFIRMATIONS / 2 && !self.current.contains(&key) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Confirmation {
        (format!("r/{i}"), Digest::of_bytes(&i.to_le_bytes()))
    }

    #[test]
    fn confirmations_stay_bounded_and_keep_what_is_used() {
        let mut recent = Recent::default();
        recent.insert(key(0));
        for i in 1..MAX_CONFIRMATIONS * 3 {
            recent.insert(key(i));
            assert!(recent.touch(&key(0)), "kept while used ({i})");
            assert!(recent.len() <= MAX_CONFIRMATIONS);
        }
        assert!(!recent.touch(&key(1)), "unused entries go");
        assert!(recent.touch(&key(MAX_CONFIRMATIONS * 3 - 1)));
    }
}
