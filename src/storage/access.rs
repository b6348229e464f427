//! Access recency, cheap to track: a request only updates an in-memory
//! map; a periodic flush writes the times out, never one write per
//! request. On disk they become blob mtimes; on S3 each node rewrites one
//! small object (`_kura/access/<node>`) with the times it has seen, and
//! eviction merges every node's object, then prunes: a node forgets blobs
//! no longer stored, and the objects of nodes that went away are deleted
//! once they hold nothing eviction still needs.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::objects::Objects;
use crate::reference::Digest;

const ACCESS_PREFIX: &str = "_kura/access/";

#[derive(Debug, Default)]
pub struct AccessTracker {
    recent: Mutex<HashMap<Digest, SystemTime>>,
    /// S3: everything this node has flushed, rewritten as one object.
    flushed: tokio::sync::Mutex<HashMap<Digest, SystemTime>>,
    /// The node name of this process's record, when not the host name: a
    /// cluster replica's id, as replicas may share a host name (several
    /// on one machine), and two writers of one record would each
    /// overwrite the other's accesses.
    node: std::sync::OnceLock<String>,
}

impl AccessTracker {
    /// Names this process's record `node` instead of the host name; only
    /// before the first flush (later, the first name stays).
    pub fn name_node(&self, node: &str) {
        let _ = self.node.set(node.to_owned());
    }

    /// This node's access object: named after the node (the pod name in
    /// Kubernetes), or as [`AccessTracker::name_node`] said.
    fn own_key(&self) -> String {
        match self.node.get() {
            Some(node) => format!("{ACCESS_PREFIX}{node}"),
            None => {
                let host = rustix::system::uname();
                format!("{ACCESS_PREFIX}{}", host.nodename().to_string_lossy())
            }
        }
    }

    pub fn record(&self, digest: &Digest) {
        let now = SystemTime::now();
        self.recent
            .lock()
            .expect("access lock")
            .insert(digest.clone(), now);
    }

    /// Accesses not yet flushed.
    pub fn snapshot(&self) -> HashMap<Digest, SystemTime> {
        self.recent.lock().expect("access lock").clone()
    }

    /// This node's latest use of `digest`, written out or not.
    pub async fn last_recorded(&self, digest: &Digest) -> Option<SystemTime> {
        let recent = self
            .recent
            .lock()
            .expect("access lock")
            .get(digest)
            .copied();
        let flushed = self.flushed.lock().await.get(digest).copied();
        recent.max(flushed)
    }

    /// Writes the recent accesses out. Each stays in memory until it is
    /// written, so a collection checking a blob's last use never misses one
    /// that is on its way to storage.
    pub async fn flush(&self, objects: &Objects, staging: &Path) -> io::Result<()> {
        let accesses = self.snapshot();
        if accesses.is_empty() {
            return Ok(());
        }
        if objects.is_local() {
            for (digest, time) in &accesses {
                objects.touch(&super::blobs::blob_key(digest), *time).await;
            }
        } else {
            let mut flushed = self.flushed.lock().await;
            flushed.extend(accesses.iter().map(|(d, t)| (d.clone(), *t)));
            let encoded: HashMap<String, u64> = flushed
                .iter()
                .map(|(digest, time)| (digest.to_string(), seconds(*time)))
                .collect();
            let body = serde_json::to_vec(&encoded).map_err(io::Error::other)?;
            objects.write(&self.own_key(), body, staging).await?;
        }
        self.forget(&accesses);
        Ok(())
    }

    /// Drops accesses now written out, unless the blob was used again since.
    fn forget(&self, written: &HashMap<Digest, SystemTime>) {
        self.recent
            .lock()
            .expect("access lock")
            .retain(|digest, time| written.get(digest) != Some(time));
    }

    /// Keeps the records small (S3): this node forgets blobs that are no
    /// longer stored, and another node's object last written before
    /// `stale_before` is deleted (a replaced pod leaves one behind; a live
    /// node that uses a blob again writes its object anew).
    pub async fn prune(
        &self,
        objects: &Objects,
        is_stored: impl Fn(&Digest) -> bool,
        stale_before: SystemTime,
    ) -> io::Result<()> {
        if objects.is_local() {
            return Ok(());
        }
        self.flushed
            .lock()
            .await
            .retain(|digest, _| is_stored(digest));
        let own = self.own_key();
        for (key, meta) in objects.list(ACCESS_PREFIX).await? {
            if key != own && meta.modified < stale_before {
                objects.delete(&key).await?;
            }
        }
        Ok(())
    }

    /// Every node's flushed access times (S3); nothing on disk, where the
    /// mtimes already carry them.
    pub async fn load(&self, objects: &Objects) -> io::Result<HashMap<Digest, SystemTime>> {
        let mut times = HashMap::new();
        if objects.is_local() {
            return Ok(times);
        }
        for (key, _) in objects.list(ACCESS_PREFIX).await? {
            let Some(body) = objects.read(&key).await? else {
                continue;
            };
            let Ok(entries) = serde_json::from_slice::<HashMap<String, u64>>(&body) else {
                continue;
            };
            for (digest, secs) in entries {
                if let Ok(digest) = Digest::parse(&digest) {
                    let time = UNIX_EPOCH + Duration::from_secs(secs);
                    let entry = times.entry(digest).or_insert(time);
                    *entry = (*entry).max(time);
                }
            }
        }
        Ok(times)
    }
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
