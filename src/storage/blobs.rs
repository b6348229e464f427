//! Content-addressed blobs: staged while downloading, hashed on the fly,
//! committed by rename only when the digest matches.

use std::io;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};
use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;

use super::{Storage, rename_into_place};
use crate::reference::Digest;

/// Why a staged blob was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("content digest {actual} does not match the expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Storage {
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs_dir().join(&hex[..2]).join(hex)
    }

    /// Opens a committed blob for reading, with its size.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)).await {
            Ok(file) => {
                let size = file.metadata().await?.len();
                Ok(Some((file, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn blob_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn read_blob(&self, digest: &Digest) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.blob_path(digest)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores bytes already in memory (manifests) after checking their digest.
    pub async fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<(), CommitError> {
        let actual = Digest::of_bytes(bytes);
        if &actual != digest {
            return Err(CommitError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        self.write_atomic(&self.blob_path(digest), bytes).await?;
        Ok(())
    }

    /// Starts a download: a new file in staging that hashes what is written.
    pub async fn stage_blob(&self) -> io::Result<StagedBlob> {
        let path = self.new_staging_path();
        let file = File::create(&path).await?;
        Ok(StagedBlob {
            storage: self.clone(),
            path,
            file,
            hasher: Sha256::new(),
            written: 0,
        })
    }
}

/// A blob being downloaded into staging. Dropping it without
/// [`StagedBlob::commit`] leaves a staging file that [`StagedBlob::discard`]
/// or the next startup removes; it can never be served as a committed blob.
pub struct StagedBlob {
    storage: Storage,
    path: PathBuf,
    file: File,
    hasher: Sha256,
    written: u64,
}

impl StagedBlob {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk; when this returns, the bytes are readable by other
    /// handles on the staging file.
    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk).await?;
        self.file.flush().await?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Verifies the digest and renames the file into content-addressed
    /// storage. On mismatch the staging file is removed.
    pub async fn commit(mut self, expected: &Digest) -> Result<(), CommitError> {
        self.file.flush().await?;
        let actual = Digest::from_sha256(self.hasher.finalize_reset().as_slice());
        if &actual != expected {
            self.discard().await;
            return Err(CommitError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let dest = self.storage.blob_path(expected);
        rename_into_place(&self.path, &dest).await?;
        Ok(())
    }

    pub async fn discard(self) {
        let _ = fs::remove_file(&self.path).await;
    }
}
