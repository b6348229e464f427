//! Content-addressed blobs: staged while downloading, hashed on the fly,
//! committed by rename only when the digest matches.

use std::io;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};
use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;

use super::{Storage, rename_into_place};
use crate::reference::Digest;

/// A committed blob as eviction and the tools see it.
#[derive(Debug, Clone)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size: u64,
    /// Last served (flushed access time) or, if never served, committed.
    pub last_used: std::time::SystemTime,
}

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

    /// Every committed blob with its size and last use (mtime).
    pub async fn list_blobs(&self) -> io::Result<Vec<BlobEntry>> {
        let dir = self.blobs_dir();
        tokio::task::spawn_blocking(move || {
            let mut entries = Vec::new();
            for prefix in std::fs::read_dir(&dir)? {
                for blob in std::fs::read_dir(prefix?.path())? {
                    let blob = blob?;
                    let name = blob.file_name();
                    let Some(digest) = name
                        .to_str()
                        .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                    else {
                        continue;
                    };
                    let meta = blob.metadata()?;
                    entries.push(BlobEntry {
                        digest,
                        size: meta.len(),
                        last_used: meta.modified()?,
                    });
                }
            }
            Ok(entries)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Re-hashes a stored blob: whether its content still matches its name.
    pub async fn verify_blob(&self, digest: &Digest) -> io::Result<bool> {
        let path = self.blob_path(digest);
        let expected = digest.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = std::fs::File::open(path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Ok(Digest::from_sha256(hasher.finalize().as_slice()) == expected)
        })
        .await
        .map_err(io::Error::other)?
    }

    pub async fn delete_blob(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.blob_path(digest)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
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
